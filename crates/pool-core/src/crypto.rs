//! Data-path AEAD (through `ring`) and key derivation.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use zeroize::Zeroize;

/// Length of an AEAD tag.
pub(crate) const TAG_LEN: usize = 16;

/// The data-path cipher, negotiated inside the authenticated handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CipherSuite {
    /// ChaCha20-Poly1305: always offered, fast everywhere.
    ChaCha20Poly1305,
    /// AES-256-GCM: offered only when this machine has AES hardware.
    Aes256Gcm,
}

impl CipherSuite {
    pub(crate) fn bit(self) -> u8 {
        match self {
            CipherSuite::ChaCha20Poly1305 => 1,
            CipherSuite::Aes256Gcm => 2,
        }
    }
    pub(crate) fn from_bit(bit: u8) -> Option<Self> {
        match bit {
            1 => Some(CipherSuite::ChaCha20Poly1305),
            2 => Some(CipherSuite::Aes256Gcm),
            _ => None,
        }
    }
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            CipherSuite::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            CipherSuite::Aes256Gcm => &aead::AES_256_GCM,
        }
    }
    /// The name used in logs and `stats()`.
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::ChaCha20Poly1305 => "chacha20-poly1305",
            CipherSuite::Aes256Gcm => "aes-256-gcm",
        }
    }
}

/// Whether this CPU has AES and carry-less multiply instructions, so that
/// AES-256-GCM is both fast and constant-time here.
pub fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// One direction's key in one epoch, with its nonce counter.
///
/// The nonce is the 64-bit counter, so within an epoch a nonce is never
/// reused; every epoch has fresh keys, so across epochs neither.
pub(crate) struct DirectionKey {
    key: LessSafeKey,
    pub(crate) epoch: u32,
    pub(crate) counter: u64,
}

/// After this many records in one epoch we refuse to encrypt more (the
/// session rekeys long before, at [`crate::Config::rekey_after_records`]).
pub(crate) const HARD_RECORD_LIMIT: u64 = 1 << 60;

impl DirectionKey {
    /// A key for `epoch`. Both suites take 32-byte keys, so ring never
    /// refuses one; `None` would mean a broken build of ring.
    pub(crate) fn new(suite: CipherSuite, mut bytes: [u8; 32], epoch: u32) -> Option<Self> {
        let unbound = UnboundKey::new(suite.algorithm(), &bytes);
        bytes.zeroize();
        Some(DirectionKey {
            key: LessSafeKey::new(unbound.ok()?),
            epoch,
            counter: 0,
        })
    }

    fn nonce(counter: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Seals `in_out` in place and returns the tag. `aad` must bind the
    /// epoch and counter (the record header does).
    pub(crate) fn seal(&mut self, aad: &[u8], in_out: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        if self.counter >= HARD_RECORD_LIMIT {
            return None;
        }
        let nonce = Self::nonce(self.counter);
        self.counter += 1;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), in_out)
            .ok()?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens `in_out` (ciphertext followed by tag) in place for the given
    /// counter; returns the plaintext length.
    pub(crate) fn open(&self, counter: u64, aad: &[u8], in_out: &mut [u8]) -> Option<usize> {
        let nonce = Self::nonce(counter);
        let plain = self.key.open_in_place(nonce, Aad::from(aad), in_out).ok()?;
        Some(plain.len())
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 (RFC 5869): extract with `salt`, expand with `info`.
pub(crate) fn hkdf(salt: &[u8], ikm: &[&[u8]], info: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&ikm.concat());
    let info = [info];
    match prk.expand(&info, Len(out.len())) {
        Ok(okm) => {
            if okm.fill(out).is_err() {
                out.fill(0);
            }
        }
        Err(_) => out.fill(0),
    }
}

/// HMAC-SHA256 truncated to 16 bytes.
pub(crate) fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 16];
    out.copy_from_slice(&tag.as_ref()[..16]);
    out
}

/// Constant-time equality.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
