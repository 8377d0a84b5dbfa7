//! Any alteration of a data record in transit, and any garbage on the
//! carrier, closes the session with a reason: never a panic, never altered
//! data handed to the application.
mod util;

use std::cell::Cell;
use std::rc::Rc;

use pool_core::{CloseCode, CloseReason, Event, SeededRng, MAX_RECORD_LEN};
use rand_core::RngCore;

/// Which data record of a's to alter (0-based): one in the middle of a transfer.
const VICTIM: usize = 3;

/// Flips `mask` at byte `pos` (negative: from the end) of a's `VICTIM`th
/// record, then keeps writing on one stream until b closes. Checks that
/// b delivered only a prefix of what was sent, and that a hears the close.
fn flip_and_run(pos: isize, mask: u8) -> CloseReason {
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
    for round in 0..4000 {
        if !p.a.is_closed() {
            // 1000 bytes a round: one record per round.
            let chunk = util::pattern(sent, 1000, 9);
            if let Ok(n) = p.a.stream_write(id, &chunk) {
                sent += n;
            }
        }
        p.drive();
        if let Ok((got, _)) = util::read_available(&mut p.b, id) {
            received.extend_from_slice(&got);
        }
        if p.b.is_closed() {
            break;
        }
        assert!(
            round < 3999,
            "b never closed (flip at {pos}, mask {mask:#x})"
        );
    }
    assert!(victim_len.get() > 0, "the victim record was sent");
    assert_eq!(
        received,
        util::pattern(0, received.len(), 9),
        "b delivered altered data"
    );
    // b's CLOSE reaches a, with the matching code.
    p.drive();
    let reason = util::closed_reason(&p.b_events)
        .expect("Event::Closed at b")
        .clone();
    assert_eq!(p.b.close_reason(), Some(&reason));
    let want = match reason {
        CloseReason::AuthFailed => CloseCode::Auth,
        _ => CloseCode::Protocol,
    };
    match util::closed_reason(&p.a_events) {
        Some(CloseReason::Peer { code, reason: text }) => {
            assert_eq!(*code, want, "{text}");
        }
        other => panic!("a should hear b's close, got {other:?}"),
    }
    // The stream now reports the close.
    assert!(p.b.stream_write(id, b"x").is_err());
    reason
}

#[test]
fn bit_flip_in_header_closes() {
    for pos in 0..4 {
        for bit in 0..8 {
            let r = flip_and_run(pos, 1 << bit);
            assert!(
                matches!(r, CloseReason::AuthFailed | CloseReason::Protocol(_)),
                "header byte {pos} bit {bit}: {r:?}"
            );
            if pos == 0 {
                // The record type: unknown or a handshake record.
                assert!(matches!(r, CloseReason::Protocol(_)), "{r:?}");
            }
        }
    }
}

#[test]
fn bit_flip_in_epoch_or_counter_fails_authentication() {
    for pos in 4..16 {
        for bit in 0..8 {
            let r = flip_and_run(pos, 1 << bit);
            assert_eq!(r, CloseReason::AuthFailed, "byte {pos} bit {bit}");
        }
    }
}

#[test]
fn bit_flip_in_ciphertext_or_tag_fails_authentication() {
    // Ciphertext: first bytes (the sequence number), middle, last before the tag.
    for pos in [16isize, 17, 23, 24, 25, 100, 500, -17] {
        for bit in [0, 4, 7] {
            let r = flip_and_run(pos, 1 << bit);
            assert_eq!(r, CloseReason::AuthFailed, "byte {pos} bit {bit}");
        }
    }
    // Every byte of the tag.
    for pos in -16isize..0 {
        let r = flip_and_run(pos, 0x01);
        assert_eq!(r, CloseReason::AuthFailed, "tag byte {pos}");
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

#[test]
fn random_garbage_closes_with_a_reason() {
    let mut rng = SeededRng::from_u64(2024);
    let mut closes = [0usize; 2];
    for i in 0..300 {
        let (mut p, _) = established();
        let mut fed = 0usize;
        // Feed garbage until b closes; a record header may announce up to
        // MAX_RECORD_LEN bytes, so at most that much more is needed.
        while !p.b.is_closed() {
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
                "b did not close after {fed} bytes"
            );
        }
        let ev = events(&mut p);
        let reason = util::closed_reason(&ev).expect("Closed event");
        match reason {
            CloseReason::AuthFailed => closes[0] += 1,
            CloseReason::Protocol(m) => {
                assert!(!m.is_empty());
                closes[1] += 1
            }
            other => panic!("unexpected {other:?}"),
        }
        // Nothing was delivered.
        assert!(!ev.iter().any(|e| matches!(e, Event::StreamReadable(_))));
    }
    assert!(closes[0] > 0 && closes[1] > 0, "{closes:?}");
}

#[test]
fn truncated_record_waits_then_fails_when_followed_by_another() {
    let (p0, rec) = established();
    drop(p0);
    for cut in [1usize, 3, 4, 10, 16, 17, 40, rec.len() / 2, rec.len() - 1] {
        let (mut p, rec) = established();
        // A partial record is kept for later: nothing consumed, no close.
        let mut part = rec[..cut].to_vec();
        assert_eq!(p.b.handle_carrier_data(p.now, &mut part), 0, "cut {cut}");
        assert!(!p.b.is_closed());
        // The rest of the record never comes; the next record follows.
        p.a.stream_write(0, &util::pattern(3000, 2000, 1)).unwrap();
        let mut buf = vec![0u8; MAX_RECORD_LEN];
        let n = p.a.poll_transmit(p.now, &mut buf).unwrap();
        let mut stream = rec[..cut].to_vec();
        stream.extend_from_slice(&buf[..n]);
        // And more, so any length the spliced header announces is there.
        stream.resize(stream.len() + MAX_RECORD_LEN, 0);
        p.b.handle_carrier_data(p.now, &mut stream);
        assert!(p.b.is_closed(), "cut {cut}");
        let ev = events(&mut p);
        assert!(
            matches!(
                util::closed_reason(&ev),
                Some(CloseReason::AuthFailed | CloseReason::Protocol(_))
            ),
            "cut {cut}: {ev:?}"
        );
        assert!(!ev.iter().any(|e| matches!(e, Event::StreamReadable(_))));
    }
}

#[test]
fn record_with_shortened_length_fails() {
    for new_len in [0usize, 1, 27, 28, 29, 100] {
        let (mut p, mut rec) = established();
        let body = new_len.min(rec.len() - 4);
        rec[1] = (body >> 16) as u8;
        rec[2] = (body >> 8) as u8;
        rec[3] = body as u8;
        rec.truncate(4 + body);
        p.b.handle_carrier_data(p.now, &mut rec);
        assert!(p.b.is_closed(), "len {new_len}");
        let ev = events(&mut p);
        let r = util::closed_reason(&ev).unwrap();
        if body < 28 {
            // Shorter than a data record can be: refused from the header.
            assert!(matches!(r, CloseReason::Protocol(_)), "{r:?}");
        } else {
            assert_eq!(*r, CloseReason::AuthFailed);
        }
    }
}

#[test]
fn intact_record_is_accepted() {
    // The control for the tests above: the same record, unaltered, is fine.
    let (mut p, mut rec) = established();
    let n = rec.len();
    assert_eq!(p.b.handle_carrier_data(p.now, &mut rec), n);
    assert!(!p.b.is_closed());
    let (got, _) = util::read_available(&mut p.b, 0).unwrap();
    assert_eq!(got, util::pattern(0, 3000, 1));
}

#[test]
fn handshake_record_on_established_carrier_closes() {
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
    assert!(
        matches!(util::closed_reason(&ev), Some(CloseReason::Protocol(m)) if m.contains("handshake record")),
        "{ev:?}"
    );
}

#[test]
fn long_close_reason_is_cut_on_a_char_boundary() {
    // 1 + 2 * 400 bytes: byte 512 falls inside a two-byte character.
    let reason = format!("x{}", "é".repeat(400));
    let mut p = util::pair();
    p.drive();
    p.a.close(p.now, CloseCode::Other(77), &reason);
    p.drive();
    match util::closed_reason(&p.b_events) {
        Some(CloseReason::Peer { code, reason: got }) => {
            assert_eq!(*code, CloseCode::Other(77));
            assert!(got.len() <= 512 && !got.is_empty());
            assert!(reason.starts_with(got.as_str()), "cut, not altered");
        }
        other => panic!("b should see a's close, got {other:?}"),
    }
    assert!(matches!(
        util::closed_reason(&p.a_events),
        Some(CloseReason::Local {
            code: CloseCode::Other(77),
            ..
        })
    ));
}

// ---- authenticated but malformed: a peer that holds the keys ----

use pool_core::wire::Frame;
use pool_core::{Config, Session};
use util::forge::{forged_responder, forged_responder_with};

/// Feeds records to `b`; returns its events.
fn feed(b: &mut Session, now: std::time::Instant, records: &[Vec<u8>]) -> Vec<Event> {
    for r in records {
        let mut r = r.clone();
        let n = r.len();
        assert_eq!(b.handle_carrier_data(now, &mut r), n);
    }
    // A failed session still sends its CLOSE (and nothing after it).
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    if b.is_closed() {
        assert!(b.poll_transmit(now, &mut buf).is_some(), "the CLOSE record");
        assert!(b.poll_transmit(now, &mut buf).is_none());
    }
    std::iter::from_fn(|| b.poll_event()).collect()
}

fn protocol_error(ev: &[Event]) -> String {
    match util::closed_reason(ev) {
        Some(CloseReason::Protocol(m)) => m.clone(),
        other => panic!("expected a protocol error, got {other:?} in {ev:?}"),
    }
}

#[test]
fn forged_peer_control_valid_frames_are_delivered() {
    let (mut b, mut f, now) = forged_responder();
    let rec = f.seal_frames(&[Frame::Stream {
        id: 0,
        fin: true,
        data: b"hello",
    }]);
    let ev = feed(&mut b, now, &[rec]);
    assert!(ev.contains(&Event::StreamOpened(0)), "{ev:?}");
    assert_eq!(
        util::read_available(&mut b, 0).unwrap(),
        (b"hello".to_vec(), true)
    );
    assert!(!b.is_closed());
}

#[test]
fn unknown_or_truncated_frame_closes() {
    let (mut b, mut f, now) = forged_responder();
    let mut pt = f.seq.to_be_bytes().to_vec();
    pt.push(0x3f);
    let ev = feed(&mut b, now, &[f.seal_raw(&pt)]);
    assert!(protocol_error(&ev).contains("unknown frame type 0x3f"));

    let (mut b, mut f, now) = forged_responder();
    let mut pt = f.seq.to_be_bytes().to_vec();
    // A STREAM frame announcing 100 bytes and carrying 10.
    pt.extend_from_slice(&[0x08, 0x00, 0x40, 100]);
    pt.extend_from_slice(&[7; 10]);
    let ev = feed(&mut b, now, &[f.seal_raw(&pt)]);
    assert!(protocol_error(&ev).contains("truncated"));

    // A record too short to hold a sequence number.
    let (mut b, mut f, now) = forged_responder();
    let ev = feed(&mut b, now, &[f.seal_raw(&[1, 2, 3])]);
    protocol_error(&ev);
}

#[test]
fn sequence_gap_closes_and_duplicates_are_dropped() {
    let (mut b, mut f, now) = forged_responder();
    let data = Frame::Stream {
        id: 0,
        fin: false,
        data: b"once",
    };
    let first = f.seal_frames(std::slice::from_ref(&data));
    // The same frame again under its old sequence number: a duplicate.
    f.seq -= 1;
    let dup = f.seal_frames(std::slice::from_ref(&data));
    let ev = feed(&mut b, now, &[first, dup]);
    assert!(util::closed_reason(&ev).is_none(), "{ev:?}");
    assert_eq!(b.stats().duplicates_dropped, 1);
    assert_eq!(util::read_available(&mut b, 0).unwrap().0, b"once");
    // A frame from the future: a gap.
    f.seq += 3;
    let ev = feed(&mut b, now, &[f.seal_frames(&[data])]);
    assert!(protocol_error(&ev).contains("sequence gap"));
}

#[test]
fn ack_of_unsent_frames_closes() {
    let (mut b, mut f, now) = forged_responder();
    let ev = feed(&mut b, now, &[f.seal_frames(&[Frame::Ack { next: 1000 }])]);
    assert!(protocol_error(&ev).contains("ack of unsent"));
}

#[test]
fn flow_control_violations_close() {
    let mut cb = Config::default();
    cb.stream_window(64 << 10)
        .session_window(1 << 20)
        .max_streams(8);
    // Past the stream window.
    let (mut b, mut f, now) = forged_responder_with(&cb);
    let chunk = vec![1u8; 16 << 10];
    let recs: Vec<Vec<u8>> = (0..5)
        .map(|_| {
            f.seal_frames(&[Frame::Stream {
                id: 0,
                fin: false,
                data: &chunk,
            }])
        })
        .collect();
    let ev = feed(&mut b, now, &recs);
    assert!(protocol_error(&ev).contains("flow control"));
    // Exactly the window is fine.
    let (mut b, mut f, now) = forged_responder_with(&cb);
    let recs: Vec<Vec<u8>> = (0..4)
        .map(|_| {
            f.seal_frames(&[Frame::Stream {
                id: 0,
                fin: false,
                data: &chunk,
            }])
        })
        .collect();
    let ev = feed(&mut b, now, &recs);
    assert!(util::closed_reason(&ev).is_none());
    assert_eq!(b.stream_readable_bytes(0), 64 << 10);

    // Past the session window over many streams.
    let mut cb2 = cb.clone();
    cb2.session_window(96 << 10);
    let (mut b, mut f, now) = forged_responder_with(&cb2);
    let recs: Vec<Vec<u8>> = (0..7u64)
        .map(|i| {
            f.seal_frames(&[Frame::Stream {
                id: 2 * i,
                fin: false,
                data: &chunk,
            }])
        })
        .collect();
    let ev = feed(&mut b, now, &recs);
    assert!(protocol_error(&ev).contains("session flow control"));

    // Past the stream limit.
    let (mut b, mut f, now) = forged_responder_with(&cb);
    let rec = f.seal_frames(&[Frame::Stream {
        id: 2 * 8,
        fin: false,
        data: b"",
    }]);
    let ev = feed(&mut b, now, &[rec]);
    assert!(protocol_error(&ev).contains("stream limit"));
}

#[test]
fn stream_rule_violations_close() {
    // A stream of the responder's that it never opened.
    let (mut b, mut f, now) = forged_responder();
    let rec = f.seal_frames(&[Frame::Stream {
        id: 1,
        fin: false,
        data: b"x",
    }]);
    assert!(protocol_error(&feed(&mut b, now, &[rec])).contains("never opened"));

    // Data after FIN.
    let (mut b, mut f, now) = forged_responder();
    let rec = f.seal_frames(&[
        Frame::Stream {
            id: 0,
            fin: true,
            data: b"end",
        },
        Frame::Stream {
            id: 0,
            fin: false,
            data: b"more",
        },
    ]);
    assert!(protocol_error(&feed(&mut b, now, &[rec])).contains("after FIN"));
}

#[test]
fn key_update_violations_close() {
    // An ack for a rekey nobody started.
    let (mut b, mut f, now) = forged_responder();
    let rec = f.seal_frames(&[Frame::KeyUpdateAck {
        epoch: 5,
        msg: &[0; 48],
    }]);
    assert!(protocol_error(&feed(&mut b, now, &[rec])).contains("key update ack"));

    // A rekey to an epoch already used.
    let (mut b, mut f, now) = forged_responder();
    let msg = f.key_update_msg(f.epoch);
    let rec = f.seal_frames(&[Frame::KeyUpdate {
        epoch: f.epoch,
        msg: &msg,
    }]);
    assert!(protocol_error(&feed(&mut b, now, &[rec])).contains("old epoch"));

    // A rekey whose Noise message does not authenticate.
    let (mut b, mut f, now) = forged_responder();
    let rec = f.seal_frames(&[Frame::KeyUpdate {
        epoch: f.epoch + 1,
        msg: &[9; 48],
    }]);
    let ev = feed(&mut b, now, &[rec]);
    assert_eq!(util::closed_reason(&ev), Some(&CloseReason::AuthFailed));

    // The control: a genuine rekey proposal is answered.
    let (mut b, mut f, now) = forged_responder();
    let msg = f.key_update_msg(f.epoch + 1);
    let rec = f.seal_frames(&[Frame::KeyUpdate {
        epoch: f.epoch + 1,
        msg: &msg,
    }]);
    let ev = feed(&mut b, now, &[rec]);
    assert!(ev.contains(&Event::Rekeyed(f.epoch + 1)), "{ev:?}");
}

#[test]
fn last_epoch_does_not_wrap() {
    // A peer moves the session to the last epoch there is; the next rekey
    // must not wrap to epoch 0 (or overflow): the session closes instead.
    let (mut b, mut f, now) = forged_responder();
    let msg = f.key_update_msg(u32::MAX);
    let rec = f.seal_frames(&[Frame::KeyUpdate {
        epoch: u32::MAX,
        msg: &msg,
    }]);
    let ev = feed(&mut b, now, &[rec]);
    assert!(ev.contains(&Event::Rekeyed(u32::MAX)), "{ev:?}");
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    while b.poll_transmit(now, &mut buf).is_some() {}
    b.force_rekey(&mut SeededRng::from_u64(1));
    assert!(
        matches!(b.close_reason(), Some(CloseReason::Protocol(m)) if m.contains("epoch")),
        "{:?}",
        b.close_reason()
    );
    // Its resume cannot start either.
    assert!(b
        .start_resume(&mut SeededRng::from_u64(1), &mut Vec::new())
        .is_err());
}

#[test]
fn pong_with_any_stamp_does_not_panic() {
    for stamp in [0, 1, 1 << 40, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
        let (mut b, mut f, now) = forged_responder();
        let ev = feed(&mut b, now, &[f.seal_frames(&[Frame::Pong { stamp }])]);
        assert!(util::closed_reason(&ev).is_none(), "stamp {stamp}: {ev:?}");
        assert!(!b.is_closed());
    }
}

#[test]
fn peer_close_frame_closes_with_its_reason() {
    let (mut b, mut f, now) = forged_responder();
    let rec = f.seal_frames(&[Frame::Close {
        code: 4,
        // Not valid UTF-8 at the end: shown, not refused.
        reason: b"going away \xff\xfe",
    }]);
    let mut r = rec.clone();
    b.handle_carrier_data(now, &mut r);
    let ev: Vec<Event> = std::iter::from_fn(|| b.poll_event()).collect();
    match util::closed_reason(&ev) {
        Some(CloseReason::Peer { code, reason }) => {
            assert_eq!(*code, CloseCode::Shutdown);
            assert!(reason.starts_with("going away"));
        }
        other => panic!("{other:?}"),
    }
}

/// Random, well-formed-looking frames sealed by an authenticated peer.
fn random_frames(rng: &mut SeededRng, seq: u64, out: &mut Vec<u8>) {
    let pick = |rng: &mut SeededRng, n: u64| rng.next_u64() % n;
    let small = |rng: &mut SeededRng| match rng.next_u32() % 4 {
        0 => rng.next_u64() % 4,
        1 => rng.next_u64() % 64,
        2 => rng.next_u64() % (1 << 20),
        _ => rng.next_u64() >> 2,
    };
    let s = seq + pick(rng, 3);
    let s = s.saturating_sub(pick(rng, 2));
    out.extend_from_slice(&s.to_be_bytes());
    let mut data = vec![0u8; pick(rng, 3000) as usize];
    rng.fill_bytes(&mut data);
    for _ in 0..1 + pick(rng, 6) {
        let (a, c) = (small(rng), small(rng));
        let f = match pick(rng, 12) {
            0 => Frame::Ack { next: a },
            1 => Frame::Ping {
                stamp: rng.next_u64(),
            },
            2 => Frame::Pong {
                stamp: rng.next_u64(),
            },
            3 => Frame::KeyUpdate {
                epoch: rng.next_u32(),
                msg: &data[..data.len().min(64)],
            },
            4 => Frame::KeyUpdateAck {
                epoch: rng.next_u32(),
                msg: &data[..data.len().min(64)],
            },
            5 | 6 => Frame::Stream {
                id: a % 16,
                fin: pick(rng, 4) == 0,
                data: &data,
            },
            7 => Frame::ResetStream {
                id: a % 16,
                code: c,
            },
            8 => Frame::MaxData { max: a },
            9 => Frame::MaxStreamData { id: a % 16, max: c },
            10 => Frame::MaxStreams { max: a },
            _ => Frame::Close {
                code: c,
                reason: &data[..data.len().min(100)],
            },
        };
        f.encode_to_vec(out);
    }
    if pick(rng, 8) == 0 {
        // Some raw bytes behind: a truncated or unknown frame.
        let mut junk = vec![0u8; pick(rng, 20) as usize];
        rng.fill_bytes(&mut junk);
        out.extend_from_slice(&junk);
    }
}

#[test]
fn random_authenticated_frames_never_panic() {
    let mut rng = SeededRng::from_u64(77);
    let mut outcomes = [0usize; 4];
    for _ in 0..300 {
        let (mut b, mut f, mut now) = forged_responder();
        for _ in 0..8 {
            let mut pt = Vec::new();
            random_frames(&mut rng, f.seq, &mut pt);
            let mut rec = f.seal_raw(&pt);
            b.handle_carrier_data(now, &mut rec);
            // Exercise the rest of the session too.
            let mut buf = vec![0u8; MAX_RECORD_LEN];
            while b.poll_transmit(now, &mut buf).is_some() {}
            while let Some(e) = b.poll_event() {
                if let Event::StreamReadable(id) = e {
                    let _ = util::read_available(&mut b, id);
                }
            }
            let _ = b.stats();
            let _ = b.snapshot();
            now += std::time::Duration::from_millis(rng.next_u64() % 3000);
            b.handle_timeout(now);
            if b.is_closed() {
                break;
            }
        }
        let k = match b.close_reason() {
            None => 0,
            Some(CloseReason::Protocol(_)) => 1,
            Some(CloseReason::AuthFailed) => 2,
            Some(_) => 3,
        };
        outcomes[k] += 1;
    }
    // The mix reached deep enough to close in several ways.
    assert!(
        outcomes[1] > 0 && outcomes[2] + outcomes[3] > 0,
        "{outcomes:?}"
    );
}
