//! The listener's side of a new session, cut into steps that a runtime can
//! run in different places (see `docs/protocol.md`, "Listener"):
//!
//! 1. [`HelloGate::check`], the cheap gate: rate limit, size, version,
//!    mac1, the fleet-secret flag and, under load, the cookie (mac2). One
//!    or two MACs and no Diffie-Hellman; it holds all of the gate's mutable
//!    state, so a runtime runs it inline under a short lock.
//! 2. [`Admitted::open`]: the Noise message (its Diffie-Hellman), against
//!    the immutable [`AcceptorKeys`] the gate checked the mac1 with. It
//!    touches no shared mutable state, so it needs no lock.
//! 3. [`ReplayTable::admit`]: clock skew, replay and trust, checked and
//!    recorded in one step (a short lock); then [`Opened::welcome`] writes
//!    the WELCOME (more Diffie-Hellman, no lock).
//!
//! [`Acceptor`] runs the three in a row, in the same order of checks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::RngCore;

use crate::config::Config;
use crate::crypto;
use crate::error::{HandshakeError, WireError};
use crate::handshake::{
    ik_prologue, mac1_key, params, refusal_proof, split, split_record, write_refusal, FleetSecret,
    CODE_UNKNOWN_SESSION, COOKIE_ROTATE, FLAG_MAC2, FLAG_PSK, HELLO_PAYLOAD_LEN, MAC_LEN, NOISE_IK,
    NOISE_IK_PSK, REFUSE_PROOF, VERSION, WELCOME_PAYLOAD_LEN,
};
use crate::keys::{PublicKey, SecretKey, KEY_LEN};
use crate::session::{Role, Session, SessionId, TransportParams};
use crate::wire::{self, Reader, RecordType, RECORD_HEADER_LEN};

/// Per-source token buckets, bounded in size.
#[derive(Debug)]
struct RateLimiter {
    rate: u32,
    burst: u32,
    buckets: HashMap<Vec<u8>, (f64, Instant)>,
}

const MAX_BUCKETS: usize = 16_384;

impl RateLimiter {
    /// Gives back the token a HELLO took when it was answered with a
    /// cookie: the limit bounds Diffie-Hellman work per source, and a
    /// cookie costs one MAC. A real client's cookie round trip under load
    /// then costs one token, not two.
    fn refund(&mut self, source: &[u8]) {
        if let Some(b) = self.buckets.get_mut(source) {
            b.0 = (b.0 + 1.0).min(f64::from(self.burst));
        }
    }

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

/// What a listener's handshakes read and never change: the static key, its
/// mac1 key, the fleet secret and the protocol configuration. Shared (in an
/// `Arc`) by the gate and the Diffie-Hellman work; a reload makes a new one
/// while handshakes already past the gate finish with the old one.
pub struct AcceptorKeys {
    local: SecretKey,
    mac_key: [u8; 32],
    fleet: Option<FleetSecret>,
    config: Config,
}

impl std::fmt::Debug for AcceptorKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AcceptorKeys(key={})", self.local.public_key().short())
    }
}

impl AcceptorKeys {
    /// Keys for this node; with a fleet secret every peer must hold it
    /// (`IKpsk2`), without one `IK` is used.
    pub fn new(config: &Config, local: SecretKey, fleet: Option<FleetSecret>) -> Arc<Self> {
        Arc::new(AcceptorKeys {
            mac_key: mac1_key(&local.public_key()),
            local,
            fleet,
            config: config.clone(),
        })
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.local.public_key()
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
}

/// The cheap checks of a HELLO, before any Diffie-Hellman, and the state
/// they keep: the per-source rate limiter, whether the listener is under
/// load, and the cookie secrets. One per listener; it survives reloads.
pub struct HelloGate {
    keys: Arc<AcceptorKeys>,
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

impl std::fmt::Debug for HelloGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HelloGate({:?}, under_load={})",
            self.keys, self.under_load
        )
    }
}

/// A HELLO that passed the gate: it may now cost its Diffie-Hellman
/// ([`Admitted::open`]), with the keys the gate checked it against.
#[must_use = "an admitted HELLO goes on to Admitted::open"]
pub struct Admitted {
    keys: Arc<AcceptorKeys>,
    flags: u8,
    len: usize,
    mac_at: usize,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Admitted(flags={}, len={})", self.flags, self.len)
    }
}

impl HelloGate {
    /// A gate for these keys; the rate limit comes from their configuration
    /// (`handshake_rate`).
    pub fn new(keys: Arc<AcceptorKeys>) -> Self {
        HelloGate {
            limiter: keys.config.handshake_rate.map(|(rate, burst)| RateLimiter {
                rate,
                burst,
                buckets: HashMap::new(),
            }),
            keys,
            under_load: false,
            cookie_secret: [0; 32],
            cookie_prev: [0; 32],
            cookie_born: None,
        }
    }

    /// The keys new HELLOs are checked against.
    pub fn keys(&self) -> &Arc<AcceptorKeys> {
        &self.keys
    }

    /// Takes new keys (a reload); the rate limiter and cookie secrets stay.
    pub fn set_keys(&mut self, keys: Arc<AcceptorKeys>) {
        self.keys = keys;
    }

    /// Whether the listener is under load (the caller decides, see
    /// [`crate::listener::Listener`]). Under load every HELLO must prove,
    /// with a cookie, that its sender receives at its source.
    pub fn set_under_load(&mut self, on: bool) {
        self.under_load = on;
    }

    /// Whether HELLOs must now carry a cookie.
    pub fn under_load(&self) -> bool {
        self.under_load
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

    /// The cheap checks of a whole HELLO record from `source` (an opaque
    /// address key for the rate limit and the cookie), in this order: rate
    /// limit, size and version, mac1, under load the cookie, the fleet
    /// secret flag. No Diffie-Hellman, and no state for the peer. A HELLO
    /// answered with a cookie gives its rate-limit token back.
    ///
    /// Under load without a valid cookie it writes a COOKIE record into
    /// `out` and returns [`HandshakeError::CookieRequired`]: send `out` and
    /// read the retried HELLO on the same carrier.
    pub fn check(
        &mut self,
        now: Instant,
        source: &[u8],
        record: &[u8],
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<Admitted, HandshakeError> {
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
        let mac = crypto::mac16(&self.keys.mac_key, &[&record[..mac_at]]);
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
                if let Some(l) = &mut self.limiter {
                    l.refund(source);
                }
                return Err(HandshakeError::CookieRequired);
            }
        }
        let uses_psk = flags & FLAG_PSK != 0;
        match (&self.keys.fleet, uses_psk) {
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
        Ok(Admitted {
            keys: self.keys.clone(),
            flags,
            len: record.len(),
            mac_at,
        })
    }
}

impl Admitted {
    /// Reads the Noise message of the HELLO the gate admitted (`record`,
    /// the same bytes): the Diffie-Hellman work, which needs no lock.
    pub fn open(self, record: &[u8], rng: &mut dyn RngCore) -> Result<Opened, HandshakeError> {
        if record.len() != self.len {
            return Err(HandshakeError::Unexpected(
                "not the HELLO the gate admitted",
            ));
        }
        let keys = self.keys;
        let noise_msg = &record[RECORD_HEADER_LEN + 2..self.mac_at];
        let uses_psk = self.flags & FLAG_PSK != 0;
        let name = if uses_psk { NOISE_IK_PSK } else { NOISE_IK };
        let prologue = ik_prologue(self.flags);
        let mut b = snow::Builder::with_resolver(params(name)?, crate::rng::Resolver::boxed(rng))
            .local_private_key(keys.local.as_bytes())
            .and_then(|b| b.prologue(&prologue))
            .map_err(|_| HandshakeError::Crypto)?;
        if let Some(f) = &keys.fleet {
            b = b.psk(2, &f.0).map_err(|_| HandshakeError::Crypto)?;
        }
        let mut hs = b.build_responder().map_err(|_| HandshakeError::Crypto)?;
        let mut payload = [0u8; HELLO_PAYLOAD_LEN];
        let mut buf = [0u8; 256];
        let n = hs
            .read_message(noise_msg, &mut buf)
            .map_err(|_| HandshakeError::Crypto)?;
        if n != HELLO_PAYLOAD_LEN {
            return Err(WireError::Truncated.into());
        }
        payload.copy_from_slice(&buf[..n]);
        let peer_bytes: [u8; KEY_LEN] = hs
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or(HandshakeError::Crypto)?;
        Ok(Opened {
            keys,
            hs,
            peer: PublicKey(peer_bytes),
            payload,
        })
    }
}

/// A HELLO whose Noise message authenticated its sender's static key; not
/// yet checked for freshness ([`ReplayTable::admit`]) nor answered
/// ([`Opened::welcome`]).
#[must_use = "an opened HELLO goes on to ReplayTable::admit"]
pub struct Opened {
    keys: Arc<AcceptorKeys>,
    hs: snow::HandshakeState,
    peer: PublicKey,
    payload: [u8; HELLO_PAYLOAD_LEN],
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opened(peer={})", self.peer.short())
    }
}

impl Opened {
    /// The peer's authenticated static key.
    pub fn peer(&self) -> PublicKey {
        self.peer
    }

    fn timestamp(&self) -> u64 {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&self.payload[..8]);
        u64::from_be_bytes(ts)
    }

    /// Chooses the cipher, writes the WELCOME record into `out` (its
    /// Diffie-Hellman work; no lock needed) and returns the new session.
    /// Call only after [`ReplayTable::admit`] accepted this HELLO.
    pub fn welcome(mut self, now: Instant, out: &mut Vec<u8>) -> Result<Session, HandshakeError> {
        let config = &self.keys.config;
        let offered = self.payload[8];
        let suite = config
            .ciphers
            .iter()
            .copied()
            .find(|c| offered & c.bit() != 0)
            .ok_or(HandshakeError::NoCommonCipher)?;
        let peer_params = TransportParams::read(&self.payload[9..])?;

        let mut reply = [0u8; WELCOME_PAYLOAD_LEN];
        reply[0] = suite.bit();
        TransportParams::from_config(config).write(&mut reply[1..]);
        let mut msg = [0u8; 256];
        let m = self
            .hs
            .write_message(&reply, &mut msg)
            .map_err(|_| HandshakeError::Crypto)?;
        wire::push_record(out, RecordType::Welcome, &[&msg[..m]]);
        let agreed = split(&mut self.hs);
        Ok(Session::new(
            now,
            Role::Responder,
            config.clone(),
            self.keys.local.public_key(),
            self.peer,
            suite,
            &agreed,
            peer_params,
        ))
    }
}

/// The newest handshake timestamps accepted per key: what makes a replayed
/// HELLO fail. One per listener; it survives reloads.
#[derive(Debug, Default)]
pub struct ReplayTable {
    seen: HashMap<PublicKey, Recent>,
}

impl ReplayTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks an opened HELLO's timestamp (within the allowed skew of
    /// `unix_nanos`, fresh for its key), then `is_trusted` on its key, and
    /// records the timestamp: check and record are one step, so of two
    /// copies of one HELLO opened at once only one gets through.
    pub fn admit(
        &mut self,
        opened: &Opened,
        unix_nanos: u64,
        is_trusted: &mut dyn FnMut(&PublicKey) -> bool,
    ) -> Result<(), HandshakeError> {
        let peer = opened.peer;
        let ts = opened.timestamp();
        let skew = ts.abs_diff(unix_nanos);
        let limit = opened.keys.config.max_clock_skew;
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
        if self.seen.len() >= MAX_SEEN {
            // Entries older than the skew window can go: such a timestamp
            // would be refused by the skew check anyway.
            let floor = unix_nanos.saturating_sub(limit.as_nanos() as u64);
            self.seen.retain(|_, r| r.max >= floor);
        }
        self.seen.entry(peer).or_default().insert(ts);
        Ok(())
    }
}

/// A listener's side of new sessions in one piece: the gate, the
/// Diffie-Hellman work and the replay table run in a row. One per endpoint.
pub struct Acceptor {
    gate: HelloGate,
    replay: ReplayTable,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Acceptor(key={})",
            self.gate.keys.local.public_key().short()
        )
    }
}

impl Acceptor {
    /// An acceptor for this node's key; with a fleet secret every peer must
    /// hold it (`IKpsk2`), without one `IK` is used.
    pub fn new(config: &Config, local: SecretKey, fleet: Option<FleetSecret>) -> Self {
        Acceptor {
            gate: HelloGate::new(AcceptorKeys::new(config, local, fleet)),
            replay: ReplayTable::new(),
        }
    }

    /// Tells the acceptor whether the listener is under load (the runtime
    /// decides, from the handshakes in progress). Under load every HELLO
    /// must prove, with a cookie, that its sender receives at its source.
    pub fn set_under_load(&mut self, on: bool) {
        self.gate.set_under_load(on);
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.gate.keys.public_key()
    }

    /// Takes a new key, fleet secret and configuration (a reload) but keeps
    /// the replay table and rate limiter: a HELLO captured before the
    /// reload is still a replay after it.
    pub fn reconfigure(&mut self, config: &Config, local: SecretKey, fleet: Option<FleetSecret>) {
        self.gate.set_keys(AcceptorKeys::new(config, local, fleet));
    }

    /// See [`AcceptorKeys::write_resume_refusal`].
    pub fn write_resume_refusal(&self, record: &[u8], out: &mut Vec<u8>) {
        self.gate.keys.write_resume_refusal(record, out);
    }

    /// Writes the KEY_INFO answer to a probe.
    pub fn write_key_info(&self, out: &mut Vec<u8>) {
        self.gate.keys.write_key_info(out);
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
        let admitted = self.gate.check(now, source, record, rng, out)?;
        let opened = admitted.open(record, rng)?;
        self.replay.admit(&opened, unix_nanos, is_trusted)?;
        opened.welcome(now, out)
    }
}
