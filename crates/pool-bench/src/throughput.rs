//! `pool-bench throughput`: one stream over loopback through pool-net.

use std::time::Instant;

use pool_net::CipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Opts, Result};

const BUF: usize = 256 << 10;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--bytes", "--cipher"])?;
    let bytes = common::parse_bytes(o.get("--bytes").unwrap_or("1G"))?;
    let cipher = match o.get("--cipher") {
        None => None,
        Some("chacha" | "chacha20" | "chacha20-poly1305") => Some(CipherSuite::ChaCha20Poly1305),
        Some("aes" | "aes-gcm" | "aes-256-gcm") => Some(CipherSuite::Aes256Gcm),
        Some(c) => return Err(format!("--cipher: chacha or aes, not {c}").into()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(bytes, cipher))
}

async fn bench(bytes: u64, cipher: Option<CipherSuite>) -> Result<()> {
    let server = common::listener(common::protocol(cipher), 1).await?;
    let addr = common::addr_of(&server)?;
    let client_ep = common::client(common::protocol(cipher), 0);
    let client = client_ep.connect(&addr, server.public_key()).await?;
    let srv = server.accept().await.ok_or("listener closed")?;
    let mut out = client.open_stream().await?;
    let negotiated = client.stats().core.cipher;

    let cpu0 = common::process_cpu()?;
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut st = srv.accept_stream().await.ok_or("no stream arrived")?;
        let mut buf = vec![0u8; BUF];
        let mut n = 0u64;
        loop {
            let k = st.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok::<_, common::Error>((n, Instant::now(), srv))
    });
    let data = vec![0x3cu8; BUF];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(BUF as u64) as usize;
        out.write_all(&data[..k]).await?;
        left -= k as u64;
    }
    out.shutdown().await?;
    let (got, done, _srv) = receiver.await??;
    let secs = (done - start).as_secs_f64();
    let cpu = (common::process_cpu()? - cpu0).as_secs_f64();
    if got != bytes {
        return Err(format!("throughput: sent {bytes} bytes, received {got}").into());
    }
    let gbit = bytes as f64 * 8.0 / secs / 1e9;
    let name = match cipher {
        Some(CipherSuite::ChaCha20Poly1305) => "chacha",
        Some(_) => "aes",
        None => "default",
    };
    println!(
        "throughput: one stream, loopback, pool-net directly (listener + client in one process, \
         multi-thread runtime): {bytes} bytes in {secs:.3} s = {gbit:.2} Gbit/s, cipher {negotiated}, \
         process CPU {:.2} cores",
        cpu / secs
    );
    common::result_with(
        &format!("throughput_{name}_gbit_s"),
        gbit,
        "Gbit/s",
        &format!("cipher={negotiated}"),
    );
    Ok(())
}
