//! `pool-bench flood`: how long a real client's session takes to open while
//! a flood of bad HELLOs from many source addresses hits the listener, side
//! by side with the same client and no flood.
//!
//! The flood runs on its own OS thread (one core: "the rate one core can
//! send") from `--sources` addresses in 127.1.0.0/16. Its HELLOs are
//! genuine Noise messages from keys the listener does not trust, so each
//! costs the listener its full Diffie-Hellman work unless the listener,
//! under load, answers with a cookie first. The listener runs with the
//! product's defaults (rate limit on): the real client comes from
//! 127.0.0.1. "Open" is measured from the client's dial until the listener
//! hands out the session (after key confirmation).
//!
//! The same run then measures the floor: the same flood against the
//! cheapest server there is (plain TCP on the same one-thread runtime: read,
//! echo, no crypto, no checks), and a plain client that connects and makes
//! two HELLO-sized round trips, with and without the flood. Its ratio is
//! what the connection churn alone costs on this machine.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::{Config, Initiator, SecretKey};
use pool_net::{Endpoint, EndpointConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Opts, Result};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--opens", "--sources", "--parallel"])?;
    let opens: usize = o.num("--opens", 200)?;
    let sources: usize = o.num("--sources", 256)?;
    let parallel: usize = o.num("--parallel", 64)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cfg = EndpointConfig::new(common::server_key())
            .protocol(Config::default())
            .trust(common::trust_clients(1));
        let server = Endpoint::bind("127.0.0.1:0", cfg).await?;
        let addr = server.local_addr().ok_or("no address")?;
        let quiet = open_times(&server, addr, opens).await?;

        let (loaded, rate) =
            under_flood(addr, sources, parallel, open_times(&server, addr, opens)).await?;

        let floor = floor_times(opens, sources, parallel).await?;

        let (q50, q99) = (pct(&quiet, 0.50), pct(&quiet, 0.99));
        let (l50, l99) = (pct(&loaded, 0.50), pct(&loaded, 0.99));
        let st = server.listener_stats();
        println!("session open, no flood:   p50 {q50:.2} ms  p99 {q99:.2} ms");
        println!("session open, with flood: p50 {l50:.2} ms  p99 {l99:.2} ms");
        println!(
            "flood: {rate:.0} bad HELLOs/s from {sources} sources; listener refused {}, dropped {}, sent {} cookies",
            st.refused.load(Ordering::Relaxed),
            st.dropped.load(Ordering::Relaxed),
            st.cookies.load(Ordering::Relaxed),
        );
        println!("p99 ratio (flood / none): {:.2} (goal <= 2)", l99 / q99);
        let (fq, fl) = (pct(&floor.0, 0.99), pct(&floor.1, 0.99));
        println!(
            "floor (plain TCP echo, same flood at {:.0}/s): p99 {fq:.2} ms without, {fl:.2} ms with: ratio {:.2}",
            floor.2,
            fl / fq
        );
        println!(
            "POOL's ratio against the floor's: {:.2}",
            (l99 / q99) / (fl / fq)
        );
        common::result("open_p99_quiet", q99, "ms");
        common::result("open_p99_flood", l99, "ms");
        common::result("open_p99_ratio", l99 / q99, "x");
        common::result("flood_hellos_per_s", rate, "1/s");
        common::result("floor_open_p99_quiet", fq, "ms");
        common::result("floor_open_p99_flood", fl, "ms");
        common::result("floor_open_p99_ratio", fl / fq, "x");
        Ok::<(), common::Error>(())
    })
}

/// Opens `n` sessions one after another; the time of each, in ms.
async fn open_times(server: &Endpoint, addr: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let client = common::client(Config::default(), 0);
    let mut times = Vec::with_capacity(n);
    let target = addr.to_string();
    for _ in 0..n {
        let t0 = Instant::now();
        let (c, s) = tokio::join!(
            client.connect(&target, server.public_key()),
            server.accept()
        );
        let (_c, _s) = (c?, s.ok_or("listener closed")?);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// Runs `measure` while the flood (its own OS thread) hits `addr`, from
/// half a second after the flood starts; returns what `measure` returned
/// and the flood's rate meanwhile (HELLOs/s).
async fn under_flood<T>(
    addr: SocketAddr,
    sources: usize,
    parallel: usize,
    measure: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let server_pub = common::server_key().public_key();
        std::thread::Builder::new()
            .name("flood".into())
            .spawn(move || flood(addr, server_pub, sources, parallel, &stop, &sent))?
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (t0, s0) = (Instant::now(), sent.load(Ordering::Relaxed));
    let out = measure.await;
    let rate = (sent.load(Ordering::Relaxed) - s0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    Ok((out?, rate))
}

/// The floor: a plain TCP echo listener on this runtime; `opens` plain
/// opens (connect, then two HELLO-sized round trips) without and then with
/// the same flood. Returns both lists of times in ms and the flood's rate.
async fn floor_times(
    opens: usize,
    sources: usize,
    parallel: usize,
) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let quiet = plain_open_times(addr, opens).await?;
    let (loaded, rate) =
        under_flood(addr, sources, parallel, plain_open_times(addr, opens)).await?;
    server.abort();
    Ok((quiet, loaded, rate))
}

async fn plain_open_times(addr: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let msg = [0x5au8; 160];
    let mut buf = [0u8; 160];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        for _ in 0..2 {
            s.write_all(&msg).await?;
            s.read_exact(&mut buf).await?;
        }
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The flood: `parallel` connections at a time from `sources` addresses,
/// each sending one HELLO (from a pool made beforehand: genuine Noise from
/// untrusted keys) and reading whatever comes back until the listener
/// closes. One OS thread, one current-thread runtime.
fn flood(
    addr: SocketAddr,
    server: pool_core::PublicKey,
    sources: usize,
    parallel: usize,
    stop: &AtomicBool,
    sent: &AtomicU64,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let hellos: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..512u64)
            .filter_map(|i| {
                let mut b = [0x77u8; 32];
                b[1..9].copy_from_slice(&i.to_le_bytes());
                let mut out = Vec::new();
                Initiator::start(
                    &Config::default(),
                    &SecretKey::from_bytes(b),
                    server,
                    None,
                    common::unix_nanos(),
                    &mut rand_core::OsRng,
                    &mut out,
                )
                .ok()
                .map(|_| out)
            })
            .collect(),
    );
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..parallel {
            let hellos = hellos.clone();
            tasks.push(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    i += parallel;
                    let src = 1 + (i % sources.max(1));
                    let ip = std::net::Ipv4Addr::new(127, 1, (src >> 8) as u8, src as u8);
                    let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                        continue;
                    };
                    if sock.bind(SocketAddr::new(ip.into(), 0)).is_err() {
                        continue;
                    }
                    let Ok(Ok(mut s)) =
                        tokio::time::timeout(Duration::from_secs(1), sock.connect(addr)).await
                    else {
                        continue;
                    };
                    let h = &hellos[i % hellos.len()];
                    if s.write_all(h).await.is_err() {
                        continue;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 512];
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                }
            });
        }
        futures_join_all(tasks).await;
    });
}

/// Runs all futures to completion on the current task.
async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: Vec<F>) {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}
