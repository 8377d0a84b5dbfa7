//! The relay server on real loopback sockets (circuits and key proofs;
//! caps, fairness, restarts and records are in `relay_limits.rs`), driven by a small test
//! client built on `pool_core::relay`: nodes prove their key before
//! anything is forwarded, circuits carry bytes verbatim (half-close too),
//! one stalled receiver does not slow another pair, caps hold, and a
//! restarted relay serves again on the same port.

mod common;

use common::*;

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
