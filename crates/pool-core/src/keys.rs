//! Static identity keys and their text form.

use std::fmt;

use zeroize::Zeroize;

use crate::error::KeyError;

/// Length of an X25519 key in bytes.
pub const KEY_LEN: usize = 32;

/// A node's static public key: its identity.
///
/// Its text form (a "token") is the key in unpadded base64url: 43 characters
/// that survive copy and paste, shell quoting and URLs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// The key as one copy-pasteable token.
    pub fn to_token(&self) -> String {
        crate::b64::encode(&self.0)
    }

    /// Parses a token printed by [`PublicKey::to_token`].
    pub fn from_token(token: &str) -> Result<Self, KeyError> {
        let token = token.trim();
        let bytes = crate::b64::decode(token).ok_or_else(|| KeyError::BadToken {
            token: shorten(token),
        })?;
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::BadToken {
            token: shorten(token),
        })?;
        Ok(PublicKey(arr))
    }

    /// A short form for logs: the first 8 characters of the token.
    pub fn short(&self) -> String {
        let mut t = self.to_token();
        t.truncate(8);
        t
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 60 {
        let mut out: String = s.chars().take(57).collect();
        out.push_str("...");
        out
    } else {
        s.to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_token())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_token(s)
    }
}

/// A node's static private key. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct SecretKey {
    bytes: [u8; KEY_LEN],
    public: PublicKey,
}

impl SecretKey {
    /// Builds a key from 32 secret bytes (for example from a key file or
    /// from the operating system's random source).
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        // Clamp as X25519 does, so the stored form is canonical.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        let public = PublicKey(x25519_base(&bytes));
        SecretKey { bytes, public }
    }

    /// The secret bytes, for writing a key file.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.bytes
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The key file text: a comment line and the key as base64url.
    pub fn to_file_text(&self) -> String {
        format!(
            "# POOL private key. Keep it secret: anyone holding it can pose as this node.\n# public key: {}\n{}\n",
            self.public.to_token(),
            crate::b64::encode(&self.bytes)
        )
    }

    /// Parses the text written by [`SecretKey::to_file_text`] (comment lines
    /// starting with `#` and blank lines are ignored).
    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or(KeyError::EmptyKeyFile)?;
        let bytes = crate::b64::decode(line).ok_or(KeyError::BadKeyFile)?;
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::BadKeyFile)?;
        Ok(SecretKey::from_bytes(arr))
    }

    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public={})", self.public.short())
    }
}

/// X25519 of a private scalar and a peer's public key; `None` for a
/// low-order point (an all-zero shared secret).
pub(crate) fn x25519(secret: &[u8; KEY_LEN], public: &[u8; KEY_LEN]) -> Option<[u8; KEY_LEN]> {
    use snow::params::DHChoice;
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver.resolve_dh(&DHChoice::Curve25519)?;
    dh.set(secret);
    let mut out = [0u8; KEY_LEN];
    dh.dh(public, &mut out).ok()?;
    if out == [0u8; KEY_LEN] {
        return None;
    }
    Some(out)
}

/// X25519 scalar multiplication with the base point (the public key of a
/// private scalar), done through snow's Diffie-Hellman provider.
fn x25519_base(secret: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    use snow::params::DHChoice;
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut out = [0u8; KEY_LEN];
    if let Some(mut dh) = DefaultResolver.resolve_dh(&DHChoice::Curve25519) {
        dh.set(secret);
        out.copy_from_slice(dh.pubkey());
    }
    out
}
