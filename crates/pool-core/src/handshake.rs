//! Session establishment: Noise `IK` (optionally `IKpsk2` with a fleet
//! secret), with a MAC before any Diffie-Hellman, timestamps against replay,
//! and a per-source rate limit. Also the epoch handshake (`NNpsk0` keyed by
//! the session's chaining secret) used by resume and rekey.

use std::collections::HashMap;
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
const FLAG_PSK: u8 = 1;
/// The HELLO ends with a second MAC keyed by a cookie (WireGuard's mac2).
const FLAG_MAC2: u8 = 2;
/// How long a cookie secret lives before it rotates (WireGuard: 2 min).
const COOKIE_ROTATE: Duration = Duration::from_secs(120);
const MAC_LEN: usize = 16;
const NOISE_IK: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const NOISE_IK_PSK: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const NOISE_EPOCH: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const HELLO_PAYLOAD_LEN: usize = 8 + 1 + TransportParams::LEN;
const WELCOME_PAYLOAD_LEN: usize = 1 + TransportParams::LEN;

fn params(name: &str) -> Result<snow::params::NoiseParams, HandshakeError> {
    name.parse().map_err(|_| HandshakeError::Crypto)
}

fn ik_prologue(flags: u8) -> [u8; 9] {
    let mut p = *b"POOL/2 IK";
    // `flags` comes from the peer before any authentication: wrap, never
    // overflow (a panic in debug builds).
    p[8] = b'0'.wrapping_add(flags);
    p
}

fn mac1_key(responder: &PublicKey) -> [u8; 32] {
    let mut k = [0u8; 32];
    crypto::hkdf(b"pool mac1", &[&responder.0], b"mac1", &mut k);
    k
}

/// The shared secret of a fleet: any holder is trusted (Noise `psk2`).
#[derive(Clone)]
pub struct FleetSecret(Zeroizing<[u8; 32]>);

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

fn split(hs: &mut snow::HandshakeState) -> Agreed {
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
/// RESUME, see [`Acceptor::write_resume_refusal`]).
pub(crate) struct Refusal<'a> {
    code: u8,
    proof: Option<&'a [u8]>,
    reason: &'a [u8],
}

const REFUSE_PROOF: u8 = 1;
/// The refusal code for "unknown session".
const CODE_UNKNOWN_SESSION: u8 = 7;

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
fn refusal_proof(dh: &[u8; 32], id: &SessionId, epoch: u32, refuse: &PublicKey) -> [u8; MAC_LEN] {
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

/// Per-source token buckets, bounded in size.
#[derive(Debug)]
struct RateLimiter {
    rate: u32,
    burst: u32,
    buckets: HashMap<Vec<u8>, (f64, Instant)>,
}

const MAX_BUCKETS: usize = 16_384;

impl RateLimiter {
    fn allow(&mut self, now: Instant, source: &[u8]) -> bool {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(source) {
            // Forget buckets that have refilled; they hold no information.
            let (rate, burst) = (f64::from(self.rate), f64::from(self.burst));
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + rate * now.saturating_duration_since(*at).as_secs_f64() < burst
            });
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let entry = self
            .buckets
            .entry(source.to_vec())
            .or_insert((f64::from(self.burst), now));
        let elapsed = now.saturating_duration_since(entry.1).as_secs_f64();
        entry.0 = (entry.0 + elapsed * f64::from(self.rate)).min(f64::from(self.burst));
        entry.1 = now;
        if entry.0 >= 1.0 {
            entry.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A listener's side of new sessions: holds the static key, the fleet
/// secret, the replay table and the rate limiter. One per endpoint.
pub struct Acceptor {
    local: SecretKey,
    mac_key: [u8; 32],
    fleet: Option<FleetSecret>,
    config: Config,
    /// Newest handshake timestamp accepted per key (replay protection).
    seen: HashMap<PublicKey, Recent>,
    limiter: Option<RateLimiter>,
    /// Under load, a HELLO must carry a valid `mac2` (a cookie for its
    /// source) or it is answered with a cookie and no Diffie-Hellman.
    under_load: bool,
    /// The cookie secrets: current, previous (still valid), and when the
    /// current one was made.
    cookie_secret: [u8; 32],
    cookie_prev: [u8; 32],
    cookie_born: Option<Instant>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Acceptor(key={})", self.local.public_key().short())
    }
}

const MAX_SEEN: usize = 65_536;
/// Handshakes from one key may arrive this much out of order (a client
/// opening several sessions at once).
const REORDER_WINDOW_NS: u64 = 2_000_000_000;
/// Timestamps remembered per key inside that window.
const RECENT_CAP: usize = 64;

/// The handshake timestamps accepted from one key. A timestamp is fresh
/// when it was never accepted, is at most [`REORDER_WINDOW_NS`] older than
/// the newest, and is newer than any timestamp forgotten to keep the list
/// short. A recorded HELLO therefore never gets in twice.
#[derive(Debug, Default)]
struct Recent {
    max: u64,
    forgotten_max: u64,
    recent: std::collections::VecDeque<u64>,
}

impl Recent {
    fn is_fresh(&self, ts: u64) -> bool {
        let floor = self
            .max
            .saturating_sub(REORDER_WINDOW_NS)
            .max(self.forgotten_max);
        (ts > floor || (self.recent.is_empty() && self.max == 0)) && !self.recent.contains(&ts)
    }

    fn insert(&mut self, ts: u64) {
        if self.recent.len() >= RECENT_CAP {
            if let Some(old) = self.recent.pop_front() {
                self.forgotten_max = self.forgotten_max.max(old);
            }
        }
        self.recent.push_back(ts);
        self.max = self.max.max(ts);
    }
}

impl Acceptor {
    /// An acceptor for this node's key; with a fleet secret every peer must
    /// hold it (`IKpsk2`), without one `IK` is used.
    pub fn new(config: &Config, local: SecretKey, fleet: Option<FleetSecret>) -> Self {
        Acceptor {
            mac_key: mac1_key(&local.public_key()),
            local,
            fleet,
            limiter: config.handshake_rate.map(|(rate, burst)| RateLimiter {
                rate,
                burst,
                buckets: HashMap::new(),
            }),
            config: config.clone(),
            seen: HashMap::new(),
            under_load: false,
            cookie_secret: [0; 32],
            cookie_prev: [0; 32],
            cookie_born: None,
        }
    }

    /// Tells the acceptor whether the listener is under load (the runtime
    /// decides, from the handshakes in progress). Under load every HELLO
    /// must prove, with a cookie, that its sender receives at its source.
    pub fn set_under_load(&mut self, on: bool) {
        self.under_load = on;
    }

    fn cookie_for(secret: &[u8; 32], source: &[u8]) -> [u8; 16] {
        crypto::mac16(secret, &[b"pool cookie", source])
    }

    fn rotate_cookie(&mut self, now: Instant, rng: &mut dyn RngCore) {
        if self
            .cookie_born
            .is_none_or(|b| now.saturating_duration_since(b) >= COOKIE_ROTATE)
        {
            self.cookie_prev = self.cookie_secret;
            let mut fresh = [0u8; 32];
            rng.fill_bytes(&mut fresh);
            // Mixed with the old secret: a new one even from a weak source.
            crypto::hkdf(
                &self.cookie_prev,
                &[&fresh],
                b"pool cookie secret",
                &mut self.cookie_secret,
            );
            self.cookie_born = Some(now);
        }
    }

    /// Whether `mac2` over `signed` is right for `source` (current or
    /// previous cookie secret).
    fn mac2_ok(&self, source: &[u8], signed: &[u8], mac2: &[u8]) -> bool {
        [&self.cookie_secret, &self.cookie_prev].iter().any(|sec| {
            let c = Self::cookie_for(sec, source);
            crypto::ct_eq(&crypto::mac16(&c, &[signed]), mac2)
        })
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.local.public_key()
    }

    /// Takes a new key, fleet secret and configuration (a reload) but keeps
    /// the replay table and rate limiter: a HELLO captured before the
    /// reload is still a replay after it.
    pub fn reconfigure(&mut self, config: &Config, local: SecretKey, fleet: Option<FleetSecret>) {
        self.mac_key = mac1_key(&local.public_key());
        self.local = local;
        self.fleet = fleet;
        self.config = config.clone();
    }

    /// Writes the answer to a RESUME for a session this node does not know:
    /// a refusal with a proof that only this node's static key can make,
    /// bound to that RESUME, so the initiator can close the session at once
    /// instead of trying until its deadline (an unproven refusal could be
    /// anyone's). Costs one X25519; callers rate-limit RESUMEs per source.
    pub fn write_resume_refusal(&self, record: &[u8], out: &mut Vec<u8>) {
        let proof = (|| {
            let (ty, body) = split_record(record).ok()?;
            if ty != RecordType::Resume {
                return None;
            }
            let mut r = Reader::new(body);
            let id = SessionId(r.array().ok()?);
            let epoch = r.u32().ok()?;
            let _base = r.u32().ok()?;
            let refuse = PublicKey(r.array().ok()?);
            let dh = crate::keys::x25519(self.local.as_bytes(), &refuse.0)?;
            Some(refusal_proof(&dh, &id, epoch, &refuse))
        })();
        let err = HandshakeError::UnknownSession;
        let reason = err.refusal_text();
        match proof {
            Some(p) => wire::push_record(
                out,
                RecordType::Refuse,
                &[&[CODE_UNKNOWN_SESSION, REFUSE_PROOF], &p, reason.as_bytes()],
            ),
            None => write_refusal(&err, out),
        }
    }

    /// Writes the KEY_INFO answer to a probe.
    pub fn write_key_info(&self, out: &mut Vec<u8>) {
        wire::push_record(out, RecordType::KeyInfo, &[&self.local.public_key().0]);
    }

    /// Handles a whole HELLO record from `source` (an opaque address key
    /// for the rate limit). On success writes the WELCOME record into `out`
    /// and returns the new session; `is_trusted` decides on the
    /// authenticated peer key. On failure the caller should send
    /// [`write_refusal`] and close the carrier.
    ///
    /// Order of checks, cheapest first: rate limit, size and version, MAC
    /// (no DH before it), Noise (DH), timestamp, trust. No state is kept
    /// for a peer before it authenticated.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        now: Instant,
        unix_nanos: u64,
        source: &[u8],
        record: &[u8],
        is_trusted: &mut dyn FnMut(&PublicKey) -> bool,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<Session, HandshakeError> {
        if let Some(l) = &mut self.limiter {
            if !l.allow(now, source) {
                return Err(HandshakeError::RateLimited);
            }
        }
        let (ty, body) = split_record(record)?;
        if ty != RecordType::Hello {
            return Err(HandshakeError::Unexpected("not a HELLO"));
        }
        if body.len() < 2 + MAC_LEN {
            return Err(WireError::Truncated.into());
        }
        let mut r = Reader::new(body);
        let version = r.u8()?;
        let flags = r.u8()?;
        if version != VERSION {
            return Err(HandshakeError::Version {
                got: version,
                want: VERSION,
            });
        }
        let has_mac2 = flags & FLAG_MAC2 != 0;
        if has_mac2 && body.len() < 2 + 2 * MAC_LEN {
            return Err(WireError::Truncated.into());
        }
        let mac2_at = record.len() - if has_mac2 { MAC_LEN } else { 0 };
        let mac_at = mac2_at - MAC_LEN;
        let mac = crypto::mac16(&self.mac_key, &[&record[..mac_at]]);
        if !crypto::ct_eq(&mac, &record[mac_at..mac2_at]) {
            return Err(HandshakeError::BadMac);
        }
        if self.under_load {
            // Still before any Diffie-Hellman: a sender that cannot show a
            // cookie for its source gets one, and nothing else.
            self.rotate_cookie(now, rng);
            if !(has_mac2 && self.mac2_ok(source, &record[..mac2_at], &record[mac2_at..])) {
                let cookie = Self::cookie_for(&self.cookie_secret, source);
                wire::push_record(out, RecordType::Cookie, &[&cookie]);
                return Err(HandshakeError::CookieRequired);
            }
        }
        let uses_psk = flags & FLAG_PSK != 0;
        match (&self.fleet, uses_psk) {
            (Some(_), false) => {
                return Err(HandshakeError::FleetSecretMismatch {
                    ours: "requires",
                    theirs: "sent none",
                })
            }
            (None, true) => {
                return Err(HandshakeError::FleetSecretMismatch {
                    ours: "does not use",
                    theirs: "used one",
                })
            }
            _ => {}
        }
        let noise_msg = &record[RECORD_HEADER_LEN + 2..mac_at];
        let name = if uses_psk { NOISE_IK_PSK } else { NOISE_IK };
        let prologue = ik_prologue(flags);
        let mut b = snow::Builder::with_resolver(params(name)?, crate::rng::Resolver::boxed(rng))
            .local_private_key(self.local.as_bytes())
            .and_then(|b| b.prologue(&prologue))
            .map_err(|_| HandshakeError::Crypto)?;
        if let Some(f) = &self.fleet {
            b = b.psk(2, &f.0).map_err(|_| HandshakeError::Crypto)?;
        }
        let mut hs = b.build_responder().map_err(|_| HandshakeError::Crypto)?;
        let mut payload = [0u8; 256];
        let n = hs
            .read_message(noise_msg, &mut payload)
            .map_err(|_| HandshakeError::Crypto)?;
        if n != HELLO_PAYLOAD_LEN {
            return Err(WireError::Truncated.into());
        }
        let peer_bytes: [u8; KEY_LEN] = hs
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or(HandshakeError::Crypto)?;
        let peer = PublicKey(peer_bytes);

        // Timestamp: within the allowed skew of our clock and newer than
        // the last one accepted from this key.
        let ts = u64::from_be_bytes(
            payload[..8]
                .try_into()
                .map_err(|_| HandshakeError::Crypto)?,
        );
        let skew = ts.abs_diff(unix_nanos);
        let limit = self.config.max_clock_skew;
        if skew > limit.as_nanos() as u64 {
            return Err(HandshakeError::ClockSkew {
                skew_secs: Duration::from_nanos(skew).as_secs(),
                limit_secs: limit.as_secs(),
            });
        }
        if self.seen.get(&peer).is_some_and(|r| !r.is_fresh(ts)) {
            return Err(HandshakeError::Replayed { key: peer });
        }
        if !is_trusted(&peer) {
            return Err(HandshakeError::Untrusted { key: peer });
        }
        self.remember(peer, ts, unix_nanos);

        let offered = payload[8];
        let suite = self
            .config
            .ciphers
            .iter()
            .copied()
            .find(|c| offered & c.bit() != 0)
            .ok_or(HandshakeError::NoCommonCipher)?;
        let peer_params = TransportParams::read(&payload[9..n])?;

        let mut reply = [0u8; WELCOME_PAYLOAD_LEN];
        reply[0] = suite.bit();
        TransportParams::from_config(&self.config).write(&mut reply[1..]);
        let mut msg = [0u8; 256];
        let m = hs
            .write_message(&reply, &mut msg)
            .map_err(|_| HandshakeError::Crypto)?;
        wire::push_record(out, RecordType::Welcome, &[&msg[..m]]);
        let agreed = split(&mut hs);
        Ok(Session::new(
            now,
            Role::Responder,
            self.config.clone(),
            self.local.public_key(),
            peer,
            suite,
            &agreed,
            peer_params,
        ))
    }

    fn remember(&mut self, peer: PublicKey, ts: u64, unix_nanos: u64) {
        if self.seen.len() >= MAX_SEEN {
            // Entries older than the skew window can go: such a timestamp
            // would be refused by the skew check anyway.
            let floor = unix_nanos.saturating_sub(self.config.max_clock_skew.as_nanos() as u64);
            self.seen.retain(|_, r| r.max >= floor);
        }
        self.seen.entry(peer).or_default().insert(ts);
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
pub(crate) struct EpochHandshake {
    hs: snow::HandshakeState,
}

/// The epoch handshake's prologue: the session id and the new epoch, and
/// for a resume its base epoch and refusal key (`extra`), so that none of
/// the cleartext fields of a RESUME can be altered.
fn epoch_prologue(id: &SessionId, epoch: u32, extra: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(32 + extra.len());
    p.extend_from_slice(b"POOL/2 epoch");
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
        initiator: bool,
        rng: &mut dyn RngCore,
    ) -> Result<Self, HandshakeError> {
        let prologue = epoch_prologue(id, epoch, extra);
        let b =
            snow::Builder::with_resolver(params(NOISE_EPOCH)?, crate::rng::Resolver::boxed(rng))
                .prologue(&prologue)
                .and_then(|b| b.psk(0, chain))
                .map_err(|_| HandshakeError::Crypto)?;
        let hs = if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
        .map_err(|_| HandshakeError::Crypto)?;
        Ok(EpochHandshake { hs })
    }

    /// Starter: writes the first message carrying `payload`.
    pub(crate) fn start(
        chain: &[u8; 32],
        id: &SessionId,
        epoch: u32,
        extra: &[u8],
        payload: &[u8],
        rng: &mut dyn RngCore,
        msg: &mut [u8],
    ) -> Result<(Self, usize), HandshakeError> {
        let mut me = Self::build(chain, id, epoch, extra, true, rng)?;
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
        first: &[u8],
        payload_out: &mut [u8],
        reply: &[u8],
        rng: &mut dyn RngCore,
        msg: &mut [u8],
    ) -> Result<(Agreed, usize, usize), HandshakeError> {
        let mut me = Self::build(chain, id, epoch, extra, false, rng)?;
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
