//! The handshake's readers on arbitrary bytes: `Acceptor::accept` (as a
//! HELLO, raw or behind a valid MAC, so that the Noise layer is reached),
//! `Initiator::finish` (as a WELCOME or REFUSE), and the small readers.

use std::time::Instant;

use pool_core::{
    read_key_info, resume_session_id, Acceptor, Config, FleetSecret, Initiator, PublicKey,
    SecretKey, SeededRng,
};

fn key(n: u8) -> SecretKey {
    SecretKey::from_bytes([n; 32])
}

/// The MAC a HELLO to `to` ends with (keyed by the public key: anyone can
/// compute it, so it must not be what stands between input and Noise).
fn mac(to: &PublicKey, rec: &[u8]) -> [u8; 16] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let mut k = [0u8; 32];
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"pool mac1")
        .extract(&to.0)
        .expand(&[b"mac1"], Len)
        .expect("hkdf")
        .fill(&mut k)
        .expect("hkdf");
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k), rec);
    tag.as_ref()[..16].try_into().expect("16 bytes")
}

pub(crate) fn run(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut cfg = Config::default();
    cfg.handshake_rate(None);
    let mut rng = SeededRng::from_u64(1);
    let server = key(2);
    let fleet = (mode & 4 != 0).then(|| FleetSecret::from_text("fleet"));
    match mode % 4 {
        // The bytes as a whole HELLO record.
        0 => {
            let mut acc = Acceptor::new(&cfg, server, fleet);
            let mut out = Vec::new();
            let r = acc.accept(now, 0, b"s", body, &mut |_| true, &mut rng, &mut out);
            assert_eq!(r.is_ok(), !out.is_empty());
        }
        // The bytes as version, flags and Noise message, with a valid MAC.
        1 => {
            let len = body.len() + 16;
            if len > 1024 {
                return;
            }
            let mut rec = vec![0x01, (len >> 16) as u8, (len >> 8) as u8, len as u8];
            rec.extend_from_slice(body);
            let m = mac(&server.public_key(), &rec);
            rec.extend_from_slice(&m);
            let mut acc = Acceptor::new(&cfg, server, fleet);
            let mut out = Vec::new();
            let _ = acc.accept(now, 0, b"s", &rec, &mut |_| true, &mut rng, &mut out);
        }
        // The bytes as the answer to a genuine HELLO.
        2 => {
            let mut hello = Vec::new();
            let init = Initiator::start(
                &cfg,
                &key(1),
                server.public_key(),
                fleet.as_ref(),
                0,
                &mut rng,
                &mut hello,
            )
            .expect("start");
            let _ = init.finish(now, body);
        }
        _ => {
            let _ = resume_session_id(body);
            let _ = read_key_info(body);
        }
    }
}
