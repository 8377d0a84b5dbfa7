//! A peer that holds a session's secrets and seals whatever it likes.
//!
//! It takes over the initiator's side of a session by a resume, using the
//! chaining secret from the initiator's snapshot, exactly as the protocol
//! does it; then it can send authenticated records with any plaintext.
//! This is how the tests (and the `session_input` fuzz target) reach the
//! frame handling behind the AEAD: a malicious or broken peer that holds
//! valid keys.
//!
//! It reads the snapshot layout of `POOLSNP1` (see `src/snapshot.rs`).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Instant;

use pool_core::wire::Frame;
use pool_core::Session;
use rand_core::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};

const NOISE_EPOCH: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// The initiator's side of a session, forged.
pub struct Forger {
    key: LessSafeKey,
    suite_bit: u8,
    pub id: [u8; 16],
    pub chain: [u8; 32],
    pub epoch: u32,
    pub counter: u64,
    /// The sequence number the target expects next from us.
    pub seq: u64,
}

fn epoch_prologue(id: &[u8; 16], epoch: u32, extra: &[u8]) -> Vec<u8> {
    let mut p = b"POOL/2 epoch".to_vec();
    p.extend_from_slice(id);
    p.extend_from_slice(&epoch.to_be_bytes());
    p.extend_from_slice(extra);
    p
}

fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let mut out = [0u8; 32];
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&[info], Len)
        .expect("hkdf")
        .fill(&mut out)
        .expect("hkdf");
    out
}

fn aead_key(suite_bit: u8, bytes: &[u8; 32]) -> LessSafeKey {
    let alg = if suite_bit == 2 {
        &AES_256_GCM
    } else {
        &CHACHA20_POLY1305
    };
    LessSafeKey::new(UnboundKey::new(alg, bytes).expect("key"))
}

/// snow's default resolver, with a seeded generator (the build has no OS one).
struct Resolver(std::sync::Mutex<Option<pool_core::SeededRng>>);

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(self.0.lock().ok()?.take()?))
    }
    fn resolve_dh(&self, c: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        snow::resolvers::DefaultResolver.resolve_dh(c)
    }
    fn resolve_hash(&self, c: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::DefaultResolver.resolve_hash(c)
    }
    fn resolve_cipher(
        &self,
        c: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::DefaultResolver.resolve_cipher(c)
    }
}

fn epoch_initiator(
    id: &[u8; 16],
    epoch: u32,
    extra: &[u8],
    chain: &[u8; 32],
    rng: &mut dyn RngCore,
) -> snow::HandshakeState {
    let prologue = epoch_prologue(id, epoch, extra);
    let res = Resolver(std::sync::Mutex::new(Some(pool_core::SeededRng::from_rng(
        rng,
    ))));
    snow::Builder::with_resolver(NOISE_EPOCH.parse().unwrap(), Box::new(res))
        .prologue(&prologue)
        .unwrap()
        .psk(0, chain)
        .unwrap()
        .build_initiator()
        .unwrap()
}

impl Forger {
    /// Resumes `target` (the session's responder) as its initiator, from
    /// the initiator's snapshot. The target is then on the new epoch and
    /// any carrier bytes fed to it are read with the forger's keys.
    pub fn take_over(
        initiator_snapshot: &[u8],
        target: &mut Session,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Forger {
        let s = initiator_snapshot;
        assert_eq!(&s[..8], b"POOLSNP3");
        assert_eq!(s[8], 0, "an initiator's snapshot");
        let id: [u8; 16] = s[9..25].try_into().unwrap();
        let suite_bit = s[89];
        let chain: [u8; 32] = s[90..122].try_into().unwrap();
        let committed = u32::from_be_bytes(s[122..126].try_into().unwrap());
        let max_epoch = u32::from_be_bytes(s[126..130].try_into().unwrap());
        let base = u32::from_be_bytes(s[130..134].try_into().unwrap());
        assert_eq!(
            base, committed,
            "a snapshot whose current epoch is confirmed"
        );
        assert_eq!(s[138], 0, "a snapshot without a previous chain");
        let recv_next: [u8; 8] = s[163..171].try_into().unwrap();
        let epoch = max_epoch + 1;
        // The refusal key: any valid public key will do here.
        let mut extra = base.to_be_bytes().to_vec();
        extra.extend_from_slice(&super::key(77).public_key().0);

        let mut hs = epoch_initiator(&id, epoch, &extra, &chain, rng);
        let mut msg = [0u8; 256];
        let n = hs.write_message(&recv_next, &mut msg).unwrap();
        let mut resume = Vec::new();
        let body = 16 + 4 + extra.len() + n;
        resume.extend_from_slice(&[0x03, (body >> 16) as u8, (body >> 8) as u8, body as u8]);
        resume.extend_from_slice(&id);
        resume.extend_from_slice(&epoch.to_be_bytes());
        resume.extend_from_slice(&extra);
        resume.extend_from_slice(&msg[..n]);
        let mut reply = Vec::new();
        target
            .handle_resume(now, &resume, rng, &mut reply)
            .expect("target accepts the forged resume");
        let mut payload = [0u8; 64];
        let p = hs.read_message(&reply[4..], &mut payload).unwrap();
        assert_eq!(p, 8);
        let seq = u64::from_be_bytes(payload[..8].try_into().unwrap());
        let (i2r, r2i) = hs.dangerously_get_raw_split();
        let hash = hs.get_handshake_hash().to_vec();
        let new_chain = hkdf32(
            &hash[..32],
            &[&chain[..], &i2r, &r2i].concat(),
            b"pool chain",
        );
        let mut f = Forger {
            key: aead_key(suite_bit, &i2r),
            suite_bit,
            id,
            chain: new_chain,
            epoch,
            counter: 0,
            seq,
        };
        // The first record on the new carrier commits the resume.
        let mut first = f.seal_frames(&[Frame::Ping { stamp: 0 }]);
        target
            .confirm_resume(now, &mut first)
            .expect("target commits the forged resume");
        f
    }

    /// A data record sealing `plaintext` as is (its first 8 bytes should be
    /// a sequence number).
    pub fn seal_raw(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let body = 12 + plaintext.len() + 16;
        let mut rec = vec![0x10, (body >> 16) as u8, (body >> 8) as u8, body as u8];
        rec.extend_from_slice(&self.epoch.to_be_bytes());
        rec.extend_from_slice(&self.counter.to_be_bytes());
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        let mut inout = plaintext.to_vec();
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&rec[..16]),
                &mut inout,
            )
            .unwrap();
        rec.extend_from_slice(&inout);
        rec.extend_from_slice(tag.as_ref());
        self.counter += 1;
        rec
    }

    /// A data record with these frames, numbered from the expected sequence.
    pub fn seal_frames(&mut self, frames: &[Frame<'_>]) -> Vec<u8> {
        let mut pt = self.seq.to_be_bytes().to_vec();
        for f in frames {
            f.encode_to_vec(&mut pt);
            if f.is_sequenced() {
                self.seq += 1;
            }
        }
        self.seal_raw(&pt)
    }

    /// The Noise message of a KEY_UPDATE to `epoch` under the current chain.
    pub fn key_update_msg(&self, epoch: u32) -> Vec<u8> {
        let mut rng = pool_core::SeededRng::from_u64(u64::from(epoch));
        let mut hs = epoch_initiator(&self.id, epoch, &[], &self.chain, &mut rng);
        let mut msg = [0u8; 256];
        let n = hs.write_message(&[], &mut msg).unwrap();
        msg[..n].to_vec()
    }
}

/// A responder whose peer is a forger instead of the real initiator:
/// returns the responder (on the forger's epoch), the forger and the clock.
pub fn forged_responder() -> (Session, Forger, Instant) {
    forged_responder_with(&pool_core::Config::default())
}

/// As [`forged_responder`], with the responder's configuration.
pub fn forged_responder_with(cb: &pool_core::Config) -> (Session, Forger, Instant) {
    let mut p = super::handshake_with(&pool_core::Config::default(), cb, None).expect("handshake");
    p.drive();
    let snap = p.a.snapshot();
    let f = Forger::take_over(&snap, &mut p.b, p.now, &mut p.rng);
    // Drain what the responder says on the new carrier.
    let mut buf = vec![0u8; pool_core::MAX_RECORD_LEN];
    while p.b.poll_transmit(p.now, &mut buf).is_some() {}
    while p.b.poll_event().is_some() {}
    (p.b, f, p.now)
}
