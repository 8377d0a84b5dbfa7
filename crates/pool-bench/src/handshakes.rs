//! `pool-bench handshakes`: new sessions per second a listener accepts on
//! one core, and the pure responder cost of the core handshake.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::{Acceptor, Initiator};
use pool_net::Endpoint;
use tokio::sync::oneshot;

use crate::common::{self, Opts, Result};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(
        args,
        &[
            "--seconds",
            "--parallel",
            "--core-seconds",
            "--client-threads",
        ],
    )?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let client_threads: usize = o.num("--client-threads", cores.saturating_sub(1).max(1))?;
    let seconds: f64 = o.num("--seconds", 5.0)?;
    let parallel: usize = o.num("--parallel", 16)?;
    let core_seconds: f64 = o.num("--core-seconds", 1.5)?;
    if parallel == 0 || seconds <= 0.0 {
        return Err("--parallel and --seconds must be positive".into());
    }

    // The listener: its own OS thread, a current_thread runtime, so every
    // handshake, accept and session task it runs shares one core.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(Endpoint, u32)>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let listener_thread = std::thread::Builder::new()
        .name("listener".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let ep = match common::listener(common::protocol(None), parallel).await {
                    Ok(ep) => ep,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let tid = match common::current_tid() {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((ep.clone(), tid)));
                // The application: take every session and drop it.
                let drain = async {
                    while let Some(s) = ep.accept().await {
                        drop(s);
                    }
                };
                tokio::select! {
                    _ = drain => {}
                    _ = stop_rx => {}
                }
            });
        })?;
    let (server, listener_tid) = ready_rx.recv()??;
    let addr = common::addr_of(&server)?;
    let server_pk = server.public_key();

    // The clients: another runtime (by default one thread per remaining
    // core; on a 2-core machine, a current_thread runtime on this thread).
    let rt = if client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(client_threads)
            .enable_all()
            .build()?
    };
    let warmup = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(seconds);
    let stats = server.listener_stats();
    let (accepted, listener_cpu, wall, client_ok, client_err) = rt.block_on(async {
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let err = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let until = Instant::now() + warmup + measure + Duration::from_millis(100);
        let mut tasks = Vec::new();
        for i in 0..parallel {
            let ep = common::client(common::protocol(None), i);
            let addr = addr.clone();
            let (ok, err) = (ok.clone(), err.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match ep.connect(&addr, server_pk).await {
                        Ok(s) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            drop(s);
                        }
                        Err(e) => {
                            if err.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("client {i}: connect failed: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(warmup).await;
        let a0 = stats.accepted.load(Ordering::Relaxed);
        let c0 = common::thread_cpu(listener_tid)?;
        let ok0 = ok.load(Ordering::Relaxed);
        let err0 = err.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(measure).await;
        let a1 = stats.accepted.load(Ordering::Relaxed);
        let c1 = common::thread_cpu(listener_tid)?;
        let wall = t0.elapsed();
        let ok1 = ok.load(Ordering::Relaxed);
        let err1 = err.load(Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        // Let the last sessions close on both sides before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, common::Error>((a1 - a0, c1 - c0, wall, ok1 - ok0, err1 - err0))
    })?;
    // Every session was dropped by both sides: none should be left.
    let live = server.session_count();
    let rss = common::rss_kib()?;
    let _ = stop_tx.send(());
    let refused = stats.refused.load(Ordering::Relaxed);
    let dropped = stats.dropped.load(Ordering::Relaxed);
    drop(server);
    let _ = listener_thread.join();

    let rate = accepted as f64 / wall.as_secs_f64();
    let cpu_share = listener_cpu.as_secs_f64() / wall.as_secs_f64();
    let per_core_s = if listener_cpu.is_zero() {
        f64::NAN
    } else {
        accepted as f64 / listener_cpu.as_secs_f64()
    };
    println!(
        "handshakes: listener on ONE core (current_thread runtime on its own OS thread), \
         per-source handshake rate limit OFF (Config::handshake_rate(None)); \
         {parallel} client tasks on {client_threads} other thread(s) ({cores} cores here), \
         each connect -> drop in a loop"
    );
    println!(
        "  accepted {accepted} sessions in {:.2} s = {rate:.0} sessions/s; listener thread busy {:.0}% \
         -> {per_core_s:.0} sessions per listener CPU-second; clients saw {client_ok} ok / {client_err} failed; \
         refused {refused}, dropped {dropped} (whole run); afterwards {live} sessions left in the \
         listener's registry, process RSS {rss} KiB",
        wall.as_secs_f64(),
        cpu_share * 100.0
    );
    if cpu_share < 0.9 {
        println!(
            "  note: the listener core was not saturated ({:.0}% busy): the clients (whose \
             handshake costs as much as the listener's) are the limit here; sessions per \
             listener CPU-second is the one-core capacity",
            cpu_share * 100.0
        );
    }

    // The pure core figure: responder side only, one thread, no I/O.
    let (n, responder, both) = core_handshakes(Duration::from_secs_f64(core_seconds))?;
    let core_rate = n as f64 / responder.as_secs_f64();
    println!(
        "  core (pool_core, one thread, no I/O): Acceptor::accept {:.1} us each = {core_rate:.0} handshakes/s \
         (responder only); whole handshake, both sides: {:.1} us",
        responder.as_secs_f64() * 1e6 / n as f64,
        both.as_secs_f64() * 1e6 / n as f64
    );
    common::result("handshakes_listener_cpu_share", cpu_share * 100.0, "%");
    common::result("handshakes_per_listener_cpu_s", per_core_s, "sessions/s");
    common::result("handshakes_core_responder_per_s", core_rate, "handshakes/s");
    common::result("handshakes_accepted_per_s", rate, "sessions/s");
    Ok(())
}

/// Runs Initiator::start, Acceptor::accept and Initiator::finish in a loop
/// for about `budget`; returns (count, time inside accept, total time).
fn core_handshakes(budget: Duration) -> Result<(u64, Duration, Duration)> {
    let cfg = common::protocol(None);
    let server = common::server_key();
    let server_pk = server.public_key();
    let client = common::client_key(0);
    let mut acceptor = Acceptor::new(&cfg, server, None);
    let mut rng = rand_core::OsRng;
    let base = common::unix_nanos();
    let mut responder = Duration::ZERO;
    let start = Instant::now();
    let mut n = 0u64;
    let mut hello = Vec::with_capacity(512);
    let mut welcome = Vec::with_capacity(512);
    while n < 200 || start.elapsed() < budget {
        // Strictly increasing timestamps per key (the replay check).
        let ts = base + n * 1_000;
        hello.clear();
        welcome.clear();
        let init = Initiator::start(&cfg, &client, server_pk, None, ts, &mut rng, &mut hello)?;
        let t = Instant::now();
        let session = acceptor.accept(
            Instant::now(),
            ts,
            b"bench",
            &hello,
            &mut |_| true,
            &mut rng,
            &mut welcome,
        )?;
        responder += t.elapsed();
        let peer = init.finish(Instant::now(), &welcome)?;
        if peer.id() != session.id() {
            return Err("core handshake: session ids differ".into());
        }
        n += 1;
    }
    Ok((n, responder, start.elapsed()))
}
