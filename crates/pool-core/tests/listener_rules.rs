//! The listener's rules on a virtual clock, without sockets: first-record
//! dispatch, RESUME lookup, source keys, handshake slots, "under load" with
//! its hysteresis, and the split HELLO path (gate, Diffie-Hellman outside
//! the lock, replay table) that `pool-net` drives.
mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pool_core::listener::{
    first_record, resume_target, source_key, write_unexpected_first, FirstRecord, HandshakeSlots,
    HelloDecision, Listener, LoadMeter, ResumeTarget, HELLO_BACKLOG, LOAD_HOLD, PENDING_PER_SOURCE,
};
use pool_core::{
    write_key_probe, Config, HandshakeError, Initiator, PublicKey, RecordType, ReplayTable,
    SeededRng, SessionId,
};

fn cfg() -> Config {
    let mut c = Config::default();
    c.handshake_rate(None);
    c
}

/// A HELLO from key `from` to key 2, stamped `stamp` ns after `T0_UNIX`.
fn hello(from: u64, cookie: Option<&[u8; 16]>, stamp: u64) -> (Initiator, Vec<u8>) {
    let mut out = Vec::new();
    let init = Initiator::start_with_cookie(
        &Config::default(),
        &util::key(from),
        util::key(2).public_key(),
        None,
        util::T0_UNIX + stamp,
        cookie,
        &mut SeededRng::from_u64(stamp ^ from),
        &mut out,
    )
    .unwrap();
    (init, out)
}

fn listener(max_pending: usize) -> Listener {
    Listener::new(&cfg(), util::key(2), None, max_pending)
}

fn decide(l: &mut Listener, now: Instant, src: &[u8], rec: &[u8]) -> (HelloDecision, Vec<u8>) {
    let mut out = Vec::new();
    let d = l.handle_hello(now, src, rec, &mut SeededRng::from_u64(9), &mut out);
    (d, out)
}

#[test]
fn first_record_dispatch() {
    let (_, h) = hello(1, None, 1);
    assert_eq!(first_record(&h), FirstRecord::Hello);
    let mut p = Vec::new();
    write_key_probe(&mut p);
    assert_eq!(first_record(&p), FirstRecord::Probe);
    let mut r = vec![RecordType::Resume as u8, 0, 0, 16];
    r.extend_from_slice(&[7; 16]);
    assert_eq!(first_record(&r), FirstRecord::Resume);
    assert_eq!(
        first_record(&[RecordType::Welcome as u8, 0, 0, 0]),
        FirstRecord::Other
    );
    assert_eq!(first_record(&[]), FirstRecord::Other);
    let mut out = Vec::new();
    write_unexpected_first(&mut out);
    assert_eq!(out[0], RecordType::Refuse as u8);
}

#[test]
fn resume_lookup_decisions() {
    let mut r = vec![RecordType::Resume as u8, 0, 0, 16];
    r.extend_from_slice(&[7; 16]);
    let known = resume_target(&r, |id| (*id == SessionId([7; 16])).then_some("s"));
    assert!(matches!(known, ResumeTarget::Known("s")));
    let unknown = resume_target(&r, |_| None::<()>);
    assert!(matches!(unknown, ResumeTarget::Unknown));
    let bad = resume_target(&r[..10], |_| Some(()));
    assert!(matches!(bad, ResumeTarget::Malformed(_)));
    // The proven refusal for an unknown session comes from the keys.
    let l = listener(8);
    let mut out = Vec::new();
    l.keys().write_resume_refusal(&r, &mut out);
    assert_eq!(out[0], RecordType::Refuse as u8);
}

#[test]
fn source_keys() {
    let v4: SocketAddr = "10.1.2.3:5".parse().unwrap();
    assert_eq!(source_key(v4, None), vec![10, 1, 2, 3]);
    let mapped: SocketAddr = "[::ffff:10.1.2.3]:6".parse().unwrap();
    assert_eq!(source_key(mapped, None), vec![10, 1, 2, 3]);
    let a: SocketAddr = "[2001:db8:1:2::1]:7".parse().unwrap();
    let b: SocketAddr = "[2001:db8:1:2:ffff::9]:8".parse().unwrap();
    assert_eq!(source_key(a, None), source_key(b, None));
    assert_eq!(source_key(a, None).len(), 8);
    let k = util::key(4).public_key();
    let relayed = source_key(v4, Some(&k));
    assert!(relayed.starts_with(b"relayed:"));
    assert_ne!(relayed, source_key(v4, Some(&util::key(5).public_key())));
}

#[test]
fn slots_per_source_and_in_all() {
    let mut s = HandshakeSlots::new(PENDING_PER_SOURCE + 4);
    for _ in 0..PENDING_PER_SOURCE {
        assert!(s.take(b"a"));
    }
    assert!(!s.take(b"a"), "one source holds at most PENDING_PER_SOURCE");
    for _ in 0..4 {
        assert!(s.take(b"b"));
    }
    assert!(!s.take(b"c"), "the listener's slots are all taken");
    s.release(b"a");
    assert!(s.take(b"a"), "a released slot can be taken again");
    assert!(!s.take(b"c"));
    s.release(b"b");
    assert!(s.take(b"c"));
    // Releasing what was never taken changes nothing.
    let before = s.in_use();
    s.release(b"zzz");
    assert_eq!(s.in_use(), before);
}

#[test]
fn load_meter_holds_after_pressure_while_dh_is_wasted() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut m = LoadMeter::default();
    assert!(!m.update(t0, false));
    assert!(m.update(t0, true));
    // Pressure, but no Diffie-Hellman wasted (real clients): no hold.
    assert!(!m.update(t0 + ms(1), false));
    // Pressure, and the admitted HELLOs are refused after their DH: held.
    assert!(m.update(t0 + ms(2), true));
    m.wasted(t0 + ms(3));
    assert!(m.update(t0 + LOAD_HOLD / 2, false));
    assert!(m.update(t0 + ms(2) + LOAD_HOLD - ms(1), false));
    assert!(!m.update(t0 + ms(2) + LOAD_HOLD, false));
    // Pressure again holds again, while the waste is recent.
    assert!(m.update(t0 + ms(500), true));
    assert!(m.update(t0 + ms(500) + ms(502), false));
    assert!(!m.update(t0 + ms(3) + LOAD_HOLD, false));
}

#[test]
fn backlog_turns_on_cookies_which_stay_on_for_the_hold() {
    let t0 = Instant::now();
    let mut l = listener(1024);
    let mut admitted = Vec::new();
    for i in 0..HELLO_BACKLOG as u64 {
        let (_, h) = hello(10 + i, None, i + 1);
        match decide(&mut l, t0, b"s", &h).0 {
            HelloDecision::Admit(a) => admitted.push((a, h)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(l.backlog(), HELLO_BACKLOG);
    // The backlog is full: the next HELLO costs one MAC and a cookie.
    let (_, h) = hello(20, None, 50);
    let (d, out) = decide(&mut l, t0, b"s", &h);
    assert!(matches!(d, HelloDecision::Cookie), "{d:?}");
    assert_eq!(out[0], RecordType::Cookie as u8);
    // The Diffie-Hellman work finishes, each refused (untrusted keys, say):
    // wasted. The backlog empties.
    for (a, h) in admitted {
        let _ = a.open(&h, &mut SeededRng::from_u64(1)).unwrap();
        l.hello_done(t0, true);
    }
    assert_eq!(l.backlog(), 0);
    // Still under load within the hold...
    let later = t0 + LOAD_HOLD - Duration::from_millis(1);
    let (d, _) = decide(&mut l, later, b"s", &h);
    assert!(matches!(d, HelloDecision::Cookie), "{d:?}");
    // ...and not after it.
    let (d, _) = decide(&mut l, t0 + LOAD_HOLD + LOAD_HOLD, b"s", &h);
    assert!(matches!(d, HelloDecision::Admit(_)), "{d:?}");
}

#[test]
fn over_half_the_slots_is_under_load() {
    let t0 = Instant::now();
    let mut l = listener(8);
    for i in 0..5u8 {
        assert!(l.take_slot(&[i]));
    }
    let (_, h) = hello(1, None, 1);
    assert!(matches!(
        decide(&mut l, t0, b"s", &h).0,
        HelloDecision::Cookie
    ));
    for i in 0..5u8 {
        l.release_slot(&[i]);
    }
    assert_eq!(l.slots_in_use(), 0);
    let t1 = t0 + LOAD_HOLD;
    assert!(matches!(
        decide(&mut l, t1, b"s", &h).0,
        HelloDecision::Admit(_)
    ));
}

#[test]
fn bad_mac_is_refused_by_the_gate() {
    let mut l = listener(8);
    let (_, mut h) = hello(1, None, 1);
    let n = h.len();
    h[n - 1] ^= 1;
    match decide(&mut l, Instant::now(), b"s", &h).0 {
        HelloDecision::Refuse(HandshakeError::BadMac) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(l.backlog(), 0);
}

/// The whole split path: cookie, retry, gate, DH, replay table, WELCOME,
/// and the initiator finishes.
#[test]
fn cookie_round_trip_then_split_accept() {
    let t0 = Instant::now();
    let mut l = listener(4);
    // Three slots of four taken: under load.
    for i in 0..3u8 {
        assert!(l.take_slot(&[i]));
    }
    let (init, h) = hello(1, None, 1);
    let (d, out) = decide(&mut l, t0, b"10.0.0.1", &h);
    assert!(matches!(d, HelloDecision::Cookie));
    let cookie = match init.finish(t0, &out) {
        Err(HandshakeError::CookieReply { cookie }) => cookie,
        other => panic!("{other:?}"),
    };
    // The cookie is bound to the source.
    let (_, h2) = hello(1, Some(&cookie), 2);
    assert!(matches!(
        decide(&mut l, t0, b"10.0.0.2", &h2).0,
        HelloDecision::Cookie
    ));
    let (init, h3) = hello(1, Some(&cookie), 3);
    let a = match decide(&mut l, t0, b"10.0.0.1", &h3).0 {
        HelloDecision::Admit(a) => a,
        other => panic!("{other:?}"),
    };
    let opened = a.open(&h3, &mut SeededRng::from_u64(3)).unwrap();
    l.hello_done(t0, false);
    assert_eq!(opened.peer(), util::key(1).public_key());
    let mut table = ReplayTable::new();
    table
        .admit(&opened, util::T0_UNIX, &mut |_: &PublicKey| true)
        .unwrap();
    let mut welcome = Vec::new();
    let server = opened.welcome(t0, &mut welcome).unwrap();
    let client = init.finish(t0, &welcome).unwrap();
    assert_eq!(client.id(), server.id());
}

/// Two copies of one HELLO opened at once (two DH threads): the replay
/// table lets one through.
#[test]
fn concurrent_copies_of_a_hello_get_in_once() {
    let t0 = Instant::now();
    let mut l = listener(64);
    let (_, h) = hello(1, None, 1);
    let mut opened = Vec::new();
    for _ in 0..2 {
        match decide(&mut l, t0, b"s", &h).0 {
            HelloDecision::Admit(a) => {
                opened.push(a.open(&h, &mut SeededRng::from_u64(4)).unwrap())
            }
            other => panic!("{other:?}"),
        }
    }
    let mut table = ReplayTable::new();
    let mut yes = |_: &PublicKey| true;
    assert!(table.admit(&opened[0], util::T0_UNIX, &mut yes).is_ok());
    assert!(matches!(
        table.admit(&opened[1], util::T0_UNIX, &mut yes),
        Err(HandshakeError::Replayed { .. })
    ));
}

/// A reload takes new keys for new HELLOs; one admitted before it finishes
/// with the keys it was checked against, and the rate limiter stays.
#[test]
fn reload_swaps_keys_but_keeps_the_limiter() {
    let t0 = Instant::now();
    let mut c = Config::default();
    c.handshake_rate(Some((1, 1)));
    let mut l = Listener::new(&c, util::key(2), None, 64);
    let (_, h) = hello(1, None, 1);
    let a = match decide(&mut l, t0, b"s", &h).0 {
        HelloDecision::Admit(a) => a,
        other => panic!("{other:?}"),
    };
    l.reconfigure(&c, util::key(3), None);
    assert_eq!(l.keys().public_key(), util::key(3).public_key());
    assert!(a.open(&h, &mut SeededRng::from_u64(1)).is_ok());
    // The bucket (burst 1) is still empty after the reload.
    let (_, h2) = hello(1, None, 2);
    assert!(matches!(
        decide(&mut l, t0, b"s", &h2).0,
        HelloDecision::Refuse(HandshakeError::RateLimited)
    ));
    // A HELLO made for the old key now fails its mac1, before any DH.
    assert!(matches!(
        decide(&mut l, t0 + Duration::from_secs(2), b"s", &h2).0,
        HelloDecision::Refuse(HandshakeError::BadMac)
    ));
}

/// Under load a HELLO answered with a cookie gives its rate-limit token
/// back: a real client's cookie round trip costs one token, not two, and
/// the limit still bounds the HELLOs that reach Diffie-Hellman.
#[test]
fn cookie_answers_cost_no_rate_limit_token() {
    let t0 = Instant::now();
    let mut c = Config::default();
    c.handshake_rate(Some((1, 2)));
    let mut l = Listener::new(&c, util::key(2), None, 4);
    for i in 0..3u8 {
        assert!(l.take_slot(&[i]));
    }
    // Many cookies, and the burst of 2 is still there.
    for i in 0..10 {
        let (_, h) = hello(1, None, i + 1);
        assert!(matches!(
            decide(&mut l, t0, b"s", &h).0,
            HelloDecision::Cookie
        ));
    }
    let (init, h) = hello(1, None, 100);
    let (_, out) = decide(&mut l, t0, b"s", &h);
    let cookie = match init.finish(t0, &out) {
        Err(HandshakeError::CookieReply { cookie }) => cookie,
        other => panic!("{other:?}"),
    };
    for i in 0..2 {
        let (_, h) = hello(1, Some(&cookie), 200 + i);
        assert!(matches!(
            decide(&mut l, t0, b"s", &h).0,
            HelloDecision::Admit(_)
        ));
    }
    let (_, h) = hello(1, Some(&cookie), 300);
    assert!(matches!(
        decide(&mut l, t0, b"s", &h).0,
        HelloDecision::Refuse(HandshakeError::RateLimited)
    ));
}

/// A burst of real clients fills the backlog, but their Diffie-Hellman is
/// not wasted: cookies only while the backlog is full, no hold after it.
#[test]
fn a_burst_of_real_clients_is_not_held_under_load() {
    let t0 = Instant::now();
    let mut l = listener(1024);
    for i in 0..HELLO_BACKLOG as u64 {
        let (_, h) = hello(10 + i, None, i + 1);
        assert!(matches!(
            decide(&mut l, t0, b"s", &h).0,
            HelloDecision::Admit(_)
        ));
    }
    let (_, h) = hello(20, None, 50);
    assert!(matches!(
        decide(&mut l, t0, b"s", &h).0,
        HelloDecision::Cookie
    ));
    for _ in 0..HELLO_BACKLOG {
        l.hello_done(t0, false);
    }
    let (_, h) = hello(21, None, 51);
    let d = decide(&mut l, t0 + Duration::from_millis(1), b"s", &h).0;
    assert!(matches!(d, HelloDecision::Admit(_)), "{d:?}");
}
