//! `pool-bench resume`: the data stall when the client's carrier is
//! dropped and the session resumes on a new one, with every chunk checked.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::common::{self, ms, Opts, Result};

const CHUNK: usize = 64;
const END: u64 = u64::MAX;
/// Chunks arriving this soon after a drop belong to its round.
const WINDOW: Duration = Duration::from_millis(60);

struct Round {
    drop_at: Instant,
    /// When the client saw the resume complete (stats().core.resumes grew).
    up_at: Option<Instant>,
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--rounds", "--interval-ms", "--spacing-ms"])?;
    let rounds: usize = o.num("--rounds", 20)?;
    let interval = Duration::from_micros(o.num::<u64>("--interval-ms", 1)? * 1000);
    let spacing = Duration::from_millis(o.num("--spacing-ms", 100)?);
    if spacing < WINDOW + Duration::from_millis(10) {
        return Err(format!("--spacing-ms must be at least {} ms", ms(WINDOW) + 10.0).into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(rounds, interval, spacing))
}

async fn bench(rounds: usize, interval: Duration, spacing: Duration) -> Result<()> {
    let server = common::listener(common::protocol(None), 1).await?;
    let addr = common::addr_of(&server)?;
    let client_ep = common::client(common::protocol(None), 0);
    let client = client_ep.connect(&addr, server.public_key()).await?;
    let srv_session = server.accept().await.ok_or("listener closed")?;
    let mut out = client.open_stream().await?;
    let base = Instant::now();

    // Receiver (listener side): every chunk's arrival time and sequence.
    let receiver = tokio::spawn(async move {
        let mut st = srv_session
            .accept_stream()
            .await
            .ok_or("no stream arrived")?;
        let mut got: Vec<(Instant, u64, u64)> = Vec::with_capacity(1 << 16);
        let mut buf = [0u8; CHUNK];
        loop {
            st.read_exact(&mut buf).await?;
            let now = Instant::now();
            let seq = u64::from_le_bytes(buf[..8].try_into()?);
            let sent = u64::from_le_bytes(buf[8..16].try_into()?);
            if seq == END {
                break;
            }
            got.push((now, seq, sent));
        }
        let dups = srv_session.stats().core.duplicates_dropped;
        Ok::<_, common::Error>((got, dups, srv_session))
    });

    // Sender (client side): one chunk per tick, sequence + send time.
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        let mut seq = 0u64;
        let mut chunk = [0xa5u8; CHUNK];
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    chunk[..8].copy_from_slice(&seq.to_le_bytes());
                    let sent = base.elapsed().as_nanos() as u64;
                    chunk[8..16].copy_from_slice(&sent.to_le_bytes());
                    out.write_all(&chunk).await?;
                    seq += 1;
                }
                _ = &mut stop_rx => break,
            }
        }
        chunk[..8].copy_from_slice(&END.to_le_bytes());
        out.write_all(&chunk).await?;
        out.shutdown().await?;
        Ok::<_, common::Error>((seq, out))
    });

    // Controller: drop the client's carrier every `spacing`.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let sockets_before = common::socket_count();
    let mut log = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let prev = client.stats().core.resumes;
        let watcher = client.clone();
        let drop_at = Instant::now();
        client.drop_carrier();
        // Watch for the resume on a plain thread (tokio timers are 1 ms).
        let up_at = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if watcher.stats().core.resumes > prev {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            None
        })
        .await?;
        log.push(Round { drop_at, up_at });
        tokio::time::sleep_until((drop_at + spacing).into()).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sockets_after = common::socket_count();
    let _ = stop_tx.send(());
    let (sent, _out) = sender.await??;
    let (got, dups, _srv) = tokio::time::timeout(Duration::from_secs(10), receiver)
        .await
        .map_err(|_| "receiver did not finish within 10 s")???;
    let cstats = client.stats().core;

    // Exactly once, in order.
    let mut bad = 0usize;
    for (i, (_, seq, _)) in got.iter().enumerate() {
        if *seq != i as u64 {
            bad += 1;
        }
    }
    let exact = bad == 0 && got.len() as u64 == sent;

    // Per round: the largest gap between consecutive arrivals in the
    // window after the drop; drop -> carrier up; and when the first chunk
    // written after the drop (it must travel on the new carrier) arrived.
    let mut stalls = Vec::new();
    let mut ups = Vec::new();
    let mut first_new = Vec::new();
    let mut up_to_data = Vec::new();
    let mut worst_delay = Vec::new();
    let mut failed_resumes = 0;
    for r in &log {
        let end = r.drop_at + WINDOW;
        let mut gap = Duration::ZERO;
        let mut delay = Duration::ZERO;
        for w in got.windows(2) {
            let (a, b) = (w[0].0, w[1].0);
            if b >= r.drop_at && b < end {
                gap = gap.max(b - a);
            }
            if b >= r.drop_at && b < end {
                let sent_at = base + Duration::from_nanos(w[1].2);
                delay = delay.max(b.saturating_duration_since(sent_at));
            }
        }
        stalls.push(ms(gap));
        worst_delay.push(ms(delay));
        let drop_ns = (r.drop_at - base).as_nanos() as u64;
        let first = got.iter().find(|(_, _, s)| *s >= drop_ns).map(|g| g.0);
        if let Some(f) = first {
            first_new.push(ms(f - r.drop_at));
        }
        match r.up_at {
            Some(u) => {
                ups.push(ms(u - r.drop_at));
                if let Some(f) = first {
                    up_to_data.push(ms(f.saturating_duration_since(u)));
                }
            }
            None => failed_resumes += 1,
        }
    }
    // Baseline: gaps away from any drop (timer and scheduling jitter).
    let mut base_gap = Duration::ZERO;
    let first_drop = log.first().map(|r| r.drop_at);
    for w in got.windows(2) {
        let b = w[1].0;
        let near = log.iter().any(|r| b >= r.drop_at && b < r.drop_at + WINDOW);
        if !near && first_drop.is_some_and(|d| b + Duration::from_millis(100) > d) {
            base_gap = base_gap.max(b - w[0].0);
        }
    }

    let (stall_med, stall_max) = common::median_max(&mut stalls);
    let (up_med, up_max) = common::median_max(&mut ups);
    let (first_med, first_max) = common::median_max(&mut first_new);
    let (u2d_med, u2d_max) = common::median_max(&mut up_to_data);
    let (_, delay_max) = common::median_max(&mut worst_delay);
    println!(
        "resume: {rounds} carrier drops (client side, Session::drop_carrier, new carrier dialled at once), \
         one stream writing {CHUNK} B every {:.1} ms: largest gap between chunks at the receiver \
         median {stall_med:.2} ms, max {stall_max:.2} ms (baseline max gap away from drops {:.2} ms)",
        ms(interval),
        ms(base_gap)
    );
    println!(
        "  drop -> carrier resumed (client sees it): median {up_med:.2} ms, max {up_max:.2} ms; \
         carrier up -> first chunk written after the drop arrives: median {u2d_med:.2} ms, max {u2d_max:.2} ms; \
         drop -> that chunk: median {first_med:.2} ms, max {first_max:.2} ms; worst chunk delay {delay_max:.2} ms"
    );
    println!(
        "  {} chunks sent, {} received, {} out of place: {}; resumes {} (failed {failed_resumes}), \
         frames resent {}, duplicates dropped at the receiver {dups}; \
         client process sockets {sockets_before} before the drops, {sockets_after} after",
        sent,
        got.len(),
        bad,
        if exact {
            "every sequence number exactly once, in order"
        } else {
            "LOSS OR DUPLICATION"
        },
        cstats.resumes,
        cstats.frames_resent,
    );
    if sockets_after > sockets_before + 2 {
        println!(
            "  note: {} more sockets are open after {rounds} resumes than before: old carriers are not closed",
            sockets_after - sockets_before
        );
    }
    common::result("resume_up_to_data_ms_median", u2d_med, "ms");
    common::result("resume_up_to_data_ms_max", u2d_max, "ms");
    common::result("resume_exactly_once", if exact { 1.0 } else { 0.0 }, "bool");
    common::result("resume_stall_ms_max", stall_max, "ms");
    common::result("resume_stall_ms_median", stall_med, "ms");
    if !exact || failed_resumes > 0 {
        return Err("resume: chunks lost, duplicated or a resume failed".into());
    }
    Ok(())
}
