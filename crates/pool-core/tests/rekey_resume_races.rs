//! A session survives a carrier cut at any moment of a rekey or a resume,
//! started from either side, including both at once (review finding F1);
//! the responder switches carrier only on the first valid record of the
//! new epoch, and each RESUME is good once (F5); a peer that never
//! acknowledges cannot grow our queues past their bounds (F7).
mod util;

use std::time::Duration;

use pool_core::wire::Frame;
use pool_core::{Config, Event, HandshakeError, MAX_RECORD_LEN};

fn check_transfer(p: &mut util::Pair, what: &str) {
    let r = util::transfer(p, 2, 1 << 20, |_, _| {});
    for (sent, got, n, recvd) in r {
        assert_eq!(sent, got, "{what}");
        assert_eq!(n, recvd, "{what}");
    }
    assert!(!p.a.is_closed() && !p.b.is_closed(), "{what}");
}

#[test]
fn cut_while_the_rekey_answer_is_in_flight() {
    // The review's reproduction: a asks for a new epoch, b's answer never
    // reaches a because the carrier dies. Both initiator and responder as
    // the side that asked.
    for a_asks in [true, false] {
        let mut p = util::pair();
        p.drive();
        if a_asks {
            p.a.force_rekey(&mut p.rng);
            p.hold_ba = true;
        } else {
            p.b.force_rekey(&mut p.rng);
            p.hold_ab = true;
        }
        p.drive();
        p.cut();
        p.resume()
            .unwrap_or_else(|e| panic!("resume after a cut mid-rekey (a asks: {a_asks}): {e}"));
        check_transfer(&mut p, &format!("a asks: {a_asks}"));
    }
}

/// Moves records one at a time, `k` of them in all, from whichever side
/// has one (a first), then cuts the carrier and resumes.
fn step_then_cut(p: &mut util::Pair, k: usize) {
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    let mut moved = 0;
    while moved < k {
        let mut any = false;
        if let Some(n) = p.a.poll_transmit(p.now, &mut buf) {
            let used = p.b.handle_carrier_data(p.now, &mut buf[..n]);
            assert_eq!(used, n);
            moved += 1;
            any = true;
        }
        if moved < k {
            if let Some(n) = p.b.poll_transmit(p.now, &mut buf) {
                let used = p.a.handle_carrier_data(p.now, &mut buf[..n]);
                assert_eq!(used, n);
                moved += 1;
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    p.cut();
}

#[test]
fn cut_after_every_record_of_a_rekey_from_either_side_or_both() {
    for who in ["a", "b", "both"] {
        for k in 0..8 {
            let what = format!("rekey by {who}, cut after {k} records");
            let mut p = util::pair();
            p.drive();
            p.advance(Duration::from_millis(20));
            if who != "b" {
                p.a.force_rekey(&mut p.rng);
            }
            if who != "a" {
                p.b.force_rekey(&mut p.rng);
            }
            step_then_cut(&mut p, k);
            p.resume().unwrap_or_else(|e| panic!("{what}: {e}"));
            check_transfer(&mut p, &what);
            // And the next rekey and resume still work.
            p.b.force_rekey(&mut p.rng);
            p.drive();
            p.advance(Duration::from_millis(50));
            p.cut();
            p.resume()
                .unwrap_or_else(|e| panic!("{what}, second resume: {e}"));
            check_transfer(&mut p, &what);
        }
    }
}

#[test]
fn rekey_asked_while_a_resume_is_pending_is_declined() {
    let mut p = util::pair();
    p.drive();
    let mut msg = Vec::new();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    // b asks for a new epoch on the old carrier; a declines (its resume is
    // based on the current epoch), and b drops its proposal.
    p.b.force_rekey(&mut p.rng);
    p.drive();
    assert_eq!(p.b.stats().epoch, 0);
    assert_eq!(p.a.stats().epoch, 0);
    let mut reply = Vec::new();
    p.b.handle_resume(p.now, &msg, &mut p.rng, &mut reply)
        .expect("resume based on epoch 0");
    p.ab.clear();
    p.ba.clear();
    p.a.finish_resume(p.now, &reply).unwrap();
    p.commit_resume().unwrap();
    check_transfer(&mut p, "after a declined rekey");
    // b can rekey again later.
    let e = p.b.stats().epoch;
    p.b.force_rekey(&mut p.rng);
    p.drive();
    p.advance(Duration::from_millis(50));
    assert_eq!(p.b.stats().epoch, e + 1);
}

#[test]
fn resume_cut_before_its_commit_then_resumed_again() {
    // a switched on RESUMED, but its first record never reached b: b is
    // still on the old epoch. The next resume must work from there.
    let mut p = util::pair();
    p.drive();
    let mut msg = Vec::new();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    let mut reply = Vec::new();
    p.b.handle_resume(p.now, &msg, &mut p.rng, &mut reply)
        .unwrap();
    p.a.finish_resume(p.now, &reply).unwrap();
    p.b.abandon_resume();
    p.cut();
    assert_eq!(p.b.stats().epoch, 0, "b never saw the commit");
    p.resume().expect("resume again");
    check_transfer(&mut p, "second resume");
}

#[test]
fn responder_switches_only_on_the_first_valid_record() {
    let mut p = util::pair();
    p.drive();
    let id = p.a.open_stream().unwrap();
    // A RESUME that the path manager sent to another address and cancelled:
    // an attacker replays it to b from elsewhere.
    let mut cancelled = Vec::new();
    p.a.start_resume(&mut p.rng, &mut cancelled).unwrap();
    p.a.cancel_resume();
    let mut reply = Vec::new();
    p.b.handle_resume(p.now, &cancelled, &mut p.rng, &mut reply)
        .expect("answered: b cannot tell yet");
    // Nothing changed: the real carrier goes on, both ways.
    assert!(p.b.carrier_up());
    assert_eq!(p.b.stats().epoch, 0);
    p.a.stream_write(id, b"still here").unwrap();
    p.drive();
    assert_eq!(util::read_available(&mut p.b, id).unwrap().0, b"still here");
    // The attacker cannot produce the first record of the new epoch.
    let mut fake = vec![0x10, 0, 0, 40];
    fake.extend_from_slice(&1u32.to_be_bytes());
    fake.extend_from_slice(&[0u8; 8 + 28]);
    assert_eq!(
        p.b.confirm_resume(p.now, &mut fake),
        Err(HandshakeError::Crypto)
    );
    assert!(p.b.carrier_up() && !p.b.is_closed());
    assert_eq!(p.b.stats().resumes, 0);
    // The RESUME is single use: replayed again, it is stale.
    let err =
        p.b.handle_resume(p.now, &cancelled, &mut p.rng, &mut Vec::new())
            .unwrap_err();
    assert!(matches!(err, HandshakeError::StaleResume { .. }), "{err:?}");
    // The real session is untouched, and a real resume still works.
    check_transfer(&mut p, "after the replayed RESUME");
    p.cut();
    p.resume().expect("a real resume");
    check_transfer(&mut p, "after the real resume");
}

#[test]
fn peer_that_never_acknowledges_cannot_grow_our_queues() {
    // The peer opens streams that our application resets at once (as the
    // bridge does for an unknown service), pings, and acknowledges
    // nothing. Our replay buffer holds the resets; when it is full the
    // streams keep their slots, so the peer gets no new ones.
    let mut cb = Config::default();
    cb.max_streams(100).replay_buffer(16 << 10);
    let (mut b, mut f, now) = util::forge::forged_responder_with(&cb);
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    let mut opened = 0u64;
    let mut throttled = false;
    while opened < 1_000_000 {
        let limit = b.debug_sizes().peer_stream_limit;
        let mut frames = Vec::new();
        while opened < limit && frames.len() < 64 {
            // Peer streams of an initiator: even ids.
            frames.push(Frame::Stream {
                id: opened * 2,
                fin: false,
                data: &[],
            });
            opened += 1;
        }
        if frames.is_empty() {
            throttled = true;
            break;
        }
        frames.push(Frame::Ping { stamp: opened });
        let mut rec = f.seal_frames(&frames);
        b.handle_carrier_data(now, &mut rec);
        while let Some(ev) = b.poll_event() {
            if let Event::StreamOpened(id) = ev {
                b.stream_reset(id, 0x5e).unwrap();
            }
        }
        while b.poll_transmit(now, &mut buf).is_some() {}
        let s = b.debug_sizes();
        assert!(!b.is_closed(), "{:?}", b.close_reason());
        assert!(s.replay_bytes <= 16 << 10, "{s:?}");
        assert!(s.peer_streams <= 100, "{s:?}");
        assert!(s.pending_resets <= 100, "{s:?}");
        assert!(s.pongs <= 16, "{s:?}");
    }
    assert!(throttled, "a peer that acknowledges nothing is held back");
    assert!(opened < 1_000_000);
    assert!(
        opened > 1000,
        "resets went out until the buffer was full: {opened}"
    );
}

/// One record from `from` to `to`, if `from` has one.
fn one_record(
    now: std::time::Instant,
    from: &mut pool_core::Session,
    to: &mut pool_core::Session,
) -> bool {
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    match from.poll_transmit(now, &mut buf) {
        Some(n) => {
            assert_eq!(to.handle_carrier_data(now, &mut buf[..n]), n);
            true
        }
        None => false,
    }
}

#[test]
fn epoch_confirmed_during_a_resume_does_not_become_its_base() {
    // a answers b's rekey (epoch 1), then starts a resume based on epoch 0;
    // b installs epoch 1 and a sees a record of it on the old carrier while
    // the resume is under way. The resume (epoch 2, from epoch 0) is
    // answered but never committed; the next resume must be based on an
    // epoch both still hold (simulator seed 1063099).
    let mut p = util::pair();
    p.drive();
    p.advance(Duration::from_millis(20));
    p.b.force_rekey(&mut p.rng);
    let now = p.now;
    while one_record(now, &mut p.b, &mut p.a) {} // KEY_UPDATE reaches a
    let mut msg = Vec::new();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    while one_record(now, &mut p.a, &mut p.b) {} // the ack reaches b
    assert_eq!(p.b.stats().epoch, 1);
    while one_record(now, &mut p.b, &mut p.a) {} // a record of epoch 1 reaches a
    let mut reply = Vec::new();
    p.b.handle_resume(now, &msg, &mut p.rng, &mut reply)
        .expect("a resume based on epoch 0");
    p.a.finish_resume(now, &reply).unwrap();
    // The new carrier dies before a's first record reaches b.
    p.b.abandon_resume();
    p.cut();
    p.resume()
        .expect("the next resume, from an epoch both hold");
    check_transfer(&mut p, "after a resume that was never committed");
}
