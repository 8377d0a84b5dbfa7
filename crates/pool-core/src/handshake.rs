//! Session establishment: Noise `IK` (optionally `IKpsk2` with a fleet
//! secret), with a MAC before any Diffie-Hellman, timestamps against replay,
//! and a per-source rate limit. Also the epoch handshake (`NNpsk0` keyed by
//! the session's chaining secret) used by resume and rekey.

use std::time::{Duration, Instant};

use rand_core::RngCore;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::crypto::{self, CipherSuite};
use crate::error::{HandshakeError, WireError};
use crate::keys::{PublicKey, SecretKey, KEY_LEN};
use crate::session::{Role, Session, SessionId, TransportParams};
use crate::wire::{self, Reader, RecordType, RECORD_HEADER_LEN};

/// The protocol version this build speaks.
pub const VERSION: u8 = 2;
pub(crate) const FLAG_PSK: u8 = 1;
/// The HELLO ends with a second MAC keyed by a cookie (WireGuard's mac2).
pub(crate) const FLAG_MAC2: u8 = 2;
/// How long a cookie secret lives before it rotates (WireGuard: 2 min).
pub(crate) const COOKIE_ROTATE: Duration = Duration::from_secs(120);
pub(crate) const MAC_LEN: usize = 16;
pub(crate) const NOISE_IK: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
pub(crate) const NOISE_IK_PSK: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const NOISE_EPOCH: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The epoch handshake of a resume at a handoff's target: both static keys
/// known in advance, so the answer proves the target's (the source, which
/// holds the chaining secret too, cannot answer it).
const NOISE_EPOCH_KK: &str = "Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s";
pub(crate) const HELLO_PAYLOAD_LEN: usize = 8 + 1 + TransportParams::LEN;
pub(crate) const WELCOME_PAYLOAD_LEN: usize = 1 + TransportParams::LEN;

pub(crate) fn params(name: &str) -> Result<snow::params::NoiseParams, HandshakeError> {
    name.parse().map_err(|_| HandshakeError::Crypto)
}

pub(crate) fn ik_prologue(flags: u8) -> [u8; 9] {
    let mut p = *b"POOL/2 IK";
    // `flags` comes from the peer before any authentication: wrap, never
    // overflow (a panic in debug builds).
    p[8] = b'0'.wrapping_add(flags);
    p
}

pub(crate) fn mac1_key(responder: &PublicKey) -> [u8; 32] {
    let mut k = [0u8; 32];
    crypto::hkdf(b"pool mac1", &[&responder.0], b"mac1", &mut k);
    k
}

/// The shared secret of a fleet: any holder is trusted (Noise `psk2`).
#[derive(Clone)]
pub struct FleetSecret(pub(crate) Zeroizing<[u8; 32]>);

impl FleetSecret {
    /// From 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        FleetSecret(Zeroizing::new(bytes))
    }
    /// From a file's text: any text, hashed to 32 bytes (so a long random
    /// line or a generated key both work). Leading/trailing space is ignored.
    pub fn from_text(text: &str) -> Self {
        let mut k = [0u8; 32];
        crypto::hkdf(
            b"pool fleet secret",
            &[text.trim().as_bytes()],
            b"psk",
            &mut k,
        );
        FleetSecret(Zeroizing::new(k))
    }
}

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(..)")
    }
}

/// Key material agreed by a handshake; the keys are wiped when dropped.
pub(crate) struct Agreed {
    pub(crate) hash: [u8; 32],
    pub(crate) initiator_to_responder: Zeroizing<[u8; 32]>,
    pub(crate) responder_to_initiator: Zeroizing<[u8; 32]>,
}

pub(crate) fn split(hs: &mut snow::HandshakeState) -> Agreed {
    let (a, b) = hs.dangerously_get_raw_split();
    let (a, b) = (Zeroizing::new(a), Zeroizing::new(b));
    let mut hash = [0u8; 32];
    let h = hs.get_handshake_hash();
    hash.copy_from_slice(&h[..32.min(h.len())]);
    Agreed {
        hash,
        initiator_to_responder: a,
        responder_to_initiator: b,
    }
}

/// The initiator's side of a new session.
pub struct Initiator {
    hs: snow::HandshakeState,
    local: PublicKey,
    peer: PublicKey,
    config: Config,
    flags: u8,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Initiator(peer={})", self.peer.short())
    }
}

impl Initiator {
    /// Starts a handshake to `peer` and writes the HELLO record into `out`.
    ///
    /// `unix_nanos` is the wall clock (the handshake timestamp that stops
    /// replays); the core reads no clock itself.
    pub fn start(
        config: &Config,
        local: &SecretKey,
        peer: PublicKey,
        fleet: Option<&FleetSecret>,
        unix_nanos: u64,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<Self, HandshakeError> {
        Self::start_with_cookie(config, local, peer, fleet, unix_nanos, None, rng, out)
    }

    /// Like [`Initiator::start`], with the cookie a listener under load
    /// answered an earlier HELLO with ([`HandshakeError::CookieReply`]):
    /// the HELLO then carries `mac2`, which lets it past the load check.
    #[allow(clippy::too_many_arguments)]
    pub fn start_with_cookie(
        config: &Config,
        local: &SecretKey,
        peer: PublicKey,
        fleet: Option<&FleetSecret>,
        unix_nanos: u64,
        cookie: Option<&[u8; 16]>,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<Self, HandshakeError> {
        let flags = if fleet.is_some() { FLAG_PSK } else { 0 }
            | if cookie.is_some() { FLAG_MAC2 } else { 0 };
        let prologue = ik_prologue(flags);
        let name = if fleet.is_some() {
            NOISE_IK_PSK
        } else {
            NOISE_IK
        };
        let mut b = snow::Builder::with_resolver(params(name)?, crate::rng::Resolver::boxed(rng))
            .local_private_key(local.as_bytes())
            .and_then(|b| b.remote_public_key(&peer.0))
            .and_then(|b| b.prologue(&prologue))
            .map_err(|_| HandshakeError::Crypto)?;
        if let Some(f) = fleet {
            b = b.psk(2, &f.0).map_err(|_| HandshakeError::Crypto)?;
        }
        let mut hs = b.build_initiator().map_err(|_| HandshakeError::Crypto)?;

        let mut payload = [0u8; HELLO_PAYLOAD_LEN];
        payload[..8].copy_from_slice(&unix_nanos.to_be_bytes());
        payload[8] = config.cipher_bits();
        TransportParams::from_config(config).write(&mut payload[9..]);

        let mut msg = [0u8; 256];
        let n = hs
            .write_message(&payload, &mut msg)
            .map_err(|_| HandshakeError::Crypto)?;
        let body_len = 2 + n + MAC_LEN + if cookie.is_some() { MAC_LEN } else { 0 };
        let start = out.len();
        let mut header = [0u8; RECORD_HEADER_LEN];
        wire::write_record_header(&mut header, RecordType::Hello, body_len);
        out.extend_from_slice(&header);
        out.extend_from_slice(&[VERSION, flags]);
        out.extend_from_slice(&msg[..n]);
        let mac = crypto::mac16(&mac1_key(&peer), &[&out[start..]]);
        out.extend_from_slice(&mac);
        if let Some(c) = cookie {
            let mac2 = crypto::mac16(c, &[&out[start..]]);
            out.extend_from_slice(&mac2);
        }
        Ok(Initiator {
            hs,
            local: local.public_key(),
            peer,
            config: config.clone(),
            flags,
        })
    }

    /// Completes the handshake with the listener's answer (a whole WELCOME
    /// or REFUSE record).
    pub fn finish(mut self, now: Instant, record: &[u8]) -> Result<Session, HandshakeError> {
        let (ty, body) = split_record(record)?;
        match ty {
            RecordType::Welcome => {}
            RecordType::Refuse => return Err(parse_refusal(body)),
            RecordType::Cookie => {
                let cookie: [u8; 16] = body
                    .try_into()
                    .map_err(|_| HandshakeError::Malformed(WireError::Truncated))?;
                return Err(HandshakeError::CookieReply { cookie });
            }
            _ => return Err(HandshakeError::Unexpected("not a WELCOME")),
        }
        let mut payload = [0u8; 256];
        let n = self
            .hs
            .read_message(body, &mut payload)
            .map_err(|_| HandshakeError::Crypto)?;
        if n != WELCOME_PAYLOAD_LEN {
            return Err(HandshakeError::Malformed(WireError::Truncated));
        }
        let suite = CipherSuite::from_bit(payload[0]).ok_or(HandshakeError::NoCommonCipher)?;
        if self.config.cipher_bits() & suite.bit() == 0 {
            return Err(HandshakeError::NoCommonCipher);
        }
        let peer_params = TransportParams::read(&payload[1..n])?;
        let _ = self.flags;
        let agreed = split(&mut self.hs);
        Ok(Session::new(
            now,
            Role::Initiator,
            self.config,
            self.local,
            self.peer,
            suite,
            &agreed,
            peer_params,
        ))
    }
}

/// Splits a whole record into its type and body.
pub(crate) fn split_record(record: &[u8]) -> Result<(RecordType, &[u8]), WireError> {
    match wire::peek_record(record)? {
        Some((ty, len)) if len == record.len() => Ok((ty, &record[RECORD_HEADER_LEN..])),
        _ => Err(WireError::Truncated),
    }
}

/// A REFUSE record's body: `code (1) | flags (1) | [proof (16)] | reason`.
/// Flag bit 0: a proof follows (only on "unknown session" answers to a
/// RESUME, see [`crate::Acceptor::write_resume_refusal`]).
pub(crate) struct Refusal<'a> {
    code: u8,
    proof: Option<&'a [u8]>,
    reason: &'a [u8],
}

pub(crate) const REFUSE_PROOF: u8 = 1;
/// The refusal code for "unknown session".
pub(crate) const CODE_UNKNOWN_SESSION: u8 = 7;

impl<'a> Refusal<'a> {
    pub(crate) fn parse(body: &'a [u8]) -> Self {
        let code = body.first().copied().unwrap_or(0);
        let flags = body.get(1).copied().unwrap_or(0);
        let rest = body.get(2..).unwrap_or(&[]);
        if flags & REFUSE_PROOF != 0 && rest.len() >= MAC_LEN {
            let (proof, reason) = rest.split_at(MAC_LEN);
            return Refusal {
                code,
                proof: Some(proof),
                reason,
            };
        }
        Refusal {
            code,
            proof: None,
            reason: rest,
        }
    }

    /// Whether this refusal proves that `server` (the peer's static key)
    /// no longer knows session `id`, answering our RESUME for `epoch`
    /// whose refusal key was `ours`.
    pub(crate) fn proves_gone(
        &self,
        ours: &SecretKey,
        server: &PublicKey,
        id: &SessionId,
        epoch: u32,
    ) -> bool {
        let Some(proof) = self.proof else {
            return false;
        };
        if self.code != CODE_UNKNOWN_SESSION {
            return false;
        }
        let Some(dh) = crate::keys::x25519(ours.as_bytes(), &server.0) else {
            return false;
        };
        let want = refusal_proof(&dh, id, epoch, &ours.public_key());
        crypto::ct_eq(&want, proof)
    }

    pub(crate) fn into_error(self) -> HandshakeError {
        HandshakeError::Refused {
            code: self.code,
            reason: String::from_utf8_lossy(self.reason).into_owned(),
        }
    }
}

fn parse_refusal(body: &[u8]) -> HandshakeError {
    Refusal::parse(body).into_error()
}

/// The MAC that proves a refusal of a RESUME comes from the holder of the
/// server's static key: keyed by X25519(server static, refusal key).
pub(crate) fn refusal_proof(
    dh: &[u8; 32],
    id: &SessionId,
    epoch: u32,
    refuse: &PublicKey,
) -> [u8; MAC_LEN] {
    let mut k = Zeroizing::new([0u8; 32]);
    crypto::hkdf(b"pool refusal proof", &[dh], b"unknown session", &mut *k);
    crypto::mac16(&*k, &[&id.0, &epoch.to_be_bytes(), &refuse.0])
}

/// Writes a REFUSE record: a plaintext, unauthenticated notice of why the
/// listener will not go on. Reasons never contain secrets, and never the
/// initiator's static key (the listener logs that locally).
pub fn write_refusal(err: &HandshakeError, out: &mut Vec<u8>) {
    let mut reason = err.refusal_text();
    crate::error::truncate_utf8(&mut reason, 400);
    wire::push_record(
        out,
        RecordType::Refuse,
        &[&[err.refuse_code(), 0], reason.as_bytes()],
    );
}

/// Writes a KEY_PROBE record (asks a listener for its public key).
pub fn write_key_probe(out: &mut Vec<u8>) {
    wire::push_record(out, RecordType::KeyProbe, &[]);
}

/// Reads a KEY_INFO record (the answer to a probe).
pub fn read_key_info(record: &[u8]) -> Result<PublicKey, HandshakeError> {
    let (ty, body) = split_record(record)?;
    match ty {
        RecordType::KeyInfo => {
            let arr: [u8; KEY_LEN] = body
                .try_into()
                .map_err(|_| HandshakeError::Malformed(WireError::Truncated))?;
            Ok(PublicKey(arr))
        }
        RecordType::Refuse => Err(parse_refusal(body)),
        _ => Err(HandshakeError::Unexpected("not a KEY_INFO")),
    }
}

/// Reads the session id from a RESUME record so the caller can find the
/// session it belongs to.
pub fn resume_session_id(record: &[u8]) -> Result<SessionId, HandshakeError> {
    let (ty, body) = split_record(record)?;
    if ty != RecordType::Resume {
        return Err(HandshakeError::Unexpected("not a RESUME"));
    }
    let mut r = Reader::new(body);
    Ok(SessionId(r.array()?))
}

/// The epoch handshake (`NNpsk0`, psk = the session's chaining secret),
/// used by resume (in RESUME/RESUMED records) and rekey (in KEY_UPDATE
/// frames). Fresh ephemerals every time: forward secrecy per epoch.
///
/// A resume at a handoff's target (RESUME_HANDOFF) uses `KKpsk0` instead:
/// the same chaining secret, and both static keys ([`Statics`]).
pub(crate) struct EpochHandshake {
    hs: snow::HandshakeState,
}

/// This side's static key and the peer's, for the `KKpsk0` epoch handshake.
pub(crate) type Statics<'a> = Option<(&'a SecretKey, &'a PublicKey)>;

/// The epoch handshake's prologue: the session id and the new epoch, and
/// for a resume its base epoch and refusal key (`extra`), so that none of
/// the cleartext fields of a RESUME can be altered.
fn epoch_prologue(id: &SessionId, epoch: u32, extra: &[u8], kk: bool) -> Vec<u8> {
    let mut p = Vec::with_capacity(32 + extra.len());
    p.extend_from_slice(if kk {
        b"POOL/2 handoff"
    } else {
        b"POOL/2 epoch"
    });
    p.extend_from_slice(&id.0);
    p.extend_from_slice(&epoch.to_be_bytes());
    p.extend_from_slice(extra);
    p
}

impl EpochHandshake {
    fn build(
        chain: &[u8; 32],
        id: &SessionId,
        epoch: u32,
        extra: &[u8],
        statics: Statics<'_>,
        initiator: bool,
        rng: &mut dyn RngCore,
    ) -> Result<Self, HandshakeError> {
        let prologue = epoch_prologue(id, epoch, extra, statics.is_some());
        let name = if statics.is_some() {
            NOISE_EPOCH_KK
        } else {
            NOISE_EPOCH
        };
        let mut b = snow::Builder::with_resolver(params(name)?, crate::rng::Resolver::boxed(rng))
            .prologue(&prologue)
            .and_then(|b| b.psk(0, chain))
            .map_err(|_| HandshakeError::Crypto)?;
        if let Some((local, remote)) = statics {
            b = b
                .local_private_key(local.as_bytes())
                .and_then(|b| b.remote_public_key(&remote.0))
                .map_err(|_| HandshakeError::Crypto)?;
        }
        let hs = if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
        .map_err(|_| HandshakeError::Crypto)?;
        Ok(EpochHandshake { hs })
    }

    /// Starter: writes the first message carrying `payload`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        chain: &[u8; 32],
        id: &SessionId,
        epoch: u32,
        extra: &[u8],
        statics: Statics<'_>,
        payload: &[u8],
        rng: &mut dyn RngCore,
        msg: &mut [u8],
    ) -> Result<(Self, usize), HandshakeError> {
        let mut me = Self::build(chain, id, epoch, extra, statics, true, rng)?;
        let n = me
            .hs
            .write_message(payload, msg)
            .map_err(|_| HandshakeError::Crypto)?;
        Ok((me, n))
    }

    /// Answerer: reads the first message (payload into `payload_out`),
    /// writes the second with `reply`, and returns the agreed keys.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn answer(
        chain: &[u8; 32],
        id: &SessionId,
        epoch: u32,
        extra: &[u8],
        statics: Statics<'_>,
        first: &[u8],
        payload_out: &mut [u8],
        reply: &[u8],
        rng: &mut dyn RngCore,
        msg: &mut [u8],
    ) -> Result<(Agreed, usize, usize), HandshakeError> {
        let mut me = Self::build(chain, id, epoch, extra, statics, false, rng)?;
        let p = me
            .hs
            .read_message(first, payload_out)
            .map_err(|_| HandshakeError::Crypto)?;
        let n = me
            .hs
            .write_message(reply, msg)
            .map_err(|_| HandshakeError::Crypto)?;
        Ok((split(&mut me.hs), p, n))
    }

    /// Starter: reads the second message and returns the agreed keys.
    pub(crate) fn finish(
        mut self,
        second: &[u8],
        payload_out: &mut [u8],
    ) -> Result<(Agreed, usize), HandshakeError> {
        let p = self
            .hs
            .read_message(second, payload_out)
            .map_err(|_| HandshakeError::Crypto)?;
        Ok((split(&mut self.hs), p))
    }
}
