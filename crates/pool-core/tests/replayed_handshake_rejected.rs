//! Handshake replay: a HELLO seen before, or one whose timestamp is far
//! from our clock, is refused; a source that sends too many is throttled;
//! a RESUME already used cannot be used again.
mod util;

use std::time::{Duration, Instant};

use pool_core::{Acceptor, Config, HandshakeError, Initiator, SecretKey, SeededRng, Session};

const SEC: u64 = 1_000_000_000;

/// A HELLO from `from` to key 2 stamped `unix_nanos`.
fn hello(from: &SecretKey, unix_nanos: u64, seed: u64) -> (Initiator, Vec<u8>) {
    let mut out = Vec::new();
    let init = Initiator::start(
        &Config::default(),
        from,
        util::key(2).public_key(),
        None,
        unix_nanos,
        &mut SeededRng::from_u64(seed),
        &mut out,
    )
    .unwrap();
    (init, out)
}

fn accept_at(
    acc: &mut Acceptor,
    now: Instant,
    clock: u64,
    source: &[u8],
    record: &[u8],
) -> Result<(Session, Vec<u8>), HandshakeError> {
    let mut out = Vec::new();
    let s = acc.accept(
        now,
        clock,
        source,
        record,
        &mut |_| true,
        &mut SeededRng::from_u64(77),
        &mut out,
    )?;
    Ok((s, out))
}

#[test]
fn same_hello_twice_is_a_replay() {
    let mut acc = Acceptor::new(&Config::default(), util::key(2), None);
    let now = Instant::now();
    let (init, h) = hello(&util::key(1), util::T0_UNIX, 1);
    let (b, welcome) = accept_at(&mut acc, now, util::T0_UNIX, b"s", &h).expect("first");
    let err = accept_at(&mut acc, now, util::T0_UNIX + SEC, b"s", &h).unwrap_err();
    let a_pub = util::key(1).public_key();
    assert_eq!(err, HandshakeError::Replayed { key: a_pub });
    assert!(err.to_string().contains("replayed"), "{err}");
    // The first session is unharmed by the replay.
    let a = init.finish(now, &welcome).expect("welcome");
    assert_eq!(a.id(), b.id());
}

#[test]
fn older_timestamp_after_newer_is_a_replay_but_newer_is_fine() {
    let mut acc = Acceptor::new(&Config::default(), util::key(2), None);
    let now = Instant::now();
    let k1 = util::key(1);
    let (_, h_new) = hello(&k1, util::T0_UNIX + 10 * SEC, 1);
    let (_, h_old) = hello(&k1, util::T0_UNIX + 5 * SEC, 2);
    let (_, h_newer) = hello(&k1, util::T0_UNIX + 11 * SEC, 3);
    accept_at(&mut acc, now, util::T0_UNIX, b"s", &h_new).expect("new");
    assert!(matches!(
        accept_at(&mut acc, now, util::T0_UNIX, b"s", &h_old),
        Err(HandshakeError::Replayed { .. })
    ));
    accept_at(&mut acc, now, util::T0_UNIX, b"s", &h_newer).expect("newer");
    // Timestamps are tracked per key: another key with an old stamp is fine.
    let (_, h_other) = hello(&util::key(5), util::T0_UNIX, 4);
    accept_at(&mut acc, now, util::T0_UNIX, b"s", &h_other).expect("other key");
}

#[test]
fn parallel_handshakes_from_one_key_may_arrive_out_of_order() {
    let mut acc = Acceptor::new(&Config::default(), util::key(2), None);
    let now = Instant::now();
    let k1 = util::key(1);
    // Three sessions opened at once; their HELLOs arrive in reverse order.
    let hs: Vec<_> = (0..3)
        .map(|i| hello(&k1, util::T0_UNIX + i * 1_000_000, 10 + i).1)
        .collect();
    for h in hs.iter().rev() {
        accept_at(&mut acc, now, util::T0_UNIX, b"s", h).expect("fresh, only reordered");
    }
    // Any of them again is a replay.
    for h in &hs {
        assert!(matches!(
            accept_at(&mut acc, now, util::T0_UNIX, b"s", h),
            Err(HandshakeError::Replayed { .. })
        ));
    }
}

#[test]
fn timestamp_far_from_our_clock_is_clock_skew() {
    let mut acc = Acceptor::new(&Config::default(), util::key(2), None);
    let now = Instant::now();
    // Default limit: 10 minutes, either way.
    for (stamp, clock) in [
        (util::T0_UNIX, util::T0_UNIX + 11 * 60 * SEC),
        (util::T0_UNIX + 11 * 60 * SEC, util::T0_UNIX),
    ] {
        let (_, h) = hello(&util::key(1), stamp, stamp);
        let err = accept_at(&mut acc, now, clock, b"s", &h).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::ClockSkew {
                skew_secs: 660,
                limit_secs: 600
            }
        );
        assert!(err.to_string().contains("check both clocks"), "{err}");
    }
    // Within the limit is accepted.
    let (_, h) = hello(&util::key(1), util::T0_UNIX, 9);
    accept_at(&mut acc, now, util::T0_UNIX + 9 * 60 * SEC, b"s", &h).expect("9 min skew");

    // A tighter limit.
    let mut cfg = Config::default();
    cfg.max_clock_skew(Duration::from_secs(2));
    let mut acc = Acceptor::new(&cfg, util::key(2), None);
    let (_, h) = hello(&util::key(1), util::T0_UNIX, 10);
    assert!(matches!(
        accept_at(&mut acc, now, util::T0_UNIX + 3 * SEC, b"s", &h),
        Err(HandshakeError::ClockSkew {
            skew_secs: 3,
            limit_secs: 2
        })
    ));
    accept_at(&mut acc, now, util::T0_UNIX + SEC, b"s", &h).expect("1 s skew");
}

#[test]
fn per_source_rate_limit() {
    let mut cfg = Config::default();
    cfg.handshake_rate(Some((1, 3)));
    let mut acc = Acceptor::new(&cfg, util::key(2), None);
    let now = Instant::now();
    let k1 = util::key(1);
    let mut stamp = util::T0_UNIX;
    let mut next_hello = || {
        stamp += 1;
        hello(&k1, stamp, stamp).1
    };
    // The burst of 3 from one source passes.
    for _ in 0..3 {
        accept_at(&mut acc, now, util::T0_UNIX, b"10.0.0.1", &next_hello()).expect("burst");
    }
    // A fourth valid HELLO at once is throttled...
    let h = next_hello();
    let err = accept_at(&mut acc, now, util::T0_UNIX, b"10.0.0.1", &h).unwrap_err();
    assert_eq!(err, HandshakeError::RateLimited);
    // ...and so is garbage (the limit is the first check, before parsing).
    assert_eq!(
        accept_at(&mut acc, now, util::T0_UNIX, b"10.0.0.1", b"junk").unwrap_err(),
        HandshakeError::RateLimited
    );
    // Another source is not affected.
    accept_at(&mut acc, now, util::T0_UNIX, b"10.0.0.2", &h).expect("other source");
    // One second later one more token is there, and only one.
    let later = now + Duration::from_secs(1);
    accept_at(&mut acc, later, util::T0_UNIX, b"10.0.0.1", &next_hello()).expect("refilled");
    assert_eq!(
        accept_at(&mut acc, later, util::T0_UNIX, b"10.0.0.1", &next_hello()).unwrap_err(),
        HandshakeError::RateLimited
    );

    // Without a limit, no throttling.
    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let mut acc = Acceptor::new(&cfg, util::key(2), None);
    for _ in 0..20 {
        accept_at(&mut acc, now, util::T0_UNIX, b"10.0.0.1", &next_hello()).expect("no limit");
    }
}

#[test]
fn replayed_resume_is_stale() {
    let mut p = util::pair();
    p.drive();
    let mut resume = Vec::new();
    p.a.start_resume(&mut p.rng, &mut resume).unwrap();
    let mut reply = Vec::new();
    p.b.handle_resume(p.now, &resume, &mut p.rng, &mut reply)
        .expect("first resume");
    p.a.finish_resume(p.now, &reply).expect("resumed");
    p.commit_resume().expect("first record on the new carrier");
    assert_eq!(p.b.stats().epoch, 1);

    // The same RESUME bytes again (an attacker replaying the new carrier).
    let mut reply2 = Vec::new();
    let err =
        p.b.handle_resume(p.now, &resume, &mut p.rng, &mut reply2)
            .unwrap_err();
    assert_eq!(err, HandshakeError::StaleResume { got: 1, current: 1 });
    assert!(reply2.is_empty());
    assert_eq!(p.b.stats().resumes, 1);

    // The session goes on, on epoch 1, and a later real resume still works.
    let r = util::transfer(&mut p, 2, 1 << 20, |_, _| {});
    assert!(r.iter().all(|(s, g, ns, ng)| s == g && ns == ng));
    p.cut();
    p.resume().expect("second resume");
    assert_eq!(p.b.stats().epoch, 2);
    // And the first RESUME is still stale.
    let err =
        p.b.handle_resume(p.now, &resume, &mut p.rng, &mut Vec::new())
            .unwrap_err();
    assert_eq!(err, HandshakeError::StaleResume { got: 1, current: 2 });
    assert!(!p.b.is_closed());
    let r = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
    assert!(r.iter().all(|(s, g, ns, ng)| s == g && ns == ng));
}

#[test]
fn resume_naming_another_session_or_altered_is_refused_harmlessly() {
    let mut p = util::pair();
    p.drive();
    let mut msg = Vec::new();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    assert_eq!(pool_core::resume_session_id(&msg).unwrap(), p.a.id());

    // Another session id (bytes 4..20): no such session here.
    let mut other = msg.clone();
    other[4] ^= 0xff;
    let err =
        p.b.handle_resume(p.now, &other, &mut p.rng, &mut Vec::new())
            .unwrap_err();
    assert_eq!(err, HandshakeError::UnknownSession);

    // The Noise part altered: authentication fails.
    let mut altered = msg.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let err =
        p.b.handle_resume(p.now, &altered, &mut p.rng, &mut Vec::new())
            .unwrap_err();
    assert_eq!(err, HandshakeError::Crypto);

    // The cleartext base epoch or refusal key altered (bytes 24..60): they
    // are bound into the handshake, so authentication fails too.
    for at in [24usize, 27, 28, 59] {
        let mut altered = msg.clone();
        altered[at] ^= 1;
        let err =
            p.b.handle_resume(p.now, &altered, &mut p.rng, &mut Vec::new())
                .unwrap_err();
        assert!(matches!(err, HandshakeError::Crypto), "byte {at}: {err:?}");
    }

    // None touched the session: the genuine RESUME still works.
    assert!(!p.b.is_closed());
    assert_eq!(p.b.stats().epoch, 0);
    let mut reply = Vec::new();
    p.b.handle_resume(p.now, &msg, &mut p.rng, &mut reply)
        .expect("genuine resume");
    p.a.finish_resume(p.now, &reply).expect("resumed");
    p.commit_resume().expect("committed");
    let r = util::transfer(&mut p, 1, 256 << 10, |_, _| {});
    assert!(r.iter().all(|(s, g, ns, ng)| s == g && ns == ng));
}
