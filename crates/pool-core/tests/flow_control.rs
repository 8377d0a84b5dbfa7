//! Flow control: a receiver that does not read buffers at most its stream
//! window per stream and its session window in all; a stream nobody reads
//! does not hold up the others.
mod util;

use pool_core::{Config, Event, StreamError};

const STREAM_WINDOW: u64 = 64 << 10;
const SESSION_WINDOW: u64 = 256 << 10;

fn small_windows() -> util::Pair {
    let mut cb = Config::default();
    cb.stream_window(STREAM_WINDOW)
        .session_window(SESSION_WINDOW);
    util::handshake_with(&Config::default(), &cb, None).unwrap()
}

/// Writes as much as a accepts on `id`; returns the count.
fn write_all_accepted(p: &mut util::Pair, id: u64, offset: usize, salt: u64) -> usize {
    let mut n = 0;
    loop {
        let chunk = util::pattern(offset + n, 8 << 10, salt);
        match p.a.stream_write(id, &chunk) {
            Ok(w) => n += w,
            Err(StreamError::Blocked) => return n,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn unread_stream_buffers_at_most_its_window() {
    let mut p = small_windows();
    let id = p.a.open_stream().unwrap();
    let mut written = 0;
    for _ in 0..20 {
        written += write_all_accepted(&mut p, id, written, 1);
        p.drive();
        let buffered = p.b.stream_readable_bytes(id) as u64;
        assert!(buffered <= STREAM_WINDOW, "{buffered} > {STREAM_WINDOW}");
    }
    // The window was used up exactly, and the writer is told to wait.
    assert_eq!(written as u64, STREAM_WINDOW);
    assert_eq!(p.b.stream_readable_bytes(id) as u64, STREAM_WINDOW);
    assert_eq!(
        p.a.stream_write(id, b"more"),
        Err(StreamError::Blocked),
        "a must not send past the window"
    );
    assert!(!p.b.is_closed());

    // Reading reopens the window (credit is granted once half of it is
    // consumed, so at least half a window), and a hears about it.
    p.a_events.clear();
    let (got, _) = util::read_available(&mut p.b, id).unwrap();
    assert_eq!(got, util::pattern(0, written, 1));
    p.drive();
    assert!(p.a_events.contains(&Event::StreamWritable(id)));
    let more = write_all_accepted(&mut p, id, written, 1);
    assert!(
        (STREAM_WINDOW / 2..=STREAM_WINDOW).contains(&(more as u64)),
        "{more}"
    );
    p.drive();
    assert!(p.b.stream_readable_bytes(id) as u64 <= STREAM_WINDOW);
    let (got, _) = util::read_available(&mut p.b, id).unwrap();
    assert_eq!(got, util::pattern(written, more, 1));
}

#[test]
fn unread_streams_buffer_at_most_the_session_window() {
    let mut p = small_windows();
    // Eight streams could hold 8 * 64 KiB; the session allows 256 KiB.
    let ids: Vec<u64> = (0..8).map(|_| p.a.open_stream().unwrap()).collect();
    let mut written = vec![0usize; ids.len()];
    for _ in 0..10 {
        for (i, &id) in ids.iter().enumerate() {
            written[i] += write_all_accepted(&mut p, id, written[i], i as u64);
        }
        p.drive();
        let total: u64 = ids
            .iter()
            .map(|&id| p.b.stream_readable_bytes(id) as u64)
            .sum();
        assert!(total <= SESSION_WINDOW, "{total} > {SESSION_WINDOW}");
        for &id in &ids {
            assert!(p.b.stream_readable_bytes(id) as u64 <= STREAM_WINDOW);
        }
    }
    let total: u64 = ids
        .iter()
        .map(|&id| p.b.stream_readable_bytes(id) as u64)
        .sum();
    assert_eq!(
        total, SESSION_WINDOW,
        "the session window is used up exactly"
    );
    assert_eq!(written.iter().sum::<usize>() as u64, SESSION_WINDOW);
    assert!(ids
        .iter()
        .all(|&id| p.a.stream_write(id, b"x") == Err(StreamError::Blocked)));

    // Streams 4..8 got nothing yet. Reading streams 0..3 (over half the
    // session window) frees session credit for the others.
    assert_eq!(written[7], 0);
    for (i, &id) in ids.iter().enumerate().take(3) {
        let (got, _) = util::read_available(&mut p.b, id).unwrap();
        assert_eq!(got, util::pattern(0, written[i], i as u64));
    }
    p.drive();
    let more = write_all_accepted(&mut p, ids[7], written[7], 7);
    assert!(more > 0);
    p.drive();
    let total: u64 = ids
        .iter()
        .map(|&id| p.b.stream_readable_bytes(id) as u64)
        .sum();
    assert!(total <= SESSION_WINDOW, "{total} > {SESSION_WINDOW}");
    for (i, &id) in ids.iter().enumerate().skip(3) {
        let (got, _) = util::read_available(&mut p.b, id).unwrap();
        let n = written[i] + if i == 7 { more } else { 0 };
        assert_eq!(got, util::pattern(0, n, i as u64), "stream {i}");
    }
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[test]
fn slow_stream_does_not_stall_another() {
    let mut p = small_windows();
    let slow = p.a.open_stream().unwrap();
    let slow_written = write_all_accepted(&mut p, slow, 0, 99);
    p.drive();
    assert_eq!(p.b.stream_readable_bytes(slow) as u64, STREAM_WINDOW);

    // 8 MiB on another stream of the same session, 32 windows' worth,
    // while the slow stream stays full and unread.
    let results = util::transfer(&mut p, 1, 8 << 20, |p, _| {
        assert_eq!(p.b.stream_readable_bytes(slow) as u64, STREAM_WINDOW);
    });
    let (sent, got, n_sent, n_got) = results[0];
    assert_eq!(n_sent, n_got);
    assert_eq!(sent, got);

    // The slow stream still holds its data intact.
    let (got, _) = util::read_available(&mut p.b, slow).unwrap();
    assert_eq!(got, util::pattern(0, slow_written, 99));
}

#[test]
fn stopped_stream_is_drained_and_credited() {
    // A reader that gives up a stream (stream_stop) must not block the
    // writer or the session: data is dropped and credited.
    let mut p = small_windows();
    let id = p.a.open_stream().unwrap();
    write_all_accepted(&mut p, id, 0, 3);
    p.drive();
    p.b.stream_stop(id).unwrap();
    p.drive();
    let mut total = 0;
    for _ in 0..20 {
        total += write_all_accepted(&mut p, id, total, 3);
        p.drive();
        assert_eq!(p.b.stream_readable_bytes(id), 0);
    }
    assert!(
        total as u64 > 4 * STREAM_WINDOW,
        "writer kept going: {total}"
    );
    // And another stream still works.
    let r = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
    assert_eq!(r[0].0, r[0].1);
}
