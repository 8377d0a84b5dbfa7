//! A listener under load answers a HELLO that shows no cookie for its
//! source with a COOKIE record and no Diffie-Hellman (WireGuard's mac2);
//! the initiator's retry with the cookie gets through.
mod util;

use std::time::{Duration, Instant};

use pool_core::{Acceptor, Config, HandshakeError, Initiator, PublicKey, RecordType, SeededRng};

fn hello(cookie: Option<&[u8; 16]>, stamp: u64) -> (Initiator, Vec<u8>) {
    let mut out = Vec::new();
    let init = Initiator::start_with_cookie(
        &Config::default(),
        &util::key(1),
        util::key(2).public_key(),
        None,
        util::T0_UNIX + stamp,
        cookie,
        &mut SeededRng::from_u64(stamp),
        &mut out,
    )
    .unwrap();
    (init, out)
}

fn accept(
    acc: &mut Acceptor,
    now: Instant,
    source: &[u8],
    rec: &[u8],
    out: &mut Vec<u8>,
) -> Result<pool_core::Session, HandshakeError> {
    acc.accept(
        now,
        util::T0_UNIX,
        source,
        rec,
        &mut |_k: &PublicKey| true,
        &mut SeededRng::from_u64(5),
        out,
    )
}

#[test]
fn under_load_a_hello_without_cookie_gets_one_and_the_retry_passes() {
    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let mut acc = Acceptor::new(&cfg, util::key(2), None);
    acc.set_under_load(true);
    let now = Instant::now();
    let (init, h) = hello(None, 1);
    let mut out = Vec::new();
    let err = accept(&mut acc, now, b"10.0.0.1", &h, &mut out).unwrap_err();
    assert_eq!(err, HandshakeError::CookieRequired);
    assert_eq!(out[0], RecordType::Cookie as u8);
    assert_eq!(out.len(), 4 + 16);
    let cookie = match init.finish(now, &out) {
        Err(HandshakeError::CookieReply { cookie }) => cookie,
        other => panic!("{other:?}"),
    };
    // The retry carries mac2 and is accepted, still under load.
    let (init, h) = hello(Some(&cookie), 2);
    let mut welcome = Vec::new();
    let b = accept(&mut acc, now, b"10.0.0.1", &h, &mut welcome).expect("with cookie");
    let a = init.finish(now, &welcome).expect("session");
    assert_eq!(a.id(), b.id());

    // The cookie is bound to its source: from another address it is not
    // enough (that source gets its own cookie).
    let (_, h) = hello(Some(&cookie), 3);
    let mut out = Vec::new();
    assert_eq!(
        accept(&mut acc, now, b"10.0.0.2", &h, &mut out).unwrap_err(),
        HandshakeError::CookieRequired
    );
    // A wrong mac2 is refused the same way.
    let (_, mut h) = hello(Some(&cookie), 4);
    let last = h.len() - 1;
    h[last] ^= 1;
    assert_eq!(
        accept(&mut acc, now, b"10.0.0.1", &h, &mut Vec::new()).unwrap_err(),
        HandshakeError::CookieRequired
    );
}

#[test]
fn cookies_expire_after_two_rotations() {
    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let mut acc = Acceptor::new(&cfg, util::key(2), None);
    acc.set_under_load(true);
    let t0 = Instant::now();
    let mut out = Vec::new();
    let _ = accept(&mut acc, t0, b"s", &hello(None, 1).1, &mut out);
    let cookie: [u8; 16] = out[4..].try_into().unwrap();
    // One rotation later the previous secret still counts.
    let t1 = t0 + Duration::from_secs(121);
    let _ = accept(&mut acc, t1, b"x", &hello(None, 2).1, &mut Vec::new());
    accept(
        &mut acc,
        t1,
        b"s",
        &hello(Some(&cookie), 3).1,
        &mut Vec::new(),
    )
    .expect("previous secret still valid");
    // Two rotations later it does not.
    let t2 = t1 + Duration::from_secs(121);
    let _ = accept(&mut acc, t2, b"x", &hello(None, 4).1, &mut Vec::new());
    assert_eq!(
        accept(
            &mut acc,
            t2,
            b"s",
            &hello(Some(&cookie), 5).1,
            &mut Vec::new()
        )
        .unwrap_err(),
        HandshakeError::CookieRequired
    );
}

#[test]
fn not_under_load_cookies_are_not_needed_and_mac2_is_harmless() {
    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let mut acc = Acceptor::new(&cfg, util::key(2), None);
    let now = Instant::now();
    accept(&mut acc, now, b"s", &hello(None, 1).1, &mut Vec::new()).expect("plain HELLO");
    accept(
        &mut acc,
        now,
        b"s",
        &hello(Some(&[7; 16]), 2).1,
        &mut Vec::new(),
    )
    .expect("a HELLO with a stale mac2 when not under load");
}
