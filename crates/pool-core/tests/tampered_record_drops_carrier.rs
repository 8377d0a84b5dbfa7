//! Bytes altered, injected or cut short on the path may come from anyone:
//! they cost the carrier (`Event::CarrierDead`), never the session. The
//! session then resumes on a new carrier and delivers everything, intact
//! and once. Never a panic, never altered data handed to the application.
mod util;

use std::cell::Cell;
use std::rc::Rc;

use pool_core::{Event, SeededRng, MAX_RECORD_LEN};
use rand_core::RngCore;

/// Which data record of a's to alter (0-based): one in the middle of a transfer.
const VICTIM: usize = 3;
/// What a sends in all.
const TOTAL: usize = 200_000;

/// Flips `mask` at byte `pos` (negative: from the end) of a's `VICTIM`th
/// record and keeps writing. Checks that b drops the carrier (and only the
/// carrier), delivered only a prefix of what was sent, and that after a
/// resume everything arrives exactly once.
fn flip_and_run(pos: isize, mask: u8) {
    let mut p = util::pair();
    let seen = Rc::new(Cell::new(0usize));
    let victim_len = Rc::new(Cell::new(0usize));
    let (s2, v2) = (seen.clone(), victim_len.clone());
    p.tamper_ab = Some(Box::new(move |rec: &mut [u8]| {
        if s2.get() == VICTIM {
            let at = if pos < 0 {
                rec.len() - pos.unsigned_abs()
            } else {
                pos as usize
            };
            rec[at] ^= mask;
            v2.set(rec.len());
        }
        s2.set(s2.get() + 1);
    }));
    let id = p.a.open_stream().unwrap();
    let mut sent = 0usize;
    let mut received = Vec::new();
    let mut resumed = false;
    for round in 0..20_000 {
        if sent < TOTAL {
            // 1000 bytes a round: one record per round.
            let chunk = util::pattern(sent, 1000.min(TOTAL - sent), 9);
            if let Ok(n) = p.a.stream_write(id, &chunk) {
                sent += n;
            }
        } else if sent == TOTAL && p.a.stream_finish(id).is_ok() {
            sent += 1;
        }
        p.drive();
        let (got, fin) = util::read_available(&mut p.b, id).unwrap();
        received.extend_from_slice(&got);
        assert_eq!(
            received,
            util::pattern(0, received.len(), 9),
            "b delivered altered data (flip at {pos}, mask {mask:#x})"
        );
        if fin {
            break;
        }
        if !p.b.carrier_up() {
            assert!(!resumed, "one flip, one lost carrier");
            assert!(!p.b.is_closed(), "the session survives (flip at {pos})");
            assert!(p.b_events.contains(&Event::CarrierDead));
            assert_eq!(p.b.stats().records_rejected, 1);
            p.cut();
            p.resume().expect("resume after the bad record");
            resumed = true;
        }
        assert!(round < 19_999, "transfer did not finish (flip at {pos})");
    }
    assert!(victim_len.get() > 0, "the victim record was sent");
    assert!(resumed, "the altered record was noticed (flip at {pos})");
    assert_eq!(received.len(), TOTAL);
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[test]
fn bit_flip_in_header_drops_the_carrier() {
    for pos in 0..4 {
        for bit in 0..8 {
            flip_and_run(pos, 1 << bit);
        }
    }
}

#[test]
fn bit_flip_in_epoch_or_counter_drops_the_carrier() {
    for pos in 4..16 {
        for bit in 0..8 {
            flip_and_run(pos, 1 << bit);
        }
    }
}

#[test]
fn bit_flip_in_ciphertext_or_tag_drops_the_carrier() {
    for pos in [16isize, 17, 23, 24, 25, 100, 500, -17] {
        for bit in [0, 4, 7] {
            flip_and_run(pos, 1 << bit);
        }
    }
    for pos in -16isize..0 {
        flip_and_run(pos, 0x01);
    }
}

/// A fresh established b, with one record of a's in hand.
fn established() -> (util::Pair, Vec<u8>) {
    let mut p = util::pair();
    p.drive();
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, &util::pattern(0, 3000, 1)).unwrap();
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    let n = p.a.poll_transmit(p.now, &mut buf).expect("a record");
    buf.truncate(n);
    (p, buf)
}

fn events(p: &mut util::Pair) -> Vec<Event> {
    std::iter::from_fn(|| p.b.poll_event()).collect()
}

/// After b dropped a carrier for bad bytes: the session is open, nothing
/// was delivered, and a resume brings the data that was in flight.
fn assert_carrier_only(p: &mut util::Pair, ev: &[Event], what: &str) {
    assert!(!p.b.carrier_up(), "{what}: carrier dropped");
    assert!(!p.b.is_closed(), "{what}: session kept");
    assert!(ev.contains(&Event::CarrierDead), "{what}: {ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::StreamReadable(_))));
    p.cut();
    p.resume().expect("resume");
    p.drive();
    let (got, _) = util::read_available(&mut p.b, 0).unwrap();
    assert!(got.len() >= 3000, "{what}: data after resume");
    assert_eq!(
        got,
        util::pattern(0, got.len(), 1),
        "{what}: data after resume"
    );
}

#[test]
fn random_garbage_drops_the_carrier() {
    let mut rng = SeededRng::from_u64(2024);
    for i in 0..300 {
        let (mut p, _) = established();
        let mut fed = 0usize;
        // Feed garbage until b drops the carrier; a record header may
        // announce up to MAX_RECORD_LEN bytes, so at most that much more.
        while p.b.carrier_up() {
            let len = 1 + (rng.next_u32() as usize % 3000);
            let mut junk = vec![0u8; len];
            rng.fill_bytes(&mut junk);
            match i % 3 {
                // A data record header with a plausible length.
                1 if fed == 0 => {
                    junk[0] = 0x10;
                    junk[1] = 0;
                }
                // A data record of the right epoch and counter, bad tag.
                2 if fed == 0 => {
                    junk = vec![0u8; 4 + 12 + 40 + 16];
                    rng.fill_bytes(&mut junk[16..]);
                    junk[0] = 0x10;
                    junk[3] = (junk.len() - 4) as u8;
                }
                _ => {}
            }
            let used = p.b.handle_carrier_data(p.now, &mut junk);
            assert!(used <= junk.len());
            fed += len;
            assert!(
                fed < 2 * MAX_RECORD_LEN,
                "b kept the carrier after {fed} bytes"
            );
        }
        let ev = events(&mut p);
        assert_carrier_only(&mut p, &ev, &format!("garbage {i}"));
    }
}

#[test]
fn truncated_record_waits_then_drops_the_carrier_when_followed_by_another() {
    let (p0, rec) = established();
    drop(p0);
    for cut in [1usize, 3, 4, 10, 16, 17, 40, rec.len() / 2, rec.len() - 1] {
        let (mut p, rec) = established();
        // A partial record is kept for later: nothing consumed, nothing lost.
        let mut part = rec[..cut].to_vec();
        assert_eq!(p.b.handle_carrier_data(p.now, &mut part), 0, "cut {cut}");
        assert!(p.b.carrier_up());
        // The rest of the record never comes; the next record follows.
        let mut buf = vec![0u8; MAX_RECORD_LEN];
        p.a.stream_write(0, &util::pattern(3000, 2000, 1)).unwrap();
        let n = p.a.poll_transmit(p.now, &mut buf).unwrap();
        let mut stream = rec[..cut].to_vec();
        stream.extend_from_slice(&buf[..n]);
        // And more, so any length the spliced header announces is there.
        stream.resize(stream.len() + MAX_RECORD_LEN, 0);
        let used = p.b.handle_carrier_data(p.now, &mut stream);
        assert_eq!(
            used,
            stream.len(),
            "a dead carrier's bytes are all consumed"
        );
        let ev = events(&mut p);
        assert_carrier_only(&mut p, &ev, &format!("cut {cut}"));
    }
}

#[test]
fn record_with_shortened_length_drops_the_carrier() {
    for new_len in [0usize, 1, 27, 28, 29, 100] {
        let (mut p, mut rec) = established();
        let body = new_len.min(rec.len() - 4);
        rec[1] = (body >> 16) as u8;
        rec[2] = (body >> 8) as u8;
        rec[3] = body as u8;
        rec.truncate(4 + body);
        p.b.handle_carrier_data(p.now, &mut rec);
        let ev = events(&mut p);
        assert_carrier_only(&mut p, &ev, &format!("len {new_len}"));
    }
}

#[test]
fn intact_record_is_accepted() {
    // The control for the tests above: the same record, unaltered, is fine.
    let (mut p, mut rec) = established();
    let n = rec.len();
    assert_eq!(p.b.handle_carrier_data(p.now, &mut rec), n);
    assert!(p.b.carrier_up() && !p.b.is_closed());
    assert_eq!(p.b.stats().records_rejected, 0);
    let (got, _) = util::read_available(&mut p.b, 0).unwrap();
    assert_eq!(got, util::pattern(0, 3000, 1));
}

#[test]
fn handshake_record_on_established_carrier_drops_it() {
    let (mut p, _) = established();
    let mut hello = Vec::new();
    pool_core::Initiator::start(
        &pool_core::Config::default(),
        &util::key(1),
        util::key(2).public_key(),
        None,
        util::T0_UNIX,
        &mut p.rng,
        &mut hello,
    )
    .unwrap();
    p.b.handle_carrier_data(p.now, &mut hello);
    let ev = events(&mut p);
    assert_carrier_only(&mut p, &ev, "HELLO mid-session");
}
