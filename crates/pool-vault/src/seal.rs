//! Sealing at rest: `push --seal` encrypts every chunk on the client to
//! the pusher's own key, so the node stores ciphertext only and only that
//! key can open it again.
//!
//! From the client's secret key `S`: `K = BLAKE3-derive-key("pool vault
//! seal v1", S)`. Per file: `salt = BLAKE3-keyed(K, plain root)[..16]` and
//! `F = BLAKE3-keyed(K, "file" || salt)`. Plain chunks of `CHUNK - 16` bytes
//! are sealed with ChaCha20-Poly1305 under `F`, nonce = chunk index, AAD =
//! salt || index, so every sealed chunk is exactly `CHUNK` bytes (the last
//! one shorter) and the stored file is chunked like any other.
//!
//! The salt depends on the content, so pushing the same file twice gives the
//! same ciphertext (the second push sends nothing) and a key and nonce are
//! only ever reused for the same plaintext. What the storing node learns:
//! sizes, times, and which files of one owner are equal.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};

use crate::manifest::{hex, Manifest, CHUNK};
use crate::VaultError;

/// Plain bytes per sealed chunk.
pub const PLAIN_CHUNK: u64 = CHUNK - 16;

/// What the node stores about a sealed file (none of it secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealInfo {
    /// The key it is sealed to (its public key).
    pub owner: String,
    /// The per-file salt (hex).
    pub salt: String,
    /// The plaintext's size.
    pub plain_size: u64,
    /// The plaintext's manifest root (in `PLAIN_CHUNK` chunks), checked
    /// after opening.
    pub plain_root: String,
}

/// Seals and opens one file's chunks.
pub struct Sealer {
    key: LessSafeKey,
    salt: [u8; 16],
    /// What goes into the manifest.
    pub info: SealInfo,
}

fn owner_key(secret: &pool_net::SecretKey) -> [u8; 32] {
    blake3::derive_key("pool vault seal v1", &secret.to_bytes())
}

fn file_key(k: &[u8; 32], salt: &[u8; 16]) -> Result<LessSafeKey, VaultError> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(b"file");
    m.extend_from_slice(salt);
    let f = blake3::keyed_hash(k, &m);
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, f.as_bytes())
        .map_err(|_| VaultError::Protocol("cannot make a sealing key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

fn parse_salt(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Sealer {
    /// For sealing a file whose plaintext manifest (in `PLAIN_CHUNK`
    /// chunks) is `plain`.
    pub fn for_file(secret: &pool_net::SecretKey, plain: &Manifest) -> Result<Sealer, VaultError> {
        let k = owner_key(secret);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&blake3::keyed_hash(&k, &plain.root()).as_bytes()[..16]);
        Ok(Sealer {
            key: file_key(&k, &salt)?,
            salt,
            info: SealInfo {
                owner: secret.public_key().to_string(),
                salt: hex(&salt),
                plain_size: plain.size,
                plain_root: plain.root_hex(),
            },
        })
    }

    /// For opening a file sealed with `info`; refused unless `secret` is
    /// the key it was sealed to.
    pub fn for_info(secret: &pool_net::SecretKey, info: &SealInfo) -> Result<Sealer, VaultError> {
        if secret.public_key().to_string() != info.owner {
            return Err(VaultError::Refused(format!(
                "this file is sealed to key {}; only that key can open it",
                info.owner
            )));
        }
        let salt = parse_salt(&info.salt)
            .ok_or_else(|| VaultError::Protocol("a sealed file's salt is malformed".into()))?;
        Ok(Sealer {
            key: file_key(&owner_key(secret), &salt)?,
            salt,
            info: info.clone(),
        })
    }

    fn nonce_aad(&self, i: u64) -> (Nonce, [u8; 24]) {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        let mut aad = [0u8; 24];
        aad[..16].copy_from_slice(&self.salt);
        aad[16..].copy_from_slice(&i.to_be_bytes());
        (Nonce::assume_unique_for_key(n), aad)
    }

    /// Seals plain chunk `i`.
    pub fn seal(&self, i: u64, plain: &[u8]) -> Result<Vec<u8>, VaultError> {
        let (nonce, aad) = self.nonce_aad(i);
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| VaultError::Protocol("sealing failed".into()))?;
        Ok(buf)
    }

    /// Opens sealed chunk `i`.
    pub fn open(&self, i: u64, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        let (nonce, aad) = self.nonce_aad(i);
        let mut buf = sealed.to_vec();
        let n = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| {
                VaultError::Refused(format!("sealed chunk {i} does not open with this key"))
            })?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// The stored (sealed) size of the plaintext.
    pub fn sealed_size(&self) -> u64 {
        let n = self.info.plain_size.div_ceil(PLAIN_CHUNK);
        self.info.plain_size + 16 * n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_net::SecretKey;

    #[test]
    fn sealed_chunks_open_only_with_the_owner_key() {
        let data = vec![5u8; (PLAIN_CHUNK + 3) as usize];
        let plain = Manifest::of_reader(&data[..], data.len() as u64, PLAIN_CHUNK).unwrap();
        let me = SecretKey::from_bytes([1; 32]);
        let s = Sealer::for_file(&me, &plain).unwrap();
        let c0 = s.seal(0, &data[..PLAIN_CHUNK as usize]).unwrap();
        assert_eq!(c0.len() as u64, CHUNK);
        assert_ne!(&c0[..16], &data[..16]);
        assert_eq!(s.sealed_size(), data.len() as u64 + 32);
        // Deterministic: the same file seals the same way.
        assert_eq!(
            Sealer::for_file(&me, &plain)
                .unwrap()
                .seal(0, &data[..10])
                .unwrap(),
            s.seal(0, &data[..10]).unwrap()
        );
        let o = Sealer::for_info(&me, &s.info).unwrap();
        assert_eq!(o.open(0, &c0).unwrap(), &data[..PLAIN_CHUNK as usize]);
        // At another index, or flipped, it does not open.
        assert!(o.open(1, &c0).is_err());
        let mut bad = c0.clone();
        bad[3] ^= 1;
        assert!(o.open(0, &bad).is_err());
        // Another key is refused.
        let other = SecretKey::from_bytes([2; 32]);
        let e = Sealer::for_info(&other, &s.info).err().unwrap();
        assert!(e.to_string().contains("sealed to key"), "{e}");
    }
}
