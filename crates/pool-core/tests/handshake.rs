//! The IK handshake: both sides agree on the session, the keys and the
//! cipher; a fleet secret admits only those who hold the same one.
mod util;

use pool_core::{write_refusal, CipherSuite, Config, FleetSecret, HandshakeError, Role};

fn ciphers(list: &[CipherSuite]) -> Config {
    let mut c = Config::default();
    c.ciphers(list);
    c
}

/// A short transfer both ways proves the negotiated keys work.
fn exchange_works(p: &mut util::Pair) {
    let id = p.a.open_stream().expect("open");
    let msg = util::pattern(0, 50_000, 1);
    assert_eq!(p.a.stream_write(id, &msg), Ok(msg.len()));
    p.a.stream_finish(id).expect("finish");
    p.drive();
    let (got, fin) = util::read_available(&mut p.b, id).expect("read");
    assert!(fin);
    assert_eq!(got, msg);
    let back = util::pattern(0, 3_000, 2);
    assert_eq!(p.b.stream_write(id, &back), Ok(back.len()));
    p.b.stream_finish(id).expect("finish");
    p.drive();
    let (got, fin) = util::read_available(&mut p.a, id).expect("read");
    assert!(fin);
    assert_eq!(got, back);
}

#[test]
fn both_sides_agree_on_session_and_keys() {
    let mut p = util::pair();
    let (ka, kb) = (util::key(1).public_key(), util::key(2).public_key());
    assert_eq!(p.a.id(), p.b.id());
    assert_eq!(p.a.role(), Role::Initiator);
    assert_eq!(p.b.role(), Role::Responder);
    assert_eq!(p.a.local_key(), ka);
    assert_eq!(p.a.peer_key(), kb);
    assert_eq!(p.b.local_key(), kb);
    assert_eq!(p.b.peer_key(), ka);
    assert_eq!(p.a.cipher(), p.b.cipher());
    assert!(p.a.carrier_up() && p.b.carrier_up());
    assert_eq!(p.a.stats().epoch, 0);
    exchange_works(&mut p);

    // Same keys, other ephemerals: another session id, still agreed.
    let other = handshake_other_seed();
    assert_eq!(other.0, other.1);
    assert_ne!(other.0, p.a.id());
}

/// A handshake with another random seed: returns both sides' session ids.
fn handshake_other_seed() -> (pool_core::SessionId, pool_core::SessionId) {
    use pool_core::{Acceptor, Initiator, SeededRng};
    let now = std::time::Instant::now();
    let cfg = Config::default();
    let mut rng = SeededRng::from_u64(7);
    let (ka, kb) = (util::key(1), util::key(2));
    let mut acc = Acceptor::new(&cfg, kb.clone(), None);
    let mut hello = Vec::new();
    let init = Initiator::start(
        &cfg,
        &ka,
        kb.public_key(),
        None,
        util::T0_UNIX,
        &mut rng,
        &mut hello,
    )
    .unwrap();
    let mut welcome = Vec::new();
    let b = acc
        .accept(
            now,
            util::T0_UNIX,
            b"src",
            &hello,
            &mut |_| true,
            &mut rng,
            &mut welcome,
        )
        .unwrap();
    let a = init.finish(now, &welcome).unwrap();
    (a.id(), b.id())
}

#[test]
fn aes_chosen_when_both_offer_it() {
    let both = ciphers(&[CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305]);
    let mut p = util::handshake_with(&both, &both, None).unwrap();
    assert_eq!(p.a.cipher(), CipherSuite::Aes256Gcm);
    assert_eq!(p.b.cipher(), CipherSuite::Aes256Gcm);
    assert_eq!(p.a.stats().cipher, "aes-256-gcm");
    exchange_works(&mut p);
}

#[test]
fn chacha_chosen_when_one_side_offers_only_chacha() {
    let both = ciphers(&[CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305]);
    let chacha = ciphers(&[CipherSuite::ChaCha20Poly1305]);
    for (ca, cb) in [(&chacha, &both), (&both, &chacha), (&chacha, &chacha)] {
        let mut p = util::handshake_with(ca, cb, None).unwrap();
        assert_eq!(p.a.cipher(), CipherSuite::ChaCha20Poly1305);
        assert_eq!(p.b.cipher(), CipherSuite::ChaCha20Poly1305);
        assert_eq!(p.b.stats().cipher, "chacha20-poly1305");
        exchange_works(&mut p);
    }
}

#[test]
fn responder_preference_decides_among_common_ciphers() {
    let aes_first = ciphers(&[CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305]);
    let chacha_first = ciphers(&[CipherSuite::ChaCha20Poly1305, CipherSuite::Aes256Gcm]);
    let p = util::handshake_with(&aes_first, &chacha_first, None).unwrap();
    assert_eq!(p.a.cipher(), CipherSuite::ChaCha20Poly1305);
    let p = util::handshake_with(&chacha_first, &aes_first, None).unwrap();
    assert_eq!(p.a.cipher(), CipherSuite::Aes256Gcm);
}

#[test]
fn ciphers_setter_always_keeps_chacha() {
    // Asking for AES only still offers ChaCha20, so a ChaCha-only peer connects.
    let aes_only = ciphers(&[CipherSuite::Aes256Gcm]);
    let chacha = ciphers(&[CipherSuite::ChaCha20Poly1305]);
    let p = util::handshake_with(&aes_only, &chacha, None).unwrap();
    assert_eq!(p.a.cipher(), CipherSuite::ChaCha20Poly1305);
}

#[test]
fn same_fleet_secret_works() {
    let f = FleetSecret::from_text("correct horse battery staple\n");
    // Surrounding white space does not change the secret.
    let g = FleetSecret::from_text("  correct horse battery staple");
    let mut p = util::handshake_fleets(&Config::default(), &Config::default(), Some(f), Some(g))
        .expect("same fleet secret");
    assert_eq!(p.a.id(), p.b.id());
    exchange_works(&mut p);
}

#[test]
fn different_fleet_secret_fails_clearly() {
    let err = util::handshake_fleets(
        &Config::default(),
        &Config::default(),
        Some(FleetSecret::from_text("fleet one")),
        Some(FleetSecret::from_text("fleet two")),
    )
    .unwrap_err();
    assert_eq!(err, HandshakeError::Crypto);
    assert!(err.to_string().contains("fleet secret"), "{err}");

    // The initiator learns it from the listener's refusal.
    let mut refusal = Vec::new();
    write_refusal(&err, &mut refusal);
    let a_err = initiator_reading(&refusal);
    match &a_err {
        HandshakeError::Refused { code, reason } => {
            assert_eq!(*code, err.refuse_code());
            assert!(reason.contains("fleet secret"), "{reason}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn fleet_secret_on_one_side_only_fails_clearly() {
    let f = FleetSecret::from_text("fleet");
    let err = util::handshake_fleets(
        &Config::default(),
        &Config::default(),
        None,
        Some(f.clone()),
    )
    .unwrap_err();
    assert_eq!(
        err,
        HandshakeError::FleetSecretMismatch {
            ours: "requires",
            theirs: "sent none"
        }
    );
    assert!(err.to_string().contains("fleet secret mismatch"), "{err}");

    let err =
        util::handshake_fleets(&Config::default(), &Config::default(), Some(f), None).unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::FleetSecretMismatch {
                ours: "does not use",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("fleet secret mismatch"), "{err}");
}

/// Starts an initiator (key 1 to key 2) and finishes it with `record`.
fn initiator_reading(record: &[u8]) -> HandshakeError {
    let mut rng = pool_core::SeededRng::from_u64(5);
    let mut hello = Vec::new();
    let init = pool_core::Initiator::start(
        &Config::default(),
        &util::key(1),
        util::key(2).public_key(),
        Some(&FleetSecret::from_text("fleet one")),
        util::T0_UNIX,
        &mut rng,
        &mut hello,
    )
    .unwrap();
    init.finish(std::time::Instant::now(), record).unwrap_err()
}
