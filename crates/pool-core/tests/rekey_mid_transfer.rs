//! New key epochs in the middle of a transfer, asked for or on time and
//! volume: nothing is lost or altered, both sides count the same epochs.
mod util;

use std::time::Duration;

use pool_core::{Config, Event, MAX_RECORD_LEN};

fn rekeyed(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rekeyed(n) => Some(*n),
            _ => None,
        })
        .collect()
}

fn check(results: &[([u8; 32], [u8; 32], usize, usize)]) {
    for (sent, got, n_sent, n_got) in results {
        assert_eq!(n_sent, n_got);
        assert_eq!(sent, got);
    }
}

/// Both sides agree on the epoch and count every step to it.
fn check_epochs(p: &util::Pair, want: u32) {
    let (sa, sb) = (p.a.stats(), p.b.stats());
    assert_eq!(sa.epoch, want);
    assert_eq!(sb.epoch, want);
    assert_eq!(sa.rekeys, u64::from(want));
    assert_eq!(sb.rekeys, u64::from(want));
    let want_events: Vec<u32> = (1..=want).collect();
    assert_eq!(rekeyed(&p.a_events), want_events);
    assert_eq!(rekeyed(&p.b_events), want_events);
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[test]
fn forced_rekeys_by_either_side_mid_transfer() {
    let mut p = util::pair();
    let mut step = 0;
    let results = util::transfer(&mut p, 3, 24 << 20, |p, got| {
        // Four rekeys, alternating sides, spread over the transfer.
        if step < 4 && got > (step + 1) * (4 << 20) {
            let before = p.a.stats().epoch;
            if step % 2 == 0 {
                p.a.force_rekey(&mut p.rng);
            } else {
                p.b.force_rekey(&mut p.rng);
            }
            step += 1;
            p.drive();
            assert_eq!(p.a.stats().epoch, before + 1, "rekey {step} completed");
        }
    });
    check(&results);
    assert_eq!(step, 4);
    check_epochs(&p, 4);
    assert_eq!(p.b.stats().stream_bytes_received, 24 << 20);
}

#[test]
fn rekey_with_records_in_flight() {
    // Records of the old epoch still in flight when the new one starts.
    let mut p = util::pair();
    let mut done = false;
    let results = util::transfer(&mut p, 2, 16 << 20, |p, got| {
        if !done && got > 5 << 20 {
            done = true;
            p.hold_ab = true;
            p.drive(); // a's next writes stay in flight (old epoch)
            p.b.force_rekey(&mut p.rng);
            p.drive(); // b's KEY_UPDATE reaches a; a answers behind its old records
            p.hold_ab = false;
            p.drive();
        }
    });
    check(&results);
    check_epochs(&p, 1);
}

#[test]
fn both_sides_rekey_at_once() {
    let mut p = util::pair();
    let mut n = 0;
    let results = util::transfer(&mut p, 2, 16 << 20, |p, got| {
        if n < 3 && got > (n + 1) * (4 << 20) {
            n += 1;
            // Both propose the same epoch before hearing each other.
            p.a.force_rekey(&mut p.rng);
            p.b.force_rekey(&mut p.rng);
            p.drive();
        }
    });
    check(&results);
    check_epochs(&p, 3);
}

/// `first` proposes a rekey; `second` is asked for one too while its
/// answer to the first is not yet sent. Then both go on working.
fn rekey_asked_while_answering(initiator_first: bool) {
    let mut p = util::pair();
    p.drive();
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    let (first, second) = if initiator_first {
        (&mut p.a, &mut p.b)
    } else {
        (&mut p.b, &mut p.a)
    };
    first.force_rekey(&mut p.rng);
    let n = first
        .poll_transmit(p.now, &mut buf)
        .expect("KEY_UPDATE record");
    let used = second.handle_carrier_data(p.now, &mut buf[..n]);
    assert_eq!(used, n);
    second.force_rekey(&mut p.rng);
    p.drive();
    p.advance(Duration::from_millis(100));
    assert!(!p.a.is_closed(), "{:?}", p.a.close_reason());
    assert!(!p.b.is_closed(), "{:?}", p.b.close_reason());
    let results = util::transfer(&mut p, 1, 2 << 20, |_, _| {});
    check(&results);
    let (sa, sb) = (p.a.stats(), p.b.stats());
    assert_eq!(sa.epoch, sb.epoch);
    assert!(sa.epoch >= 1);
    // Either side can still start the next rekey, and it completes.
    for by_a in [false, true, false] {
        let e = p.a.stats().epoch;
        if by_a {
            p.a.force_rekey(&mut p.rng);
        } else {
            p.b.force_rekey(&mut p.rng);
        }
        // A rekey asked for right after the last one waits until the peer
        // has shown it holds the current epoch (its next ack or ping).
        p.drive();
        p.advance(Duration::from_millis(100));
        assert_eq!(p.a.stats().epoch, e + 1, "rekey by a: {by_a}");
        assert_eq!(p.b.stats().epoch, e + 1, "rekey by a: {by_a}");
    }
    let results = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
    check(&results);
}

#[test]
fn responder_asked_to_rekey_while_answering_one() {
    rekey_asked_while_answering(true);
}

#[test]
fn initiator_asked_to_rekey_while_answering_one() {
    rekey_asked_while_answering(false);
}

#[test]
fn rekey_on_time_while_transferring() {
    let mut c = Config::default();
    c.rekey_after(Duration::from_secs(2));
    let mut p = util::handshake_with(&c, &c, None).unwrap();
    let start = p.now;
    let results = util::transfer(&mut p, 2, 16 << 20, |p, _| {
        // 100 ms of virtual time per round.
        p.advance(Duration::from_millis(100));
    });
    check(&results);
    let elapsed = p.now - start;
    let (sa, sb) = (p.a.stats(), p.b.stats());
    assert_eq!(sa.epoch, sb.epoch);
    assert_eq!(sa.rekeys, u64::from(sa.epoch));
    assert_eq!(sb.rekeys, u64::from(sb.epoch));
    // One rekey per 2 s, give or take the round-trip of the last one.
    let expect = (elapsed.as_secs_f64() / 2.0) as u32;
    assert!(
        sa.epoch + 1 >= expect && sa.epoch <= expect,
        "epoch {} after {elapsed:?}",
        sa.epoch
    );
    assert!(sa.epoch >= 3, "epoch {} after {elapsed:?}", sa.epoch);
    assert_eq!(rekeyed(&p.a_events), (1..=sa.epoch).collect::<Vec<_>>());
}

#[test]
fn no_rekey_before_time_or_volume() {
    let mut p = util::pair();
    let results = util::transfer(&mut p, 1, 4 << 20, |p, _| {
        p.advance(Duration::from_millis(100));
    });
    check(&results);
    // Default: 120 s; far less has passed.
    assert_eq!(p.a.stats().epoch, 0);
    assert!(rekeyed(&p.a_events).is_empty());
}

#[test]
fn rekey_on_record_count() {
    let mut c = Config::default();
    c.rekey_after_records(200);
    let mut p = util::handshake_with(&c, &c, None).unwrap();
    let results = util::transfer(&mut p, 2, 16 << 20, |p, _| {
        // Volume-triggered rekeys start from the timer check.
        p.advance(Duration::from_millis(1));
    });
    check(&results);
    let records = p.a.stats().records_sent;
    let epoch = p.a.stats().epoch;
    assert_eq!(epoch, p.b.stats().epoch);
    // A records per epoch ≈ 200 (plus the few sent while a rekey is under way).
    assert!(
        u64::from(epoch) >= records / 400 && u64::from(epoch) <= records / 200,
        "{epoch} epochs for {records} records"
    );
}
