//! Streams: many at once from both sides, half-close with FIN, reset with
//! an application code, and the peer's limit on open streams.
mod util;

use pool_core::{Config, Event, ReadResult, StreamError};

#[test]
fn many_streams_from_both_sides() {
    let mut p = util::pair();
    let from_a: Vec<u64> = (0..60).map(|_| p.a.open_stream().unwrap()).collect();
    let from_b: Vec<u64> = (0..60).map(|_| p.b.open_stream().unwrap()).collect();
    // Initiator's ids are even, responder's odd, all distinct.
    assert!(from_a.iter().all(|id| id % 2 == 0));
    assert!(from_b.iter().all(|id| id % 2 == 1));
    for (i, &id) in from_a.iter().enumerate() {
        let msg = util::pattern(0, 1000 + i * 97, id);
        assert_eq!(p.a.stream_write(id, &msg), Ok(msg.len()));
        p.a.stream_finish(id).unwrap();
    }
    for (i, &id) in from_b.iter().enumerate() {
        let msg = util::pattern(0, 2000 + i * 31, id);
        assert_eq!(p.b.stream_write(id, &msg), Ok(msg.len()));
        p.b.stream_finish(id).unwrap();
    }
    p.drive();
    // Each side was told of every stream the other opened.
    for &id in &from_a {
        assert!(p.b_events.contains(&Event::StreamOpened(id)), "{id}");
        assert!(p.b_events.contains(&Event::StreamReadable(id)), "{id}");
    }
    for &id in &from_b {
        assert!(p.a_events.contains(&Event::StreamOpened(id)), "{id}");
    }
    // Read in reverse order: streams do not depend on each other.
    for (i, &id) in from_a.iter().enumerate().rev() {
        let (got, fin) = util::read_available(&mut p.b, id).unwrap();
        assert!(fin);
        assert_eq!(got, util::pattern(0, 1000 + i * 97, id), "stream {id}");
    }
    for (i, &id) in from_b.iter().enumerate() {
        let (got, fin) = util::read_available(&mut p.a, id).unwrap();
        assert!(fin);
        assert_eq!(got, util::pattern(0, 2000 + i * 31, id), "stream {id}");
    }
    // The other directions are still open: finish them, then all is gone.
    assert_eq!(p.a.stats().streams_active, 120);
    for &id in &from_a {
        p.b.stream_finish(id).unwrap();
    }
    for &id in &from_b {
        p.a.stream_finish(id).unwrap();
    }
    p.drive();
    for &id in &from_a {
        assert_eq!(util::read_available(&mut p.a, id).unwrap(), (vec![], true));
    }
    for &id in &from_b {
        assert_eq!(util::read_available(&mut p.b, id).unwrap(), (vec![], true));
    }
    assert_eq!(p.a.stats().streams_active, 0);
    assert_eq!(p.b.stats().streams_active, 0);
    assert_eq!(p.a.stats().streams_opened, 120);
    assert_eq!(p.b.stats().streams_opened, 120);
}

#[test]
fn fin_half_closes_one_direction_only() {
    let mut p = util::pair();
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, b"request").unwrap();
    p.a.stream_finish(id).unwrap();
    p.drive();
    // a's side is finished: no more writes.
    assert_eq!(p.a.stream_write(id, b"more"), Err(StreamError::Finished));
    assert_eq!(p.a.stream_finish(id), Ok(()), "finishing twice is harmless");
    assert_eq!(
        util::read_available(&mut p.b, id).unwrap(),
        (b"request".to_vec(), true)
    );
    // Reading past the FIN keeps saying FIN.
    let mut buf = [0u8; 8];
    assert_eq!(p.b.stream_read(id, &mut buf), Ok(ReadResult::Fin));
    // b answers on the same stream after a finished: a still receives.
    let reply = util::pattern(0, 300_000, 5);
    let mut off = 0;
    while off < reply.len() {
        if let Ok(n) = p.b.stream_write(id, &reply[off..]) {
            off += n;
        }
        p.drive();
    }
    p.b.stream_finish(id).unwrap();
    p.drive();
    let (got, fin) = util::read_available(&mut p.a, id).unwrap();
    assert!(fin);
    assert_eq!(got, reply);
    // Both directions finished and read: the stream is gone on both sides.
    assert_eq!(p.a.stats().streams_active, 0);
    assert_eq!(p.b.stats().streams_active, 0);
    assert_eq!(p.a.stream_write(id, b"x"), Err(StreamError::Unknown(id)));
}

#[test]
fn empty_stream_with_only_fin() {
    let mut p = util::pair();
    let id = p.b.open_stream().unwrap();
    p.b.stream_finish(id).unwrap();
    p.drive();
    assert!(p.a_events.contains(&Event::StreamOpened(id)));
    let mut buf = [0u8; 8];
    assert_eq!(p.a.stream_read(id, &mut buf), Ok(ReadResult::Fin));
}

#[test]
fn reset_reaches_the_peer_with_its_code() {
    let mut p = util::pair();
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, &util::pattern(0, 5000, 1)).unwrap();
    p.drive();
    // b reads some, then aborts with code 42.
    let mut buf = [0u8; 1000];
    assert_eq!(p.b.stream_read(id, &mut buf), Ok(ReadResult::Data(1000)));
    p.b.stream_reset(id, 42).unwrap();
    p.drive();
    assert!(p.a_events.contains(&Event::StreamReadable(id)));
    assert_eq!(p.a.stream_read(id, &mut buf), Err(StreamError::Reset(42)));
    assert!(matches!(
        p.a.stream_write(id, b"late"),
        Err(StreamError::Reset(42) | StreamError::Unknown(_))
    ));
    // The other streams and the session are unaffected.
    assert!(!p.a.is_closed() && !p.b.is_closed());
    let r = util::transfer(&mut p, 2, 1 << 20, |_, _| {});
    assert!(r.iter().all(|(s, g, _, _)| s == g));
}

#[test]
fn reset_discards_unread_data_and_frees_the_window() {
    let mut c = Config::default();
    c.stream_window(32 << 10).session_window(64 << 10);
    let mut p = util::handshake_with(&c, &c, None).unwrap();
    let id = p.a.open_stream().unwrap();
    let n =
        p.a.stream_write(id, &util::pattern(0, 40 << 10, 1))
            .unwrap();
    assert_eq!(n, 32 << 10, "stream window");
    p.drive();
    p.a.stream_reset(id, 7).unwrap();
    p.drive();
    let mut buf = [0u8; 100];
    // Reset wins over the data still buffered.
    assert_eq!(p.b.stream_read(id, &mut buf), Err(StreamError::Reset(7)));
    assert_eq!(p.b.stream_readable_bytes(id), 0);
    // The session credit the unread data held is given back: once b has
    // consumed the rest of the first window (32 KiB discarded by the reset,
    // 32 KiB read), a may send again.
    let s1 = p.a.open_stream().unwrap();
    let s2 = p.a.open_stream().unwrap();
    let w1 =
        p.a.stream_write(s1, &util::pattern(0, 40 << 10, 2))
            .unwrap();
    assert_eq!(w1, 32 << 10, "the rest of the session window");
    assert_eq!(
        p.a.stream_write(s2, b"x"),
        Err(StreamError::Blocked),
        "session window used up"
    );
    p.drive();
    let (got, _) = util::read_available(&mut p.b, s1).unwrap();
    assert_eq!(got.len(), 32 << 10);
    p.drive();
    let w2 =
        p.a.stream_write(s2, &util::pattern(0, 32 << 10, 3))
            .unwrap();
    assert_eq!(w2, 32 << 10, "credit came back, reset data included");
}

/// Opens streams at a until the limit; returns them.
fn open_until_limit(p: &mut util::Pair) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        match p.a.open_stream() {
            Ok(id) => ids.push(id),
            Err(StreamError::Limit) => return ids,
            Err(e) => panic!("{e}"),
        }
        assert!(ids.len() < 100);
    }
}

#[test]
fn stream_limit_then_streams_available_after_close() {
    let mut cb = Config::default();
    cb.max_streams(4);
    let mut p = util::handshake_with(&Config::default(), &cb, None).unwrap();
    let ids = open_until_limit(&mut p);
    assert_eq!(ids.len(), 4, "b allows 4 streams from a");
    assert_eq!(p.a.open_stream(), Err(StreamError::Limit));
    p.drive();
    assert!(!p.a_events.contains(&Event::StreamsAvailable));

    // Half-closing is not enough: the stream is still open.
    p.a.stream_finish(ids[0]).unwrap();
    p.drive();
    assert_eq!(
        util::read_available(&mut p.b, ids[0]).unwrap(),
        (vec![], true)
    );
    p.drive();
    assert!(!p.a_events.contains(&Event::StreamsAvailable));
    assert_eq!(p.a.open_stream(), Err(StreamError::Limit));

    // Both sides finished and read: one stream slot comes back.
    p.b.stream_finish(ids[0]).unwrap();
    p.drive();
    assert!(p.a_events.contains(&Event::StreamsAvailable));
    assert_eq!(
        util::read_available(&mut p.a, ids[0]).unwrap(),
        (vec![], true)
    );
    let new = p.a.open_stream().expect("a slot is free");
    assert_eq!(p.a.open_stream(), Err(StreamError::Limit));
    // The new stream works.
    p.a.stream_write(new, b"hi").unwrap();
    p.drive();
    assert_eq!(util::read_available(&mut p.b, new).unwrap().0, b"hi");
}

#[test]
fn reset_streams_give_their_slots_back() {
    let mut cb = Config::default();
    cb.max_streams(3);
    let mut p = util::handshake_with(&Config::default(), &cb, None).unwrap();
    let ids = open_until_limit(&mut p);
    assert_eq!(ids.len(), 3);
    p.drive();
    let mut buf = [0u8; 16];
    // a resets one; b reads the reset (it keeps reading it until it lets
    // the stream go with stream_stop, as a runtime does when the handle
    // is dropped).
    p.a.stream_reset(ids[0], 1).unwrap();
    p.drive();
    assert_eq!(
        p.b.stream_read(ids[0], &mut buf),
        Err(StreamError::Reset(1))
    );
    assert_eq!(
        p.b.stream_read(ids[0], &mut buf),
        Err(StreamError::Reset(1))
    );
    p.b.stream_stop(ids[0]).unwrap();
    // b resets another; a reads the reset and lets it go.
    p.b.stream_reset(ids[1], 2).unwrap();
    p.drive();
    assert_eq!(
        p.a.stream_read(ids[1], &mut buf),
        Err(StreamError::Reset(2))
    );
    p.a.stream_stop(ids[1]).unwrap();
    p.drive();
    // Both slots come back to a.
    assert!(p.a_events.contains(&Event::StreamsAvailable));
    let n = open_until_limit(&mut p).len();
    assert_eq!(n, 2);
    p.drive();
    assert_eq!(p.b.stats().streams_active, 3);
    assert_eq!(p.a.stats().streams_active, 3);
}

#[test]
fn stream_limit_cycles_many_times() {
    // Open, use and close far more streams than the limit, in turns.
    let mut cb = Config::default();
    cb.max_streams(2);
    let mut p = util::handshake_with(&Config::default(), &cb, None).unwrap();
    let mut total = 0;
    for round in 0..50u64 {
        let ids = open_until_limit(&mut p);
        assert_eq!(ids.len(), 2, "round {round}");
        for &id in &ids {
            p.a.stream_write(id, &util::pattern(0, 100, round)).unwrap();
            p.a.stream_finish(id).unwrap();
        }
        p.drive();
        for &id in &ids {
            let (got, fin) = util::read_available(&mut p.b, id).unwrap();
            assert!(fin);
            assert_eq!(got, util::pattern(0, 100, round));
            p.b.stream_finish(id).unwrap();
        }
        p.drive();
        for &id in &ids {
            assert_eq!(util::read_available(&mut p.a, id).unwrap(), (vec![], true));
        }
        total += ids.len();
    }
    assert_eq!(total, 100);
    assert_eq!(p.a.stats().streams_active, 0);
    assert_eq!(p.b.stats().streams_active, 0);
}

#[test]
fn unknown_stream_and_closed_session_errors() {
    let mut p = util::pair();
    let mut buf = [0u8; 4];
    assert_eq!(p.a.stream_write(8, b"x"), Err(StreamError::Unknown(8)));
    assert_eq!(p.a.stream_read(8, &mut buf), Err(StreamError::Unknown(8)));
    let id = p.a.open_stream().unwrap();
    p.drive();
    p.a.close(p.now, pool_core::CloseCode::Normal, "bye");
    p.drive();
    assert!(p.a.is_closed() && p.b.is_closed());
    assert!(matches!(
        p.a.stream_write(id, b"x"),
        Err(StreamError::SessionClosed(_))
    ));
    assert!(matches!(
        p.b.stream_read(id, &mut buf),
        Err(StreamError::SessionClosed(_))
    ));
    assert!(matches!(
        p.a.open_stream(),
        Err(StreamError::SessionClosed(_))
    ));
}

#[test]
fn read_with_takes_what_the_sink_takes_and_keeps_the_rest_in_order() {
    let mut p = util::pair();
    let id = p.a.open_stream().unwrap();
    let msg = util::pattern(0, 50_000, id);
    assert_eq!(p.a.stream_write(id, &msg), Ok(msg.len()));
    p.a.stream_finish(id).unwrap();
    p.drive();
    let mut got = Vec::new();
    // A sink that takes nothing leaves everything in place.
    assert_eq!(
        p.b.stream_read_with(id, |a, b| {
            assert_eq!(a.len() + b.len(), msg.len());
            0
        }),
        Ok(ReadResult::Data(0))
    );
    // Odd-sized bites across both slices.
    loop {
        let r = p.b.stream_read_with(id, |a, b| {
            let take = 7_777.min(a.len() + b.len());
            let from_a = take.min(a.len());
            got.extend_from_slice(&a[..from_a]);
            got.extend_from_slice(&b[..take - from_a]);
            take
        });
        match r {
            Ok(ReadResult::Data(n)) => assert!(n > 0 && n <= 7_777),
            Ok(ReadResult::Fin) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, msg);
    // A sink claiming more than there is counts only what there was.
    let id2 = p.a.open_stream().unwrap();
    p.a.stream_write(id2, b"abc").unwrap();
    p.drive();
    assert_eq!(
        p.b.stream_read_with(id2, |_, _| 1_000),
        Ok(ReadResult::Data(3))
    );
    assert_eq!(
        p.b.stream_read_with(id2, |_, _| unreachable!("no bytes left")),
        Ok(ReadResult::Blocked)
    );
}

/// `stream_write_with` fills frames in the replay buffer in place: what
/// arrives is what the source produced, in order, across ring wraps, short
/// fills and a carrier cut with a resume in the middle.
#[test]
fn write_with_fills_in_place_and_survives_a_resume() {
    let mut p = util::pair();
    let id = p.a.open_stream().unwrap();
    let msg = util::pattern(0, 3 << 20, id);
    let mut sent = 0usize;
    let mut got = Vec::new();
    let mut cut_done = false;
    let mut calls = 0usize;
    while got.len() < msg.len() {
        // A source that gives odd-sized pieces, like a socket would.
        let piece = 1 + (calls * 7919) % 40_000;
        calls += 1;
        let r = p.a.stream_write_with(id, 300_000, |rooms| {
            // Like a vectored read: fills the rooms in order, stops short.
            let mut n = 0;
            for room in rooms.iter_mut() {
                let k = room.len().min(piece - n).min(msg.len() - sent);
                room[..k].copy_from_slice(&msg[sent..sent + k]);
                sent += k;
                n += k;
            }
            n
        });
        match r {
            Ok(_) | Err(StreamError::Blocked) => {}
            Err(e) => panic!("write_with: {e:?}"),
        }
        if sent == msg.len() {
            let _ = p.a.stream_finish(id);
        }
        if !cut_done && sent > msg.len() / 2 {
            // Records in flight are lost with the carrier; the replay
            // buffer must resend exactly what was filled in place.
            p.hold_ab = true;
            p.drive();
            assert!(!p.ab.is_empty());
            p.cut();
            p.resume().expect("resume");
            cut_done = true;
        }
        p.drive();
        let (more, _) = util::read_available(&mut p.b, id).unwrap();
        got.extend_from_slice(&more);
    }
    assert!(cut_done);
    assert_eq!(got.len(), msg.len());
    assert!(got == msg, "the bytes that arrived differ from those sent");
    assert!(
        p.a.stats().frames_resent > 0,
        "the cut lost frames in flight"
    );
    // A source that has nothing writes nothing and queues nothing.
    let id2 = p.a.open_stream().unwrap();
    let frames = p.a.stats().frames_sent;
    assert_eq!(p.a.stream_write_with(id2, 1000, |_| 0), Ok(0));
    assert_eq!(p.a.stats().frames_sent, frames);
    // No credit: Blocked, and the source is not called.
    let mut writes = 0;
    while p.a.stream_write(id2, &[0u8; 65536]).is_ok() {
        writes += 1;
        assert!(writes < 10_000, "the stream never ran out of credit");
    }
    assert_eq!(
        p.a.stream_write_with(id2, 1000, |_| unreachable!("no credit")),
        Err(StreamError::Blocked)
    );
}
