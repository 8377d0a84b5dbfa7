//! What the relay's tests share: a relay on loopback, a small test client
//! on `pool_core::relay` (dial, authenticate, register, pair), data and
//! waiting helpers.
#![allow(dead_code, unreachable_pub, unused_imports, missing_docs)]

pub use std::net::SocketAddr;
pub use std::path::PathBuf;
pub use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use pool_core::relay::{
    authenticate, CircuitId, Intent, Msg, ERR_AUTH, ERR_CAPACITY, ERR_NOT_ALLOWED, ERR_NO_ANSWER,
    ERR_PROTOCOL, ERR_UNKNOWN_PEER, MAGIC, VERSION,
};
pub use pool_core::{PublicKey, SecretKey};
pub use pool_relay::{RelayConfig, RelayHandle, RelayServer};
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub use tokio::net::TcpStream;

/// How long a test waits for anything.
pub const T: Duration = Duration::from_secs(10);

pub fn key(n: u8) -> SecretKey {
    let mut b = [n; 32];
    b[0] = 0x40;
    b[31] = n.wrapping_mul(31);
    SecretKey::from_bytes(b)
}

pub async fn relay(cfg: RelayConfig) -> RelayHandle {
    RelayServer::bind(cfg).await.expect("bind relay").spawn()
}

pub fn local() -> RelayConfig {
    RelayConfig::new("127.0.0.1:0")
}

/// A connection to the relay, before raw splicing starts.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Conn {
    /// Next message, or `None` on EOF / reset. Fails the test after `T`.
    pub async fn next(&mut self) -> Option<Msg> {
        let deadline = Instant::now() + T;
        loop {
            if let Some((m, used)) = Msg::decode(&self.buf).expect("relay sent garbage") {
                self.buf.drain(..used);
                return Some(m);
            }
            let mut tmp = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.stream.read(&mut tmp))
                .await
                .expect("relay message within 10 s");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    pub async fn expect_welcome(&mut self) -> SocketAddr {
        match self.next().await {
            Some(Msg::Welcome { observed }) => observed,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    pub async fn expect_error(&mut self, code: u8) -> String {
        match self.next().await {
            Some(Msg::Error { code: c, message }) if c == code => message,
            other => panic!("expected ERROR {code}, got {other:?}"),
        }
    }

    pub async fn expect_incoming(&mut self) -> (CircuitId, PublicKey) {
        match self.next().await {
            Some(Msg::Incoming { circuit, from }) => (circuit, from),
            other => panic!("expected INCOMING, got {other:?}"),
        }
    }

    /// Nothing arrives (and the connection stays open) for `d`.
    pub async fn expect_quiet(&mut self, d: Duration) {
        let mut tmp = [0u8; 64];
        match tokio::time::timeout(d, self.stream.read(&mut tmp)).await {
            Err(_) => {}
            Ok(r) => panic!("expected nothing, got {r:?} ({:?})", tmp),
        }
    }

    /// The connection is closed by the relay (EOF or reset) within `d`,
    /// after at most an ERROR.
    pub async fn expect_closed(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut tmp = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut tmp)).await {
                Err(_) => panic!("connection still open after {d:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn send(&mut self, m: &Msg) {
        let mut out = Vec::new();
        m.encode(&mut out);
        self.stream.write_all(&out).await.expect("write to relay");
    }

    /// The raw stream, once WELCOME has been read (no leftover expected).
    pub fn raw(self) -> TcpStream {
        assert!(self.buf.is_empty(), "unexpected bytes before raw data");
        self.stream
    }
}

pub async fn dial(relay: SocketAddr) -> Conn {
    let stream = TcpStream::connect(relay).await.expect("connect to relay");
    stream.set_nodelay(true).unwrap();
    Conn {
        stream,
        buf: Vec::new(),
    }
}

/// HELLO, CHALLENGE, AUTH (`extra` written in the same segment as AUTH).
pub async fn auth_with(relay: SocketAddr, k: &SecretKey, intent: Intent, extra: &[u8]) -> Conn {
    let mut c = dial(relay).await;
    c.send(&Msg::Hello { version: VERSION }).await;
    let Some(Msg::Challenge { ephemeral, nonce }) = c.next().await else {
        panic!("expected CHALLENGE")
    };
    let auth = authenticate(k, &ephemeral, &nonce, intent).expect("auth");
    let mut out = Vec::new();
    auth.encode(&mut out);
    out.extend_from_slice(extra);
    c.stream.write_all(&out).await.unwrap();
    c
}

pub async fn auth(relay: SocketAddr, k: &SecretKey, intent: Intent) -> Conn {
    auth_with(relay, k, intent, &[]).await
}

pub async fn register(relay: SocketAddr, k: &SecretKey) -> Conn {
    let mut c = auth(relay, k, Intent::Register).await;
    let observed = c.expect_welcome().await;
    assert_eq!(observed, c.stream.local_addr().unwrap());
    c
}

/// A opens a circuit to B (registered on `b_ctl`); both raw streams.
pub async fn pair(
    relay: SocketAddr,
    a: &SecretKey,
    b: &SecretKey,
    b_ctl: &mut Conn,
) -> (TcpStream, TcpStream) {
    let mut ca = auth(relay, a, Intent::Connect(b.public_key())).await;
    let (circuit, from) = b_ctl.expect_incoming().await;
    assert_eq!(from, a.public_key());
    let mut cb = auth(relay, b, Intent::Accept(circuit)).await;
    let ob = cb.expect_welcome().await;
    let oa = ca.expect_welcome().await;
    assert_eq!(oa, ca.stream.local_addr().unwrap());
    assert_eq!(ob, cb.stream.local_addr().unwrap());
    (ca.raw(), cb.raw())
}

/// Deterministic pseudo-random bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

pub async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got))
        .await
        .expect("EOF within 60 s")
        .expect("read");
    got
}

pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn temp(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "pool-relay-test-{name}-{}-{nanos}",
        std::process::id()
    ))
}

/// A connection from `source` (a loopback address: 127.0.0.2, ...).
pub async fn dial_from(relay: SocketAddr, source: &str) -> Conn {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(relay).await.expect("connect to relay");
    stream.set_nodelay(true).unwrap();
    Conn {
        stream,
        buf: Vec::new(),
    }
}

pub async fn read_to_eof_half(r: &mut tokio::net::tcp::ReadHalf<'_>) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .expect("EOF within 60 s")
        .expect("read");
    got
}
