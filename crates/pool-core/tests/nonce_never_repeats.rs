//! AEAD nonces are per-epoch counters and never reused: across rekeys and
//! resumes no (epoch, counter) pair is sealed twice, and a record replayed
//! from an old epoch (or the current one) fails authentication.
mod util;

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

type Log = Rc<RefCell<Vec<(u32, u64)>>>;

/// Parses the nonce fields of a data record header.
fn epoch_counter(rec: &[u8]) -> (u32, u64) {
    assert_eq!(rec[0], 0x10, "a data record");
    let epoch = u32::from_be_bytes(rec[4..8].try_into().unwrap());
    let counter = u64::from_be_bytes(rec[8..16].try_into().unwrap());
    (epoch, counter)
}

/// Records every (epoch, counter) a side seals; keeps a copy of the
/// `keep`th record.
fn recorder(log: &Log, keep: usize, kept: &Rc<RefCell<Vec<u8>>>) -> util::Tamper {
    let (log, kept) = (log.clone(), kept.clone());
    Box::new(move |rec: &mut [u8]| {
        let mut l = log.borrow_mut();
        if l.len() == keep {
            *kept.borrow_mut() = rec.to_vec();
        }
        l.push(epoch_counter(rec));
    })
}

fn assert_unique(log: &[(u32, u64)], who: &str) {
    let mut seen = HashSet::new();
    for pair in log {
        assert!(seen.insert(*pair), "{who} sealed {pair:?} twice");
    }
    // Within an epoch counters only go up, from 0 with no gap.
    let mut last: std::collections::HashMap<u32, u64> = Default::default();
    for &(e, c) in log {
        let want = last.get(&e).map_or(0, |l| l + 1);
        assert_eq!(c, want, "{who}: epoch {e} counter {c} out of order");
        last.insert(e, c);
    }
}

#[test]
fn no_nonce_repeats_across_rekeys_and_resumes() {
    let mut p = util::pair();
    let (log_a, log_b): (Log, Log) = Default::default();
    let old_a = Rc::new(RefCell::new(Vec::new()));
    let old_b = Rc::new(RefCell::new(Vec::new()));
    p.tamper_ab = Some(recorder(&log_a, 5, &old_a));
    p.tamper_ba = Some(recorder(&log_b, 5, &old_b));
    let mut events = 0;
    let results = util::transfer(&mut p, 3, 32 << 20, |p, got| {
        if p.hold_ab {
            // Records sealed but lost with the carrier: their nonces are
            // used up all the same.
            p.cut();
            p.resume().expect("resume");
            events += 1;
        } else if got > (events + 1) * (4 << 20) && events < 7 {
            match events % 3 {
                0 => {
                    p.a.force_rekey(&mut p.rng);
                    events += 1;
                }
                1 => {
                    p.b.force_rekey(&mut p.rng);
                    events += 1;
                }
                _ => p.hold_ab = true,
            }
        }
    });
    for (sent, got, n_sent, n_got) in &results {
        assert_eq!(n_sent, n_got);
        assert_eq!(sent, got);
    }
    assert_eq!(events, 7);
    let (sa, sb) = (p.a.stats(), p.b.stats());
    assert_eq!(sa.resumes, 2);
    assert_eq!(sa.rekeys, 5);
    assert_eq!(sa.epoch, 7);
    assert_eq!(sb.epoch, 7);

    let log_a = log_a.borrow();
    let log_b = log_b.borrow();
    assert_unique(&log_a, "a");
    assert_unique(&log_b, "b");
    let epochs: HashSet<u32> = log_a.iter().map(|(e, _)| *e).collect();
    assert_eq!(epochs, (0..=7).collect(), "a sealed records in every epoch");
    assert_eq!(log_a.len() as u64, sa.records_sent);

    // A record from epoch 0, replayed now, fails authentication at b: it
    // costs the carrier, not the session.
    let old = old_a.borrow().clone();
    assert_eq!(epoch_counter(&old), (0, 5));
    p.tamper_ab = None;
    p.tamper_ba = None;
    p.ab.extend_from_slice(&old);
    p.drive();
    assert!(!p.b.carrier_up() && !p.b.is_closed());
    assert_eq!(p.b.stats().records_rejected, 1);
    assert_eq!(util::closed_reason(&p.b_events), None);
}

#[test]
fn old_epoch_record_after_resume_fails_at_each_side() {
    for to_b in [true, false] {
        let mut p = util::pair();
        let (log_a, log_b): (Log, Log) = Default::default();
        let old_a = Rc::new(RefCell::new(Vec::new()));
        let old_b = Rc::new(RefCell::new(Vec::new()));
        p.tamper_ab = Some(recorder(&log_a, 1, &old_a));
        p.tamper_ba = Some(recorder(&log_b, 1, &old_b));
        let r = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
        assert_eq!(r[0].0, r[0].1);
        p.cut();
        p.resume().unwrap();
        p.drive();
        assert_eq!(p.a.stats().epoch, 1);
        if to_b {
            let old = old_a.borrow().clone();
            assert_eq!(epoch_counter(&old).0, 0);
            p.ab.extend_from_slice(&old);
        } else {
            let old = old_b.borrow().clone();
            assert_eq!(epoch_counter(&old).0, 0);
            p.ba.extend_from_slice(&old);
        }
        p.drive();
        let (victim, other) = if to_b { (&p.b, &p.a) } else { (&p.a, &p.b) };
        // The victim drops the carrier the replay came on; nobody closes.
        assert!(!victim.carrier_up(), "to_b {to_b}");
        assert_eq!(victim.stats().records_rejected, 1);
        assert!(!victim.is_closed() && !other.is_closed(), "to_b {to_b}");
        // And the session goes on over a new carrier.
        p.cut();
        p.resume().unwrap();
        let r = util::transfer(&mut p, 1, 1 << 16, |_, _| {});
        assert_eq!(r[0].0, r[0].1);
    }
}

#[test]
fn replay_within_the_current_epoch_fails() {
    let mut p = util::pair();
    let (log_a, kept): (Log, Rc<RefCell<Vec<u8>>>) = Default::default();
    p.tamper_ab = Some(recorder(&log_a, 2, &kept));
    let id = p.a.open_stream().unwrap();
    for i in 0..5 {
        p.a.stream_write(id, &util::pattern(i * 100, 100, 0))
            .unwrap();
        p.drive();
    }
    let (got, _) = util::read_available(&mut p.b, id).unwrap();
    assert_eq!(got, util::pattern(0, 500, 0));
    // Replay record 2 of this same epoch: its counter is behind.
    let old = kept.borrow().clone();
    assert_eq!(epoch_counter(&old), (0, 2));
    p.ab.extend_from_slice(&old);
    p.drive();
    assert!(!p.b.carrier_up() && !p.b.is_closed());
    // Nothing was delivered twice.
    assert_eq!(util::read_available(&mut p.b, id).unwrap().0, b"");
    assert_eq!(p.b.stats().stream_bytes_received, 500);
}
