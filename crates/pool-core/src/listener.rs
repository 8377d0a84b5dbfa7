//! The listener's rules, without I/O: what the first record of a new
//! carrier asks for, whether a RESUME names a session we hold, the
//! handshake slots (in all and per source), when the listener counts as
//! under load, and the HELLO gate. A runtime owns the sockets, tasks and
//! timers; it asks a [`Listener`] and does what the answer says.
//!
//! The Diffie-Hellman work of a HELLO that passed the gate does not happen
//! here, nor under the listener's lock: [`HelloDecision::Admit`] hands it
//! an [`Admitted`] to open elsewhere (`pool-net` uses the blocking pool),
//! with a [`ReplayTable`](crate::ReplayTable) behind its own short lock.
//! The runtime reports each one done with [`Listener::hello_done`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::RngCore;

use crate::acceptor::{AcceptorKeys, Admitted, HelloGate};
use crate::config::Config;
use crate::error::HandshakeError;
use crate::handshake::{resume_session_id, write_refusal, FleetSecret};
use crate::keys::{PublicKey, SecretKey};
use crate::session::SessionId;
use crate::wire::{RecordType, HANDOFF_TOKEN_LEN};

/// HELLOs admitted by the gate and waiting for (or in) their
/// Diffie-Hellman work beyond which the listener counts as under load.
pub const HELLO_BACKLOG: usize = 4;

/// Handshakes in progress one source may hold at once: one address (or
/// /64, or relayed key) cannot take all of the listener's slots.
pub const PENDING_PER_SOURCE: usize = 32;

/// How long the listener stays under load after the last sign of it, while
/// Diffie-Hellman work is being wasted: a flood that is answered with
/// cookies empties the backlog at once, and without this it would get its
/// next HELLOs through to Diffie-Hellman.
pub const LOAD_HOLD: Duration = Duration::from_secs(1);

/// What the first record on a new carrier asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FirstRecord {
    /// A new session: [`Listener::handle_hello`].
    Hello,
    /// A resume: [`resume_target`] finds the session.
    Resume,
    /// A resume at a handoff's target: [`handoff_resume_fields`] reads
    /// what to check before any Diffie-Hellman.
    ResumeHandoff,
    /// A key probe: answer with [`AcceptorKeys::write_key_info`].
    Probe,
    /// Anything else: counted as dropped, answered with
    /// [`write_unexpected_first`], closed.
    Other,
}

/// Classifies a carrier's first (whole) record by its type byte.
pub fn first_record(record: &[u8]) -> FirstRecord {
    match record.first().copied() {
        Some(t) if t == RecordType::Hello as u8 => FirstRecord::Hello,
        Some(t) if t == RecordType::Resume as u8 => FirstRecord::Resume,
        Some(t) if t == RecordType::ResumeHandoff as u8 => FirstRecord::ResumeHandoff,
        Some(t) if t == RecordType::KeyProbe as u8 => FirstRecord::Probe,
        _ => FirstRecord::Other,
    }
}

/// Writes the refusal for a first record that is none of HELLO, RESUME or
/// KEY_PROBE.
pub fn write_unexpected_first(out: &mut Vec<u8>) {
    let e = HandshakeError::Unexpected("first record must be HELLO, RESUME or KEY_PROBE");
    write_refusal(&e, out);
}

/// What to do with a RESUME, given the sessions the listener holds.
#[derive(Debug)]
pub enum ResumeTarget<T> {
    /// The session it names: let its core answer the RESUME.
    Known(T),
    /// No such session: answer with the proven refusal
    /// ([`AcceptorKeys::write_resume_refusal`]), so the peer closes at once.
    Unknown,
    /// Unreadable: answer with [`write_refusal`] of this error.
    Malformed(HandshakeError),
}

/// Reads the session id of a RESUME and looks it up with `lookup` (the
/// runtime's registry).
pub fn resume_target<T>(
    record: &[u8],
    lookup: impl FnOnce(&SessionId) -> Option<T>,
) -> ResumeTarget<T> {
    match resume_session_id(record) {
        Ok(id) => match lookup(&id) {
            Some(t) => ResumeTarget::Known(t),
            None => ResumeTarget::Unknown,
        },
        Err(e) => ResumeTarget::Malformed(e),
    }
}

/// What a RESUME_HANDOFF names, read without any cryptography: the session,
/// the proposed epoch and the migration token. The target checks the token
/// ([`crate::handoff::Imports::check`], one MAC) before any key exchange.
pub fn handoff_resume_fields(
    record: &[u8],
) -> Result<(SessionId, u32, [u8; HANDOFF_TOKEN_LEN]), HandshakeError> {
    let (ty, body) = crate::handshake::split_record(record)?;
    if ty != RecordType::ResumeHandoff {
        return Err(HandshakeError::Unexpected("not a RESUME_HANDOFF"));
    }
    let mut r = crate::wire::Reader::new(body);
    let id = SessionId(r.array()?);
    let epoch = r.u32()?;
    let _base_and_refusal_key: [u8; 36] = r.array()?;
    let token = r.array()?;
    Ok((id, epoch, token))
}

/// The rate-limit, cookie and slot key of a carrier's source: the IPv4
/// address, the IPv6 /64 (one host usually holds a whole /64), or, for a
/// relayed carrier, the key the relay authenticated (all relayed clients
/// share the relay's address).
pub fn source_key(from: SocketAddr, relayed: Option<&PublicKey>) -> Vec<u8> {
    if let Some(k) = relayed {
        let mut v = b"relayed:".to_vec();
        v.extend_from_slice(&k.0);
        return v;
    }
    match from.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => a.octets()[..8].to_vec(),
        },
    }
}

/// Handshakes in progress: at most `max` in all and [`PENDING_PER_SOURCE`]
/// per source. A carrier takes a slot before its first record is read and
/// gives it back when its handshake ends, however it ends.
#[derive(Debug)]
pub struct HandshakeSlots {
    max: usize,
    in_use: usize,
    by_source: HashMap<Vec<u8>, usize>,
}

impl HandshakeSlots {
    /// Room for `max` handshakes at once (at least one).
    pub fn new(max: usize) -> Self {
        HandshakeSlots {
            max: max.max(1),
            in_use: 0,
            by_source: HashMap::new(),
        }
    }

    /// Takes a slot for `source`; `false` when the listener or this source
    /// has none left (drop the carrier unread).
    #[must_use]
    pub fn take(&mut self, source: &[u8]) -> bool {
        if self.in_use >= self.max {
            return false;
        }
        let n = self.by_source.get(source).copied().unwrap_or(0);
        if n >= PENDING_PER_SOURCE {
            return false;
        }
        self.by_source.insert(source.to_vec(), n + 1);
        self.in_use += 1;
        true
    }

    /// Gives back a slot [`HandshakeSlots::take`] gave `source`.
    pub fn release(&mut self, source: &[u8]) {
        if let Some(n) = self.by_source.get_mut(source) {
            *n -= 1;
            self.in_use = self.in_use.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(source);
            }
        }
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Whether more than half of the slots are taken.
    pub fn over_half(&self) -> bool {
        self.max - self.in_use < self.max / 2
    }
}

/// "Under load", with hysteresis: on while there is pressure, and for
/// [`LOAD_HOLD`] after the last pressure if Diffie-Hellman work was wasted
/// (a HELLO admitted that led to no session) within [`LOAD_HOLD`] too. A
/// burst of real clients, whose Diffie-Hellman is not wasted, is not held:
/// it would pay a cookie round trip each for nothing.
#[derive(Debug, Default)]
pub struct LoadMeter {
    pressure_at: Option<Instant>,
    wasted_at: Option<Instant>,
}

impl LoadMeter {
    /// Whether the listener is under load at `now`, given whether it sees
    /// pressure now.
    pub fn update(&mut self, now: Instant, pressure: bool) -> bool {
        if pressure {
            self.pressure_at = Some(now);
            return true;
        }
        let recent = |t: Option<Instant>| t.is_some_and(|t| now < t + LOAD_HOLD);
        recent(self.pressure_at) && recent(self.wasted_at)
    }

    /// An admitted HELLO's Diffie-Hellman led to no session.
    pub fn wasted(&mut self, now: Instant) {
        self.wasted_at = Some(now);
    }
}

/// What to do with a HELLO.
#[derive(Debug)]
#[must_use]
pub enum HelloDecision {
    /// Under load and no valid cookie: send what was written to `out` (a
    /// COOKIE record) and read the retried HELLO on the same carrier. No
    /// Diffie-Hellman was done.
    Cookie,
    /// Refused by the gate: send [`write_refusal`] of the error, close.
    Refuse(HandshakeError),
    /// Passed the gate: do its Diffie-Hellman ([`Admitted::open`]) off the
    /// listener's lock, then call [`Listener::hello_done`].
    Admit(Admitted),
}

/// A listener's decisions, in one state machine: slots, load and gate.
#[derive(Debug)]
pub struct Listener {
    gate: HelloGate,
    slots: HandshakeSlots,
    load: LoadMeter,
    /// HELLOs admitted whose Diffie-Hellman is not done.
    backlog: usize,
}

impl Listener {
    /// A listener for this key with room for `max_pending` handshakes.
    pub fn new(
        config: &Config,
        local: SecretKey,
        fleet: Option<FleetSecret>,
        max_pending: usize,
    ) -> Self {
        Listener {
            gate: HelloGate::new(AcceptorKeys::new(config, local, fleet)),
            slots: HandshakeSlots::new(max_pending),
            load: LoadMeter::default(),
            backlog: 0,
        }
    }

    /// The keys now (for probes, proven refusals, and the Diffie-Hellman
    /// of admitted HELLOs, which carry their own copy).
    pub fn keys(&self) -> Arc<AcceptorKeys> {
        self.gate.keys().clone()
    }

    /// A reload: new key, fleet secret and configuration; the slots, the
    /// rate limiter and the cookie secrets stay (and the runtime's replay
    /// table, which this does not hold).
    pub fn reconfigure(&mut self, config: &Config, local: SecretKey, fleet: Option<FleetSecret>) {
        self.gate.set_keys(AcceptorKeys::new(config, local, fleet));
    }

    /// See [`HandshakeSlots::take`].
    #[must_use]
    pub fn take_slot(&mut self, source: &[u8]) -> bool {
        self.slots.take(source)
    }

    /// See [`HandshakeSlots::release`].
    pub fn release_slot(&mut self, source: &[u8]) {
        self.slots.release(source);
    }

    /// Handshakes in progress.
    pub fn slots_in_use(&self) -> usize {
        self.slots.in_use()
    }

    /// Admitted HELLOs whose Diffie-Hellman is not done.
    pub fn backlog(&self) -> usize {
        self.backlog
    }

    /// Whether the last HELLO found the listener under load.
    pub fn under_load(&self) -> bool {
        self.gate.under_load()
    }

    /// Decides on a whole HELLO record from `source`. Under load (at least
    /// [`HELLO_BACKLOG`] admitted HELLOs waiting for their Diffie-Hellman,
    /// or over half the slots taken; held as [`LoadMeter`] says) a HELLO
    /// without a valid cookie gets one.
    pub fn handle_hello(
        &mut self,
        now: Instant,
        source: &[u8],
        record: &[u8],
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> HelloDecision {
        let pressure = self.backlog >= HELLO_BACKLOG || self.slots.over_half();
        let on = self.load.update(now, pressure);
        self.gate.set_under_load(on);
        match self.gate.check(now, source, record, rng, out) {
            Ok(a) => {
                self.backlog += 1;
                HelloDecision::Admit(a)
            }
            Err(HandshakeError::CookieRequired) => HelloDecision::Cookie,
            Err(e) => HelloDecision::Refuse(e),
        }
    }

    /// An admitted HELLO's Diffie-Hellman is done; `wasted` when it led to
    /// no session (refused after the Diffie-Hellman, or never run).
    pub fn hello_done(&mut self, now: Instant, wasted: bool) {
        self.backlog = self.backlog.saturating_sub(1);
        if wasted {
            self.load.wasted(now);
        }
    }
}
