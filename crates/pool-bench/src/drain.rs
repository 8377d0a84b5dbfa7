//! `pool-bench drain`: how long draining a worker takes. The source holds
//! `--idle` idle sessions and `--busy` busy ones (each with a stream its app
//! writes a 1 KiB chunk to every millisecond); every session is handed to
//! the target, `--parallel` at a time, as `pool ctl drain` does. Reports the
//! time until the source holds no session, sessions per second, the longest
//! freeze, and checks every busy stream's chunks by index (0 lost, 0
//! repeated) after the drain.

use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, HandoffOptions, TaggedLink, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{ms, Opts, Result};
use crate::handoff::{key, serve_target};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--idle", "--busy", "--parallel"])?;
    let idle: usize = o.num("--idle", 1000)?;
    let busy: usize = o.num("--busy", 100)?;
    let parallel: usize = o.num("--parallel", 32)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(idle, busy, parallel))
}

async fn bench(idle: usize, busy: usize, parallel: usize) -> Result<()> {
    let ck = key(1);
    let source = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(key(2)).trust(Trust::new().allow(ck.public_key())),
    )
    .await?;
    let target = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(key(3)).trust(
            Trust::new()
                .allow(ck.public_key())
                .allow(key(2).public_key()),
        ),
    )
    .await?;
    serve_target(target.clone());
    let client = Endpoint::client(EndpointConfig::new(ck));
    let (saddr, taddr) = (
        source.local_addr().ok_or("no address")?.to_string(),
        target.local_addr().ok_or("no address")?,
    );
    let mut clients = Vec::with_capacity(idle + busy);
    let mut servers = Vec::with_capacity(idle + busy);
    let mut readers = Vec::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Accepted sessions arrive in order on their own task (a failed connect
    // must not leave an accept waiting forever).
    let (acc_tx, mut acc_rx) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = source.clone();
    tokio::spawn(async move {
        while let Some(s) = acceptor.accept().await {
            if acc_tx.send(s).is_err() {
                return;
            }
        }
    });
    for i in 0..idle + busy {
        let mut tries = 0u32;
        let c = loop {
            match client.connect(&saddr, key(2).public_key()).await {
                Ok(c) => break c,
                // The listener rate-limits handshakes per source address,
                // and every session here comes from 127.0.0.1.
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let s = tokio::time::timeout(Duration::from_secs(5), acc_rx.recv())
            .await
            .map_err(|_| "the source did not accept")?
            .ok_or("no session")?;
        if i >= idle {
            let mut up = c.open_stream().await?;
            up.write_all(&[0]).await?;
            let mut down = s.accept_stream().await.ok_or("no stream")?;
            let mut tag = [0u8; 1];
            down.read_exact(&mut tag).await?;
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let mut n = 0u64;
                let mut chunk = vec![0u8; 1024];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    chunk[..8].copy_from_slice(&n.to_be_bytes());
                    if down.write_all(&chunk).await.is_err() {
                        return;
                    }
                    n += 1;
                }
                let _ = down.shutdown().await;
            });
            readers.push(tokio::spawn(async move {
                let mut chunk = vec![0u8; 1024];
                let mut want = 0u64;
                while up.read_exact(&mut chunk).await.is_ok() {
                    let got = u64::from_be_bytes(chunk[..8].try_into().unwrap_or([0; 8]));
                    if got != want {
                        return Err(format!("chunk {got} where {want} was due"));
                    }
                    want += 1;
                }
                Ok(want)
            }));
        }
        clients.push(c);
        servers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let link = std::sync::Arc::new(TaggedLink(
        source
            .connect(&taddr.to_string(), key(3).public_key())
            .await?,
    ));
    let before = source.session_count();
    let started = Instant::now();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for s in servers {
        let (link, permits) = (link.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _p = permits.acquire_owned().await;
            s.handoff_to(
                link.as_ref(),
                key(3).public_key(),
                vec![taddr],
                HandoffOptions::default(),
            )
            .await
            .map(|r| r.frozen)
        }));
    }
    let mut worst = Duration::ZERO;
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok(f) => worst = worst.max(f),
            Err(e) => {
                failed += 1;
                eprintln!("handoff failed: {e}");
            }
        }
    }
    // The worker link is a session the target accepted, not the source.
    while source.session_count() > 0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut chunks = 0;
    for r in readers {
        chunks += r.await??;
    }
    println!(
        "drain: {before} sessions ({idle} idle, {busy} busy), {parallel} at a time: {:.2} s until the source held none ({:.0} sessions/s), {failed} failed",
        took.as_secs_f64(),
        before as f64 / took.as_secs_f64()
    );
    println!(
        "  longest freeze {:.2} ms; {chunks} chunks of the busy streams checked: 0 lost, 0 repeated",
        ms(worst)
    );
    drop(clients);
    if failed > 0 {
        return Err(format!("{failed} handoffs failed").into());
    }
    Ok(())
}
