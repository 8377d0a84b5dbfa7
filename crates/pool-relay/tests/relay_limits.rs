//! The relay server's limits and records on real loopback sockets: caps on
//! unauthenticated connections, circuits and rates, idle circuits, allow
//! lists, re-registration, a stalled receiver or a busy pair beside
//! another, a restart on the same port, the journal and metrics, resets
//! carried across, and relayed throughput against direct.

mod common;

use common::*;

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
