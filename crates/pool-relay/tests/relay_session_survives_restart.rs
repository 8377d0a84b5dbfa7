//! A real POOL session runs through the relay: the client dials its
//! carriers through a relay CONNECT (a `pool_net::Dialer`), the server's
//! side is a small agent that registers, ACCEPTs and pipes each circuit to
//! an ordinary POOL listener. The relay is killed in the middle of a
//! 64 MiB transfer and started again on the same port: the agent
//! re-registers, the session resumes through the new relay, and every
//! byte arrives once, verified by SHA-256.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::relay::{authenticate, CircuitId, Intent, Msg, VERSION};
use pool_net::{
    BoxedCarrier, DialFuture, Dialer, Endpoint, EndpointConfig, PublicKey, SecretKey, Trust,
};
use pool_relay::{RelayConfig, RelayServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn key(n: u8) -> SecretKey {
    let mut b = [n; 32];
    b[1] = n.wrapping_mul(41);
    SecretKey::from_bytes(b)
}

fn other(m: impl Into<String>) -> io::Error {
    io::Error::other(m.into())
}

/// HELLO, CHALLENGE, AUTH, then WELCOME: the stream, ready for raw bytes.
async fn relay_open(
    relay: SocketAddr,
    key: &SecretKey,
    intent: Intent,
) -> io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(relay).await?;
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    Msg::Hello { version: VERSION }.encode(&mut out);
    s.write_all(&out).await?;
    let Msg::Challenge { ephemeral, nonce } = next(&mut s, &mut buf).await? else {
        return Err(other("expected CHALLENGE"));
    };
    out.clear();
    authenticate(key, &ephemeral, &nonce, intent)
        .ok_or_else(|| other("bad challenge"))?
        .encode(&mut out);
    s.write_all(&out).await?;
    match next(&mut s, &mut buf).await? {
        Msg::Welcome { .. } => Ok((s, buf)),
        Msg::Error { message, .. } => Err(other(message)),
        m => Err(other(format!("unexpected {m:?}"))),
    }
}

async fn next(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Msg> {
    loop {
        if let Some((m, used)) = Msg::decode(buf).map_err(|e| other(e.to_string()))? {
            buf.drain(..used);
            return Ok(m);
        }
        let mut tmp = [0u8; 1024];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Dials carriers to `peer` through the relay.
struct RelayDialer {
    relay: SocketAddr,
    key: SecretKey,
    peer: PublicKey,
}

impl Dialer for RelayDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let (s, leftover) = relay_open(self.relay, &self.key, Intent::Connect(self.peer))
                .await
                .map_err(|source| pool_net::Error::Connect {
                    addr: self.describe(),
                    source,
                })?;
            assert!(leftover.is_empty(), "the listener spoke first");
            Ok(Box::new(s) as BoxedCarrier)
        })
    }

    fn describe(&self) -> String {
        format!("relay {}", self.relay)
    }
}

/// The server's agent: stays registered (again after the relay restarts)
/// and pipes every circuit offered to it into the POOL listener.
async fn agent(relay: SocketAddr, key: SecretKey, listener: SocketAddr, regs: Arc<AtomicU64>) {
    loop {
        let Ok((mut ctl, mut buf)) = relay_open(relay, &key, Intent::Register).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        regs.fetch_add(1, Ordering::Relaxed);
        while let Ok(m) = next(&mut ctl, &mut buf).await {
            if let Msg::Incoming { circuit, .. } = m {
                tokio::spawn(pipe(relay, key.clone(), circuit, listener));
            }
        }
    }
}

async fn pipe(relay: SocketAddr, key: SecretKey, circuit: CircuitId, listener: SocketAddr) {
    let Ok((mut from_relay, leftover)) = relay_open(relay, &key, Intent::Accept(circuit)).await
    else {
        return;
    };
    let Ok(mut to_listener) = TcpStream::connect(listener).await else {
        return;
    };
    let _ = to_listener.set_nodelay(true);
    if to_listener.write_all(&leftover).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut from_relay, &mut to_listener).await;
}

fn pattern(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = (x ^ (x >> 11) ^ (x >> 23)) as u8;
    }
}

const TOTAL: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_through_relay_survives_relay_restart() {
    let (ka, kb) = (key(1), key(2));
    let relay = RelayServer::bind(RelayConfig::new("127.0.0.1:0"))
        .await
        .unwrap()
        .spawn();
    let relay_addr = relay.local_addr();

    let server = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(kb.clone()).trust(Trust::new().allow(ka.public_key())),
    )
    .await
    .unwrap();
    let regs = Arc::new(AtomicU64::new(0));
    let agent_task = tokio::spawn(agent(
        relay_addr,
        kb.clone(),
        server.local_addr().unwrap(),
        regs.clone(),
    ));
    while regs.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let client = Endpoint::client(EndpointConfig::new(ka.clone()));
    let dialer = Arc::new(RelayDialer {
        relay: relay_addr,
        key: ka.clone(),
        peer: kb.public_key(),
    });
    let (c, s) = tokio::join!(
        client.connect_with(dialer, kb.public_key()),
        server.accept()
    );
    let (c, s) = (c.expect("session through the relay"), s.expect("accept"));

    let received = Arc::new(AtomicU64::new(0));
    let got = received.clone();
    let reader = tokio::spawn(async move {
        let mut st = s.accept_stream().await.expect("accept_stream");
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = st.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            got.fetch_add(n as u64, Ordering::Relaxed);
        }
        (s, ctx.finish().as_ref().to_vec())
    });
    let mut st = c.open_stream().await.unwrap();
    let writer = tokio::spawn(async move {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < TOTAL {
            let k = ((TOTAL - off) as usize).min(buf.len());
            pattern(off, &mut buf[..k]);
            st.write_all(&buf[..k]).await.expect("write");
            ctx.update(&buf[..k]);
            off += k as u64;
        }
        st.shutdown().await.expect("shutdown");
        ctx.finish().as_ref().to_vec()
    });

    // Kill the relay a quarter of the way in; start it again 300 ms later.
    let t0 = Instant::now();
    while received.load(Ordering::Relaxed) < TOTAL / 4 {
        assert!(t0.elapsed() < Duration::from_secs(30), "transfer stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    relay.shutdown().await;
    let at_kill = received.load(Ordering::Relaxed);
    assert!(at_kill < TOTAL, "the relay should die mid-transfer");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = RelayServer::bind(RelayConfig::new(relay_addr.to_string()))
        .await
        .expect("the same port again")
        .spawn();

    let sent = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer done within 60 s")
        .unwrap();
    let (s, got) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("reader done within 60 s")
        .unwrap();
    assert_eq!(received.load(Ordering::Relaxed), TOTAL);
    assert_eq!(got, sent, "bytes altered, lost or duplicated");
    assert!(c.stats().core.resumes >= 1, "the session never resumed");
    assert!(
        regs.load(Ordering::Relaxed) >= 2,
        "the agent never re-registered"
    );
    assert!(relay.stats().circuits_total >= 1);
    eprintln!(
        "64 MiB through the relay, killed at {at_kill} bytes; resumed {} time(s) in {:?}",
        c.stats().core.resumes,
        t0.elapsed()
    );
    drop(s);
    agent_task.abort();
    relay.shutdown().await;
}
