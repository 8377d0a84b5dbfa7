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

#[path = "snapshot.rs"]
pub(crate) mod snapshot;

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
}

/// Sequenced frames not yet acknowledged: the replay buffer, which is also
/// the send queue. Frames are stored encoded, back to back, in one ring.
#[derive(Debug)]
struct SendQueue {
    bytes: VecDeque<u8>,
    lens: VecDeque<u32>,
    /// Sequence number of `lens[0]`.
    base_seq: u64,
    /// Index in `lens` of the next frame to put on the carrier.
    tx_index: usize,
    /// Byte offset of that frame.
    tx_offset: usize,
    /// One past the highest sequence number ever put on a carrier.
    sent_hw: u64,
    cap: usize,
}

impl SendQueue {
    fn new(cap: usize) -> Self {
        SendQueue {
            bytes: VecDeque::new(),
            lens: VecDeque::new(),
            base_seq: 0,
            tx_index: 0,
            tx_offset: 0,
            sent_hw: 0,
            cap,
        }
    }
    fn next_seq(&self) -> u64 {
        self.base_seq + self.lens.len() as u64
    }
    fn tx_next(&self) -> u64 {
        self.base_seq + self.tx_index as u64
    }
    fn space(&self) -> usize {
        self.cap.saturating_sub(self.bytes.len())
    }
    fn push(&mut self, parts: &[&[u8]]) {
        let mut len = 0;
        for p in parts {
            self.bytes.extend(p.iter());
            len += p.len();
        }
        self.lens.push_back(len as u32);
    }
    /// Drops frames below `next`; returns bytes freed.
    fn ack(&mut self, next: u64) -> usize {
        let mut freed = 0;
        while self.base_seq < next {
            let Some(len) = self.lens.pop_front() else {
                break;
            };
            let len = len as usize;
            self.bytes.drain(..len);
            freed += len;
            self.base_seq += 1;
            if self.tx_index > 0 {
                self.tx_index -= 1;
                self.tx_offset -= len;
            }
        }
        freed
    }
    /// Puts the transmit position back to the first unacknowledged frame
    /// (after a resume); returns how many frames will be sent again.
    fn rewind(&mut self) -> u64 {
        // Counted from the high-water mark, not `tx_index`: a restored
        // session starts with `tx_index` at 0 but has sent up to `sent_hw`.
        let again = self
            .sent_hw
            .saturating_sub(self.base_seq)
            .min(self.lens.len() as u64);
        self.tx_index = 0;
        self.tx_offset = 0;
        again
    }
    fn copy_out(&self, start: usize, out: &mut [u8]) {
        let (a, b) = self.bytes.as_slices();
        let mut done = 0;
        if start < a.len() {
            let n = (a.len() - start).min(out.len());
            out[..n].copy_from_slice(&a[start..start + n]);
            done = n;
        }
        if done < out.len() {
            let s = start + done - a.len();
            let n = out.len() - done;
            out[done..].copy_from_slice(&b[s..s + n]);
        }
    }
}

#[derive(Debug, Default)]
struct StreamState {
    // Sending side.
    send_max: u64,
    sent: u64,
    fin_queued: bool,
    // Receiving side.
    recv_buf: VecDeque<u8>,
    recv_total: u64,
    recv_consumed: u64,
    recv_max: u64,
    fin_received: bool,
    fin_read: bool,
    /// The application no longer reads: incoming data is dropped and credited.
    discarding: bool,
    reset: Option<u64>,
    max_update_queued: bool,
}

impl StreamState {
    fn recv_done(&self) -> bool {
        self.reset.is_some() || self.fin_read || (self.discarding && self.fin_received)
    }
    fn send_done(&self) -> bool {
        self.reset.is_some() || self.fin_queued
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    Closing,
    Closed(CloseReason),
}

struct PendingEpoch {
    hs: EpochHandshake,
    epoch: u32,
}

/// One POOL session: everything but the sockets and the clock.
pub struct Session {
    role: Role,
    config: Config,
    local: PublicKey,
    peer: PublicKey,
    id: SessionId,
    suite: CipherSuite,
    chain: Zeroizing<[u8; 32]>,
    /// Highest epoch with installed keys.
    committed_epoch: u32,
    /// Highest epoch proposed, answered or installed.
    max_epoch: u32,
    peer_params: TransportParams,

    tx: Option<DirectionKey>,
    rx: Option<DirectionKey>,
    rx_next: Option<DirectionKey>,
    rekey: Option<PendingEpoch>,
    resume: Option<PendingEpoch>,
    out_key_update: Option<(u32, Vec<u8>)>,
    out_key_ack: Option<(u32, Vec<u8>, DirectionKey)>,
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
            &agreed.initiator_to_responder,
            &agreed.responder_to_initiator,
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
            Role::Initiator => (agreed.initiator_to_responder, agreed.responder_to_initiator),
            Role::Responder => (agreed.responder_to_initiator, agreed.initiator_to_responder),
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
            committed_epoch: 0,
            max_epoch: 0,
            peer_params: params,
            tx: None,
            rx: None,
            rx_next: None,
            rekey: None,
            resume: None,
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
    /// The peer's authenticated static key.
    pub fn peer_key(&self) -> PublicKey {
        self.peer
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

    // ---- events and timers ----

    /// The next event, if any. Drain after every input.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut consider = |x: Instant| {
            t = Some(t.map_or(x, |t| t.min(x)));
        };
        if self.carrier_up {
            if let Some(a) = self.ack_due {
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
            if self.rekey.is_none() && self.resume.is_none() {
                consider(self.epoch_started + self.config.rekey_after);
            }
        } else if let Some(lost) = self.lost_at {
            consider(lost + self.config.resume_deadline);
        }
        t
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
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

// ---- carriers, epochs, resume and rekey ----
impl Session {
    /// The carrier is gone (EOF, error, or declared dead). Keys of the
    /// current epoch are dropped; the session waits for a resume until the
    /// resume deadline.
    pub fn carrier_lost(&mut self, now: Instant) {
        self.carrier_up = false;
        self.awaiting_since = None;
        self.ping_outstanding = false;
        self.tx = None;
        self.rx = None;
        self.rx_next = None;
        self.rekey = None;
        self.out_key_update = None;
        self.out_key_ack = None;
        self.lost_at.get_or_insert(now);
        if matches!(self.state, State::Closing) {
            let (code, reason, _) =
                self.pending_close
                    .take()
                    .unwrap_or((CloseCode::Normal, String::new(), false));
            self.finish_close(CloseReason::Local { code, reason });
        }
    }

    /// A session without a carrier (restored from a snapshot).
    fn mark_detached(&mut self, now: Instant) {
        self.carrier_up = false;
        self.tx = None;
        self.rx = None;
        self.lost_at = Some(now);
        self.send.tx_index = 0;
        self.send.tx_offset = 0;
    }

    fn install_epoch(
        &mut self,
        now: Instant,
        epoch: u32,
        agreed: &Agreed,
        starter: bool,
    ) -> Result<(), HandshakeError> {
        let (tx, rx) = if starter {
            (agreed.initiator_to_responder, agreed.responder_to_initiator)
        } else {
            (agreed.responder_to_initiator, agreed.initiator_to_responder)
        };
        self.tx = Some(DirectionKey::new(self.suite, tx, epoch).ok_or(HandshakeError::Crypto)?);
        self.rx = Some(DirectionKey::new(self.suite, rx, epoch).ok_or(HandshakeError::Crypto)?);
        self.rx_next = None;
        self.chain = next_chain(&self.chain, agreed);
        self.committed_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        self.epoch_started = now;
        Ok(())
    }

    /// Initiator: starts a resume on a new carrier and writes the RESUME
    /// record into `out`. The current carrier, if any, stays usable until
    /// [`Session::finish_resume`] (make-before-break).
    pub fn start_resume(
        &mut self,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        let epoch = self.next_epoch().ok_or(HandshakeError::Closed)?;
        let mut msg = [0u8; 256];
        let (hs, n) = EpochHandshake::start(
            &self.chain,
            &self.id,
            epoch,
            &self.recv_next.to_be_bytes(),
            rng,
            &mut msg,
        )?;
        self.max_epoch = epoch;
        self.resume = Some(PendingEpoch { hs, epoch });
        wire::push_record(
            out,
            RecordType::Resume,
            &[&self.id.0, &epoch.to_be_bytes(), &msg[..n]],
        );
        Ok(())
    }

    /// Initiator: completes the resume with the peer's RESUMED (or REFUSE)
    /// record. The new carrier is then the session's carrier: the caller
    /// must stop reading the old one.
    pub fn finish_resume(&mut self, now: Instant, record: &[u8]) -> Result<(), HandshakeError> {
        let (ty, body) = split_record(record)?;
        if ty == RecordType::Refuse {
            let code = body.first().copied().unwrap_or(0);
            let reason = String::from_utf8_lossy(body.get(1..).unwrap_or(&[])).into_owned();
            return Err(HandshakeError::Refused { code, reason });
        }
        if ty != RecordType::Resumed {
            return Err(HandshakeError::Unexpected("not a RESUMED"));
        }
        let pending = self
            .resume
            .take()
            .ok_or(HandshakeError::Unexpected("no resume pending"))?;
        let mut payload = [0u8; 64];
        let (agreed, p) = pending.hs.finish(body, &mut payload)?;
        let peer_next = read_u64(&payload[..p])?;
        self.attach(now, pending.epoch, &agreed, true, peer_next)
    }

    /// Responder: handles a RESUME record that [`crate::resume_session_id`]
    /// matched to this session, and writes RESUMED into `out`. The caller
    /// then replaces the old carrier with the one the RESUME came on.
    pub fn handle_resume(
        &mut self,
        now: Instant,
        record: &[u8],
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        let (ty, body) = split_record(record)?;
        if ty != RecordType::Resume {
            return Err(HandshakeError::Unexpected("not a RESUME"));
        }
        let mut r = Reader::new(body);
        let id: [u8; 16] = r.array()?;
        if id != self.id.0 {
            return Err(HandshakeError::UnknownSession);
        }
        let epoch = r.u32()?;
        if epoch <= self.committed_epoch {
            return Err(HandshakeError::StaleResume {
                got: epoch,
                current: self.committed_epoch,
            });
        }
        let mut payload = [0u8; 64];
        let mut msg = [0u8; 256];
        let (agreed, p, n) = EpochHandshake::answer(
            &self.chain,
            &self.id,
            epoch,
            r.remaining(),
            &mut payload,
            &self.recv_next.to_be_bytes(),
            rng,
            &mut msg,
        )?;
        let peer_next = read_u64(&payload[..p])?;
        wire::push_record(out, RecordType::Resumed, &[&msg[..n]]);
        self.attach(now, epoch, &agreed, false, peer_next)
    }

    fn attach(
        &mut self,
        now: Instant,
        epoch: u32,
        agreed: &Agreed,
        starter: bool,
        peer_next: u64,
    ) -> Result<(), HandshakeError> {
        if peer_next < self.send.base_seq || peer_next > self.send.next_seq() {
            return Err(HandshakeError::Unexpected(
                "resume position outside the replay buffer",
            ));
        }
        self.rekey = None;
        self.out_key_update = None;
        self.out_key_ack = None;
        self.install_epoch(now, epoch, agreed, starter)?;
        self.send.ack(peer_next);
        let again = self.send.rewind();
        self.stats.frames_resent += again;
        self.stats.resumes += 1;
        self.carrier_up = true;
        self.lost_at = None;
        self.last_recv = now;
        self.awaiting_since = None;
        self.ping_outstanding = false;
        self.paths_queued = !self.local_paths.is_empty();
        self.next_ping = now;
        self.ping_due = true;
        // Tell the peer where we are at once: this is also the commit point.
        self.ack_sent = 0;
        self.ack_due = Some(now);
        self.requeue_limits();
        self.wake_blocked();
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }

    /// Whether the peer owes us an ack (frames on the carrier not yet
    /// acknowledged) or a pong.
    fn owed_answer(&self) -> bool {
        self.send.tx_index > 0 || self.ping_outstanding
    }

    /// When the next liveness ping is due while data moves (every half
    /// probe timeout, for one keepalive interval after the last data).
    fn fast_ping_at(&self) -> Option<Instant> {
        let p = self.config.probe_timeout?;
        if self.ping_outstanding || self.ping_due {
            return None;
        }
        let at = self.last_ping_sent + p / 2;
        (at < self.last_data_at + self.config.keepalive).then_some(at)
    }

    /// When the current carrier counts as broken if nothing arrives.
    fn probe_deadline(&self) -> Option<Instant> {
        let t = self.config.probe_timeout?;
        let since = self.awaiting_since?;
        let t = t.max(self.stats.rtt.unwrap_or_default() * 4);
        Some(since.max(self.last_recv) + t)
    }

    /// Initiator: gives up a resume started with [`Session::start_resume`]
    /// whose carrier failed before an answer; the current carrier, if any,
    /// goes on as before.
    pub fn cancel_resume(&mut self) {
        self.resume = None;
    }

    /// Sets the addresses where this side accepts direct carriers; they go
    /// to the peer in a PATHS frame now and after every resume (at most
    /// [`wire::MAX_PATHS`]).
    pub fn set_local_paths(&mut self, addrs: &[std::net::SocketAddr]) {
        let mut enc = Vec::with_capacity(addrs.len().min(wire::MAX_PATHS) * 18);
        for a in addrs.iter().take(wire::MAX_PATHS) {
            crate::relay::put_addr(&mut enc, a);
        }
        if enc != self.local_paths {
            self.local_paths = enc;
            self.paths_queued = !self.local_paths.is_empty();
        }
    }

    fn requeue_limits(&mut self) {
        self.max_data_queued = true;
        self.max_streams_queued = true;
        self.max_stream_data_queue.clear();
        for (id, st) in self.streams.iter_mut() {
            if !st.recv_done() {
                st.max_update_queued = true;
                self.max_stream_data_queue.push_back(*id);
            }
        }
    }

    fn maybe_start_rekey(&mut self, now: Instant) {
        if self.rekey.is_some()
            || self.resume.is_some()
            || self.out_key_ack.is_some()
            || !self.carrier_up
        {
            return;
        }
        let records = self.tx.as_ref().map_or(0, |k| k.counter);
        if now < self.epoch_started + self.config.rekey_after
            && records < self.config.rekey_after_records
        {
            return;
        }
        self.start_rekey();
    }

    /// Starts a new key epoch on the current carrier now (normally done on
    /// time and volume by itself).
    pub fn force_rekey(&mut self, rng: &mut dyn RngCore) {
        self.provide_entropy(rng);
        self.start_rekey();
    }

    /// The epoch after every one proposed so far. A peer can move the
    /// session to epoch `u32::MAX` (epochs may skip); after it there is
    /// none, and the session closes rather than wrap to a used epoch.
    fn next_epoch(&mut self) -> Option<u32> {
        let next = self.max_epoch.checked_add(1);
        if next.is_none() {
            self.fail(CloseReason::Protocol("key epoch numbers exhausted".into()));
        }
        next
    }

    fn start_rekey(&mut self) {
        // Not while an epoch change is under way: a proposal sent before our
        // answer to the peer's (KEY_UPDATE_ACK) or during a resume would cross
        // it, and the peer would drop its own rekey and then refuse our ack.
        if self.rekey.is_some()
            || self.out_key_ack.is_some()
            || self.resume.is_some()
            || !self.carrier_up
            || self.is_closed()
        {
            return;
        }
        let Some(epoch) = self.next_epoch() else {
            return;
        };
        let seed = self.derive_rekey_seed();
        let mut rng = crate::rng::SeededRng::new(seed);
        let mut msg = [0u8; 256];
        if let Ok((hs, n)) =
            EpochHandshake::start(&self.chain, &self.id, epoch, &[], &mut rng, &mut msg)
        {
            self.max_epoch = epoch;
            self.rekey = Some(PendingEpoch { hs, epoch });
            self.out_key_update = Some((epoch, msg[..n].to_vec()));
        }
    }

    /// Entropy for a time- or volume-triggered rekey, which has no caller
    /// to pass a generator: the runtime refills it with
    /// [`Session::provide_entropy`]; failing that, it is derived from the
    /// chaining secret and counters (unique per epoch, still secret).
    fn derive_rekey_seed(&self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        let ctr = self.tx.as_ref().map_or(0, |k| k.counter);
        crypto::hkdf(
            &*self.chain,
            &[
                &self.max_epoch.to_be_bytes(),
                &ctr.to_be_bytes(),
                &self.entropy,
            ],
            b"pool rekey seed",
            &mut seed,
        );
        seed
    }

    /// Gives the session fresh randomness for the ephemeral keys of future
    /// rekeys (the runtime calls this when it creates or resumes a session).
    pub fn provide_entropy(&mut self, rng: &mut dyn RngCore) {
        rng.fill_bytes(&mut self.entropy);
    }

    fn handle_key_update(
        &mut self,
        now: Instant,
        epoch: u32,
        msg: &[u8],
    ) -> Result<(), CloseReason> {
        if self.rekey.is_some() {
            // Both sides started at once: the session initiator's wins.
            if self.role == Role::Initiator {
                return Ok(());
            }
            self.rekey = None;
            self.out_key_update = None;
        }
        if epoch <= self.committed_epoch {
            return Err(CloseReason::Protocol(format!(
                "key update to old epoch {epoch}"
            )));
        }
        let mut rng = crate::rng::SeededRng::new(self.derive_rekey_seed());
        let mut payload = [0u8; 16];
        let mut reply = [0u8; 256];
        let (agreed, _, n) = EpochHandshake::answer(
            &self.chain,
            &self.id,
            epoch,
            msg,
            &mut payload,
            &[],
            &mut rng,
            &mut reply,
        )
        .map_err(|_| CloseReason::AuthFailed)?;
        let tx = DirectionKey::new(self.suite, agreed.responder_to_initiator, epoch)
            .ok_or(CloseReason::AuthFailed)?;
        let rx = DirectionKey::new(self.suite, agreed.initiator_to_responder, epoch)
            .ok_or(CloseReason::AuthFailed)?;
        self.rx_next = Some(rx);
        self.chain = next_chain(&self.chain, &agreed);
        self.committed_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        self.epoch_started = now;
        self.stats.rekeys += 1;
        self.out_key_ack = Some((epoch, reply[..n].to_vec(), tx));
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }

    fn handle_key_update_ack(
        &mut self,
        now: Instant,
        epoch: u32,
        msg: &[u8],
    ) -> Result<(), CloseReason> {
        let Some(pending) = self.rekey.take() else {
            return Err(CloseReason::Protocol("unexpected key update ack".into()));
        };
        if pending.epoch != epoch {
            return Err(CloseReason::Protocol(
                "key update ack for another epoch".into(),
            ));
        }
        let mut payload = [0u8; 16];
        let (agreed, _) = pending
            .hs
            .finish(msg, &mut payload)
            .map_err(|_| CloseReason::AuthFailed)?;
        self.install_epoch(now, epoch, &agreed, true)
            .map_err(|_| CloseReason::AuthFailed)?;
        self.stats.rekeys += 1;
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }
}

fn read_u64(b: &[u8]) -> Result<u64, HandshakeError> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| HandshakeError::Malformed(WireError::Truncated))?;
    Ok(u64::from_be_bytes(arr))
}

// ---- sending ----
impl Session {
    /// Writes the next record for the carrier into `buf` and returns its
    /// length, or `None` when there is nothing to send. `buf` should hold
    /// [`crate::MAX_RECORD_LEN`] bytes; a smaller one gets smaller records.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if !self.carrier_up || self.tx.is_none() {
            return None;
        }
        let cap = buf.len().min(MAX_RECORD_LEN);
        if cap < DATA_OVERHEAD + 64 {
            return None;
        }
        if self.is_closed() {
            // Closed by a peer's fault (see `fail`): one last record, the CLOSE.
            return self.transmit_final_close(buf);
        }
        let body_start = RECORD_HEADER_LEN + DATA_PREFIX_LEN;
        let end = cap - TAG_LEN;
        let mut p = body_start;
        buf[p..p + 8].copy_from_slice(&self.send.tx_next().to_be_bytes());
        p += 8;
        let first = p;

        let has_frames = self.send.tx_index < self.send.lens.len();
        let close_now = match &self.pending_close {
            Some((_, _, urgent)) => *urgent || !has_frames,
            None => false,
        };
        let other = has_frames
            || close_now
            || self.ping_due
            || !self.pongs.is_empty()
            || self.out_key_update.is_some()
            || self.out_key_ack.is_some()
            || self.max_data_queued
            || self.max_streams_queued
            || self.paths_queued
            || !self.max_stream_data_queue.is_empty();
        let ack_wanted = self.recv_next > self.ack_sent
            || self.ack_due.is_some_and(|d| d <= now && self.ack_sent == 0);
        let ack_due =
            self.unacked_bytes >= self.config.ack_every || self.ack_due.is_some_and(|d| d <= now);
        if ack_wanted && (other || ack_due) {
            p += Frame::Ack {
                next: self.recv_next,
            }
            .encode(&mut buf[p..]);
            self.ack_sent = self.recv_next.max(1);
            self.unacked_bytes = 0;
            self.ack_due = None;
        }
        let put = |buf: &mut [u8], p: &mut usize, f: &Frame<'_>| -> bool {
            if *p + f.encoded_len() > end {
                return false;
            }
            *p += f.encode(&mut buf[*p..]);
            true
        };
        if close_now {
            if let Some((code, reason, _)) = &self.pending_close {
                let f = Frame::Close {
                    code: code.to_u64(),
                    reason: reason.as_bytes(),
                };
                put(buf, &mut p, &f);
            }
        }
        if self.ping_due {
            let stamp = now.saturating_duration_since(self.start).as_micros() as u64;
            if put(buf, &mut p, &Frame::Ping { stamp }) {
                self.ping_due = false;
                self.ping_outstanding = true;
                self.last_ping_sent = now;
            }
        }
        while let Some(&stamp) = self.pongs.front() {
            if !put(buf, &mut p, &Frame::Pong { stamp }) {
                break;
            }
            self.pongs.pop_front();
        }
        if let Some((epoch, msg)) = &self.out_key_update {
            if put(buf, &mut p, &Frame::KeyUpdate { epoch: *epoch, msg }) {
                self.out_key_update = None;
            }
        }
        let mut switch_tx = None;
        if let Some((epoch, msg, _)) = &self.out_key_ack {
            if put(buf, &mut p, &Frame::KeyUpdateAck { epoch: *epoch, msg }) {
                switch_tx = self.out_key_ack.take().map(|(_, _, k)| k);
            }
        }
        if self.max_data_queued
            && put(
                buf,
                &mut p,
                &Frame::MaxData {
                    max: self.recv_max_data,
                },
            )
        {
            self.max_data_queued = false;
        }
        if self.max_streams_queued
            && put(
                buf,
                &mut p,
                &Frame::MaxStreams {
                    max: self.local_max_streams,
                },
            )
        {
            self.max_streams_queued = false;
        }
        if self.paths_queued
            && put(
                buf,
                &mut p,
                &Frame::Paths {
                    addrs: &self.local_paths,
                },
            )
        {
            self.paths_queued = false;
        }
        while let Some(&id) = self.max_stream_data_queue.front() {
            if let Some(st) = self.streams.get_mut(&id) {
                if st.max_update_queued
                    && !st.recv_done()
                    && !put(
                        buf,
                        &mut p,
                        &Frame::MaxStreamData {
                            id,
                            max: st.recv_max,
                        },
                    )
                {
                    break;
                }
                st.max_update_queued = false;
            }
            self.max_stream_data_queue.pop_front();
        }
        // Sequenced frames from the replay buffer, as many as fit.
        let tx_index_before = self.send.tx_index;
        while self.send.tx_index < self.send.lens.len() {
            let len = self.send.lens[self.send.tx_index] as usize;
            if p + len > end {
                break;
            }
            self.send
                .copy_out(self.send.tx_offset, &mut buf[p..p + len]);
            p += len;
            self.send.tx_index += 1;
            self.send.tx_offset += len;
        }
        self.send.sent_hw = self.send.sent_hw.max(self.send.tx_next());
        if p == first {
            return None;
        }

        let total = self.seal_record(buf, p)?;
        if self.send.tx_index > tx_index_before {
            self.last_data_at = now;
        }
        if self.awaiting_since.is_none() && self.owed_answer() {
            self.awaiting_since = Some(now);
        }
        if let Some(k) = switch_tx {
            self.tx = Some(k);
        }
        if close_now {
            if let Some((code, reason, _)) = self.pending_close.take() {
                if !self.is_closed() {
                    self.finish_close(CloseReason::Local { code, reason });
                }
            }
        }
        Some(total)
    }

    /// Seals the plaintext in `buf[RECORD_HEADER_LEN + DATA_PREFIX_LEN..end]`
    /// into a data record under the current epoch; returns its length.
    fn seal_record(&mut self, buf: &mut [u8], end: usize) -> Option<usize> {
        let body_start = RECORD_HEADER_LEN + DATA_PREFIX_LEN;
        let tx = self.tx.as_mut()?;
        let body_len = DATA_PREFIX_LEN + (end - body_start) + TAG_LEN;
        wire::write_record_header(buf, RecordType::Data, body_len);
        buf[4..8].copy_from_slice(&tx.epoch.to_be_bytes());
        buf[8..16].copy_from_slice(&tx.counter.to_be_bytes());
        let (head, rest) = buf.split_at_mut(body_start);
        let Some(tag) = tx.seal(head, &mut rest[..end - body_start]) else {
            // Out of nonces without a new epoch: never reuse one.
            self.finish_close(CloseReason::Protocol(
                "nonce space exhausted before a rekey".into(),
            ));
            return None;
        };
        buf[end..end + TAG_LEN].copy_from_slice(&tag);
        let total = end + TAG_LEN;
        self.stats.records_sent += 1;
        self.stats.bytes_sent += total as u64;
        Some(total)
    }

    /// The record carrying the CLOSE frame queued by `fail`, and nothing
    /// else: after a failure no other frame goes out.
    fn transmit_final_close(&mut self, buf: &mut [u8]) -> Option<usize> {
        let (code, reason, _) = self.pending_close.take()?;
        let f = Frame::Close {
            code: code.to_u64(),
            reason: reason.as_bytes(),
        };
        let mut p = RECORD_HEADER_LEN + DATA_PREFIX_LEN;
        if p + 8 + f.encoded_len() + TAG_LEN > buf.len().min(MAX_RECORD_LEN) {
            return None;
        }
        buf[p..p + 8].copy_from_slice(&self.send.tx_next().to_be_bytes());
        p += 8;
        p += f.encode(&mut buf[p..]);
        self.seal_record(buf, p)
    }

    /// Bytes of sequenced frames waiting for the carrier.
    pub fn pending_bytes(&self) -> usize {
        self.send.bytes.len() - self.send.tx_offset
    }
}

// ---- receiving ----
impl Session {
    /// Feeds bytes read from the carrier. Consumes whole records from the
    /// front of `buf` (decrypting in place) and returns how many bytes it
    /// consumed; the caller keeps the rest for the next call.
    ///
    /// A record that fails authentication or breaks the protocol closes
    /// the session with a reason (see [`Event::Closed`]).
    pub fn handle_carrier_data(&mut self, now: Instant, buf: &mut [u8]) -> usize {
        let mut used = 0;
        while !self.is_closed() && self.carrier_up {
            match wire::peek_record(&buf[used..]) {
                Ok(None) => break,
                Ok(Some((RecordType::Data, len))) => {
                    let rec = &mut buf[used..used + len];
                    used += len;
                    if let Err(reason) = self.handle_data_record(now, rec) {
                        self.fail(reason);
                    }
                }
                Ok(Some((_, _))) => {
                    self.fail(CloseReason::Protocol(
                        "handshake record on an established carrier".into(),
                    ));
                }
                Err(e) => {
                    self.fail(CloseReason::Protocol(e.to_string()));
                }
            }
        }
        if self.is_closed() {
            return buf.len();
        }
        used
    }

    fn fail(&mut self, reason: CloseReason) {
        let code = match &reason {
            CloseReason::AuthFailed => CloseCode::Auth,
            CloseReason::Protocol(m)
                if m.contains("flow control") || m.contains("stream limit") =>
            {
                CloseCode::FlowControl
            }
            _ => CloseCode::Protocol,
        };
        let text = reason.to_string();
        self.pending_close = Some((code, text, true));
        // Closed now for the application; the CLOSE frame goes out with the
        // next poll_transmit if the carrier can still carry it.
        self.state = State::Closed(reason.clone());
        self.events.push_back(Event::Closed(reason));
        self.carrier_up_after_fail();
    }

    fn carrier_up_after_fail(&mut self) {
        // Allow exactly one more record (the CLOSE) to be sealed.
        if self.tx.is_none() {
            self.pending_close = None;
        }
    }

    fn handle_data_record(&mut self, now: Instant, rec: &mut [u8]) -> Result<(), CloseReason> {
        let epoch = u32::from_be_bytes([rec[4], rec[5], rec[6], rec[7]]);
        let counter =
            u64::from_be_bytes(rec[8..16].try_into().map_err(|_| CloseReason::AuthFailed)?);
        let use_next = match (&self.rx, &self.rx_next) {
            (Some(k), _) if k.epoch == epoch => false,
            (_, Some(k)) if k.epoch == epoch => true,
            _ => return Err(CloseReason::AuthFailed),
        };
        if use_next {
            self.rx = self.rx_next.take();
        }
        let rx = self.rx.as_mut().ok_or(CloseReason::AuthFailed)?;
        if counter != rx.counter {
            return Err(CloseReason::AuthFailed);
        }
        let (aad, body) = rec.split_at_mut(RECORD_HEADER_LEN + DATA_PREFIX_LEN);
        let n = rx.open(counter, aad, body).ok_or(CloseReason::AuthFailed)?;
        rx.counter += 1;
        self.stats.records_received += 1;
        self.stats.bytes_received += (RECORD_HEADER_LEN + DATA_PREFIX_LEN + n + TAG_LEN) as u64;
        self.last_recv = now;
        self.awaiting_since = None;
        let plain = &body[..n];
        let mut r = Reader::new(plain);
        let mut seq = r.u64().map_err(|e| CloseReason::Protocol(e.to_string()))?;
        let mut delivered_bytes = 0usize;
        while !r.is_empty() {
            let frame = decode_frame(&mut r).map_err(|e| CloseReason::Protocol(e.to_string()))?;
            if frame.is_sequenced() {
                if seq < self.recv_next {
                    seq += 1;
                    self.stats.duplicates_dropped += 1;
                    continue;
                }
                if seq > self.recv_next {
                    return Err(CloseReason::Protocol(format!(
                        "sequence gap: got {seq}, expected {}",
                        self.recv_next
                    )));
                }
                seq += 1;
                self.recv_next += 1;
                self.stats.frames_received += 1;
                delivered_bytes += frame.encoded_len();
            }
            self.handle_frame(now, frame)?;
            if self.is_closed() {
                return Ok(());
            }
        }
        if delivered_bytes > 0 {
            self.last_data_at = now;
            self.unacked_bytes += delivered_bytes;
            if self.ack_due.is_none() {
                self.ack_due = Some(now + self.config.ack_delay);
            }
        }
        if self.owed_answer() {
            self.awaiting_since = Some(now);
        }
        Ok(())
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame<'_>) -> Result<(), CloseReason> {
        match frame {
            Frame::Ack { next } => {
                if next > self.send.sent_hw {
                    return Err(CloseReason::Protocol(format!("ack of unsent frame {next}")));
                }
                if self.send.ack(next) > 0 {
                    self.wake_blocked();
                }
            }
            Frame::Ping { stamp } => {
                if self.pongs.len() < 16 {
                    self.pongs.push_back(stamp);
                }
            }
            Frame::Pong { stamp } => {
                self.ping_outstanding = false;
                self.rtt_sample(now, stamp);
            }
            Frame::Paths { addrs } => {
                let list = addrs
                    .chunks_exact(18)
                    .filter_map(|c| c.try_into().ok())
                    .map(crate::relay::get_addr)
                    .collect();
                self.events.push_back(Event::PeerPaths(list));
            }
            Frame::KeyUpdate { epoch, msg } => self.handle_key_update(now, epoch, msg)?,
            Frame::KeyUpdateAck { epoch, msg } => self.handle_key_update_ack(now, epoch, msg)?,
            Frame::Stream { id, fin, data } => self.on_stream_data(id, fin, data)?,
            Frame::ResetStream { id, code } => {
                if let Some(st) = self.peer_stream(id)? {
                    if st.reset.is_none() {
                        st.reset = Some(code);
                        let unread = st.recv_buf.len() as u64;
                        st.recv_buf = VecDeque::new();
                        self.recv_consumed += unread;
                        self.events.push_back(Event::StreamReadable(id));
                        self.events.push_back(Event::StreamWritable(id));
                        self.maybe_grant_session();
                    }
                }
            }
            Frame::MaxData { max } => {
                if max > self.send_max_data {
                    self.send_max_data = max;
                    self.wake_blocked();
                }
            }
            Frame::MaxStreamData { id, max } => {
                if let Some(st) = self.streams.get_mut(&id) {
                    if max > st.send_max {
                        st.send_max = max;
                        self.wake_blocked();
                    }
                }
            }
            Frame::MaxStreams { max } => {
                if max > self.peer_max_streams {
                    self.peer_max_streams = max;
                    if self.stream_limit_blocked {
                        self.stream_limit_blocked = false;
                        self.events.push_back(Event::StreamsAvailable);
                    }
                }
            }
            Frame::Close { code, reason } => {
                let reason = String::from_utf8_lossy(reason).into_owned();
                self.finish_close(CloseReason::Peer {
                    code: CloseCode::from_u64(code),
                    reason,
                });
            }
        }
        Ok(())
    }

    fn rtt_sample(&mut self, now: Instant, stamp: u64) {
        let sent = self.start + Duration::from_micros(stamp);
        if sent > now {
            return;
        }
        let sample = now - sent;
        let s = &mut self.stats;
        s.rtt = Some(match s.rtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
        s.min_rtt = Some(s.min_rtt.map_or(sample, |m| m.min(sample)));
        if let Some(prev) = self.last_rtt_sample {
            let d = sample.abs_diff(prev);
            let j = s.jitter;
            s.jitter = if d > j {
                j + (d - j) / 16
            } else {
                j - (j - d) / 16
            };
        }
        self.last_rtt_sample = Some(sample);
    }

    fn is_local_stream(&self, id: u64) -> bool {
        let local_bit = if self.role == Role::Initiator { 0 } else { 1 };
        id & 1 == local_bit
    }

    /// The stream a peer frame refers to: `Some` if live, `None` if it was
    /// closed (the frame is then ignored); creates peer streams on first use.
    fn peer_stream(&mut self, id: u64) -> Result<Option<&mut StreamState>, CloseReason> {
        if !self.streams.contains_key(&id) {
            let index = id >> 1;
            if self.is_local_stream(id) {
                if index >= self.next_local_index {
                    return Err(CloseReason::Protocol(format!(
                        "frame for stream {id} that this side never opened"
                    )));
                }
                return Ok(None);
            }
            if index < self.next_peer_index {
                return Ok(None);
            }
            if index >= self.local_max_streams {
                return Err(CloseReason::Protocol(format!(
                    "stream limit exceeded: stream {id}, limit {}",
                    self.local_max_streams
                )));
            }
            for i in self.next_peer_index..=index {
                let sid = i * 2 + (id & 1);
                self.streams.insert(sid, self.new_stream_state());
                self.stats.streams_opened += 1;
                self.events.push_back(Event::StreamOpened(sid));
            }
            self.next_peer_index = index + 1;
        }
        Ok(self.streams.get_mut(&id))
    }

    fn new_stream_state(&self) -> StreamState {
        StreamState {
            send_max: self.peer_params.stream_window,
            recv_max: self.config.stream_window,
            ..StreamState::default()
        }
    }

    fn on_stream_data(&mut self, id: u64, fin: bool, data: &[u8]) -> Result<(), CloseReason> {
        let len = data.len() as u64;
        if self.recv_data + len > self.recv_max_data {
            return Err(CloseReason::Protocol(
                "session flow control window exceeded".into(),
            ));
        }
        self.recv_data += len;
        self.stats.stream_bytes_received += len;
        let Some(st) = self.peer_stream(id)? else {
            self.recv_consumed += len;
            self.maybe_grant_session();
            return Ok(());
        };
        if st.reset.is_some() || st.fin_received {
            if st.fin_received && len > 0 {
                return Err(CloseReason::Protocol(format!(
                    "data after FIN on stream {id}"
                )));
            }
            self.recv_consumed += len;
            self.maybe_grant_session();
            return Ok(());
        }
        if st.recv_total + len > st.recv_max {
            return Err(CloseReason::Protocol(format!(
                "stream flow control window exceeded on stream {id}"
            )));
        }
        st.recv_total += len;
        st.fin_received |= fin;
        let discarding = st.discarding;
        if discarding {
            st.recv_consumed += len;
        } else {
            st.recv_buf.extend(data.iter());
        }
        let done = st.recv_done() && st.send_done();
        if discarding {
            self.recv_consumed += len;
            self.maybe_grant_session();
            self.maybe_grant_stream(id);
            if done {
                self.forget(id);
            }
        } else if len > 0 || fin {
            self.events.push_back(Event::StreamReadable(id));
        }
        Ok(())
    }

    /// Gives back the memory of buffers a burst left behind. Called on the
    /// keepalive tick, never on the data path (shrinking there and growing
    /// again on the next write would cost more than the copy itself).
    fn shrink_idle_buffers(&mut self) {
        if self.send.lens.is_empty() && self.send.bytes.capacity() > (64 << 10) {
            self.send.bytes.shrink_to(0);
        }
        for st in self.streams.values_mut() {
            if st.recv_buf.is_empty() && st.recv_buf.capacity() > (16 << 10) {
                st.recv_buf.shrink_to(0);
            }
        }
    }

    fn maybe_grant_session(&mut self) {
        let w = self.config.session_window;
        if self.recv_max_data - self.recv_consumed < w / 2 {
            self.recv_max_data = self.recv_consumed + w;
            self.max_data_queued = true;
        }
    }

    fn maybe_grant_stream(&mut self, id: u64) {
        let w = self.config.stream_window;
        if let Some(st) = self.streams.get_mut(&id) {
            if !st.fin_received && st.recv_max - st.recv_consumed < w / 2 {
                st.recv_max = st.recv_consumed + w;
                if !st.max_update_queued {
                    st.max_update_queued = true;
                    self.max_stream_data_queue.push_back(id);
                }
            }
        }
    }

    fn wake_blocked(&mut self) {
        for id in self.blocked.drain(..) {
            self.events.push_back(Event::StreamWritable(id));
        }
    }

    fn forget(&mut self, id: u64) {
        if self.streams.remove(&id).is_some() && !self.is_local_stream(id) {
            self.peer_streams_closed += 1;
            self.local_max_streams += 1;
            self.max_streams_queued = true;
        }
    }

    fn finish_close(&mut self, reason: CloseReason) {
        if !self.is_closed() {
            self.state = State::Closed(reason.clone());
            self.events.push_back(Event::Closed(reason));
        }
    }
}

// ---- the application's side: streams and close ----
impl Session {
    fn check_open(&self) -> Result<(), StreamError> {
        match &self.state {
            State::Closed(r) => Err(StreamError::SessionClosed(r.clone())),
            State::Closing => Err(StreamError::SessionClosed(CloseReason::Local {
                code: CloseCode::Normal,
                reason: "closing".into(),
            })),
            State::Open => Ok(()),
        }
    }

    /// Opens a stream. The peer learns of it at once (an empty STREAM
    /// frame), so protocols where the server speaks first work.
    pub fn open_stream(&mut self) -> Result<u64, StreamError> {
        self.check_open()?;
        if self.next_local_index >= self.peer_max_streams {
            self.stream_limit_blocked = true;
            return Err(StreamError::Limit);
        }
        let hdr_space = 17;
        if self.send.space() < hdr_space {
            return Err(StreamError::Blocked);
        }
        let bit = if self.role == Role::Initiator { 0 } else { 1 };
        let id = self.next_local_index * 2 + bit;
        self.next_local_index += 1;
        let st = self.new_stream_state();
        self.streams.insert(id, st);
        self.stats.streams_opened += 1;
        self.push_stream_frame(id, false, &[]);
        Ok(id)
    }

    fn push_stream_frame(&mut self, id: u64, fin: bool, data: &[u8]) {
        let mut hdr = [0u8; 17];
        let n = wire::stream_header(id, fin, data.len(), &mut hdr);
        self.send.push(&[&hdr[..n], data]);
        self.stats.frames_sent += 1;
    }

    /// Writes as much of `data` as flow control and the replay buffer
    /// allow; returns the count, or [`StreamError::Blocked`] if none
    /// (then wait for [`Event::StreamWritable`]).
    pub fn stream_write(&mut self, id: u64, data: &[u8]) -> Result<usize, StreamError> {
        self.check_open()?;
        let st = self.streams.get(&id).ok_or(StreamError::Unknown(id))?;
        if let Some(code) = st.reset {
            return Err(StreamError::Reset(code));
        }
        if st.fin_queued {
            return Err(StreamError::Finished);
        }
        let credit = (st.send_max - st.sent).min(self.send_max_data - self.data_sent);
        let mut written = 0usize;
        let mut left = (data.len() as u64).min(credit) as usize;
        while left > 0 {
            let space = self.send.space();
            if space <= 17 {
                break;
            }
            let n = left.min(MAX_STREAM_CHUNK).min(space - 17);
            self.push_stream_frame(id, false, &data[written..written + n]);
            written += n;
            left -= n;
        }
        if written == 0 && !data.is_empty() {
            if !self.blocked.contains(&id) {
                self.blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        if let Some(st) = self.streams.get_mut(&id) {
            st.sent += written as u64;
        }
        self.data_sent += written as u64;
        self.stats.stream_bytes_sent += written as u64;
        Ok(written)
    }

    /// Ends the sending side (FIN). Reading goes on until the peer's FIN.
    pub fn stream_finish(&mut self, id: u64) -> Result<(), StreamError> {
        self.check_open()?;
        let st = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if let Some(code) = st.reset {
            return Err(StreamError::Reset(code));
        }
        if st.fin_queued {
            return Ok(());
        }
        if self.send.space() < 17 {
            if !self.blocked.contains(&id) {
                self.blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        st.fin_queued = true;
        let done = st.recv_done();
        self.push_stream_frame(id, true, &[]);
        if done {
            self.forget(id);
        }
        Ok(())
    }

    /// Aborts the stream in both directions; the peer sees `code`.
    pub fn stream_reset(&mut self, id: u64, code: u64) -> Result<(), StreamError> {
        self.check_open()?;
        let st = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if st.reset.is_some() {
            return Ok(());
        }
        st.reset = Some(code);
        let unread = st.recv_buf.len() as u64;
        self.recv_consumed += unread;
        let f = Frame::ResetStream { id, code };
        let mut tmp = [0u8; 24];
        let n = f.encode(&mut tmp);
        self.send.push(&[&tmp[..n]]);
        self.stats.frames_sent += 1;
        self.forget(id);
        self.maybe_grant_session();
        Ok(())
    }

    /// The application will not read this stream any more: data that
    /// arrives is dropped and credited, so the peer is never blocked.
    /// Also finishes the sending side if it is still open.
    pub fn stream_stop(&mut self, id: u64) -> Result<(), StreamError> {
        let Some(st) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        st.discarding = true;
        let unread = st.recv_buf.len() as u64;
        st.recv_consumed += unread;
        st.recv_buf = VecDeque::new();
        self.recv_consumed += unread;
        let fin_queued = st.fin_queued || st.reset.is_some();
        self.maybe_grant_session();
        self.maybe_grant_stream(id);
        if !fin_queued && !self.is_closed() {
            let _ = self.stream_finish(id);
        }
        if self
            .streams
            .get(&id)
            .is_some_and(|st| st.recv_done() && st.send_done())
        {
            self.forget(id);
        }
        Ok(())
    }

    /// Reads into `out`.
    pub fn stream_read(&mut self, id: u64, out: &mut [u8]) -> Result<ReadResult, StreamError> {
        self.stream_read_with(id, |a, b| {
            let na = out.len().min(a.len());
            out[..na].copy_from_slice(&a[..na]);
            let nb = (out.len() - na).min(b.len());
            out[na..na + nb].copy_from_slice(&b[..nb]);
            na + nb
        })
    }

    /// Like [`Session::stream_read`], without a copy: `f` gets the bytes
    /// waiting on the stream, in order, as two slices (the second may be
    /// empty), and returns how many of them it consumed (at most their
    /// total length). Returns [`ReadResult::Data`] with that count, which
    /// may be 0 when `f` takes nothing; `f` is called only when there are
    /// bytes to read.
    pub fn stream_read_with(
        &mut self,
        id: u64,
        f: impl FnOnce(&[u8], &[u8]) -> usize,
    ) -> Result<ReadResult, StreamError> {
        let closed = self.close_reason().cloned();
        let Some(st) = self.streams.get_mut(&id) else {
            if let Some(r) = closed {
                return Err(StreamError::SessionClosed(r));
            }
            return Err(StreamError::Unknown(id));
        };
        if let Some(code) = st.reset {
            return Err(StreamError::Reset(code));
        }
        if st.recv_buf.is_empty() {
            if st.fin_received {
                st.fin_read = true;
                if st.send_done() {
                    self.forget(id);
                }
                return Ok(ReadResult::Fin);
            }
            if let Some(r) = closed {
                return Err(StreamError::SessionClosed(r));
            }
            return Ok(ReadResult::Blocked);
        }
        let (a, b) = st.recv_buf.as_slices();
        let n = f(a, b).min(st.recv_buf.len());
        if n == 0 {
            return Ok(ReadResult::Data(0));
        }
        st.recv_buf.drain(..n);
        st.recv_consumed += n as u64;
        self.recv_consumed += n as u64;
        self.maybe_grant_stream(id);
        self.maybe_grant_session();
        Ok(ReadResult::Data(n))
    }

    /// Bytes waiting to be read on a stream.
    pub fn stream_readable_bytes(&self, id: u64) -> usize {
        self.streams.get(&id).map_or(0, |s| s.recv_buf.len())
    }

    /// Closes the session: queued stream data is sent first, then a CLOSE
    /// frame with `code` and `reason`.
    pub fn close(&mut self, now: Instant, code: CloseCode, reason: &str) {
        let _ = now;
        if self.is_closed() || self.pending_close.is_some() {
            return;
        }
        if !self.carrier_up {
            self.finish_close(CloseReason::Local {
                code,
                reason: reason.to_string(),
            });
            return;
        }
        let mut reason = reason.to_string();
        crate::error::truncate_utf8(&mut reason, 512);
        self.pending_close = Some((code, reason, false));
        self.state = State::Closing;
    }
}
