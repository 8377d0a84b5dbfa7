//! Proofs of key ownership: a node's (or relay's) AUTH over the relay's
//! CHALLENGE, and a dialled relay's PEER_PROOF over its dialler's
//! [`PeerChallenge`].

use curve25519_dalek::montgomery::MontgomeryPoint;
use rand_core::RngCore;
use zeroize::Zeroize;

use super::{Intent, Msg, PeerChallenge, MAGIC};
use crate::crypto::{ct_eq, hkdf};
use crate::keys::{PublicKey, SecretKey};

fn proof_for(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    nonce: &[u8; 32],
    key: &PublicKey,
    intent: &Intent,
) -> [u8; 32] {
    let mut k = [0u8; 32];
    hkdf(b"POOL-RELAY/1 auth", &[shared], b"proof key", &mut k);
    let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k);
    k.zeroize();
    let mut ctx = ring::hmac::Context::with_key(&hk);
    ctx.update(MAGIC);
    ctx.update(ephemeral);
    ctx.update(nonce);
    ctx.update(&key.0);
    let mut i = Vec::with_capacity(33);
    intent.encode(&mut i);
    ctx.update(&i);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// X25519; `None` for a non-contributory (low-order) peer point.
fn dh(secret: &[u8; 32], public: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = MontgomeryPoint(*public).mul_clamped(*secret).to_bytes();
    if shared.iter().all(|b| *b == 0) {
        None
    } else {
        Some(shared)
    }
}

/// Node side: the AUTH message answering a CHALLENGE.
pub fn authenticate(
    key: &SecretKey,
    ephemeral: &[u8; 32],
    nonce: &[u8; 32],
    intent: Intent,
) -> Option<Msg> {
    let mut shared = dh(key.as_bytes(), ephemeral)?;
    let public = key.public_key();
    let proof = proof_for(&shared, ephemeral, nonce, &public, &intent);
    shared.zeroize();
    Some(Msg::Auth {
        key: public,
        proof,
        intent,
    })
}

/// Relay side: one connection's challenge (a fresh ephemeral key and
/// nonce), able to check the node's answer.
pub struct Challenge {
    secret: [u8; 32],
    ephemeral: [u8; 32],
    nonce: [u8; 32],
}

impl Drop for Challenge {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl Challenge {
    /// A new challenge.
    pub fn new(rng: &mut dyn RngCore) -> Challenge {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let ephemeral = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        Challenge {
            secret,
            ephemeral,
            nonce,
        }
    }

    /// The CHALLENGE message to send.
    pub fn msg(&self) -> Msg {
        Msg::Challenge {
            ephemeral: self.ephemeral,
            nonce: self.nonce,
        }
    }

    /// The same ephemeral key and nonce as a [`PeerChallenge`], for a
    /// relay that dials another: it puts this in its intent and checks the
    /// answer with [`Challenge::verify_peer`].
    #[must_use]
    pub fn peer_challenge(&self) -> PeerChallenge {
        PeerChallenge {
            ephemeral: self.ephemeral,
            nonce: self.nonce,
        }
    }

    /// Whether a PEER_PROOF shows that the dialled relay holds
    /// `responder`'s secret, for this challenge sent by `initiator`.
    #[must_use]
    pub fn verify_peer(
        &self,
        responder: &PublicKey,
        initiator: &PublicKey,
        proof: &[u8; 32],
    ) -> bool {
        let Some(mut shared) = dh(&self.secret, &responder.0) else {
            return false;
        };
        let want = peer_proof_for(&shared, &self.peer_challenge(), responder, initiator);
        shared.zeroize();
        ct_eq(&want, proof)
    }

    /// Whether `proof` shows that the sender holds `key`'s secret.
    pub fn verify(&self, key: &PublicKey, proof: &[u8; 32], intent: &Intent) -> bool {
        let Some(mut shared) = dh(&self.secret, &key.0) else {
            return false;
        };
        let want = proof_for(&shared, &self.ephemeral, &self.nonce, key, intent);
        shared.zeroize();
        ct_eq(&want, proof)
    }
}

fn peer_proof_for(
    shared: &[u8; 32],
    ch: &PeerChallenge,
    responder: &PublicKey,
    initiator: &PublicKey,
) -> [u8; 32] {
    let mut k = [0u8; 32];
    hkdf(b"POOL-RELAY/1 peer", &[shared], b"peer proof key", &mut k);
    let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k);
    k.zeroize();
    let mut ctx = ring::hmac::Context::with_key(&hk);
    ctx.update(MAGIC);
    ctx.update(b" peer");
    ctx.update(&ch.ephemeral);
    ctx.update(&ch.nonce);
    ctx.update(&responder.0);
    ctx.update(&initiator.0);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Dialled relay side: the PEER_PROOF answering `challenge` from the relay
/// `initiator` (whose AUTH checked out). `None` for a low-order ephemeral
/// key.
#[must_use]
pub fn peer_proof(
    key: &SecretKey,
    challenge: &PeerChallenge,
    initiator: &PublicKey,
) -> Option<Msg> {
    let mut shared = dh(key.as_bytes(), &challenge.ephemeral)?;
    let public = key.public_key();
    let proof = peer_proof_for(&shared, challenge, &public, initiator);
    shared.zeroize();
    Some(Msg::PeerProof { key: public, proof })
}
