//! The session state machine: records, sequencing, acks, the replay
//! buffer, epochs (rekey and resume), streams and flow control.
//!
//! Drive it with `handle_*` and `poll_*`; after any input, drain
//! [`Session::poll_transmit`] and [`Session::poll_event`] until they return
//! `None`, then sleep until [`Session::poll_timeout`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand_core::RngCore;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::crypto::{self, CipherSuite, DirectionKey, TAG_LEN};
use crate::error::{CloseCode, CloseReason, HandshakeError, StreamError, WireError};
use crate::handshake::{split_record, Agreed, EpochHandshake};
use crate::keys::PublicKey;
use crate::wire::{
    self, decode_frame, Frame, Reader, RecordType, DATA_OVERHEAD, DATA_PREFIX_LEN, MAX_RECORD_LEN,
    RECORD_HEADER_LEN,
};

mod epoch;
mod handoff;
mod receive;
mod send_queue;
pub(crate) mod snapshot;
mod streams;
mod transmit;

use handoff::{ClientMove, Deferred, SourceOffer};
pub use handoff::{HandoffError, HandoffOffer, HeldOp};

use send_queue::SendQueue;
use streams::StreamState;

/// Largest stream payload in one frame; four fit in one record.
pub(crate) const MAX_STREAM_CHUNK: usize = 16 * 1024 - 32;

/// Which side of the first handshake this session was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Dialled the peer; resumes the session when the carrier dies.
    Initiator,
    /// Accepted the peer; waits for a resume when the carrier dies.
    Responder,
}

/// A session's identifier: public, derived from the handshake hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Limits each side announces in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TransportParams {
    pub(crate) stream_window: u64,
    pub(crate) session_window: u64,
    pub(crate) max_streams: u64,
}

impl TransportParams {
    pub(crate) const LEN: usize = 24;
    pub(crate) fn from_config(c: &Config) -> Self {
        TransportParams {
            stream_window: c.stream_window,
            session_window: c.session_window,
            max_streams: c.max_streams,
        }
    }
    pub(crate) fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.stream_window.to_be_bytes());
        out[8..16].copy_from_slice(&self.session_window.to_be_bytes());
        out[16..24].copy_from_slice(&self.max_streams.to_be_bytes());
    }
    pub(crate) fn read(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        Ok(TransportParams {
            stream_window: r.u64()?,
            session_window: r.u64()?,
            max_streams: r.u64()?,
        })
    }
}

/// What the session tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer opened a stream.
    StreamOpened(u64),
    /// A stream has data, a FIN or a reset to read.
    StreamReadable(u64),
    /// A stream that was blocked may be written again.
    StreamWritable(u64),
    /// The peer allows more streams.
    StreamsAvailable,
    /// Nothing arrived on the carrier for the configured time: drop it
    /// (the initiator then resumes on a new one).
    CarrierDead,
    /// A new key epoch is in use.
    Rekeyed(u32),
    /// The peer told us where it accepts direct carriers.
    PeerPaths(Vec<std::net::SocketAddr>),
    /// Client: the server offers to hand the session to another server
    /// (a HANDOFF frame). Follow it with [`Session::start_handoff_resume`]
    /// on a carrier to the target, or refuse it with
    /// [`Session::decline_handoff`].
    HandoffOffered(HandoffOffer),
    /// Source: the client declined handoff `id` with `code` (a
    /// [`crate::wire::DeclineCode`] value).
    HandoffDeclined {
        /// The handoff.
        id: u32,
        /// Why.
        code: u8,
    },
    /// Client: the session moved to another server; `to` is its peer now.
    Moved {
        /// The server it left.
        from: PublicKey,
        /// The server that holds it now.
        to: PublicKey,
    },
    /// The session is over.
    Closed(CloseReason),
}

/// What a stream read produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadResult {
    /// This many bytes were copied.
    Data(usize),
    /// The peer finished its side; no more data will come.
    Fin,
    /// Nothing yet: wait for [`Event::StreamReadable`].
    Blocked,
}

/// What [`Session::debug_sizes`] reports.
#[doc(hidden)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DebugSizes {
    pub replay_bytes: usize,
    pub replay_frames: usize,
    pub recv_buffered: usize,
    pub peer_streams: usize,
    pub local_streams: usize,
    pub pongs: usize,
    pub max_stream_data_queue: usize,
    pub blocked: usize,
    pub pending_resets: usize,
    pub events: usize,
    pub peer_stream_limit: u64,
    pub held_fins: usize,
}

/// Counters and estimates; a snapshot, cheap to take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Carrier bytes sent (records, headers included).
    pub bytes_sent: u64,
    /// Carrier bytes received.
    pub bytes_received: u64,
    /// Records sent.
    pub records_sent: u64,
    /// Records received.
    pub records_received: u64,
    /// Sequenced frames queued for sending.
    pub frames_sent: u64,
    /// Sequenced frames received and delivered (duplicates excluded).
    pub frames_received: u64,
    /// Stream payload bytes written by the application.
    pub stream_bytes_sent: u64,
    /// Stream payload bytes received.
    pub stream_bytes_received: u64,
    /// Frames sent again after a resume.
    pub frames_resent: u64,
    /// Duplicate frames dropped on receipt.
    pub duplicates_dropped: u64,
    /// Smoothed round-trip time.
    pub rtt: Option<Duration>,
    /// Smallest RTT seen.
    pub min_rtt: Option<Duration>,
    /// Jitter: smoothed difference between consecutive RTT samples
    /// (RFC 3550 §6.4.1 estimator, gain 1/16).
    pub jitter: Duration,
    /// Current key epoch.
    pub epoch: u32,
    /// Rekeys completed.
    pub rekeys: u64,
    /// Resumes completed (carrier changes).
    pub resumes: u64,
    /// Streams opened (both sides).
    pub streams_opened: u64,
    /// Streams open now.
    pub streams_active: u64,
    /// Whether a carrier is attached.
    pub carrier_up: bool,
    /// Data-path cipher.
    pub cipher: &'static str,
    /// Carriers lost (died, declared dead, or dropped for bad records).
    pub carriers_lost: u64,
    /// Carriers dropped because bytes on them failed authentication
    /// (tampering, injection, or corruption on the path).
    pub records_rejected: u64,
}

/// Sequenced frames not yet acknowledged: the replay buffer, which is also

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    Closing,
    Closed(CloseReason),
}

/// A rekey we proposed, waiting for the peer's KEY_UPDATE_ACK.
struct PendingEpoch {
    hs: EpochHandshake,
    epoch: u32,
}

/// Initiator: a RESUME sent, waiting for RESUMED (or a refusal).
struct PendingResume {
    hs: EpochHandshake,
    epoch: u32,
    /// The epoch whose chaining secret the resume is based on, and that
    /// secret (kept: the current one may move on meanwhile).
    base: u32,
    base_chain: Zeroizing<[u8; 32]>,
    /// Ephemeral key that lets a server prove it no longer knows the
    /// session (an authenticated refusal, see `handshake::resume_refusal`).
    refuse_key: crate::keys::SecretKey,
    /// A resume at a handoff's target (RESUME_HANDOFF): its key.
    target: Option<PublicKey>,
}

/// Responder: a RESUME answered, waiting for the first valid record on the
/// new carrier, the commit point (WireGuard's roaming rule).
struct PendingAttach {
    epoch: u32,
    base: u32,
    base_chain: Zeroizing<[u8; 32]>,
    chain: Zeroizing<[u8; 32]>,
    tx: DirectionKey,
    rx: DirectionKey,
    peer_next: u64,
}

/// The answer queued for a peer's KEY_UPDATE.
enum KeyAck {
    /// Our half of the new epoch, and the send key to switch to once the
    /// ack is sealed.
    Answer(u32, Vec<u8>, Box<DirectionKey>),
    /// Not now (a resume of ours is under way): the peer drops its rekey.
    Decline(u32),
}

/// One POOL session: everything but the sockets and the clock.
pub struct Session {
    role: Role,
    config: Config,
    local: PublicKey,
    peer: PublicKey,
    id: SessionId,
    suite: CipherSuite,
    /// The chaining secret of `committed_epoch`.
    chain: Zeroizing<[u8; 32]>,
    /// The epoch before it and its chaining secret: the peer may still base
    /// a resume on it (it has not yet seen a record of ours in the new one).
    prev_chain: Option<(u32, Zeroizing<[u8; 32]>)>,
    /// Highest epoch with installed keys.
    committed_epoch: u32,
    /// Highest epoch proposed, answered or installed.
    max_epoch: u32,
    /// Highest epoch in which an authenticated record of the peer arrived:
    /// the peer surely holds that epoch's chaining secret, so resumes are
    /// based on it, and rekeys wait until it is the current epoch.
    rx_confirmed: u32,
    /// Responder: highest epoch proposed by a RESUME answered so far; a
    /// RESUME must propose a newer one, so each is good once.
    resume_floor: u32,
    /// A rekey was asked for ([`Session::force_rekey`]) and waits its turn.
    rekey_requested: bool,
    /// After the peer declined a rekey: none before this time.
    rekey_not_before: Option<Instant>,
    peer_params: TransportParams,

    tx: Option<DirectionKey>,
    rx: Option<DirectionKey>,
    rx_next: Option<DirectionKey>,
    rekey: Option<PendingEpoch>,
    resume: Option<PendingResume>,
    attach_pending: Option<PendingAttach>,
    out_key_update: Option<(u32, Vec<u8>)>,
    out_key_ack: Option<KeyAck>,
    epoch_started: Instant,

    carrier_up: bool,
    lost_at: Option<Instant>,
    last_recv: Instant,
    /// Since when the carrier owes us an answer (an ack of sent frames or
    /// a pong); see `Config::probe_timeout`.
    awaiting_since: Option<Instant>,
    ping_outstanding: bool,
    last_ping_sent: Instant,
    /// When stream data last moved (either way): while it moves, pings go
    /// out every half probe timeout so that a receiver, which owes no
    /// acks, also notices a dead path quickly.
    last_data_at: Instant,
    /// Our direct-path candidates, encoded for a PATHS frame.
    local_paths: Vec<u8>,
    paths_queued: bool,

    send: SendQueue,
    recv_next: u64,
    ack_sent: u64,
    /// An ack goes out even with nothing new to acknowledge (after a
    /// resume: the first record on a new carrier).
    ack_forced: bool,
    unacked_bytes: usize,
    ack_due: Option<Instant>,

    streams: HashMap<u64, StreamState>,
    next_local_index: u64,
    next_peer_index: u64,
    peer_max_streams: u64,
    local_max_streams: u64,
    peer_streams_closed: u64,
    max_streams_queued: bool,
    stream_limit_blocked: bool,
    max_stream_data_queue: VecDeque<u64>,
    blocked: Vec<u64>,
    /// Streams reset locally whose RESET_STREAM waits for buffer space.
    pending_resets: VecDeque<u64>,

    send_max_data: u64,
    data_sent: u64,
    recv_max_data: u64,
    recv_data: u64,
    recv_consumed: u64,
    max_data_queued: bool,

    start: Instant,
    next_ping: Instant,
    ping_due: bool,
    entropy: [u8; 32],
    pongs: VecDeque<u64>,
    last_rtt_sample: Option<Duration>,

    /// Source of a handoff: the offer sent to the client (again after
    /// every resume while it stands).
    offer: Option<SourceOffer>,
    offer_queued: bool,
    /// Source: frozen while the target takes the session over; nothing is
    /// read, sent or delivered (see `session/handoff.rs`).
    frozen: bool,
    /// Stream operations asked for while frozen, done at unfreeze (or
    /// handed to the runtime at fence).
    deferred: Vec<Deferred>,
    /// Client: the handoff being followed.
    moving: Option<ClientMove>,
    decline_queued: Option<(u32, u8)>,
    /// Client: the server the session started with, once it moved.
    origin: Option<PublicKey>,
    /// Client: moved to a target (the server it left, the new epoch) and
    /// no record of the target authenticated yet: the commit may not have
    /// happened, and [`Session::revert_handoff`] may go back.
    unconfirmed_move: Option<(PublicKey, u32)>,
    /// FINs held while frozen that found no room at unfreeze.
    held_fins: Vec<u64>,

    pending_close: Option<(CloseCode, String, bool)>,
    state: State,
    events: VecDeque<Event>,
    stats: Stats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session(id={}, role={:?}, peer={})",
            self.id,
            self.role,
            self.peer.short()
        )
    }
}

fn derive_id(hash: &[u8; 32]) -> SessionId {
    let mut id = [0u8; 16];
    crypto::hkdf(hash, &[], b"pool session id", &mut id);
    SessionId(id)
}

fn next_chain(chain: &[u8; 32], agreed: &Agreed) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    crypto::hkdf(
        &agreed.hash,
        &[
            chain,
            &agreed.initiator_to_responder[..],
            &agreed.responder_to_initiator[..],
        ],
        b"pool chain",
        &mut *out,
    );
    out
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        now: Instant,
        role: Role,
        config: Config,
        local: PublicKey,
        peer: PublicKey,
        suite: CipherSuite,
        agreed: &Agreed,
        peer_params: TransportParams,
    ) -> Session {
        let chain = next_chain(&[0u8; 32], agreed);
        let (tx, rx) = match role {
            Role::Initiator => (
                *agreed.initiator_to_responder,
                *agreed.responder_to_initiator,
            ),
            Role::Responder => (
                *agreed.responder_to_initiator,
                *agreed.initiator_to_responder,
            ),
        };
        let mut s = Session::blank(
            now,
            role,
            config,
            local,
            peer,
            derive_id(&agreed.hash),
            suite,
        );
        s.chain = chain;
        s.peer_params = peer_params;
        s.peer_max_streams = peer_params.max_streams;
        s.send_max_data = peer_params.session_window;
        s.tx = DirectionKey::new(suite, tx, 0);
        s.rx = DirectionKey::new(suite, rx, 0);
        s.carrier_up = s.tx.is_some() && s.rx.is_some();
        s.stats.carrier_up = s.carrier_up;
        s
    }

    pub(crate) fn blank(
        now: Instant,
        role: Role,
        config: Config,
        local: PublicKey,
        peer: PublicKey,
        id: SessionId,
        suite: CipherSuite,
    ) -> Session {
        let params = TransportParams::from_config(&config);
        Session {
            role,
            local,
            peer,
            id,
            suite,
            chain: Zeroizing::new([0u8; 32]),
            prev_chain: None,
            committed_epoch: 0,
            max_epoch: 0,
            rx_confirmed: 0,
            resume_floor: 0,
            rekey_requested: false,
            rekey_not_before: None,
            peer_params: params,
            tx: None,
            rx: None,
            rx_next: None,
            rekey: None,
            resume: None,
            attach_pending: None,
            out_key_update: None,
            out_key_ack: None,
            epoch_started: now,
            carrier_up: false,
            lost_at: None,
            last_recv: now,
            awaiting_since: None,
            ping_outstanding: false,
            last_ping_sent: now,
            last_data_at: now,
            local_paths: Vec::new(),
            paths_queued: false,
            send: SendQueue::new(config.replay_buffer),
            recv_next: 0,
            ack_sent: 0,
            ack_forced: false,
            unacked_bytes: 0,
            ack_due: None,
            streams: HashMap::new(),
            next_local_index: 0,
            next_peer_index: 0,
            peer_max_streams: 0,
            local_max_streams: config.max_streams,
            peer_streams_closed: 0,
            max_streams_queued: false,
            stream_limit_blocked: false,
            max_stream_data_queue: VecDeque::new(),
            blocked: Vec::new(),
            pending_resets: VecDeque::new(),
            send_max_data: 0,
            data_sent: 0,
            recv_max_data: config.session_window,
            recv_data: 0,
            recv_consumed: 0,
            max_data_queued: false,
            start: now,
            next_ping: now,
            ping_due: true,
            entropy: [0; 32],
            pongs: VecDeque::new(),
            last_rtt_sample: None,
            offer: None,
            offer_queued: false,
            frozen: false,
            deferred: Vec::new(),
            moving: None,
            decline_queued: None,
            origin: None,
            unconfirmed_move: None,
            held_fins: Vec::new(),
            pending_close: None,
            state: State::Open,
            events: VecDeque::new(),
            stats: Stats {
                cipher: suite.name(),
                ..Stats::default()
            },
            config,
        }
    }

    // ---- accessors ----

    /// The session id (shared by both sides).
    pub fn id(&self) -> SessionId {
        self.id
    }
    /// Which side of the handshake this was.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The peer's authenticated static key: after a handoff, the server
    /// that holds the session now.
    pub fn peer_key(&self) -> PublicKey {
        self.peer
    }
    /// The server the session started with, if it moved since (client).
    pub fn origin_key(&self) -> Option<PublicKey> {
        self.origin
    }
    /// This node's static key.
    pub fn local_key(&self) -> PublicKey {
        self.local
    }
    /// The data-path cipher.
    pub fn cipher(&self) -> CipherSuite {
        self.suite
    }
    /// Whether a carrier is attached and keyed.
    pub fn carrier_up(&self) -> bool {
        self.carrier_up
    }
    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }
    /// Sequenced frames the peer has not acknowledged yet (sent or still
    /// queued): 0 once the peer holds everything this side wrote.
    pub fn unacknowledged_frames(&self) -> usize {
        self.send.lens.len()
    }
    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Closed(r) => Some(r),
            _ => None,
        }
    }
    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// Counters and estimates.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.epoch = self.committed_epoch;
        s.streams_active = self.streams.len() as u64;
        s.carrier_up = self.carrier_up;
        s
    }

    /// Sizes of every buffer and queue, for the simulator and tests that
    /// check bounds; not a stable interface.
    #[doc(hidden)]
    pub fn debug_sizes(&self) -> DebugSizes {
        let local_bit = u64::from(self.role == Role::Responder);
        DebugSizes {
            replay_bytes: self.send.bytes_len(),
            replay_frames: self.send.lens.len(),
            recv_buffered: self.streams.values().map(|s| s.recv_buf.len()).sum(),
            peer_streams: self
                .streams
                .keys()
                .filter(|id| *id & 1 != local_bit)
                .count(),
            local_streams: self
                .streams
                .keys()
                .filter(|id| *id & 1 == local_bit)
                .count(),
            pongs: self.pongs.len(),
            max_stream_data_queue: self.max_stream_data_queue.len(),
            blocked: self.blocked.len(),
            pending_resets: self.pending_resets.len(),
            events: self.events.len(),
            peer_stream_limit: self.local_max_streams,
            held_fins: self.held_fins.len(),
        }
    }

    // ---- events and timers ----

    /// The next event, if any. Drain after every input.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() || self.frozen {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut consider = |x: Instant| {
            t = Some(t.map_or(x, |t| t.min(x)));
        };
        if self.carrier_up {
            if let Some(a) = self
                .ack_due
                .filter(|_| self.ack_forced || self.recv_next > self.ack_sent)
            {
                consider(a);
            }
            consider(self.next_ping);
            consider(self.last_recv + self.config.dead_after);
            if let Some(d) = self.probe_deadline() {
                consider(d);
            }
            if let Some(d) = self.fast_ping_at() {
                consider(d);
            }
            if self.rekey_allowed() {
                // Only when a rekey could start: a deadline that handling
                // cannot clear would be due forever (a spinning timer).
                consider(self.rekey_due_at());
            }
        } else if let Some(lost) = self.lost_at {
            consider(lost + self.config.resume_deadline);
        }
        t
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() || self.frozen {
            return;
        }
        if !self.carrier_up {
            if let Some(lost) = self.lost_at {
                if now >= lost + self.config.resume_deadline {
                    self.finish_close(CloseReason::ResumeDeadline {
                        secs: self.config.resume_deadline.as_secs(),
                    });
                }
            }
            return;
        }
        if now >= self.last_recv + self.config.dead_after
            || self.probe_deadline().is_some_and(|d| now >= d)
        {
            self.carrier_lost(now);
            self.events.push_back(Event::CarrierDead);
            return;
        }
        if self.fast_ping_at().is_some_and(|d| now >= d) {
            self.ping_due = true;
        }
        if now >= self.next_ping {
            self.next_ping = now + self.config.keepalive;
            self.shrink_idle_buffers();
            // A ping frame is produced by poll_transmit when due.
            self.ping_due = true;
        }
        self.maybe_start_rekey(now);
    }
}
