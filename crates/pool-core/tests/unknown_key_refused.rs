//! Trust is explicit: a key the trust callback does not accept is refused
//! by name, a HELLO for another node's key fails the cheap MAC check
//! before any Diffie-Hellman, and the initiator learns why from REFUSE.
mod util;

use std::time::Instant;

use pool_core::{write_refusal, Acceptor, Config, HandshakeError, Initiator, PublicKey, SeededRng};
use rand_core::RngCore;

/// Counts the bytes drawn from it: the acceptor draws randomness only when
/// it builds the Noise state, so zero bytes means no DH was started.
struct CountingRng {
    inner: SeededRng,
    drawn: usize,
}

impl RngCore for CountingRng {
    fn next_u32(&mut self) -> u32 {
        self.drawn += 4;
        self.inner.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.drawn += 8;
        self.inner.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.drawn += dest.len();
        self.inner.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

fn counting() -> CountingRng {
    CountingRng {
        inner: SeededRng::from_u64(3),
        drawn: 0,
    }
}

/// A HELLO from key 1 addressed to `to`.
fn hello_to(to: PublicKey) -> (Initiator, Vec<u8>) {
    let mut out = Vec::new();
    let mut rng = SeededRng::from_u64(11);
    let init = Initiator::start(
        &Config::default(),
        &util::key(1),
        to,
        None,
        util::T0_UNIX,
        &mut rng,
        &mut out,
    )
    .unwrap();
    (init, out)
}

fn accept(
    acc: &mut Acceptor,
    hello: &[u8],
    trust: &mut dyn FnMut(&PublicKey) -> bool,
    rng: &mut CountingRng,
) -> Result<pool_core::Session, HandshakeError> {
    let mut out = Vec::new();
    let r = acc.accept(
        Instant::now(),
        util::T0_UNIX,
        b"src",
        hello,
        trust,
        rng,
        &mut out,
    );
    assert_eq!(
        r.is_ok(),
        !out.is_empty(),
        "WELCOME written only on success"
    );
    r
}

#[test]
fn untrusted_key_is_refused_by_name() {
    let kb = util::key(2);
    let mut acc = Acceptor::new(&Config::default(), kb.clone(), None);
    let (_, hello) = hello_to(kb.public_key());
    let mut asked = Vec::new();
    let mut rng = counting();
    let err = accept(
        &mut acc,
        &hello,
        &mut |k| {
            asked.push(*k);
            false
        },
        &mut rng,
    )
    .unwrap_err();
    let a_pub = util::key(1).public_key();
    assert_eq!(
        asked,
        vec![a_pub],
        "the callback sees the authenticated key"
    );
    assert_eq!(err, HandshakeError::Untrusted { key: a_pub });
    let text = err.to_string();
    assert!(text.contains(&a_pub.to_token()), "{text}");
    assert!(text.contains("not trusted"), "{text}");
    // The Noise state was built (randomness drawn): the key check comes after DH.
    assert!(rng.drawn > 0);

    // A refusal leaves no trace: the same HELLO is accepted once trusted
    // (it is not counted as seen, so not a replay).
    let mut rng = counting();
    accept(&mut acc, &hello, &mut |k| *k == a_pub, &mut rng).expect("trusted now");
}

#[test]
fn hello_for_another_key_fails_mac_before_any_dh() {
    let kb = util::key(2);
    let mut acc = Acceptor::new(&Config::default(), kb, None);
    let (_, hello) = hello_to(util::key(3).public_key());
    let mut called = false;
    let mut rng = counting();
    let err = accept(
        &mut acc,
        &hello,
        &mut |_| {
            called = true;
            true
        },
        &mut rng,
    )
    .unwrap_err();
    assert_eq!(err, HandshakeError::BadMac);
    assert!(err.to_string().contains("different public key"), "{err}");
    assert_eq!(rng.drawn, 0, "no Noise state (and so no DH) before the MAC");
    assert!(
        !called,
        "trust is not consulted for an unauthenticated HELLO"
    );
}

#[test]
fn every_bit_flip_of_a_hello_is_refused_cheaply() {
    let kb = util::key(2);
    let (_, hello) = hello_to(kb.public_key());
    // Many attempts from one source: lift the rate limit for this test.
    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let mut acc = Acceptor::new(&cfg, kb, None);
    for pos in 0..hello.len() {
        for bit in [0u8, 3, 7] {
            let mut h = hello.clone();
            h[pos] ^= 1 << bit;
            let mut rng = counting();
            let err = accept(&mut acc, &h, &mut |_| true, &mut rng).unwrap_err();
            match (pos, &err) {
                // Type or length: not a whole HELLO record.
                (0..=3, HandshakeError::Malformed(_) | HandshakeError::Unexpected(_)) => {}
                (4, HandshakeError::Version { .. }) => {}
                (5.., HandshakeError::BadMac) => {}
                _ => panic!("flip at {pos} bit {bit}: unexpected {err:?}"),
            }
            assert_eq!(rng.drawn, 0, "flip at {pos}: Noise state built");
        }
    }
    // The untouched HELLO is still good.
    let mut rng = counting();
    accept(&mut acc, &hello, &mut |_| true, &mut rng).expect("original accepted");
}

#[test]
fn refusal_reaches_the_initiator_with_its_reason() {
    let kb = util::key(2);
    let mut acc = Acceptor::new(&Config::default(), kb.clone(), None);
    let (init, hello) = hello_to(kb.public_key());
    let err = accept(&mut acc, &hello, &mut |_| false, &mut counting()).unwrap_err();
    let mut refusal = Vec::new();
    write_refusal(&err, &mut refusal);
    assert_eq!(refusal[0], 0x05, "a REFUSE record");
    let got = init.finish(Instant::now(), &refusal).unwrap_err();
    let a_tok = util::key(1).public_key().to_token();
    match &got {
        HandshakeError::Refused { code, reason } => {
            assert_eq!(*code, err.refuse_code());
            assert_eq!(*reason, err.refusal_text());
            // The initiator's static key never crosses the wire in clear
            // (Noise IK hides it); the listener logs it locally instead.
            assert!(!reason.contains(&a_tok), "{reason}");
            assert!(!refusal
                .windows(32)
                .any(|w| w == util::key(1).public_key().0));
            assert!(err.to_string().contains(&a_tok), "the local log names it");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(got.to_string().contains("refused"), "{got}");
}

#[test]
fn refusal_codes_differ_by_cause() {
    let cases = [
        HandshakeError::BadMac,
        HandshakeError::Untrusted {
            key: util::key(1).public_key(),
        },
        HandshakeError::RateLimited,
        HandshakeError::UnknownSession,
    ];
    let mut codes: Vec<u8> = cases.iter().map(|e| e.refuse_code()).collect();
    codes.dedup();
    assert_eq!(codes.len(), cases.len());
    for err in &cases {
        let mut rec = Vec::new();
        write_refusal(err, &mut rec);
        // A REFUSE is a handshake-class record: within the size limit.
        assert!(rec.len() <= 4 + 1024);
        let (init, _) = hello_to(util::key(2).public_key());
        match init.finish(Instant::now(), &rec).unwrap_err() {
            HandshakeError::Refused { code, reason } => {
                assert_eq!(code, err.refuse_code());
                assert_eq!(reason, err.refusal_text());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn long_refusal_reason_is_cut_on_a_char_boundary() {
    // A reason that came from elsewhere (here: another listener's refusal,
    // passed on) can hold multi-byte characters around the 400-byte cut.
    let err = HandshakeError::Refused {
        code: 9,
        reason: format!("x{}", "é".repeat(300)),
    };
    let mut rec = Vec::new();
    write_refusal(&err, &mut rec);
    assert!(rec.len() <= 4 + 1 + 400);
    let (init, _) = hello_to(util::key(2).public_key());
    match init.finish(Instant::now(), &rec).unwrap_err() {
        HandshakeError::Refused { reason, .. } => {
            assert!(err.to_string().starts_with(&reason));
            assert!(reason.len() > 300);
        }
        other => panic!("{other:?}"),
    }
}

/// The MAC a HELLO to `to` must end with. It is keyed by the responder's
/// *public* key: it proves the sender knows that key, nothing more.
fn forge_mac(to: &PublicKey, record_without_mac: &[u8]) -> [u8; 16] {
    use ring::{hkdf, hmac};
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let mut key = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, b"pool mac1")
        .extract(&to.0)
        .expand(&[b"mac1"], Len)
        .unwrap()
        .fill(&mut key)
        .unwrap();
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), record_without_mac);
    tag.as_ref()[..16].try_into().unwrap()
}

/// A HELLO record to `to` with `noise` as its Noise part and a valid MAC.
fn hello_with_noise(to: &PublicKey, flags: u8, noise: &[u8]) -> Vec<u8> {
    let body = 2 + noise.len() + 16;
    let mut rec = vec![0x01, (body >> 16) as u8, (body >> 8) as u8, body as u8];
    rec.extend_from_slice(&[pool_core::VERSION, flags]);
    rec.extend_from_slice(noise);
    let mac = forge_mac(to, &rec);
    rec.extend_from_slice(&mac);
    rec
}

#[test]
fn forged_mac_with_garbage_noise_fails_authentication_without_panic() {
    let kb = util::key(2);
    let b_pub = kb.public_key();
    // The forged MAC is right: the genuine HELLO's MAC is the same.
    let (_, genuine) = hello_to(b_pub);
    let n = genuine.len();
    assert_eq!(forge_mac(&b_pub, &genuine[..n - 16]), genuine[n - 16..]);

    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let fleet = pool_core::FleetSecret::from_text("fleet");
    let mut rng = SeededRng::from_u64(4);
    for fleet in [None, Some(fleet)] {
        let mut acc = Acceptor::new(&cfg, kb.clone(), fleet);
        // Every Noise length up to the record limit, random content, and
        // flag bytes this version does not define.
        for len in (0..=1024 - 18).step_by(7) {
            let mut noise = vec![0u8; len];
            rng.fill_bytes(&mut noise);
            for flags in [0u8, 1, 2, 0xd1, 0xff] {
                let rec = hello_with_noise(&b_pub, flags, &noise);
                let r = accept(&mut acc, &rec, &mut |_| true, &mut counting());
                match r {
                    Err(HandshakeError::Crypto)
                    | Err(HandshakeError::Malformed(_))
                    | Err(HandshakeError::FleetSecretMismatch { .. }) => {}
                    // Flag bit 1 says a mac2 follows mac1: this forgery put
                    // its MAC where mac2 goes, so mac1 does not match.
                    Err(HandshakeError::BadMac) if flags & 2 != 0 => {}
                    other => panic!("len {len} flags {flags}: {other:?}"),
                }
            }
        }
    }
    let mut acc = Acceptor::new(&cfg, kb.clone(), None);
    // The genuine Noise part with altered bytes behind a forged MAC.
    let noise = &genuine[6..n - 16];
    for i in 0..noise.len() {
        let mut alt = noise.to_vec();
        alt[i] ^= 0x20;
        let rec = hello_with_noise(&b_pub, 0, &alt);
        assert_eq!(
            accept(&mut acc, &rec, &mut |_| true, &mut counting()).unwrap_err(),
            HandshakeError::Crypto,
            "byte {i}"
        );
    }
}

#[test]
fn garbage_welcome_is_an_error_without_panic() {
    let mut rng = SeededRng::from_u64(6);
    for len in (0..=1024).step_by(5) {
        for ty in [0x02u8, 0x05, 0x04, 0x10] {
            let mut rec = vec![ty, (len >> 16) as u8, (len >> 8) as u8, len as u8];
            let mut body = vec![0u8; len];
            rng.fill_bytes(&mut body);
            rec.extend_from_slice(&body);
            let (init, _) = hello_to(util::key(2).public_key());
            match init.finish(Instant::now(), &rec) {
                Err(_) => {}
                Ok(_) => panic!("random WELCOME of {len} bytes accepted"),
            }
        }
    }
}
