//! Randomness is passed in: the core never reads an ambient random source.
//!
//! Callers hand the core a [`rand_core::RngCore`] + [`rand_core::CryptoRng`];
//! the runtime passes the operating system's generator, tests pass a seeded
//! one. For snow, which wants an owned generator, we draw a 32-byte seed from
//! the caller's generator and expand it with HMAC-SHA256 in counter mode.

use rand_core::{CryptoRng, RngCore};
use ring::hmac;

/// The random source the core accepts.
pub trait Rng: RngCore + CryptoRng {}
impl<T: RngCore + CryptoRng> Rng for T {}

/// A deterministic generator: HMAC-SHA256(seed, counter) blocks.
///
/// Cryptographically sound as long as the seed is secret and random; used
/// for tests (with a fixed seed) and to hand snow an owned generator.
pub struct SeededRng {
    key: hmac::Key,
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl SeededRng {
    /// A generator expanding `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        SeededRng {
            key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    /// A generator seeded from another generator.
    pub fn from_rng(rng: &mut dyn RngCore) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self::new(seed)
    }

    /// A test generator from a small number.
    pub fn from_u64(n: u64) -> Self {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&n.to_le_bytes());
        Self::new(seed)
    }
}

impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for byte in dest {
            if self.used == 32 {
                let tag = hmac::sign(&self.key, &self.counter.to_le_bytes());
                self.block.copy_from_slice(tag.as_ref());
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for SeededRng {}

impl snow::types::Random for SeededRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        RngCore::fill_bytes(self, dest);
        Ok(())
    }
}

/// A snow resolver whose random source is a [`SeededRng`] drawn from the
/// caller's generator, and whose primitives come from snow's defaults.
pub(crate) struct Resolver {
    seed: std::sync::Mutex<Option<[u8; 32]>>,
}

impl Resolver {
    pub(crate) fn boxed(rng: &mut dyn RngCore) -> Box<dyn snow::resolvers::CryptoResolver + Send> {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Box::new(Resolver {
            seed: std::sync::Mutex::new(Some(seed)),
        })
    }
}

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        let seed = self.seed.lock().ok()?.take()?;
        Some(Box::new(SeededRng::new(seed)))
    }
    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        snow::resolvers::DefaultResolver.resolve_dh(choice)
    }
    fn resolve_hash(
        &self,
        choice: &snow::params::HashChoice,
    ) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::DefaultResolver.resolve_hash(choice)
    }
    fn resolve_cipher(
        &self,
        choice: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::DefaultResolver.resolve_cipher(choice)
    }
}
