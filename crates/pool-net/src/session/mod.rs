//! One task drives one core session: it writes records, runs timers and,
//! on the initiator, reconnects and resumes when the carrier dies.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use pool_core::{CloseCode, CloseReason, Event, HandshakeError, PublicKey, SessionId, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tracing::{debug, info, warn, Instrument};

use crate::carrier::{BoxedCarrier, Dialer};

mod resume;
use crate::error::Error;
use crate::stream::Stream;
use resume::reconnect;
pub(crate) use resume::{resume_on, resume_with};

/// Runtime state guarded by one lock, next to the core session.
pub(crate) struct State {
    pub(crate) core: pool_core::Session,
    pub(crate) read_wakers: HashMap<u64, Waker>,
    pub(crate) write_wakers: HashMap<u64, Waker>,
    accept_queue: VecDeque<u64>,
    /// Generation of the attached carrier; readers of older ones stop.
    generation: u64,
    /// A carrier waiting for the driver to adopt its writing half.
    new_writer: Option<(u64, WriteHalf<BoxedCarrier>)>,
    remote: Option<SocketAddr>,
    pub(crate) carrier_kind: &'static str,
    /// The relays the carrier goes through (empty: direct).
    carrier_relays: Vec<String>,
    reconnecting: bool,
    /// The peer's direct-path candidates (from its PATHS frames).
    pub(crate) peer_paths: Vec<SocketAddr>,
    /// Carrier switches to another kind or address.
    path_changes: u64,
    last_path_change: Option<Instant>,
    pub(crate) closed: Option<CloseReason>,
    /// A duplicate of the TCP carrier's socket, for `TCP_INFO`.
    carrier_fd: Option<std::os::fd::OwnedFd>,
    /// Retransmissions on carriers already retired.
    retrans_base: u64,
    /// After a handoff (source side): where each stream lives now.
    pub(crate) rehomed: HashMap<u64, Arc<crate::stream::Rehomed>>,
    /// Source: the client declined this handoff, with this code.
    pub(crate) declined: Option<(u32, u8)>,
    /// Client: the server the session left at its last handoff, and how
    /// many handoffs it made.
    pub(crate) moved_from: Option<PublicKey>,
    pub(crate) handoffs: u64,
    /// Client: the dialer of the server left at the last handoff, while
    /// the move is unconfirmed (no record of the target yet).
    pub(crate) origin_dialer: Option<Arc<dyn Dialer>>,
}

impl State {
    fn tcp_retransmits_now(&self) -> u64 {
        self.carrier_fd
            .as_ref()
            .and_then(pool_sys::tcp_info)
            .map_or(0, |i| i.total_retrans)
    }
}

/// What a [`crate::Session`] handle and its streams share with the driver.
pub(crate) struct Shared {
    /// This, for tasks spawned while only a reference is at hand.
    pub(crate) me: std::sync::Weak<Shared>,
    pub(crate) state: Mutex<State>,
    /// Wakes the driver: something to send, or a carrier change.
    pub(crate) wake: Notify,
    /// Wakes `accept_stream`, `open_stream` and `closed` waiters.
    pub(crate) app: Notify,
    pub(crate) id: SessionId,
    /// The peer the session started with (the span's name); after a
    /// handoff the core's `peer_key()` is the current one.
    pub(crate) peer: PublicKey,
    pub(crate) started: Instant,
    /// The current carrier generation, watched by readers so that a
    /// retired carrier's reader stops at once.
    generation: tokio::sync::watch::Sender<u64>,
    dialer: Mutex<Option<Arc<dyn Dialer>>>,
    /// Initiator: how to follow a server's handoff offer.
    pub(crate) follow: Option<crate::handoff::Follow>,
    /// Wakes a carrier reader waiting while the session is frozen.
    pub(crate) thaw: Notify,
    /// Wakes a source's handoff task (the client declined).
    pub(crate) handoff_note: Notify,
    /// Target: told when an imported session commits on a later carrier.
    pub(crate) on_commit: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    handles: AtomicU64,
    /// Wakes the path manager: the peer's candidates changed.
    pub(crate) paths_changed: Notify,
    /// One resume at a time (reconnect and path upgrade both resume).
    pub(crate) resume_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere while holding it; the
        // state is still the best we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        self.dialer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_dialer(&self, d: Arc<dyn Dialer>) {
        *self.dialer.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }

    pub(crate) fn add_handle(&self) {
        self.handles.fetch_add(1, Ordering::Relaxed);
    }

    /// The last application handle (session or stream) is gone: close.
    pub(crate) fn drop_handle(&self) {
        if self.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut st = self.lock();
            st.core
                .close(Instant::now(), CloseCode::Normal, "session dropped");
            drop(st);
            self.wake.notify_one();
        }
    }
}

/// Retires the current carrier: its reader and writer stop, and the socket
/// closes once both halves are gone.
fn bump_generation(st: &mut State, shared: &Shared) -> u64 {
    st.generation += 1;
    // Keep the retired carrier's retransmissions in the session's total,
    // and let its socket close.
    st.retrans_base += st.tcp_retransmits_now();
    st.carrier_fd = None;
    shared.generation.send_replace(st.generation);
    st.generation
}

/// Applies core events to wakers and queues. Call with the lock held.
pub(crate) fn process_events(st: &mut State, shared: &Shared) {
    let mut app = false;
    while let Some(ev) = st.core.poll_event() {
        match ev {
            Event::StreamReadable(id) => {
                if let Some(w) = st.read_wakers.remove(&id) {
                    w.wake();
                }
            }
            Event::StreamWritable(id) => {
                if let Some(w) = st.write_wakers.remove(&id) {
                    w.wake();
                }
            }
            Event::StreamOpened(id) => {
                st.accept_queue.push_back(id);
                app = true;
            }
            Event::StreamsAvailable => app = true,
            Event::CarrierDead => {
                info!(session = %shared.id, "carrier silent for too long; dropping it");
                bump_generation(st, shared);
                shared.wake.notify_one();
            }
            Event::Rekeyed(epoch) => debug!(session = %shared.id, epoch, "new key epoch"),
            Event::HandoffOffered(offer) => {
                crate::handoff::offered(st, shared, offer);
            }
            Event::HandoffDeclined { id, code } => {
                info!(session = %shared.id, handoff = id, code, "the client declined the handoff");
                st.declined = Some((id, code));
                shared.handoff_note.notify_waiters();
            }
            Event::Moved { from, to } => {
                info!(session = %shared.id, %from, %to, "session moved to another server");
                st.moved_from = Some(from);
                st.handoffs += 1;
                if let Some(f) = &shared.follow {
                    let _ = f.events.send(crate::EndpointEvent::Moved {
                        id: shared.id,
                        from,
                        to,
                    });
                }
            }
            Event::PeerPaths(paths) if paths != st.peer_paths => {
                debug!(session = %shared.id, ?paths, "peer's direct-path candidates");
                st.peer_paths = paths;
                shared.paths_changed.notify_one();
            }
            Event::Closed(reason) => {
                info!(session = %shared.id, %reason, "session closed");
                st.closed = Some(reason);
                shared.thaw.notify_waiters();
                shared.handoff_note.notify_waiters();
                for (_, w) in st.read_wakers.drain() {
                    w.wake();
                }
                for (_, w) in st.write_wakers.drain() {
                    w.wake();
                }
                app = true;
            }
            _ => {}
        }
    }
    if app {
        shared.app.notify_waiters();
    }
}

/// Counters and state of a session, for tables and metrics.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SessionStats {
    /// The core's counters (bytes, frames, RTT, epochs, resumes, ...).
    pub core: Stats,
    /// The carrier's remote address, if attached.
    pub remote: Option<SocketAddr>,
    /// The carrier kind ("tcp", "relay"), or "none" while resuming.
    pub carrier: &'static str,
    /// The path: "direct", "relay", or "none" while resuming.
    pub path: &'static str,
    /// The relays the carrier goes through, ours first, then peer relays
    /// (`ADDR (key)`); empty on a direct path.
    pub relays: Vec<String>,
    /// How many times the session moved to another carrier kind or
    /// address (relay to direct, direct to relay, a new address).
    pub path_changes: u64,
    /// How long ago the last path change was.
    pub last_path_change: Option<Duration>,
    /// How long the session has existed.
    pub age: Duration,
    /// TCP retransmissions on the current carrier (from `TCP_INFO`), when
    /// the carrier is TCP and the platform reports it.
    pub tcp_retransmits: Option<u64>,
    /// The server the session left at its last handoff (client side).
    pub moved_from: Option<PublicKey>,
    /// Handoffs this session followed (client side).
    pub handoffs: u64,
    /// Whether a handoff of this session is under way (server side: offered
    /// or frozen).
    pub handing_off: bool,
}

/// A live POOL session: open and accept streams, read stats, close.
/// Cloning gives another handle to the same session; the session closes
/// when the last handle and stream are dropped.
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

impl Clone for Session {
    fn clone(&self) -> Self {
        self.shared.add_handle();
        Session {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.drop_handle();
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session({}, peer={})",
            self.shared.id,
            self.shared.peer.short()
        )
    }
}

impl Session {
    /// Another handle to the session behind `shared`.
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Session {
        shared.add_handle();
        Session { shared }
    }

    /// The session id (the same on both sides).
    pub fn id(&self) -> SessionId {
        self.shared.id
    }

    /// The peer's authenticated public key: after a handoff, the server
    /// that holds the session now.
    pub fn peer_key(&self) -> PublicKey {
        self.shared.lock().core.peer_key()
    }

    /// Frames written on this session that the peer has not acknowledged
    /// yet: 0 once it holds everything (what a program waits for before it
    /// exits, as the kernel lingers on a closed TCP socket).
    pub fn unacknowledged(&self) -> usize {
        self.shared.lock().core.unacknowledged_frames()
    }

    /// Counters, RTT and carrier state.
    pub fn stats(&self) -> SessionStats {
        let st = self.shared.lock();
        let carrier = if st.core.carrier_up() {
            st.carrier_kind
        } else {
            "none"
        };
        SessionStats {
            core: st.core.stats(),
            remote: st.remote,
            carrier,
            path: match carrier {
                "none" => "none",
                "relay" => "relay",
                _ => "direct",
            },
            relays: if carrier == "none" {
                Vec::new()
            } else {
                st.carrier_relays.clone()
            },
            path_changes: st.path_changes,
            last_path_change: st.last_path_change.map(|t| t.elapsed()),
            age: self.shared.started.elapsed(),
            tcp_retransmits: (st.carrier_fd.is_some() || st.retrans_base > 0)
                .then(|| st.retrans_base + st.tcp_retransmits_now()),
            moved_from: st.moved_from,
            handoffs: st.handoffs,
            handing_off: st.core.handoff_offered().is_some() || st.core.is_frozen(),
        }
    }

    /// Opens a stream; waits while the peer's stream limit is reached.
    pub async fn open_stream(&self) -> Result<Stream, Error> {
        loop {
            let notified = self.shared.app.notified();
            {
                let mut st = self.shared.lock();
                if let Some(r) = &st.closed {
                    return Err(Error::Closed(r.clone()));
                }
                match st.core.open_stream() {
                    Ok(id) => {
                        drop(st);
                        self.shared.wake.notify_one();
                        return Ok(Stream::new(self.shared.clone(), id));
                    }
                    Err(pool_core::StreamError::SessionClosed(r)) => return Err(Error::Closed(r)),
                    Err(_) => {}
                }
            }
            notified.await;
        }
    }

    /// The next stream the peer opens, or `None` once the session is closed.
    pub async fn accept_stream(&self) -> Option<Stream> {
        loop {
            let notified = self.shared.app.notified();
            {
                let mut st = self.shared.lock();
                if let Some(id) = st.accept_queue.pop_front() {
                    return Some(Stream::new(self.shared.clone(), id));
                }
                if st.closed.is_some() {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Closes gracefully: what streams wrote is sent first, then a CLOSE
    /// with `reason`. Returns when the session is closed.
    pub async fn close(&self, reason: &str) -> CloseReason {
        {
            let mut st = self.shared.lock();
            st.core.close(Instant::now(), CloseCode::Normal, reason);
            process_events(&mut st, &self.shared);
        }
        self.shared.wake.notify_one();
        self.closed().await
    }

    /// Waits until the session is closed and says why.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.shared.app.notified();
            if let Some(r) = &self.shared.lock().closed {
                return r.clone();
            }
            notified.await;
        }
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Starts a new key epoch now (normally automatic on time and volume).
    pub fn rekey(&self) {
        let mut st = self.shared.lock();
        st.core.force_rekey(&mut rand_core::OsRng);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Drops the current carrier as if it had died (for tests and for
    /// operators moving a session by hand): the initiator resumes on a new
    /// one.
    pub fn drop_carrier(&self) {
        let mut st = self.shared.lock();
        st.core.carrier_lost(Instant::now());
        bump_generation(&mut st, &self.shared);
        process_events(&mut st, &self.shared);
        drop(st);
        self.shared.wake.notify_one();
    }
}

/// Called with the session's id when its driver ends (a listener removes
/// it from its registry).
pub(crate) type OnEnd = Box<dyn FnOnce(SessionId) + Send>;

/// The tracing span of a session's tasks.
pub(crate) fn span(shared: &Shared) -> tracing::Span {
    tracing::info_span!("session", id = %shared.id, peer = %shared.peer.short())
}

/// Creates the shared state and starts the driver on `carrier`.
pub(crate) fn spawn(
    core: pool_core::Session,
    carrier: Option<BoxedCarrier>,
    dialer: Option<Arc<dyn Dialer>>,
    follow: Option<crate::handoff::Follow>,
    on_end: Option<OnEnd>,
) -> Session {
    let id = core.id();
    let peer = core.peer_key();
    let remote = carrier.as_ref().and_then(|c| c.peer_addr());
    let kind = carrier.as_ref().map_or("none", |c| c.kind());
    let relays = carrier.as_ref().map(|c| c.relays()).unwrap_or_default();
    let mut core = core;
    core.provide_entropy(&mut rand_core::OsRng);
    let shared = Arc::new_cyclic(|me| Shared {
        me: me.clone(),
        state: Mutex::new(State {
            core,
            read_wakers: HashMap::new(),
            write_wakers: HashMap::new(),
            accept_queue: VecDeque::new(),
            generation: 0,
            new_writer: None,
            remote,
            carrier_kind: kind,
            carrier_relays: relays,
            reconnecting: false,
            peer_paths: Vec::new(),
            path_changes: 0,
            last_path_change: None,
            closed: None,
            carrier_fd: None,
            retrans_base: 0,
            rehomed: HashMap::new(),
            declined: None,
            moved_from: None,
            handoffs: 0,
            origin_dialer: None,
        }),
        wake: Notify::new(),
        app: Notify::new(),
        id,
        peer,
        started: Instant::now(),
        generation: tokio::sync::watch::Sender::new(0),
        dialer: Mutex::new(dialer),
        follow,
        thaw: Notify::new(),
        handoff_note: Notify::new(),
        on_commit: Mutex::new(None),
        handles: AtomicU64::new(1),
        paths_changed: Notify::new(),
        resume_lock: tokio::sync::Mutex::new(()),
    });
    if let Some(c) = carrier {
        attach(&shared, c);
    }
    let drv = shared.clone();
    tokio::spawn(
        async move {
            drive(drv.clone()).await;
            if let Some(f) = on_end {
                f(drv.id);
            }
        }
        .instrument(span(&shared)),
    );
    Session { shared }
}

/// Makes the current carrier's reader and writer stand down (a resume on
/// another carrier was accepted under the same lock).
pub(crate) fn invalidate_carrier(st: &mut State, shared: &Shared) {
    bump_generation(st, shared);
}

/// Attaches a new carrier (after the core accepted it): a reader task for
/// its reading half; the driver adopts its writing half.
pub(crate) fn attach(shared: &Arc<Shared>, carrier: BoxedCarrier) {
    let remote = carrier.peer_addr();
    let kind = carrier.kind();
    let relays = carrier.relays();
    let fd = carrier.tcp_socket();
    let (rd, wr) = tokio::io::split(carrier);
    let gen = {
        let mut st = shared.lock();
        let gen = bump_generation(&mut st, shared);
        if gen > 1
            && (st.carrier_kind != kind || st.remote.map(|a| a.ip()) != remote.map(|a| a.ip()))
        {
            st.path_changes += 1;
            st.last_path_change = Some(Instant::now());
        }
        st.carrier_fd = fd;
        st.new_writer = Some((gen, wr));
        st.remote = remote;
        st.carrier_kind = kind;
        st.carrier_relays = relays;
        gen
    };
    let sh = shared.clone();
    tokio::spawn(read_loop(sh, rd, gen).in_current_span());
    shared.wake.notify_one();
}

async fn read_loop(shared: Arc<Shared>, mut rd: ReadHalf<BoxedCarrier>, gen: u64) {
    let mut retired = shared.generation.subscribe();
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    // Bytes before `start` are records already handled: the rest (a
    // partial record) moves to the front only when the buffer is full,
    // not after every read.
    let mut start = 0usize;
    let mut last_big = Instant::now();
    loop {
        if buf.len() == buf.capacity() && start > 0 {
            buf.drain(..start);
            start = 0;
        }
        if buf.len() == buf.capacity() {
            let grow = buf.capacity().clamp(16 << 10, 256 << 10);
            buf.reserve(grow);
            last_big = Instant::now();
        } else if buf.is_empty()
            && buf.capacity() > (64 << 10)
            && last_big.elapsed() > Duration::from_secs(5)
        {
            // A burst is long over: give its buffer back.
            buf = Vec::with_capacity(16 << 10);
        }
        let res = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = retired.wait_for(|g| *g != gen) => return,
        };
        let frozen = {
            let mut st = shared.lock();
            if st.generation != gen {
                return;
            }
            match res {
                Ok(0) | Err(_) => {
                    debug!("carrier closed by the other end");
                    st.core.carrier_lost(Instant::now());
                    bump_generation(&mut st, &shared);
                    process_events(&mut st, &shared);
                    drop(st);
                    shared.wake.notify_one();
                    return;
                }
                Ok(_) => {
                    let used = st
                        .core
                        .handle_carrier_data(Instant::now(), &mut buf[start..]);
                    process_events(&mut st, &shared);
                    let closed = st.core.is_closed();
                    let frozen = st.core.is_frozen();
                    drop(st);
                    start += used;
                    if start == buf.len() || frozen {
                        buf.drain(..start);
                        start = 0;
                    }
                    shared.wake.notify_one();
                    if closed {
                        return;
                    }
                    frozen
                }
            }
        };
        if frozen && !wait_thawed(&shared, &mut buf, gen).await {
            return;
        }
    }
}

/// Frozen for a handoff: reads nothing more (the bytes wait in the socket,
/// unacknowledged) until the session thaws, then hands over what was
/// buffered. Returns whether the reader goes on.
async fn wait_thawed(shared: &Arc<Shared>, buf: &mut Vec<u8>, gen: u64) -> bool {
    loop {
        let thawed = shared.thaw.notified();
        tokio::pin!(thawed);
        thawed.as_mut().enable();
        {
            let mut st = shared.lock();
            if st.generation != gen || st.core.is_closed() {
                return false;
            }
            if !st.core.is_frozen() {
                let used = st.core.handle_carrier_data(Instant::now(), buf);
                process_events(&mut st, shared);
                let go_on = !st.core.is_closed();
                drop(st);
                buf.drain(..used);
                shared.wake.notify_one();
                return go_on;
            }
        }
        thawed.await;
    }
}

/// The driver: writes what the core produces, runs its timers, adopts new
/// carriers and, on the initiator, resumes after a carrier is lost.
async fn drive(shared: Arc<Shared>) {
    let mut writer: Option<(u64, WriteHalf<BoxedCarrier>)> = None;
    let mut out: Vec<u8> = Vec::new();
    let mut filled;
    let mut last_bulk = Instant::now();
    let mut retired = shared.generation.subscribe();
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let wake = shared.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let (deadline, done, lost) = {
            let mut st = shared.lock();
            if let Some(w) = st.new_writer.take() {
                writer = Some(w);
            }
            if writer.as_ref().is_some_and(|(g, _)| *g != st.generation) {
                writer = None;
            }
            filled = 0;
            if writer.is_some() {
                // A small buffer while idle (pings, acks, frames under 8 KiB:
                // all pending bytes fit), large batches while data is queued
                // (1 MiB: one write and one wake-up of the peer per MiB; it
                // measured ~5% more iperf3 throughput than 256 KiB). The
                // buffer only grows, and is never zeroed again.
                let bulk = st.core.pending_bytes() > 8 << 10;
                let want = if bulk { 1 << 20 } else { 12 << 10 };
                let need = if bulk {
                    want + pool_core::MAX_RECORD_LEN
                } else {
                    want
                };
                if bulk {
                    last_bulk = Instant::now();
                } else if out.len() > need && last_bulk.elapsed() > Duration::from_secs(5) {
                    // The burst is long over: give its buffer back.
                    out = Vec::new();
                }
                if out.len() < need {
                    out.resize(need, 0);
                }
                let now = Instant::now();
                while filled < want {
                    match st.core.poll_transmit(now, &mut out[filled..]) {
                        Some(n) => filled += n,
                        None => break,
                    }
                }
            }
            process_events(&mut st, &shared);
            let lost = !st.core.carrier_up() && !st.core.is_closed();
            if lost && !st.reconnecting && shared.dialer().is_some() {
                st.reconnecting = true;
                let sh = shared.clone();
                tokio::spawn(reconnect(sh).in_current_span());
            }
            (st.core.poll_timeout(), st.core.is_closed(), lost)
        };
        if filled > 0 {
            if let Some((gen, w)) = writer.as_mut() {
                let gen = *gen;
                let res = tokio::select! {
                    r = w.write_all(&out[..filled]) => r,
                    _ = retired.wait_for(|g| *g != gen) => Err(std::io::Error::other("carrier retired")),
                };
                if let Err(e) = res {
                    debug!(error = %e, "carrier write failed");
                    let mut st = shared.lock();
                    if st.generation == gen {
                        st.core.carrier_lost(Instant::now());
                        bump_generation(&mut st, &shared);
                        process_events(&mut st, &shared);
                    }
                    writer = None;
                }
            }
            continue;
        }
        if done {
            if let Some((_, mut w)) = writer.take() {
                let _ = w.flush().await;
                let _ = w.shutdown().await;
            }
            shared.app.notify_waiters();
            return;
        }
        if lost {
            writer = None;
        }
        match deadline {
            Some(d) => {
                // Re-arm only when the deadline moves earlier: the ack timer
                // moves later with every record, and re-registering a timer
                // each time costs a wake-up of the I/O driver (an eventfd
                // write) per record. An early fire is harmless.
                if armed.is_none_or(|a| d < a) {
                    sleep.as_mut().reset(d.into());
                    armed = Some(d);
                }
                tokio::select! {
                    _ = &mut wake => {}
                    _ = &mut sleep => {
                        armed = None;
                        let mut st = shared.lock();
                        st.core.handle_timeout(Instant::now());
                        process_events(&mut st, &shared);
                    }
                }
            }
            None => wake.await,
        }
    }
}
