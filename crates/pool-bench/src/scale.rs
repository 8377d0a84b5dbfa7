//! `pool-bench scale-clients`: many mostly idle sessions against one real
//! `pool daemon` (what `scripts/bench-scale` drives), and `pool-bench
//! client-keys`, which prints the keys those clients use so that the
//! daemon can trust them (`[trust] authorized = FILE`).
//!
//! Each worker has a key of its own and connects its sessions one after
//! another (the listener's replay check wants one key's handshake
//! timestamps to increase). Each worker also dials from a loopback source
//! address of its own (`127.64.X.Y`): the daemon's per-source handshake
//! limit (200/s, burst 400) is meant for one address, and ten thousand
//! clients of a real fleet come from many.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use pool_net::{BoxedCarrier, DialFuture, Dialer, Error as NetError, Preamble, Session};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use crate::common::{self, Opts, Result};

/// What each stream writes after its preamble: a few bytes, so that the
/// stream really is open and routed at the daemon.
const HELLO: &[u8; 8] = b"scale-hi";

/// `pool-bench client-keys --first F --count N`: the public keys of client
/// keys `F..F+N`, one a line.
pub(crate) fn keys(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--first", "--count"])?;
    let first: usize = o.num("--first", 0)?;
    let count: usize = o.num("--count", 1)?;
    for i in first..first + count {
        println!("{}", common::client_key(i).public_key().to_token());
    }
    Ok(())
}

/// The loopback source address of client key `i`: distinct per key, in
/// 127.64.0.0/10 (any 127/8 address is local on Linux).
fn source_of(i: usize) -> IpAddr {
    let j = (i as u32).wrapping_add(1);
    IpAddr::V4(Ipv4Addr::new(
        127,
        64 + ((j >> 16) & 0x3f) as u8,
        (j >> 8) as u8,
        j as u8,
    ))
}

/// Dials TCP to a fixed address from a fixed source address.
struct SourceDialer {
    to: SocketAddr,
    from: IpAddr,
}

impl Dialer for SourceDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let connect = async {
                let s = match self.to {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                if self.to.is_ipv4() == self.from.is_ipv4() {
                    s.bind(SocketAddr::new(self.from, 0))?;
                }
                let s = s.connect(self.to).await?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(s)
            };
            match connect.await {
                Ok(s) => Ok(Box::new(s) as BoxedCarrier),
                Err(source) => Err(NetError::Connect {
                    addr: self.to.to_string(),
                    source,
                }),
            }
        })
    }

    fn describe(&self) -> String {
        format!("{} (from {})", self.to, self.from)
    }
}

/// `pool-bench scale-clients ADDR SERVER_KEY [--sessions N] [--streams S]
/// [--first-key K] [--workers W] [--service NAME]`.
pub(crate) fn clients(args: &[String]) -> Result<()> {
    const USAGE: &str = "usage: pool-bench scale-clients ADDR SERVER_KEY [--sessions 2500] \
                         [--streams 10] [--first-key 0] [--workers 32] [--service pool.discard]";
    let (Some(addr), Some(key)) = (args.first(), args.get(1)) else {
        return Err(USAGE.into());
    };
    let o = Opts::parse(
        &args[2..],
        &[
            "--sessions",
            "--streams",
            "--first-key",
            "--workers",
            "--service",
        ],
    )?;
    let to: SocketAddr = addr
        .parse()
        .map_err(|_| format!("ADDR must be IP:PORT, got {addr}"))?;
    let server = common::parse_key(key)?;
    let n: usize = o.num("--sessions", 2500)?;
    let streams: usize = o.num("--streams", 10)?;
    let first: usize = o.num("--first-key", 0)?;
    let workers: usize = o.num("--workers", 32)?;
    let service = o.get("--service").unwrap_or("pool.discard").to_string();
    if n == 0 || workers == 0 {
        return Err("--sessions and --workers must be positive".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(to, server, n, streams, first, workers.min(n), service))
}

async fn run(
    to: SocketAddr,
    server: pool_net::PublicKey,
    n: usize,
    streams: usize,
    first: usize,
    workers: usize,
    service: String,
) -> Result<()> {
    let rss_before = common::rss_kib()?;
    let t_start = common::unix_nanos();
    let start = Instant::now();
    // Phase 1: sessions only (what the daemon's accept path does).
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let k = first + w;
        let ep = common::client(common::protocol(None), k);
        let dialer = std::sync::Arc::new(SourceDialer {
            to,
            from: source_of(k),
        });
        let count = (n - w).div_ceil(workers);
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let s = ep.connect_with(dialer.clone(), server).await?;
                held.push(s);
            }
            Ok::<_, common::Error>((ep, held))
        }));
    }
    let mut endpoints = Vec::with_capacity(workers);
    let mut sessions: Vec<Session> = Vec::with_capacity(n);
    for t in tasks {
        let (ep, held) = t.await??;
        endpoints.push(ep);
        sessions.extend(held);
    }
    let t_sessions = common::unix_nanos();
    let connected = start.elapsed();

    // Phase 2: S streams per session, each naming the service and
    // writing a few bytes.
    let mut head = Preamble::for_service(&service).encode();
    head.extend_from_slice(HELLO);
    let head = std::sync::Arc::new(head);
    let mut tasks = Vec::with_capacity(workers);
    let per = sessions.len().div_ceil(workers);
    let mut rest = sessions;
    while !rest.is_empty() {
        let chunk: Vec<Session> = rest.drain(..per.min(rest.len())).collect();
        let head = head.clone();
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(chunk.len() * streams);
            for s in &chunk {
                for _ in 0..streams {
                    let mut st = s.open_stream().await?;
                    st.write_all(&head).await?;
                    held.push(st);
                }
            }
            Ok::<_, common::Error>((chunk, held))
        }));
    }
    let mut held = Vec::with_capacity(tasks.len());
    for t in tasks {
        held.push(t.await??);
    }
    let t_streams = common::unix_nanos();
    let total = start.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = common::rss_kib()?;
    let open: usize = held.iter().map(|(s, _)| s.len()).sum();
    let open_streams: usize = held.iter().map(|(_, st)| st.len()).sum();
    println!(
        "READY sessions={open} streams={open_streams} first_key={first} workers={workers} \
         t_start={:.3} t_sessions={:.3} t_streams={:.3} connect_s={:.3} streams_s={:.3} \
         connect_per_s={:.0} client_kib_per_session={:.1}",
        t_start as f64 / 1e9,
        t_sessions as f64 / 1e9,
        t_streams as f64 / 1e9,
        connected.as_secs_f64(),
        (total - connected).as_secs_f64(),
        open as f64 / connected.as_secs_f64().max(1e-9),
        rss_after.saturating_sub(rss_before) as f64 / open.max(1) as f64,
    );
    // Hold everything until stdin closes (the script or test ends us).
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    // Watch the sessions meanwhile: one that closes is a failure to hold.
    let mut rx = rx;
    loop {
        tokio::select! {
            _ = &mut rx => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let closed = held
                    .iter()
                    .flat_map(|(s, _)| s.iter())
                    .filter(|s| s.is_closed())
                    .count();
                if closed > 0 {
                    println!("LOST sessions={closed}");
                }
            }
        }
    }
    drop(held);
    drop(endpoints);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..70_000 {
            let a = source_of(i);
            assert!(a.is_loopback(), "{a}");
            assert!(seen.insert(a), "{i} -> {a} twice");
        }
    }
}
