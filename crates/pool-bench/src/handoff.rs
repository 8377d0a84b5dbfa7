//! `pool-bench handoff`: the stall a live handoff causes, on one machine.
//!
//! Each round opens a session from a client to a source worker, whose app
//! writes a paced stream (a 16-byte chunk, index and nothing else, every
//! `--interval-ms`) for `--round-ms`. In a handoff round the source hands
//! the session to the target halfway; the stream stays served by the
//! source's app and is forwarded through the target. In a baseline round
//! nothing happens. The stall of a handoff is the largest gap between
//! chunks at the client in the handoff round minus the largest gap of the
//! baseline round before it. Every chunk index is checked: a lost or
//! repeated chunk fails the run.
//!
//! With `--worker-rtt-ms N` the two workers stand on "different hosts" N ms
//! apart: the worker link and the client's carrier to the source go through
//! a userspace forwarder that delays each direction by N/2 ms; the client
//! stands beside the target (reaches it directly).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, HandoffOptions, SecretKey, TaggedLink, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{ms, Opts, Result};

pub(crate) fn key(n: u8) -> SecretKey {
    let mut b = [n; 32];
    b[1] = n.wrapping_mul(37);
    SecretKey::from_bytes(b)
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(
        args,
        &["--rounds", "--interval-ms", "--round-ms", "--worker-rtt-ms"],
    )?;
    let rounds: usize = o.num("--rounds", 20)?;
    let rtt = Duration::from_millis(o.num("--worker-rtt-ms", 0)?);
    let interval = Duration::from_millis(o.num("--interval-ms", 1)?);
    let round = Duration::from_millis(o.num("--round-ms", 300)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(rounds, interval, round, rtt))
}

/// A TCP forwarder on 127.0.0.1 that delays every byte by `one_way` in
/// each direction (order kept): a link between hosts `2 × one_way` apart.
pub(crate) async fn delaying_forwarder(to: SocketAddr, one_way: Duration) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(out) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = out.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = out.into_split();
                tokio::spawn(delay_pipe(ri, wo, one_way));
                tokio::spawn(delay_pipe(ro, wi, one_way));
            });
        }
    });
    Ok(addr)
}

async fn delay_pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + one_way;
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some((due, bytes)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if w.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Serves the target: handoff and forward streams by their tag byte.
pub(crate) fn serve_target(ep: Endpoint) {
    tokio::spawn(async move {
        while let Some(session) = ep.accept().await {
            let ep = ep.clone();
            tokio::spawn(async move {
                while let Some(st) = session.accept_stream().await {
                    let (ep, peer) = (ep.clone(), session.peer_key());
                    tokio::spawn(async move {
                        let _ = ep.serve_tagged(st, peer).await;
                    });
                }
            });
        }
    });
}

/// One round: returns the largest gap at the client, the freeze time of
/// the handoff (if one was made) and the chunk count.
async fn one_round(
    source: &Endpoint,
    source_addr: SocketAddr,
    client: &Endpoint,
    link: Option<(&TaggedLink, std::net::SocketAddr)>,
    interval: Duration,
    round: Duration,
) -> Result<(Duration, Option<Duration>, u64)> {
    let saddr = source_addr.to_string();
    let (c, s) = tokio::join!(client.connect(&saddr, key(2).public_key()), source.accept());
    let (c, s) = (c?, s.ok_or("no session")?);
    let mut up = c.open_stream().await?;
    up.write_all(&[0]).await?;
    let mut down = s.accept_stream().await.ok_or("no stream")?;
    let mut tag = [0u8; 1];
    down.read_exact(&mut tag).await?;
    let writer = tokio::spawn(async move {
        let start = Instant::now();
        let mut i = 0u64;
        let mut tick = tokio::time::interval(interval);
        while start.elapsed() < round {
            tick.tick().await;
            let mut chunk = [0u8; 16];
            chunk[..8].copy_from_slice(&i.to_be_bytes());
            if down.write_all(&chunk).await.is_err() {
                break;
            }
            i += 1;
        }
        let _ = down.shutdown().await;
        i
    });
    let reader = tokio::spawn(async move {
        let mut last = Instant::now();
        let mut worst = Duration::ZERO;
        let mut want = 0u64;
        let mut chunk = [0u8; 16];
        let mut first = true;
        while up.read_exact(&mut chunk).await.is_ok() {
            let now = Instant::now();
            if !first {
                worst = worst.max(now - last);
            }
            first = false;
            last = now;
            let got = u64::from_be_bytes(chunk[..8].try_into().unwrap_or([0; 8]));
            if got != want {
                return Err(format!("chunk {got} arrived where {want} was due"));
            }
            want += 1;
        }
        Ok((worst, want))
    });
    let mut frozen = None;
    if let Some((link, taddr)) = link {
        tokio::time::sleep(round / 2).await;
        let r = s
            .handoff_to(
                link,
                key(3).public_key(),
                vec![taddr],
                HandoffOptions::default(),
            )
            .await?;
        frozen = Some(r.frozen);
    }
    let sent = writer.await?;
    let (worst, got) = reader.await??;
    if got != sent {
        return Err(format!("{sent} chunks sent, {got} arrived").into());
    }
    drop(c);
    Ok((worst, frozen, got))
}

async fn bench(rounds: usize, interval: Duration, round: Duration, rtt: Duration) -> Result<()> {
    let client_key = key(1);
    let source = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(key(2)).trust(Trust::new().allow(client_key.public_key())),
    )
    .await?;
    let target = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(key(3)).trust(
            Trust::new()
                .allow(client_key.public_key())
                .allow(key(2).public_key()),
        ),
    )
    .await?;
    serve_target(target.clone());
    let client = Endpoint::client(EndpointConfig::new(client_key));
    let taddr = target.local_addr().ok_or("no address")?;
    let saddr = source.local_addr().ok_or("no address")?;
    // Across "hosts": the worker link, and the client's way to the source.
    let (link_to, client_to) = if rtt.is_zero() {
        (taddr, saddr)
    } else {
        (
            delaying_forwarder(taddr, rtt / 2).await?,
            delaying_forwarder(saddr, rtt / 2).await?,
        )
    };
    let link = TaggedLink(
        source
            .connect(&link_to.to_string(), key(3).public_key())
            .await?,
    );
    let mut stalls = Vec::with_capacity(rounds);
    let mut freezes = Vec::with_capacity(rounds);
    let mut chunks = 0;
    for _ in 0..rounds {
        let (base, _, n0) = one_round(&source, client_to, &client, None, interval, round).await?;
        let (gap, frozen, n1) = one_round(
            &source,
            client_to,
            &client,
            Some((&link, taddr)),
            interval,
            round,
        )
        .await?;
        stalls.push(gap.saturating_sub(base));
        freezes.push(frozen.unwrap_or_default());
        chunks += n0 + n1;
    }
    stalls.sort();
    freezes.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let goal = if rtt.is_zero() {
        "goal < 10 ms on one machine".to_string()
    } else {
        format!(
            "goal < 2 RTT + 10 ms = {:.0} ms; client beside the target",
            ms(rtt * 2) + 10.0
        )
    };
    println!(
        "handoff stall (largest gap minus the baseline's), {rounds} handoffs, a chunk every {} ms, {:.0} ms RTT between the workers:",
        ms(interval),
        ms(rtt)
    );
    println!(
        "  stall   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms   ({goal})",
        ms(pct(&stalls, 0.5)),
        ms(pct(&stalls, 0.99)),
        ms(stalls[stalls.len() - 1])
    );
    println!(
        "  frozen  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms   (source frozen: pull to commit)",
        ms(pct(&freezes, 0.5)),
        ms(pct(&freezes, 0.99)),
        ms(freezes[freezes.len() - 1])
    );
    println!("  {chunks} chunks checked: 0 lost, 0 repeated");
    Ok(())
}
