//! Minimal reproduction of simulator finding 6 (`pool-sim --seed 16`),
//! on the public API only: a rekey the peer declines because its own
//! resume is pending is proposed again on the very next record, so the
//! two sides exchange KEY_UPDATE / declining KEY_UPDATE_ACK records
//! forever (one epoch number burnt per round trip) while the resume is
//! pending. It needs a rekey due by time (or volume): after the decline
//! `maybe_start_rekey`, called for every record received, finds the epoch
//! still due and starts the next proposal. Fixed in the core: after a
//! decline the proposer waits (1 s, at least 4 RTT) before the next one.

use std::time::{Duration, Instant};

use pool_core::{Acceptor, Config, Initiator, SecretKey, SeededRng, Session, MAX_RECORD_LEN};

fn key(rng: &mut SeededRng) -> SecretKey {
    let mut b = [0u8; 32];
    rand_core::RngCore::fill_bytes(rng, &mut b);
    SecretKey::from_bytes(b)
}

/// Moves every record `from` writes into `to`; returns how many.
fn drain(now: Instant, from: &mut Session, to: &mut Session) -> usize {
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    let mut wire = Vec::new();
    let mut n = 0;
    while let Some(len) = from.poll_transmit(now, &mut buf) {
        wire.extend_from_slice(&buf[..len]);
        n += 1;
    }
    while from.poll_event().is_some() {}
    if !wire.is_empty() {
        let used = to.handle_carrier_data(now, &mut wire);
        assert_eq!(used, wire.len());
    }
    n
}

#[test]
fn declined_rekey_is_not_proposed_again_at_once() {
    let mut rng = SeededRng::new([7; 32]);
    let mut config = Config::default();
    config.rekey_after(Duration::from_secs(3));
    let now = Instant::now();
    let (ck, sk) = (key(&mut rng), key(&mut rng));
    let client_pub = ck.public_key();
    let mut acc = Acceptor::new(&config, sk, None);
    let mut hello = Vec::new();
    let init = Initiator::start(
        &config,
        &ck,
        acc.public_key(),
        None,
        1,
        &mut rng,
        &mut hello,
    )
    .unwrap();
    let mut welcome = Vec::new();
    let mut server = acc
        .accept(
            now,
            1,
            b"c",
            &hello,
            &mut |k| *k == client_pub,
            &mut rng,
            &mut welcome,
        )
        .unwrap();
    let mut client = init.finish(now, &welcome).unwrap();
    for _ in 0..4 {
        drain(now, &mut client, &mut server);
        drain(now, &mut server, &mut client);
    }
    // The client starts a resume on a new carrier; its RESUME is lost (the
    // new carrier hangs), the old carrier still works.
    let mut resume = Vec::new();
    client.start_resume(&mut rng, &mut resume).unwrap();
    // The server's epoch is due for its timed rekey: it proposes one on
    // the old carrier; the client declines (its resume is pending).
    let now = now + Duration::from_millis(3001);
    server.handle_timeout(now);
    client.handle_timeout(now);
    let mut rounds = 0;
    while rounds < 1000 {
        let a = drain(now, &mut server, &mut client);
        let b = drain(now, &mut client, &mut server);
        if a + b == 0 {
            break;
        }
        rounds += 1;
    }
    assert!(
        rounds < 10,
        "still exchanging records after {rounds} round trips with no input (server at epoch {})",
        server.stats().epoch
    );
}
