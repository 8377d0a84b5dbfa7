//! The relay server on real loopback sockets, driven by a small test
//! client built on `pool_core::relay`: nodes prove their key before
//! anything is forwarded, circuits carry bytes verbatim (half-close too),
//! one stalled receiver does not slow another pair, caps hold, and a
//! restarted relay serves again on the same port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pool_core::relay::{
    authenticate, CircuitId, Intent, Msg, ERR_AUTH, ERR_CAPACITY, ERR_NOT_ALLOWED, ERR_NO_ANSWER,
    ERR_PROTOCOL, ERR_UNKNOWN_PEER, MAGIC, VERSION,
};
use pool_core::{PublicKey, SecretKey};
use pool_relay::{RelayConfig, RelayHandle, RelayServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

fn key(n: u8) -> SecretKey {
    let mut b = [n; 32];
    b[0] = 0x40;
    b[31] = n.wrapping_mul(31);
    SecretKey::from_bytes(b)
}

async fn relay(cfg: RelayConfig) -> RelayHandle {
    RelayServer::bind(cfg).await.expect("bind relay").spawn()
}

fn local() -> RelayConfig {
    RelayConfig::new("127.0.0.1:0")
}

/// A connection to the relay, before raw splicing starts.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Next message, or `None` on EOF / reset. Fails the test after `T`.
    async fn next(&mut self) -> Option<Msg> {
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

    async fn expect_welcome(&mut self) -> SocketAddr {
        match self.next().await {
            Some(Msg::Welcome { observed }) => observed,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    async fn expect_error(&mut self, code: u8) -> String {
        match self.next().await {
            Some(Msg::Error { code: c, message }) if c == code => message,
            other => panic!("expected ERROR {code}, got {other:?}"),
        }
    }

    async fn expect_incoming(&mut self) -> (CircuitId, PublicKey) {
        match self.next().await {
            Some(Msg::Incoming { circuit, from }) => (circuit, from),
            other => panic!("expected INCOMING, got {other:?}"),
        }
    }

    /// Nothing arrives (and the connection stays open) for `d`.
    async fn expect_quiet(&mut self, d: Duration) {
        let mut tmp = [0u8; 64];
        match tokio::time::timeout(d, self.stream.read(&mut tmp)).await {
            Err(_) => {}
            Ok(r) => panic!("expected nothing, got {r:?} ({:?})", tmp),
        }
    }

    /// The connection is closed by the relay (EOF or reset) within `d`,
    /// after at most an ERROR.
    async fn expect_closed(&mut self, d: Duration) {
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

    async fn send(&mut self, m: &Msg) {
        let mut out = Vec::new();
        m.encode(&mut out);
        self.stream.write_all(&out).await.expect("write to relay");
    }

    /// The raw stream, once WELCOME has been read (no leftover expected).
    fn raw(self) -> TcpStream {
        assert!(self.buf.is_empty(), "unexpected bytes before raw data");
        self.stream
    }
}

async fn dial(relay: SocketAddr) -> Conn {
    let stream = TcpStream::connect(relay).await.expect("connect to relay");
    stream.set_nodelay(true).unwrap();
    Conn {
        stream,
        buf: Vec::new(),
    }
}

/// HELLO, CHALLENGE, AUTH (`extra` written in the same segment as AUTH).
async fn auth_with(relay: SocketAddr, k: &SecretKey, intent: Intent, extra: &[u8]) -> Conn {
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

async fn auth(relay: SocketAddr, k: &SecretKey, intent: Intent) -> Conn {
    auth_with(relay, k, intent, &[]).await
}

async fn register(relay: SocketAddr, k: &SecretKey) -> Conn {
    let mut c = auth(relay, k, Intent::Register).await;
    let observed = c.expect_welcome().await;
    assert_eq!(observed, c.stream.local_addr().unwrap());
    c
}

/// A opens a circuit to B (registered on `b_ctl`); both raw streams.
async fn pair(
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
fn data(seed: u64, len: usize) -> Vec<u8> {
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

fn sha(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got))
        .await
        .expect("EOF within 60 s")
        .expect("read");
    got
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn temp(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "pool-relay-test-{name}-{}-{nanos}",
        std::process::id()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_carries_bytes_verbatim_and_half_close() {
    let r = relay(local()).await;
    let (a, b) = (key(1), key(2));
    let mut b_ctl = register(r.local_addr(), &b).await;
    let (mut sa, mut sb) = pair(r.local_addr(), &a, &b, &mut b_ctl).await;

    const N: usize = 8 << 20;
    let a_data = data(1, N);
    let b_data = data(2, N);
    // A sends and half-closes; B reads to EOF while its own direction is
    // still open, then answers and half-closes.
    let (mut ar, mut aw) = sa.split();
    let (mut br, mut bw) = sb.split();
    let a_side = async {
        aw.write_all(&a_data).await.unwrap();
        aw.shutdown().await.unwrap();
        let mut got = Vec::new();
        ar.read_to_end(&mut got).await.unwrap();
        got
    };
    let b_side = async {
        let mut got = Vec::new();
        br.read_to_end(&mut got).await.unwrap();
        bw.write_all(&b_data).await.unwrap();
        bw.shutdown().await.unwrap();
        got
    };
    let (at_a, at_b) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(a_side, b_side)
    })
    .await
    .expect("transfer within 60 s");
    assert_eq!(at_b.len(), N);
    assert_eq!(sha(&at_b), sha(&a_data), "A to B altered");
    assert_eq!(at_a.len(), N);
    assert_eq!(sha(&at_a), sha(&b_data), "B to A altered");

    let s = r.stats();
    assert_eq!(s.circuits_total, 1);
    assert_eq!(s.bytes, 2 * N as u64);
    // Both directions ended, so the circuit did: A has no connection left,
    // B its control connection.
    wait_until("circuit closed", || r.stats().circuits == 0).await;
    let nodes = r.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].key, b.public_key());
    assert!(nodes[0].registered);
    assert_eq!(nodes[0].connections, 1);
    assert_eq!((nodes[0].sent, nodes[0].received), (N as u64, N as u64));
    drop((sa, sb));
    wait_until("circuit closed", || r.stats().circuits == 0).await;
    assert_eq!(r.stats().nodes, 1);
    drop(b_ctl);
    wait_until("node unregistered", || r.stats().nodes == 0).await;
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_with_auth_are_not_lost() {
    let r = relay(local()).await;
    let (a, b) = (key(3), key(4));
    let mut b_ctl = register(r.local_addr(), &b).await;
    // Both ends pipeline data behind their AUTH, before any WELCOME.
    let mut ca = auth_with(
        r.local_addr(),
        &a,
        Intent::Connect(b.public_key()),
        b"early from A",
    )
    .await;
    let (circuit, _) = b_ctl.expect_incoming().await;
    let mut cb = auth_with(r.local_addr(), &b, Intent::Accept(circuit), b"early from B").await;
    cb.expect_welcome().await;
    ca.expect_welcome().await;
    let mut got_b = cb.buf.clone();
    let mut got_a = ca.buf.clone();
    let mut tmp = [0u8; 64];
    while got_b.len() < 12 {
        let n = cb.stream.read(&mut tmp).await.unwrap();
        assert!(n > 0);
        got_b.extend_from_slice(&tmp[..n]);
    }
    while got_a.len() < 12 {
        let n = ca.stream.read(&mut tmp).await.unwrap();
        assert!(n > 0);
        got_a.extend_from_slice(&tmp[..n]);
    }
    assert_eq!(got_b, b"early from A");
    assert_eq!(got_a, b"early from B");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_proof_gets_nothing_forwarded() {
    let path = temp("authfail");
    let r = relay(local().journal(&path)).await;
    let (a, b, mallory) = (key(5), key(6), key(7));
    let mut b_ctl = register(r.local_addr(), &b).await;

    // Mallory claims A's key with a proof made from her own secret.
    for intent in [Intent::Connect(b.public_key()), Intent::Register] {
        let mut c = dial(r.local_addr()).await;
        c.send(&Msg::Hello { version: VERSION }).await;
        let Some(Msg::Challenge { ephemeral, nonce }) = c.next().await else {
            panic!("expected CHALLENGE")
        };
        let Some(Msg::Auth { proof, intent, .. }) =
            authenticate(&mallory, &ephemeral, &nonce, intent)
        else {
            panic!()
        };
        c.send(&Msg::Auth {
            key: a.public_key(),
            proof,
            intent,
        })
        .await;
        c.send(&Msg::Ping(1)).await; // anything after: must go nowhere
        c.stream.write_all(b"payload for B").await.unwrap();
        let msg = c.expect_error(ERR_AUTH).await;
        assert!(msg.contains("proof"), "{msg}");
        c.expect_closed(T).await;
    }
    // Claiming B's key to take over its registration fails the same way.
    let mut c = dial(r.local_addr()).await;
    c.send(&Msg::Hello { version: VERSION }).await;
    let Some(Msg::Challenge { ephemeral, nonce }) = c.next().await else {
        panic!()
    };
    let Some(Msg::Auth { proof, .. }) =
        authenticate(&mallory, &ephemeral, &nonce, Intent::Register)
    else {
        panic!()
    };
    c.send(&Msg::Auth {
        key: b.public_key(),
        proof,
        intent: Intent::Register,
    })
    .await;
    c.expect_error(ERR_AUTH).await;

    // B saw nothing, and is still registered: A (the real one) gets through.
    b_ctl.expect_quiet(Duration::from_millis(300)).await;
    assert_eq!(r.stats().auth_failures, 3);
    assert_eq!(r.stats().circuits_total, 0);
    let (mut sa, mut sb) = pair(r.local_addr(), &a, &b, &mut b_ctl).await;
    sa.write_all(b"hi").await.unwrap();
    let mut two = [0u8; 2];
    sb.read_exact(&mut two).await.unwrap();
    assert_eq!(&two, b"hi");
    drop((sa, sb, b_ctl));
    r.shutdown().await;

    let text = std::fs::read_to_string(&path).unwrap();
    let fails: Vec<_> = text
        .lines()
        .filter(|l| l.contains("\"event\":\"relay_auth_failed\""))
        .collect();
    assert_eq!(fails.len(), 3, "{text}");
    assert!(fails[0].contains(&a.public_key().to_string()), "{text}");
    assert!(fails[0].contains("127.0.0.1:"), "{text}");
    assert!(pool_journal::verify(&path).unwrap().is_intact());
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_by_another_key_is_refused() {
    let r = relay(local()).await;
    let (a, b, c) = (key(8), key(9), key(10));
    let mut b_ctl = register(r.local_addr(), &b).await;
    let mut ca = auth(r.local_addr(), &a, Intent::Connect(b.public_key())).await;
    let (circuit, _) = b_ctl.expect_incoming().await;
    // C, a valid key, tries to take the circuit offered to B.
    let mut cc = auth(r.local_addr(), &c, Intent::Accept(circuit)).await;
    cc.stream.write_all(b"from C").await.unwrap();
    let msg = cc.expect_error(ERR_AUTH).await;
    assert!(msg.contains("offered to"), "{msg}");
    // An unknown circuit is refused too.
    let mut cx = auth(r.local_addr(), &b, Intent::Accept([0xee; 16])).await;
    cx.expect_error(ERR_PROTOCOL).await;
    // A got nothing; B can still accept.
    let mut cb = auth(r.local_addr(), &b, Intent::Accept(circuit)).await;
    cb.expect_welcome().await;
    ca.expect_welcome().await;
    let (mut sa, mut sb) = (ca.raw(), cb.raw());
    sb.write_all(b"from B").await.unwrap();
    let mut six = [0u8; 6];
    sa.read_exact(&mut six).await.unwrap();
    assert_eq!(&six, b"from B");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_unregistered_key_fails_promptly() {
    let r = relay(local()).await;
    let t0 = Instant::now();
    let mut c = auth(
        r.local_addr(),
        &key(11),
        Intent::Connect(key(12).public_key()),
    )
    .await;
    let msg = c.expect_error(ERR_UNKNOWN_PEER).await;
    assert!(msg.contains(&key(12).public_key().to_string()), "{msg}");
    assert!(msg.contains("not registered"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(r.stats().refused_unknown_peer, 1);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_never_accepts_gives_no_answer() {
    let r = relay(local().accept_timeout(Duration::from_millis(300))).await;
    let (a, b) = (key(13), key(14));
    let mut b_ctl = register(r.local_addr(), &b).await;
    let mut ca = auth(r.local_addr(), &a, Intent::Connect(b.public_key())).await;
    let (circuit, _) = b_ctl.expect_incoming().await;
    ca.expect_error(ERR_NO_ANSWER).await;
    // Too late now.
    let mut cb = auth(r.local_addr(), &b, Intent::Accept(circuit)).await;
    cb.expect_error(ERR_PROTOCOL).await;
    assert_eq!(r.stats().pending, 0);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_abandoned_before_accept_is_forgotten() {
    let r = relay(local().accept_timeout(Duration::from_secs(30))).await;
    let (a, b) = (key(43), key(44));
    let mut b_ctl = register(r.local_addr(), &b).await;
    let ca = auth(r.local_addr(), &a, Intent::Connect(b.public_key())).await;
    let (circuit, _) = b_ctl.expect_incoming().await;
    assert_eq!(r.stats().pending, 1);
    drop(ca);
    // Forgotten long before the accept timeout.
    let t0 = Instant::now();
    wait_until("pending dropped", || r.stats().pending == 0).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let mut cb = auth(r.local_addr(), &b, Intent::Accept(circuit)).await;
    cb.expect_error(ERR_PROTOCOL).await;
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silence_are_closed_and_server_keeps_serving() {
    let hs = Duration::from_millis(500);
    // 100 slowloris connections from one address: above the default cap of
    // unauthenticated connections per address (tested on its own below).
    let r = relay(
        local()
            .handshake_timeout(hs)
            .max_unauthenticated_per_address(0),
    )
    .await;
    let addr = r.local_addr();

    // An HTTP request.
    let mut c = dial(addr).await;
    c.stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    c.expect_error(ERR_PROTOCOL).await;
    c.expect_closed(T).await;

    // Wrong magic, right framing.
    let mut c = dial(addr).await;
    let mut hello = vec![1, 0, 11];
    hello.extend_from_slice(b"POOL-RELAX");
    hello.push(VERSION);
    c.stream.write_all(&hello).await.unwrap();
    c.expect_error(ERR_PROTOCOL).await;

    // Another version.
    let mut c = dial(addr).await;
    let mut hello = vec![1, 0, 11];
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION + 1);
    c.stream.write_all(&hello).await.unwrap();
    let msg = c.expect_error(ERR_PROTOCOL).await;
    assert!(msg.contains("upgrade"), "{msg}");

    // A length over the cap.
    let mut c = dial(addr).await;
    c.stream.write_all(&[3, 0xff, 0xff, 0, 0]).await.unwrap();
    c.expect_error(ERR_PROTOCOL).await;

    // Slowloris: many connections that send nothing, or only HELLO.
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut c = dial(addr).await;
        if i % 2 == 1 {
            c.send(&Msg::Hello { version: VERSION }).await;
        }
        idle.push(c);
    }
    // Meanwhile the relay serves others at once.
    let t0 = Instant::now();
    let (a, b) = (key(15), key(16));
    let mut b_ctl = register(addr, &b).await;
    let (mut sa, mut sb) = pair(addr, &a, &b, &mut b_ctl).await;
    sa.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    sb.read_exact(&mut one).await.unwrap();
    assert!(
        t0.elapsed() < hs,
        "served behind the idle ones: {:?}",
        t0.elapsed()
    );
    // And the idle ones are closed once the handshake time is up.
    let t0 = Instant::now();
    for c in &mut idle {
        c.expect_closed(hs + Duration::from_secs(5)).await;
    }
    assert!(t0.elapsed() < hs + Duration::from_secs(5));
    assert!(r.stats().refused_protocol >= 104, "{:?}", r.stats());
    // Left: B's control connection and the two ends of the circuit.
    wait_until("idle ones counted out", || r.stats().connections == 3).await;
    r.shutdown().await;
}

/// A connection from `source` (a loopback address: 127.0.0.2, ...).
async fn dial_from(relay: SocketAddr, source: &str) -> Conn {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(relay).await.expect("connect to relay");
    stream.set_nodelay(true).unwrap();
    Conn {
        stream,
        buf: Vec::new(),
    }
}

/// F11: one address may hold only so many connections that have not
/// authenticated; other addresses, and its authenticated ones, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_per_address_are_capped() {
    let r = relay(
        local()
            .max_unauthenticated_per_address(4)
            .handshake_timeout(Duration::from_secs(30)),
    )
    .await;
    let addr = r.local_addr();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(dial(addr).await);
    }
    wait_until("4 unauthenticated", || r.stats().unauthenticated == 4).await;
    let mut fifth = dial(addr).await;
    let msg = fifth.expect_error(ERR_CAPACITY).await;
    assert!(
        msg.contains("127.0.0.1") && msg.contains("not authenticated"),
        "{msg}"
    );
    fifth.expect_closed(T).await;
    assert_eq!(r.stats().refused_address, 1);

    // Another address is served at once.
    let b = key(60);
    let mut c = dial_from(addr, "127.0.0.2").await;
    c.send(&Msg::Hello { version: VERSION }).await;
    let Some(Msg::Challenge { ephemeral, nonce }) = c.next().await else {
        panic!("expected CHALLENGE")
    };
    let mut out = Vec::new();
    authenticate(&b, &ephemeral, &nonce, Intent::Register)
        .unwrap()
        .encode(&mut out);
    c.stream.write_all(&out).await.unwrap();
    c.expect_welcome().await;

    // Once one silent connection goes, 127.0.0.1 may authenticate again,
    // and an authenticated connection no longer counts.
    drop(silent.pop());
    wait_until("3 unauthenticated", || r.stats().unauthenticated == 3).await;
    let _a_ctl = register(addr, &key(61)).await;
    wait_until("still 3", || r.stats().unauthenticated == 3).await;
    silent.push(dial(addr).await);
    wait_until("4 again", || r.stats().unauthenticated == 4).await;
    assert_eq!(r.stats().refused_address, 1, "{:?}", r.stats());
    r.shutdown().await;
}

/// F11: a circuit nobody uses is closed after the idle timeout (journaled
/// and counted); a circuit in use is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_circuit_is_closed_and_busy_one_is_not() {
    let path = temp("idle");
    let idle = Duration::from_millis(400);
    let r = relay(local().circuit_idle_timeout(Some(idle)).journal(&path)).await;
    let addr = r.local_addr();
    let (a, b, c, d) = (key(62), key(63), key(64), key(65));
    let mut b_ctl = register(addr, &b).await;
    let mut d_ctl = register(addr, &d).await;
    // Before the quiet pair's last bytes (its setup), so that the time
    // since `t0` is never less than the time the circuit was idle.
    let t0 = Instant::now();
    let (mut quiet_a, mut quiet_b) = pair(addr, &a, &b, &mut b_ctl).await;
    let (mut busy_c, mut busy_d) = pair(addr, &c, &d, &mut d_ctl).await;
    // The busy pair trades a byte every 100 ms for three idle timeouts.
    let busy = tokio::spawn(async move {
        let mut one = [0u8; 1];
        for i in 0..12u8 {
            busy_c.write_all(&[i]).await.unwrap();
            busy_d.read_exact(&mut one).await.unwrap();
            assert_eq!(one[0], i);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (busy_c, busy_d)
    });
    let mut tmp = [0u8; 16];
    let end_a = tokio::time::timeout(T, quiet_a.read(&mut tmp))
        .await
        .unwrap();
    let end_b = tokio::time::timeout(T, quiet_b.read(&mut tmp))
        .await
        .unwrap();
    assert!(matches!(end_a, Ok(0) | Err(_)), "{end_a:?}");
    assert!(matches!(end_b, Ok(0) | Err(_)), "{end_b:?}");
    let took = t0.elapsed();
    assert!(took >= idle && took < idle * 4, "{took:?}");
    let (mut busy_c, mut busy_d) = busy.await.unwrap();
    // Still open after 1.2 s of use.
    busy_d.write_all(b"!").await.unwrap();
    let mut one = [0u8; 1];
    busy_c.read_exact(&mut one).await.unwrap();
    assert_eq!(r.stats().circuits_idle_closed, 1);
    assert_eq!(r.stats().circuits, 1);
    drop((busy_c, busy_d));
    wait_until("circuit closed", || r.stats().circuits == 0).await;
    r.shutdown().await;

    let text = std::fs::read_to_string(&path).unwrap();
    let closed: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "circuit_closed")
        .collect();
    assert_eq!(closed.len(), 2, "{text}");
    let idle_one = closed
        .iter()
        .find(|e| e["from"] == a.public_key().to_string())
        .unwrap();
    assert!(
        idle_one["reason"].as_str().unwrap().starts_with("idle"),
        "{idle_one}"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(pool_journal::key_path(&path));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_are_enforced() {
    // Per node: A may hold 2 connections.
    let r = relay(local().max_connections_per_node(2)).await;
    let (a, b, d) = (key(17), key(18), key(19));
    let addr = r.local_addr();
    let mut b_ctl = register(addr, &b).await;
    let _a_ctl = register(addr, &a).await;
    let _a_pending = auth(addr, &a, Intent::Connect(b.public_key())).await;
    b_ctl.expect_incoming().await;
    let mut third = auth(addr, &a, Intent::Connect(b.public_key())).await;
    let msg = third.expect_error(ERR_CAPACITY).await;
    assert!(msg.contains("cap"), "{msg}");
    // Another node is not affected.
    let _d_ctl = register(addr, &d).await;
    assert_eq!(r.stats().refused_capacity, 1);
    r.shutdown().await;

    // In total: 3 connections.
    let r = relay(local().max_connections(3)).await;
    let addr = r.local_addr();
    let _held: Vec<Conn> = vec![dial(addr).await, dial(addr).await, dial(addr).await];
    wait_until("3 connections", || r.stats().connections == 3).await;
    let mut c = dial(addr).await;
    c.send(&Msg::Hello { version: VERSION }).await;
    c.expect_error(ERR_CAPACITY).await;
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refuses_other_keys() {
    let (a, b) = (key(20), key(21));
    let r = relay(local().allow(a.public_key())).await;
    let _ok = register(r.local_addr(), &a).await;
    let mut c = auth(r.local_addr(), &b, Intent::Register).await;
    c.expect_error(ERR_NOT_ALLOWED).await;
    assert_eq!(r.stats().refused_not_allowed, 1);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_registration_replaces_older() {
    let r = relay(local()).await;
    let (a, b) = (key(22), key(23));
    let mut old = register(r.local_addr(), &b).await;
    let mut new = register(r.local_addr(), &b).await;
    let msg = old.expect_error(ERR_PROTOCOL).await;
    assert!(msg.contains("replaced"), "{msg}");
    old.expect_closed(T).await;
    // The old one closing did not unregister the new one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(r.stats().nodes, 1);
    let (mut sa, mut sb) = pair(r.local_addr(), &a, &b, &mut new).await;
    sa.write_all(b"to new").await.unwrap();
    let mut six = [0u8; 6];
    sb.read_exact(&mut six).await.unwrap();
    // PING is answered on the control connection.
    new.send(&Msg::Ping(77)).await;
    assert_eq!(new.next().await, Some(Msg::Pong(77)));
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_control_connection_is_dropped() {
    let r = relay(local().control_idle_timeout(Duration::from_millis(400))).await;
    let b = key(24);
    let mut ctl = register(r.local_addr(), &b).await;
    // Pinging keeps it alive...
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctl.send(&Msg::Ping(i)).await;
        assert_eq!(ctl.next().await, Some(Msg::Pong(i)));
    }
    // ... silence does not.
    let msg = ctl.expect_error(ERR_PROTOCOL).await;
    assert!(msg.contains("silent"), "{msg}");
    ctl.expect_closed(T).await;
    wait_until("unregistered", || r.stats().nodes == 0).await;
    r.shutdown().await;
}

/// Pair 1's receiver never reads while its sender floods; pair 2 moves
/// 32 MiB and its small round trips stay fast. Bounds are generous (a
/// loaded 2-core machine) but a blocked pair 2 fails them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_does_not_slow_another_pair() {
    let r = relay(local()).await;
    let addr = r.local_addr();
    let (a1, b1, a2, b2) = (key(25), key(26), key(27), key(28));
    let mut b1_ctl = register(addr, &b1).await;
    let mut b2_ctl = register(addr, &b2).await;
    let (mut s_a1, _s_b1_never_read) = pair(addr, &a1, &b1, &mut b1_ctl).await;

    let flooded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let f = flooded.clone();
    let flood = tokio::spawn(async move {
        let chunk = vec![0x5a; 256 << 10];
        loop {
            if s_a1.write_all(&chunk).await.is_err() {
                break;
            }
            f.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Let the flood fill every buffer on its way.
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = flooded.load(std::sync::atomic::Ordering::Relaxed);
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "the flood never stalled");
    }
    let stalled_at = last;
    // Back-pressure reached the sender: bounded by socket buffers.
    assert!(
        stalled_at < 256 << 20,
        "flood went on to {stalled_at} bytes"
    );

    let (mut sa, mut sb) = pair(addr, &a2, &b2, &mut b2_ctl).await;
    // Round trips.
    let mut rtts = Vec::new();
    for i in 0..200u32 {
        let t0 = Instant::now();
        sa.write_all(&i.to_be_bytes()).await.unwrap();
        let mut four = [0u8; 4];
        sb.read_exact(&mut four).await.unwrap();
        sb.write_all(&four).await.unwrap();
        sa.read_exact(&mut four).await.unwrap();
        assert_eq!(u32::from_be_bytes(four), i);
        rtts.push(t0.elapsed());
    }
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    let p99 = rtts[rtts.len() * 99 / 100];
    // Bulk.
    const N: usize = 32 << 20;
    let payload = data(9, N);
    let t0 = Instant::now();
    let (mut br, _bw) = sb.split();
    let (sent, got) = tokio::join!(
        async {
            sa.write_all(&payload).await.unwrap();
            sa.shutdown().await.unwrap();
        },
        read_to_eof_half(&mut br)
    );
    let () = sent;
    let bulk = t0.elapsed();
    assert_eq!(got.len(), N);
    assert_eq!(sha(&got), sha(&payload));
    eprintln!(
        "pair 2 beside a stalled flood ({stalled_at} bytes in flight): rtt median {median:?}, p99 {p99:?}; 32 MiB in {bulk:?} ({:.0} Mbit/s)",
        N as f64 * 8.0 / bulk.as_secs_f64() / 1e6
    );
    assert!(median < Duration::from_millis(50), "median {median:?}");
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    assert!(bulk < Duration::from_secs(20), "32 MiB took {bulk:?}");
    // The flood is still stuck where it was: only its own sender waits.
    assert_eq!(
        flooded.load(std::sync::atomic::Ordering::Relaxed),
        stalled_at
    );
    flood.abort();
    r.shutdown().await;
}

/// Pair 1 moves bulk as fast as it can (its receiver reads); pair 2's
/// small round trips stay fast beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pair_does_not_starve_another() {
    let r = relay(local()).await;
    let addr = r.local_addr();
    let (a1, b1, a2, b2) = (key(39), key(40), key(41), key(42));
    let mut b1_ctl = register(addr, &b1).await;
    let mut b2_ctl = register(addr, &b2).await;
    let (mut s_a1, mut s_b1) = pair(addr, &a1, &b1, &mut b1_ctl).await;
    let (mut sa, mut sb) = pair(addr, &a2, &b2, &mut b2_ctl).await;
    let flood = tokio::spawn(async move {
        let chunk = vec![0x5a; 256 << 10];
        while s_a1.write_all(&chunk).await.is_ok() {}
    });
    let sink = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        while let Ok(k) = s_b1.read(&mut buf).await {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = r.stats().bytes;
    let mut rtts = Vec::new();
    for i in 0..200u32 {
        let t0 = Instant::now();
        sa.write_all(&i.to_be_bytes()).await.unwrap();
        let mut four = [0u8; 4];
        sb.read_exact(&mut four).await.unwrap();
        sb.write_all(&four).await.unwrap();
        sa.read_exact(&mut four).await.unwrap();
        rtts.push(t0.elapsed());
    }
    let flooded = r.stats().bytes - before;
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    let p99 = rtts[rtts.len() * 99 / 100];
    eprintln!("pair 2 beside a {flooded}-byte flood: rtt median {median:?}, p99 {p99:?}");
    assert!(flooded > 1 << 20, "the flood did not run ({flooded} bytes)");
    assert!(median < Duration::from_millis(50), "median {median:?}");
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    flood.abort();
    sink.abort();
    r.shutdown().await;
}

async fn read_to_eof_half(r: &mut tokio::net::tcp::ReadHalf<'_>) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .expect("EOF within 60 s")
        .expect("read");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_cap_slows_only_that_node() {
    let rate = 2 << 20; // 2 MiB/s, 2 MiB of burst
    let r = relay(local().max_rate_per_node(rate)).await;
    let addr = r.local_addr();
    let (a, b) = (key(29), key(30));
    let mut b_ctl = register(addr, &b).await;
    let (mut sa, mut sb) = pair(addr, &a, &b, &mut b_ctl).await;
    let payload = data(3, 6 << 20);
    let t0 = Instant::now();
    let (_, got) = tokio::join!(
        async {
            sa.write_all(&payload).await.unwrap();
            sa.shutdown().await.unwrap();
        },
        read_to_eof(&mut sb)
    );
    let took = t0.elapsed();
    assert_eq!(got.len(), payload.len());
    // 6 MiB at 2 MiB/s with 2 MiB of burst: at least ~2 s.
    assert!(took > Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restarts_on_the_same_port() {
    let r = relay(local()).await;
    let addr = r.local_addr();
    let (a, b) = (key(31), key(32));
    let mut b_ctl = register(addr, &b).await;
    let (mut sa, _sb) = pair(addr, &a, &b, &mut b_ctl).await;
    r.shutdown().await;
    // Everything was closed.
    b_ctl.expect_closed(T).await;
    let mut tmp = [0u8; 16];
    let n = tokio::time::timeout(T, sa.read(&mut tmp)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // Same port at once (SO_REUSEADDR), nodes re-register.
    let r = relay(RelayConfig::new(addr.to_string())).await;
    assert_eq!(r.local_addr(), addr);
    let mut b_ctl = register(addr, &b).await;
    let (mut sa, mut sb) = pair(addr, &a, &b, &mut b_ctl).await;
    sa.write_all(b"again").await.unwrap();
    let mut five = [0u8; 5];
    sb.read_exact(&mut five).await.unwrap();
    assert_eq!(&five, b"again");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_and_metrics_record_the_circuit() {
    let path = temp("journal");
    let r = relay(local().journal(&path).metrics("127.0.0.1:0")).await;
    let addr = r.local_addr();
    let (a, b) = (key(33), key(34));
    let mut b_ctl = register(addr, &b).await;
    let (mut sa, mut sb) = pair(addr, &a, &b, &mut b_ctl).await;
    sa.write_all(&[7; 1000]).await.unwrap();
    sa.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut sb).await.len(), 1000);
    drop((sa, sb));
    wait_until("circuit closed", || r.stats().circuits == 0).await;

    let mut m = TcpStream::connect(r.metrics_addr().unwrap()).await.unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = String::from_utf8(read_to_eof(&mut m).await).unwrap();
    for line in [
        "pool_relay_nodes 1",
        "pool_relay_circuits_total 1",
        "pool_relay_circuits_open 0",
        "pool_relay_bytes_total 1000",
        "pool_relay_auth_failures_total 0",
        "pool_relay_refused_total{reason=\"unknown_peer\"} 0",
        "pool_relay_refused_total{reason=\"address\"} 0",
        "pool_relay_circuits_idle_closed_total 0",
        "pool_relay_unauthenticated 0",
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    drop(b_ctl);
    wait_until("unregistered", || r.stats().nodes == 0).await;
    r.shutdown().await;

    let text = std::fs::read_to_string(&path).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "relay_started",
            "node_registered",
            "circuit_opened",
            "circuit_closed",
            "node_unregistered",
            "relay_stopped",
            "journal_checkpoint"
        ],
        "{text}"
    );
    let closed = &events[3];
    assert_eq!(closed["from"], a.public_key().to_string());
    assert_eq!(closed["to"], b.public_key().to_string());
    assert_eq!(closed["bytes_from_to"], 1000);
    assert_eq!(closed["bytes_to_from"], 0);
    assert_eq!(events[1]["key"], b.public_key().to_string());
    assert!(pool_journal::verify(&path).unwrap().is_intact());
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_carried_to_the_other_end() {
    let r = relay(local()).await;
    let (a, b) = (key(35), key(36));
    let mut b_ctl = register(r.local_addr(), &b).await;
    let (sa, mut sb) = pair(r.local_addr(), &a, &b, &mut b_ctl).await;
    // A resets (abortive close).
    socket2::SockRef::from(&sa)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sa);
    let mut tmp = [0u8; 16];
    let got = tokio::time::timeout(T, sb.read(&mut tmp)).await.unwrap();
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "B saw {got:?}, not a reset"
    );
    wait_until("circuit closed", || r.stats().circuits == 0).await;
    r.shutdown().await;
}

/// Not a test: prints relayed against direct loopback throughput.
/// `cargo test --release -p pool-relay --test relay -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn relayed_throughput_against_direct() {
    const N: usize = 2 << 30;
    async fn blast(mut tx: TcpStream, mut rx: TcpStream) -> f64 {
        let t0 = Instant::now();
        let w = tokio::spawn(async move {
            let chunk = vec![1u8; 256 << 10];
            let mut left = N;
            while left > 0 {
                let n = left.min(chunk.len());
                tx.write_all(&chunk[..n]).await.unwrap();
                left -= n;
            }
            tx.shutdown().await.unwrap();
        });
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0;
        loop {
            let n = rx.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        w.await.unwrap();
        assert_eq!(got, N);
        N as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    let direct = blast(c.unwrap(), s.unwrap().0).await;
    let r = relay(local()).await;
    let (a, b) = (key(37), key(38));
    let mut b_ctl = register(r.local_addr(), &b).await;
    let (sa, sb) = pair(r.local_addr(), &a, &b, &mut b_ctl).await;
    let relayed = blast(sa, sb).await;
    eprintln!(
        "2 GiB one way on loopback: direct {direct:.2} Gbit/s, through the relay {relayed:.2} Gbit/s ({:.0} %)",
        relayed / direct * 100.0
    );
    r.shutdown().await;
}
