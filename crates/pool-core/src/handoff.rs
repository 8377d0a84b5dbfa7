//! The target's side of the live handoff's migration token
//! (docs/handoff.md).
//!
//! The target of a handoff mints the token when the source asks it to
//! prepare ([`Imports::prepare`]); the source passes it to the client in a
//! HANDOFF frame, and the client shows it back in its resume at the target
//! ([`Imports::check`]). The token is opaque to both:
//!
//! ```text
//! version u8 = 1 | reserved u8 | reserved u16 | nonce (16) | expiry u64 (Unix ms)
//! | floor epoch u32 | mac (16)
//! mac = HMAC-SHA-256/128(HKDF(table key, "pool handoff token"),
//!                        first 32 bytes ‖ session id ‖ target key ‖ client key ‖ source key)
//! ```
//!
//! - **short-lived**: it expires at `expiry`;
//! - **bound** to the session, to the target (another target has another
//!   table key), to the client's and the source's keys, and to the epoch:
//!   the resume must propose an epoch of at least `floor`;
//! - **single use**: each import holds its token's nonce; a nonce, once the
//!   import is committed, aborted or expired, is *spent* until a minute
//!   after its expiry, and a spent nonce is refused;
//! - **bounded**: the table holds at most [`Imports::MAX`] imports, and
//!   one per session.
//!
//! Everything takes the wall-clock time in Unix milliseconds (the token
//! carries its expiry), so the rules are testable with any clock.

use std::collections::HashMap;
use std::time::Duration;

use rand_core::RngCore;
use zeroize::Zeroizing;

use crate::crypto;
use crate::keys::PublicKey;
use crate::session::SessionId;
use crate::wire::HANDOFF_TOKEN_LEN;

const TOKEN_VERSION: u8 = 1;
/// How long a spent nonce is remembered after its token's expiry.
const SPENT_RETENTION_MS: u64 = 60_000;

/// Why a handoff cannot be prepared, or a token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token (length or version).
    #[error("not a handoff token")]
    Malformed,
    /// The MAC does not match: minted by another target, or for another
    /// session, client or source.
    #[error("the handoff token was not minted here for this session")]
    BadMac,
    /// Past its expiry.
    #[error("the handoff token expired")]
    Expired,
    /// Used already (committed, aborted or expired before).
    #[error("the handoff token was used already")]
    Spent,
    /// No handoff of this session is prepared here.
    #[error("no handoff of this session is prepared here")]
    NotPrepared,
    /// The resume proposes an epoch below the token's floor.
    #[error("the resume proposes epoch {proposed}, below the handoff's floor {floor}")]
    EpochTooLow {
        /// Proposed by the resume.
        proposed: u32,
        /// The token's floor.
        floor: u32,
    },
    /// A handoff of this session is prepared here already.
    #[error("a handoff of this session is pending already")]
    Pending,
    /// The table is full.
    #[error("too many handoffs are pending here")]
    Full,
}

/// One prepared import: what the target expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// The source's id of the handoff.
    pub handoff: u32,
    /// The source worker's key.
    pub source: PublicKey,
    /// The client's key.
    pub client: PublicKey,
    /// The lowest epoch the client's resume may propose.
    pub floor: u32,
    /// When the token expires, Unix ms.
    pub expiry_ms: u64,
    nonce: [u8; 16],
}

/// The target's table of prepared imports and spent tokens. One per
/// listener; it survives a reload, not a restart (a restart makes a new
/// key, so every earlier token fails its MAC, as it should: the imports
/// are gone too).
pub struct Imports {
    mac_key: Zeroizing<[u8; 32]>,
    by_session: HashMap<SessionId, Import>,
    /// Spent nonces and until when (Unix ms) they are remembered.
    spent: HashMap<[u8; 16], u64>,
}

impl std::fmt::Debug for Imports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Imports({} prepared, {} spent)",
            self.by_session.len(),
            self.spent.len()
        )
    }
}

impl Imports {
    /// Imports prepared at once, at most.
    pub const MAX: usize = 4096;

    /// A table with a fresh key.
    pub fn new(rng: &mut dyn RngCore) -> Imports {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut secret[..]);
        let mut mac_key = Zeroizing::new([0u8; 32]);
        crypto::hkdf(&[], &[&secret[..]], b"pool handoff token", &mut mac_key[..]);
        Imports {
            mac_key,
            by_session: HashMap::new(),
            spent: HashMap::new(),
        }
    }

    fn mac(
        &self,
        head: &[u8],
        session: &SessionId,
        target: &PublicKey,
        client: &PublicKey,
        source: &PublicKey,
    ) -> [u8; 16] {
        crypto::mac16(
            &self.mac_key[..],
            &[head, &session.0, &target.0, &client.0, &source.0],
        )
    }

    /// Prepares the import of `session` (this node being `target`) and
    /// mints its token, valid for `lifetime` from `now_ms`.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &mut self,
        now_ms: u64,
        session: SessionId,
        handoff: u32,
        target: &PublicKey,
        source: PublicKey,
        client: PublicKey,
        floor: u32,
        lifetime: Duration,
        rng: &mut dyn RngCore,
    ) -> Result<[u8; HANDOFF_TOKEN_LEN], TokenError> {
        self.expire(now_ms);
        if self.by_session.contains_key(&session) {
            return Err(TokenError::Pending);
        }
        // Spent nonces are bounded by the prepares that made them; so
        // bound those too.
        if self.by_session.len() >= Self::MAX || self.spent.len() >= 16 * Self::MAX {
            return Err(TokenError::Full);
        }
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let expiry_ms = now_ms.saturating_add(lifetime.as_millis() as u64);
        let mut token = [0u8; HANDOFF_TOKEN_LEN];
        token[0] = TOKEN_VERSION;
        token[4..20].copy_from_slice(&nonce);
        token[20..28].copy_from_slice(&expiry_ms.to_be_bytes());
        token[28..32].copy_from_slice(&floor.to_be_bytes());
        let mac = self.mac(&token[..32], &session, target, &client, &source);
        token[32..].copy_from_slice(&mac);
        self.by_session.insert(
            session,
            Import {
                handoff,
                source,
                client,
                floor,
                expiry_ms,
                nonce,
            },
        );
        Ok(token)
    }

    /// Checks a token shown by `client` in a resume of `session` proposing
    /// `epoch` at this node (`target`). Cheap (one MAC, no Diffie-Hellman):
    /// it runs before any key exchange. Changes nothing: the import stays
    /// until [`Imports::spend`].
    pub fn check(
        &self,
        now_ms: u64,
        session: &SessionId,
        target: &PublicKey,
        client: &PublicKey,
        token: &[u8],
        epoch: u32,
    ) -> Result<&Import, TokenError> {
        if token.len() != HANDOFF_TOKEN_LEN || token[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&token[4..20]);
        if self.spent.contains_key(&nonce) {
            return Err(TokenError::Spent);
        }
        let import = self
            .by_session
            .get(session)
            .ok_or(TokenError::NotPrepared)?;
        let mac = self.mac(&token[..32], session, target, client, &import.source);
        if !crypto::ct_eq(&mac, &token[32..]) || import.nonce != nonce {
            return Err(TokenError::BadMac);
        }
        if now_ms >= import.expiry_ms {
            return Err(TokenError::Expired);
        }
        if epoch < import.floor {
            return Err(TokenError::EpochTooLow {
                proposed: epoch,
                floor: import.floor,
            });
        }
        Ok(import)
    }

    /// Ends the import of `session`, committed or aborted: its token is
    /// spent from now on. Returns it, if there was one.
    pub fn spend(&mut self, session: &SessionId) -> Option<Import> {
        let import = self.by_session.remove(session)?;
        self.spent.insert(
            import.nonce,
            import.expiry_ms.saturating_add(SPENT_RETENTION_MS),
        );
        Some(import)
    }

    /// Drops imports past their expiry (their tokens are spent) and spent
    /// nonces past their retention.
    pub fn expire(&mut self, now_ms: u64) {
        let expired: Vec<SessionId> = self
            .by_session
            .iter()
            .filter(|(_, i)| now_ms >= i.expiry_ms)
            .map(|(s, _)| *s)
            .collect();
        for s in expired {
            self.spend(&s);
        }
        self.spent.retain(|_, until| now_ms < *until);
    }

    /// The import prepared for `session`, if any.
    pub fn get(&self, session: &SessionId) -> Option<&Import> {
        self.by_session.get(session)
    }

    /// Imports prepared now.
    pub fn pending(&self) -> usize {
        self.by_session.len()
    }
}
