//! Relay peering on loopback: relays that enrol each other's keys forward
//! circuits between their nodes, find nodes that move, refuse keys they
//! did not enrol (and nodes posing as relays), end enrolments from either
//! side, and cap what one peer relay may take.
mod common;

use common::*;
use pool_core::relay::{Challenge, PeerChallenge, RouteHop};
use pool_relay::PeerConfig;
use rand_core::OsRng;

fn journal_has(path: &PathBuf, event: &str, needle: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(&format!("\"event\":\"{event}\"")) && l.contains(needle))
}

/// A relay with key `n`, journaling to a temp file.
async fn keyed(n: u8, tag: &str) -> (RelayHandle, SecretKey, PathBuf) {
    let k = key(n);
    let j = temp(&format!("{tag}-{n}"));
    let r = relay(
        local()
            .key(k.clone())
            .journal(&j)
            .peer_retry_max(Duration::from_millis(300)),
    )
    .await;
    (r, k, j)
}

fn enroll_both(r1: &RelayHandle, k1: &SecretKey, r2: &RelayHandle, k2: &SecretKey) {
    assert!(r1
        .enroll(PeerConfig::new(
            r2.local_addr().to_string(),
            k2.public_key()
        ))
        .unwrap());
    assert!(r2
        .enroll(PeerConfig::new(
            r1.local_addr().to_string(),
            k1.public_key()
        ))
        .unwrap());
}

async fn wait_knows(r: &RelayHandle, peer: &PublicKey, nodes: u64) {
    wait_until("the peer relay's registrations arrive", || {
        r.peers()
            .iter()
            .any(|p| p.key == *peer && p.up && p.nodes == nodes)
    })
    .await;
}

async fn expect_route(c: &mut Conn) -> Vec<RouteHop> {
    match c.next().await {
        Some(Msg::Route(r)) => r,
        other => panic!("expected ROUTE, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_at_one_relay_reaches_a_node_at_a_peer_relay_by_key() {
    let (r1, k1, j1) = keyed(101, "reach").await;
    let (r2, k2, j2) = keyed(102, "reach").await;
    enroll_both(&r1, &k1, &r2, &k2);
    let (a, b) = (key(1), key(2));
    let mut b_ctl = register(r2.local_addr(), &b).await;
    wait_knows(&r1, &k2.public_key(), 1).await;

    // Routed intents: both ends learn the relay past theirs.
    let mut ca = auth(r1.local_addr(), &a, Intent::ConnectRouted(b.public_key())).await;
    let (circuit, from) = b_ctl.expect_incoming().await;
    assert_eq!(from, a.public_key());
    let mut cb = auth(r2.local_addr(), &b, Intent::AcceptRouted(circuit)).await;
    let rb = expect_route(&mut cb).await;
    assert_eq!(rb.len(), 1);
    assert_eq!(rb[0].key, k1.public_key());
    assert_eq!(rb[0].addr, r1.local_addr());
    cb.expect_welcome().await;
    let ra = expect_route(&mut ca).await;
    assert_eq!(ra[0].key, k2.public_key());
    assert_eq!(ra[0].addr, r2.local_addr());
    ca.expect_welcome().await;
    let (mut sa, mut sb) = (ca.raw(), cb.raw());
    let (up, down) = (data(1, 4 << 20), data(2, 1 << 20));
    let (up2, down2) = (up.clone(), down.clone());
    let wa = tokio::spawn(async move {
        sa.write_all(&up2).await.unwrap();
        sa.shutdown().await.unwrap();
        read_to_eof(&mut sa).await
    });
    sb.write_all(&down2).await.unwrap();
    sb.shutdown().await.unwrap();
    let got_b = read_to_eof(&mut sb).await;
    let got_a = wa.await.unwrap();
    assert_eq!(sha(&got_b), sha(&up), "A to B verbatim");
    assert_eq!(sha(&got_a), sha(&down), "B to A verbatim");

    // A plain CONNECT / ACCEPT (an existing client) works across the
    // peering too, and sees no ROUTE.
    let (mut pa, mut pb) = pair_across(r1.local_addr(), r2.local_addr(), &a, &b, &mut b_ctl).await;
    pb.write_all(b"plain").await.unwrap();
    let mut got = [0u8; 5];
    pa.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"plain");

    // Accounting on both relays: per peer relay and per node key.
    wait_until("circuit accounted", || {
        let p = &r1.peers()[0];
        p.bytes_out >= (4 << 20) && p.bytes_in >= (1 << 20) && p.circuits_total >= 1
    })
    .await;
    let p2 = &r2.peers()[0];
    assert!(p2.bytes_in >= 4 << 20 && p2.bytes_out >= 1 << 20, "{p2:?}");
    let acct = r1.accounts();
    let a_acct = acct
        .iter()
        .find(|x| x.key == a.public_key())
        .expect("A accounted");
    assert!(a_acct.sent >= 4 << 20 && a_acct.circuits >= 1, "{a_acct:?}");
    let b_at_r2 = r2.accounts();
    assert!(b_at_r2
        .iter()
        .any(|x| x.key == a.public_key() && x.received >= 1 << 20));
    let s = r1.status();
    assert_eq!(s["peers"][0]["key"], k2.public_key().to_string());
    for j in [&j1, &j2] {
        wait_until("journal", || journal_has(j, "circuit_opened", "\"via\"")).await;
        assert!(journal_has(j, "relay_peer_enrolled", "operator"));
        assert!(journal_has(j, "relay_peer_up", ""));
    }
    r1.shutdown().await;
    r2.shutdown().await;
}

/// `pair` does B's ACCEPT at the CONNECT's relay; through peers B accepts
/// at its own.
async fn pair_across(
    r1: SocketAddr,
    r2: SocketAddr,
    a: &SecretKey,
    b: &SecretKey,
    b_ctl: &mut Conn,
) -> (TcpStream, TcpStream) {
    let mut ca = auth(r1, a, Intent::Connect(b.public_key())).await;
    let (circuit, from) = b_ctl.expect_incoming().await;
    assert_eq!(from, a.public_key());
    let mut cb = auth(r2, b, Intent::Accept(circuit)).await;
    cb.expect_welcome().await;
    ca.expect_welcome().await;
    (ca.raw(), cb.raw())
}

#[tokio::test]
async fn plain_clients_work_across_peers_and_a_moved_node_is_found() {
    let (r1, k1, _) = keyed(111, "move").await;
    let (r2, k2, _) = keyed(112, "move").await;
    let (r3, k3, _) = keyed(113, "move").await;
    enroll_both(&r1, &k1, &r2, &k2);
    enroll_both(&r1, &k1, &r3, &k3);
    let (a, b) = (key(11), key(12));
    let mut b_ctl = register(r2.local_addr(), &b).await;
    wait_knows(&r1, &k2.public_key(), 1).await;
    let (mut sa, mut sb) = pair_across(r1.local_addr(), r2.local_addr(), &a, &b, &mut b_ctl).await;
    sa.write_all(b"hello through two relays").await.unwrap();
    let mut got = [0u8; 24];
    sb.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello through two relays");
    drop((sa, sb));

    // B moves to r3: r2 says GONE, r3 HAVE; r1 finds it there.
    drop(b_ctl);
    wait_knows(&r1, &k2.public_key(), 0).await;
    let mut b_ctl = register(r3.local_addr(), &b).await;
    wait_knows(&r1, &k3.public_key(), 1).await;
    let (mut sa, mut sb) = pair_across(r1.local_addr(), r3.local_addr(), &a, &b, &mut b_ctl).await;
    sb.write_all(b"found at r3").await.unwrap();
    let mut got = [0u8; 11];
    sa.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"found at r3");

    // Gone from everywhere: a clear ERR_UNKNOWN_PEER.
    drop(b_ctl);
    wait_knows(&r1, &k3.public_key(), 0).await;
    let mut c = auth(r1.local_addr(), &a, Intent::Connect(b.public_key())).await;
    let m = c.expect_error(ERR_UNKNOWN_PEER).await;
    assert!(m.contains("peer relay"), "{m}");
    for r in [r1, r2, r3] {
        r.shutdown().await;
    }
}

/// A relay-to-relay connection by hand: proves `k` with a PEER intent.
async fn peer_link(relay: SocketAddr, k: &SecretKey) -> (Conn, Challenge) {
    let ch = Challenge::new(&mut OsRng);
    let c = auth(relay, k, Intent::Peer(ch.peer_challenge())).await;
    (c, ch)
}

#[tokio::test]
async fn untrusted_relay_keys_are_refused_and_journaled_and_nodes_cannot_pose_as_relays() {
    let (r1, _k1, j1) = keyed(121, "untrusted").await;
    let (r2, k2, j2) = keyed(122, "untrusted").await;
    let (r3, _k3, _) = keyed(123, "untrusted").await;
    // r1 enrols r2, but r2's operator never enrolled r1.
    r1.enroll(PeerConfig::new(
        r2.local_addr().to_string(),
        k2.public_key(),
    ))
    .unwrap();
    wait_until("refusal journaled at both ends", || {
        journal_has(&j1, "relay_peer_refused", "\"direction\":\"out\"")
            && journal_has(&j2, "relay_peer_refused", "not an enrolled peer relay")
    })
    .await;
    assert!(!r1.peers()[0].up);
    assert!(r2.peers().is_empty());

    // A node (registered at r2, with a real key) tries to peer, or to
    // forward a circuit claiming another node as its sender: refused, and
    // the target hears nothing.
    let (b, mallory) = (key(22), key(23));
    let mut b_ctl = register(r2.local_addr(), &b).await;
    let (mut c, _) = peer_link(r2.local_addr(), &mallory).await;
    let m = c.expect_error(ERR_NOT_ALLOWED).await;
    assert!(
        m.contains("not enrolled") && m.contains("node key cannot pose"),
        "{m}"
    );
    let ch = Challenge::new(&mut OsRng);
    let mut c = auth(
        r2.local_addr(),
        &mallory,
        Intent::PeerCircuit {
            challenge: ch.peer_challenge(),
            from: key(24).public_key(),
            to: b.public_key(),
        },
    )
    .await;
    c.expect_error(ERR_NOT_ALLOWED).await;
    b_ctl.expect_quiet(Duration::from_millis(300)).await;

    // Claiming an enrolled relay's key without its secret: ERR_AUTH.
    let r2_enrols = |k: &SecretKey| PeerConfig::new(r1.local_addr().to_string(), k.public_key());
    r2.enroll(r2_enrols(&key(121))).unwrap();
    let mut c = dial(r2.local_addr()).await;
    c.send(&Msg::Hello { version: VERSION }).await;
    let Some(Msg::Challenge { ephemeral, nonce }) = c.next().await else {
        panic!("no challenge")
    };
    let Some(Msg::Auth { proof, intent, .. }) = authenticate(
        &mallory,
        &ephemeral,
        &nonce,
        Intent::Peer(PeerChallenge {
            ephemeral: [9; 32],
            nonce: [9; 32],
        }),
    ) else {
        panic!()
    };
    c.send(&Msg::Auth {
        key: key(121).public_key(),
        proof,
        intent,
    })
    .await;
    c.expect_error(ERR_AUTH).await;

    // A relay enrolled under r2's key but dialled at r3's address: r3
    // proves its own key, which is not the one enrolled.
    let (r4, _, j4) = keyed(124, "untrusted").await;
    r4.enroll(PeerConfig::new(
        r3.local_addr().to_string(),
        k2.public_key(),
    ))
    .unwrap();
    wait_until("impostor journaled", || {
        journal_has(&j4, "relay_peer_refused", "")
    })
    .await;
    assert!(!r4.peers()[0].up);
    for r in [r1, r2, r3, r4] {
        r.shutdown().await;
    }
}

#[tokio::test]
async fn either_side_ends_the_enrolment() {
    let (r1, k1, j1) = keyed(131, "end").await;
    let (r2, k2, j2) = keyed(132, "end").await;
    enroll_both(&r1, &k1, &r2, &k2);
    let (a, b) = (key(31), key(32));
    let _b_ctl = register(r2.local_addr(), &b).await;
    wait_knows(&r1, &k2.public_key(), 1).await;
    // r2's operator ends it: r1 is told and drops it too.
    assert!(r2.unenroll(&k1.public_key()));
    wait_until("r1 dropped the enrolment", || r1.peers().is_empty()).await;
    assert!(r2.peers().is_empty());
    assert!(journal_has(&j2, "relay_peer_ended", "\"by\":\"operator\""));
    wait_until("journaled", || {
        journal_has(&j1, "relay_peer_ended", "\"by\":\"peer\"")
    })
    .await;
    let mut c = auth(r1.local_addr(), &a, Intent::Connect(b.public_key())).await;
    c.expect_error(ERR_UNKNOWN_PEER).await;
    assert!(!r1.unenroll(&k2.public_key()));
    r1.shutdown().await;
    r2.shutdown().await;
}

#[tokio::test]
async fn a_peer_relay_is_held_to_its_caps_and_bad_frames_close_its_link() {
    let (r1, k1, _) = keyed(141, "caps").await;
    let k2 = key(142);
    let j2 = temp("caps-142");
    let r2 = relay(
        local()
            .key(k2.clone())
            .journal(&j2)
            .max_keys_per_peer(3)
            .peer(PeerConfig::new(r1.local_addr().to_string(), k1.public_key()).max_circuits(1)),
    )
    .await;
    r1.enroll(PeerConfig::new(
        r2.local_addr().to_string(),
        k2.public_key(),
    ))
    .unwrap();
    let (a1, a2, b) = (key(41), key(42), key(43));
    let mut b_ctl = register(r2.local_addr(), &b).await;
    wait_knows(&r1, &k2.public_key(), 1).await;
    let (_s1, _s2) = pair_across(r1.local_addr(), r2.local_addr(), &a1, &b, &mut b_ctl).await;
    // A second circuit through the same peer relay: over its cap of 1.
    let mut c = auth(r1.local_addr(), &a2, Intent::Connect(b.public_key())).await;
    let m = c.expect_error(ERR_CAPACITY).await;
    assert!(m.contains("cap"), "{m}");
    wait_until("cap journaled", || {
        journal_has(&j2, "relay_peer_cap", "circuits")
    })
    .await;
    assert!(r2.peers()[0].caps_hit >= 1);

    // An enrolled relay that misbehaves on its link: too many keys are
    // ignored (and journaled); a malformed frame closes the link with a
    // clear ERROR, and the relay goes on serving.
    let k3 = key(144);
    r2.enroll(PeerConfig::new("127.0.0.1:9", k3.public_key()))
        .unwrap();
    let (mut l, ch) = peer_link(r2.local_addr(), &k3).await;
    let Some(Msg::PeerProof { key: pk, proof }) = l.next().await else {
        panic!("no PEER_PROOF")
    };
    assert!(ch.verify_peer(&pk, &k3.public_key(), &proof));
    l.expect_welcome().await;
    // Its first message is r2's registrations.
    assert!(matches!(l.next().await, Some(Msg::Have(k)) if k == vec![b.public_key()]));
    let many: Vec<PublicKey> = (50..60).map(|n| key(n).public_key()).collect();
    l.send(&Msg::Have(many)).await;
    wait_until("keys capped", || {
        r2.peers()
            .iter()
            .any(|p| p.key == k3.public_key() && p.nodes == 3 && p.caps_hit >= 1)
    })
    .await;
    assert!(
        journal_has(&j2, "relay_peer_cap", "keys") || {
            tokio::time::sleep(Duration::from_millis(500)).await;
            journal_has(&j2, "relay_peer_cap", "keys")
        }
    );
    l.stream
        .write_all(&[11, 0, 5, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    let m = l.expect_error(ERR_PROTOCOL).await;
    assert!(m.contains("HAVE"), "{m}");
    l.expect_closed(T).await;
    wait_until("link down", || {
        r2.peers()
            .iter()
            .any(|p| p.key == k3.public_key() && !p.up && p.nodes == 0)
    })
    .await;
    // Still serving: a local pair works.
    let (c1, c2) = (key(45), key(46));
    let mut c2_ctl = register(r2.local_addr(), &c2).await;
    let (mut x, mut y) = pair(r2.local_addr(), &c1, &c2, &mut c2_ctl).await;
    x.write_all(b"ok").await.unwrap();
    let mut got = [0u8; 2];
    y.read_exact(&mut got).await.unwrap();
    r1.shutdown().await;
    r2.shutdown().await;
}
