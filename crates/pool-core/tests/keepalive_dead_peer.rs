//! Keepalive: an idle session pings and measures the round trip; a carrier
//! that silently stops delivering is declared dead after `dead_after`, and
//! a session with no carrier is closed at the resume deadline.
mod util;

use std::time::Duration;

use pool_core::{CloseReason, Config, Event};

fn count(events: &[Event], e: &Event) -> usize {
    events.iter().filter(|x| *x == e).count()
}

#[test]
fn idle_session_pings_and_stays_up() {
    let mut p = util::pair();
    p.drive();
    let (ra, rb) = (p.a.stats().records_sent, p.b.stats().records_sent);
    // Two minutes of silence from the application, far past dead_after (20 s).
    for _ in 0..120 {
        p.advance(Duration::from_secs(1));
    }
    let (sa, sb) = (p.a.stats(), p.b.stats());
    // A ping every 5 s from each side (and pongs): at least 24 records each.
    assert!(sa.records_sent - ra >= 24, "{}", sa.records_sent - ra);
    assert!(sb.records_sent - rb >= 24, "{}", sb.records_sent - rb);
    // ...but not a flood: at most a ping, a pong and an ack per interval.
    assert!(sa.records_sent - ra <= 3 * 25, "{}", sa.records_sent - ra);
    assert!(sa.rtt.is_some() && sb.rtt.is_some());
    assert_eq!(count(&p.a_events, &Event::CarrierDead), 0);
    assert_eq!(count(&p.b_events, &Event::CarrierDead), 0);
    assert!(p.a.carrier_up() && p.b.carrier_up());
    assert!(util::closed_reason(&p.a_events).is_none());
}

#[test]
fn rtt_measures_the_delay_of_the_carrier() {
    let mut p = util::pair();
    // a's first record carries a ping; hold it 40 ms in flight.
    p.hold_ab = true;
    p.drive();
    assert!(!p.ab.is_empty());
    p.advance(Duration::from_millis(40));
    p.hold_ab = false;
    p.drive();
    let s = p.a.stats();
    assert_eq!(s.rtt, Some(Duration::from_millis(40)));
    assert_eq!(s.min_rtt, Some(Duration::from_millis(40)));

    // Next pings come back at once: the smoothed RTT falls, the minimum
    // follows the fastest sample, jitter shows the change.
    for _ in 0..4 {
        p.advance(Duration::from_secs(5));
    }
    let s = p.a.stats();
    assert_eq!(s.min_rtt, Some(Duration::ZERO));
    let rtt = s.rtt.unwrap();
    assert!(
        rtt < Duration::from_millis(40) && rtt > Duration::ZERO,
        "{rtt:?}"
    );
    assert!(s.jitter > Duration::ZERO);
    // b's first ping was answered through the held direction too.
    let sb = p.b.stats();
    assert_eq!(sb.min_rtt, Some(Duration::ZERO));
    assert!(sb.rtt.unwrap() > Duration::ZERO);
}

#[test]
fn silent_carrier_is_declared_dead_then_resume_deadline_closes() {
    // Only the keepalive rule here; the probe rule is tested below.
    let mut c = Config::default();
    c.probe_timeout(None);
    let mut p = util::handshake_with(&c, &c, None).unwrap();
    p.drive();
    p.advance(Duration::from_secs(3));
    // The carrier stops delivering in both directions, without an error.
    p.hold_ab = true;
    p.hold_ba = true;
    let silent_from = p.now;
    let mut dead_at = [None, None];
    let mut closed_at = [None, None];
    for _ in 0..200 {
        p.advance(Duration::from_millis(500));
        for (i, ev) in [&p.a_events, &p.b_events].into_iter().enumerate() {
            if dead_at[i].is_none() && ev.contains(&Event::CarrierDead) {
                dead_at[i] = Some(p.now - silent_from);
            }
            if closed_at[i].is_none() && util::closed_reason(ev).is_some() {
                closed_at[i] = Some(p.now - silent_from);
            }
        }
    }
    // Declared dead 20 s (dead_after) after the last record arrived: the
    // last one came at most a keepalive (5 s) before the silence.
    for (i, d) in dead_at.iter().enumerate() {
        let d = d.unwrap_or_else(|| panic!("side {i}: no CarrierDead"));
        assert!(
            d >= Duration::from_secs(15) && d <= Duration::from_secs(21),
            "side {i}: dead after {d:?}"
        );
    }
    assert!(!p.a.carrier_up() && !p.b.carrier_up());
    assert_eq!(count(&p.a_events, &Event::CarrierDead), 1);
    // Closed 60 s (resume deadline) after the carrier was declared dead.
    for i in 0..2 {
        let c = closed_at[i].unwrap_or_else(|| panic!("side {i}: not closed"));
        let since_dead = c - dead_at[i].unwrap();
        assert!(
            since_dead >= Duration::from_secs(60) && since_dead <= Duration::from_millis(60_500),
            "side {i}: closed {since_dead:?} after dead"
        );
    }
    for ev in [&p.a_events, &p.b_events] {
        assert_eq!(
            util::closed_reason(ev),
            Some(&CloseReason::ResumeDeadline { secs: 60 })
        );
    }
    assert!(p.a.is_closed() && p.b.is_closed());
    assert_eq!(p.a.poll_timeout(), None, "a closed session wants no timer");
    // A closed session cannot resume.
    assert!(p.resume().is_err());
}

#[test]
fn resume_before_the_deadline_keeps_the_session() {
    let mut c = Config::default();
    c.dead_after(Duration::from_secs(4))
        .keepalive(Duration::from_secs(1))
        .resume_deadline(Duration::from_secs(10))
        .probe_timeout(None);
    let mut p = util::handshake_with(&c, &c, None).unwrap();
    p.drive();
    p.hold_ab = true;
    p.hold_ba = true;
    p.advance(Duration::from_secs(5));
    assert!(p.a_events.contains(&Event::CarrierDead));
    assert!(!p.a.carrier_up());
    p.advance(Duration::from_secs(8));
    assert!(!p.a.is_closed(), "within the deadline");
    p.cut();
    p.resume().expect("resume");
    // Far past the old deadline, the session lives on.
    for _ in 0..30 {
        p.advance(Duration::from_secs(1));
    }
    assert!(!p.a.is_closed() && !p.b.is_closed());
    assert!(p.a.carrier_up());
    let r = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
    assert_eq!(r[0].0, r[0].1);
}

#[test]
fn one_way_silence_is_noticed_by_the_deaf_side() {
    // a→b stops; b→a still flows. b hears nothing and declares the carrier
    // dead; a keeps hearing b's pings until b drops the carrier.
    let mut c = Config::default();
    c.dead_after(Duration::from_secs(6))
        .keepalive(Duration::from_secs(2))
        .probe_timeout(None);
    let mut p = util::handshake_with(&c, &c, None).unwrap();
    p.drive();
    p.hold_ab = true;
    p.advance(Duration::from_millis(6500));
    assert!(p.b_events.contains(&Event::CarrierDead));
    assert!(!p.b.carrier_up());
    assert!(!p.a_events.contains(&Event::CarrierDead));
}

#[test]
fn unanswered_data_declares_the_path_dead_within_the_probe_timeout() {
    // Default config: probe timeout 2 s. The path goes silent both ways
    // while a has data in flight: a gives up on it ~2 s later, far before
    // dead_after (20 s), and so does b (its pings go unanswered).
    let mut p = util::pair();
    p.drive();
    p.advance(Duration::from_secs(1));
    p.hold_ab = true;
    p.hold_ba = true;
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, &[7u8; 1000]).unwrap();
    let cut = p.now;
    let mut dead_at = None;
    for _ in 0..100 {
        p.advance(Duration::from_millis(100));
        if dead_at.is_none() && p.a_events.contains(&Event::CarrierDead) {
            dead_at = Some(p.now - cut);
        }
    }
    let d = dead_at.expect("a noticed the cut");
    assert!(
        d >= Duration::from_secs(2) && d <= Duration::from_millis(2200),
        "dead after {d:?}"
    );
    assert!(!p.a.carrier_up());
    // The data is still queued for the next carrier: nothing lost.
    p.cut();
    p.resume().expect("resume");
    p.drive();
    let mut got = vec![0u8; 2000];
    let n = match p.b.stream_read(id, &mut got).unwrap() {
        pool_core::ReadResult::Data(n) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!(n, 1000);
}

#[test]
fn a_slow_path_that_answers_is_never_declared_dead() {
    // The carrier delivers in bursts 1.5 s apart (both ways) while data
    // flows: slow, but it answers before the 2 s probe timeout each time.
    let mut p = util::pair();
    p.drive();
    let id = p.a.open_stream().unwrap();
    let mut sent = 0usize;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..20 {
        sent += p.a.stream_write(id, &[1u8; 8192]).unwrap_or(0);
        p.hold_ab = true;
        p.hold_ba = true;
        p.advance(Duration::from_millis(1500));
        p.hold_ab = false;
        p.hold_ba = false;
        p.drive();
        while let Ok(pool_core::ReadResult::Data(n)) = p.b.stream_read(id, &mut buf) {
            got += n;
        }
        p.drive();
    }
    assert!(sent > 0 && got == sent, "sent {sent}, got {got}");
    assert!(!p.a_events.contains(&Event::CarrierDead));
    assert!(!p.b_events.contains(&Event::CarrierDead));
    assert!(p.a.carrier_up() && p.b.carrier_up());
}

#[test]
fn a_receiver_notices_a_dead_path_too() {
    // b sends, a only receives (a owes acks but is owed nothing). While
    // data moves, a pings every half probe timeout, so when the path goes
    // silent a notices within 1.5 probe timeouts, not at the next
    // keepalive.
    let mut p = util::pair();
    p.drive();
    let id = p.b.open_stream().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..30 {
        let _ = p.b.stream_write(id, &[3u8; 4096]);
        p.advance(Duration::from_millis(100));
        while let Ok(pool_core::ReadResult::Data(_)) = p.a.stream_read(id, &mut buf) {}
    }
    p.hold_ab = true;
    p.hold_ba = true;
    let cut = p.now;
    let mut dead_at = None;
    for _ in 0..100 {
        p.advance(Duration::from_millis(100));
        if dead_at.is_none() && p.a_events.contains(&Event::CarrierDead) {
            dead_at = Some(p.now - cut);
        }
    }
    let d = dead_at.expect("the receiver noticed");
    assert!(d <= Duration::from_millis(3100), "dead after {d:?}");
}
