//! A live session written out with `snapshot()` and rebuilt elsewhere with
//! `restore()` carries on with a resume, mid-transfer, with nothing lost;
//! snapshot bytes round-trip exactly; corrupt bytes are an error, not a panic.
mod util;

use pool_core::{Config, Session, SnapshotError};

fn check(results: &[([u8; 32], [u8; 32], usize, usize)]) {
    for (sent, got, n_sent, n_got) in results {
        assert_eq!(n_sent, n_got);
        assert_eq!(sent, got);
    }
}

/// Replaces one side with a session restored from its snapshot (as if it
/// moved to another process), loses the carrier, and resumes.
fn move_side(p: &mut util::Pair, responder: bool) {
    let now = p.now;
    let side = if responder { &mut p.b } else { &mut p.a };
    let before = side.stats();
    let snap = side.snapshot();
    let restored = Session::restore(now, side.config().clone(), &snap).expect("restore");
    assert!(!restored.carrier_up(), "a restored session has no carrier");
    assert_eq!(restored.id(), side.id());
    assert_eq!(restored.role(), side.role());
    let after = restored.stats();
    assert_eq!(after.stream_bytes_received, before.stream_bytes_received);
    assert_eq!(after.stream_bytes_sent, before.stream_bytes_sent);
    assert_eq!(after.epoch, before.epoch);
    *side = restored;
    p.cut();
    p.resume().expect("resume to the restored session");
}

fn move_mid_transfer(responder: bool) {
    let mut p = util::pair();
    let mut moves = 0;
    let results = util::transfer(&mut p, 3, 24 << 20, |p, got| {
        if p.hold_ab {
            // A round of a's records is in flight: the move loses it.
            assert!(!p.ab.is_empty());
            moves += 1;
            move_side(p, responder);
        } else if (moves == 0 && got > 6 << 20) || (moves == 1 && got > 15 << 20) {
            p.hold_ab = true;
        }
    });
    assert_eq!(moves, 2);
    check(&results);
    let (sa, sb) = (p.a.stats(), p.b.stats());
    assert_eq!(sb.stream_bytes_received, 24 << 20);
    assert_eq!(sa.resumes, 2);
    assert_eq!(sb.resumes, 2);
    assert_eq!(sa.epoch, sb.epoch);
    assert!(sa.frames_resent > 0, "lost frames were sent again");
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[test]
fn restored_responder_continues_the_transfer() {
    move_mid_transfer(true);
}

#[test]
fn restored_initiator_continues_the_transfer() {
    move_mid_transfer(false);
}

#[test]
fn restored_session_keeps_unread_data_and_open_streams() {
    let mut p = util::pair();
    let up = p.a.open_stream().unwrap();
    let down = p.b.open_stream().unwrap();
    let data_up = util::pattern(0, 100_000, 1);
    let data_down = util::pattern(0, 70_000, 2);
    assert_eq!(p.a.stream_write(up, &data_up), Ok(data_up.len()));
    assert_eq!(p.b.stream_write(down, &data_down), Ok(data_down.len()));
    p.drive();
    // Unread at b (buffered) and at a.
    assert_eq!(p.b.stream_readable_bytes(up), 100_000);
    move_side(&mut p, true);
    move_side(&mut p, false);
    p.drive();
    let (got, fin) = util::read_available(&mut p.b, up).unwrap();
    assert_eq!(got, data_up);
    assert!(!fin);
    let (got, _) = util::read_available(&mut p.a, down).unwrap();
    assert_eq!(got, data_down);
    // Both directions still work on both streams.
    p.a.stream_write(up, b"after").unwrap();
    p.a.stream_finish(up).unwrap();
    p.b.stream_write(down, b"back").unwrap();
    p.b.stream_finish(down).unwrap();
    p.drive();
    assert_eq!(
        util::read_available(&mut p.b, up).unwrap(),
        (b"after".to_vec(), true)
    );
    assert_eq!(
        util::read_available(&mut p.a, down).unwrap(),
        (b"back".to_vec(), true)
    );
}

/// A pair with state in every part of a snapshot: unacked frames in the
/// replay buffer, unread data, streams in several states, a past rekey.
fn busy_pair() -> util::Pair {
    let mut p = util::pair();
    p.a.force_rekey(&mut p.rng);
    p.drive();
    let s0 = p.a.open_stream().unwrap();
    let s1 = p.a.open_stream().unwrap();
    let s2 = p.b.open_stream().unwrap();
    p.a.stream_write(s0, &util::pattern(0, 3_000, 1)).unwrap();
    p.a.stream_finish(s1).unwrap();
    p.b.stream_write(s2, &util::pattern(0, 500, 2)).unwrap();
    p.drive();
    p.a.stream_reset(s0, 9).unwrap();
    // Frames in flight, not acknowledged.
    p.hold_ab = true;
    let s3 = p.a.open_stream().unwrap();
    p.a.stream_write(s3, &util::pattern(0, 2_000, 3)).unwrap();
    p.drive();
    p
}

#[test]
fn snapshot_round_trips_exactly() {
    let p = busy_pair();
    for s in [&p.a, &p.b] {
        let snap = s.snapshot();
        assert_eq!(*snap, *s.snapshot(), "deterministic");
        let r = Session::restore(p.now, s.config().clone(), &snap).unwrap();
        assert_eq!(*r.snapshot(), *snap, "snapshot of the restored session");
        // Twice over, to be sure nothing drifts.
        let r2 = Session::restore(p.now, Config::default(), &r.snapshot()).unwrap();
        assert_eq!(*r2.snapshot(), *snap);
        assert_eq!(r.stats().streams_active, s.stats().streams_active);
        assert_eq!(r.stats().frames_sent, s.stats().frames_sent);
    }
    // The two sides' snapshots differ (roles, keys, buffers).
    assert_ne!(*p.a.snapshot(), *p.b.snapshot());
}

#[test]
fn truncated_snapshot_is_an_error() {
    let p = busy_pair();
    let snap = p.b.snapshot();
    assert!(snap.len() > 200);
    for len in 0..snap.len() {
        match Session::restore(p.now, Config::default(), &snap[..len]) {
            Err(SnapshotError::Corrupt(_) | SnapshotError::Magic | SnapshotError::Invalid(_)) => {}
            Err(e) => panic!("cut at {len}: unexpected {e:?}"),
            Ok(_) => panic!("cut at {len} restored"),
        }
    }
    let mut long = snap.to_vec();
    long.push(0);
    assert_eq!(
        Session::restore(p.now, Config::default(), &long).unwrap_err(),
        SnapshotError::Invalid("trailing bytes")
    );
}

#[test]
fn corrupt_snapshot_is_an_error_not_a_panic() {
    let p = busy_pair();
    let snap = p.a.snapshot().to_vec();
    let restore = |b: &[u8]| Session::restore(p.now, Config::default(), b);
    // Magic.
    let mut s = snap.clone();
    s[0] ^= 1;
    assert_eq!(restore(&s).unwrap_err(), SnapshotError::Magic);
    // Role.
    let mut s = snap.clone();
    s[8] = 7;
    assert_eq!(restore(&s).unwrap_err(), SnapshotError::Invalid("role"));
    // Cipher (after magic, role, id, two keys).
    let mut s = snap.clone();
    s[8 + 1 + 16 + 64] = 0x80;
    assert_eq!(restore(&s).unwrap_err(), SnapshotError::Invalid("cipher"));
    // Every byte flipped in turn: an error or a session, never a panic;
    // what restores must still answer calls.
    let mut ok = 0;
    for i in 0..snap.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut s = snap.clone();
            s[i] ^= mask;
            if let Ok(mut r) = restore(&s) {
                ok += 1;
                let _ = r.stats();
                let _ = r.poll_timeout();
                let _ = r.snapshot();
                r.handle_timeout(p.now);
            }
        }
    }
    assert!(ok > 0, "some flips (counters, data) leave a valid snapshot");
    // Random bytes, and random bytes behind a valid magic.
    let mut rng = pool_core::SeededRng::from_u64(8);
    for n in 0..500 {
        let mut b = vec![0u8; n];
        rand_core::RngCore::fill_bytes(&mut rng, &mut b);
        assert!(restore(&b).is_err());
        if n >= 8 {
            b[..8].copy_from_slice(b"POOLSNP1");
            assert!(restore(&b).is_err());
        }
    }
}

#[test]
fn stale_snapshot_cannot_resume_past_acknowledged_data() {
    // A snapshot older than what the peer already had acknowledged (and so
    // dropped from its replay buffer) must be refused, not silently lose data.
    let mut p = util::pair();
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, &util::pattern(0, 10_000, 1)).unwrap();
    p.drive();
    let old = p.b.snapshot();
    p.a.stream_write(id, &util::pattern(10_000, 10_000, 1))
        .unwrap();
    p.drive();
    p.advance(std::time::Duration::from_millis(50)); // acks flow; a forgets
    p.b = Session::restore(p.now, Config::default(), &old).unwrap();
    p.cut();
    assert!(p.resume().is_err(), "resume from a stale snapshot");
}
