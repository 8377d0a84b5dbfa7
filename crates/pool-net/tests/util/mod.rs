//! Shared helpers for runtime tests on real loopback sockets.
#![allow(dead_code, unreachable_pub, missing_docs)]

use pool_net::{Endpoint, EndpointConfig, PublicKey, SecretKey, Session, Trust};
use ring::digest::{Context, SHA256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub fn key(n: u8) -> SecretKey {
    let mut b = [n; 32];
    b[1] = n.wrapping_mul(37);
    SecretKey::from_bytes(b)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A listener (key 2) trusting key 1, and a client endpoint (key 1).
pub async fn pair_on(addr: &str) -> (Endpoint, Endpoint, PublicKey) {
    let server = Endpoint::bind(
        addr,
        EndpointConfig::new(key(2)).trust(Trust::new().allow(key(1).public_key())),
    )
    .await
    .expect("bind");
    let client = Endpoint::client(EndpointConfig::new(key(1)));
    let pk = server.public_key();
    (server, client, pk)
}

pub async fn connect(server: &Endpoint, client: &Endpoint, addr: &str) -> (Session, Session) {
    let (c, s) = tokio::join!(client.connect(addr, server.public_key()), server.accept());
    (c.expect("connect"), s.expect("accept"))
}

/// Deterministic bytes for stream `i` at offset `off`.
pub fn pattern(i: u64, off: u64, buf: &mut [u8]) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = (off + j as u64)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(i)
            .to_le_bytes()[3];
    }
}

/// Writes `n` pattern bytes, then FIN; returns the SHA-256.
pub async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, i: u64, n: u64) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < n {
        let k = ((n - off) as usize).min(buf.len());
        pattern(i, off, &mut buf[..k]);
        w.write_all(&buf[..k]).await.expect("write");
        ctx.update(&buf[..k]);
        off += k as u64;
    }
    w.shutdown().await.expect("shutdown");
    ctx.finish().as_ref().try_into().unwrap()
}

/// Reads to EOF; returns (bytes, SHA-256).
pub async fn recv_all<R: AsyncRead + Unpin>(r: &mut R) -> (u64, [u8; 32]) {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        total += n as u64;
    }
    (total, ctx.finish().as_ref().try_into().unwrap())
}
