//! A malformed frame inside an authentic record (only the peer, who holds
//! the keys, can send one) closes the session with a reason: never a panic,
//! never altered data handed to the application. Bytes altered or injected
//! in transit are another matter: see `tampered_record_drops_carrier.rs`.
mod util;

use pool_core::{CloseCode, CloseReason, Event, SeededRng, MAX_RECORD_LEN};
use rand_core::RngCore;

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

/// The handoff is not followed yet: an authentic HANDOFF offer (or a
/// decline) changes nothing, and the frames after it still arrive.
#[test]
fn handoff_offers_are_ignored_for_now() {
    let (mut b, mut f, now) = forged_responder();
    let token = [5u8; pool_core::wire::HANDOFF_TOKEN_LEN];
    let rec = f.seal_frames(&[
        Frame::Handoff {
            id: 1,
            target: [9; 32],
            floor: 2,
            expires_ms: 10_000,
            token: &token,
            addrs: &[],
        },
        Frame::HandoffDecline { id: 1, code: 1 },
        Frame::Stream {
            id: 0,
            fin: true,
            data: b"after",
        },
    ]);
    let ev = feed(&mut b, now, &[rec]);
    assert!(!b.is_closed(), "{ev:?}");
    assert_eq!(
        util::read_available(&mut b, 0).unwrap(),
        (b"after".to_vec(), true)
    );
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
    // A rekey waits until the peer shows it holds the new epoch; a resume
    // needs an epoch number at once, and there is none left.
    b.force_rekey(&mut SeededRng::from_u64(1));
    assert!(!b.is_closed());
    assert!(b
        .start_resume(&mut SeededRng::from_u64(1), &mut Vec::new())
        .is_err());
    assert!(
        matches!(b.close_reason(), Some(CloseReason::Protocol(m)) if m.contains("epoch")),
        "{:?}",
        b.close_reason()
    );
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
