//! The listener's I/O: the accept loop, relay registrations, and each new
//! carrier's first records. What to do with them is decided by
//! `pool_core::listener` (dispatch, slots, under load, the HELLO gate);
//! this module reads, writes, spawns and times out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use pool_core::listener::{
    first_record, resume_target, source_key, write_unexpected_first, FirstRecord, HelloDecision,
    Listener, ResumeTarget,
};
use pool_core::{HandshakeError, PublicKey, ReplayTable, SecretKey, SessionId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::carrier::{read_record, tune, unix_nanos, BoxedCarrier};
use crate::config::EndpointConfig;
use crate::error::Error;
use crate::paths::PathCtx;
use crate::session::{self, Session, Shared};
use crate::trust::Trust;

/// Sessions a listener can resume, by id.
pub(crate) struct Registry {
    pub(crate) sessions: Mutex<HashMap<SessionId, Weak<Shared>>>,
}

impl Registry {
    pub(crate) fn remove(&self, id: &SessionId) {
        if let Ok(mut m) = self.sessions.lock() {
            m.remove(id);
        }
    }
    pub(crate) fn insert(&self, id: SessionId, session: &Session) {
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(id, Arc::downgrade(&session.shared));
        }
    }
    pub(crate) fn get(&self, id: &SessionId) -> Option<Arc<Shared>> {
        self.sessions.lock().ok()?.get(id)?.upgrade()
    }
}

/// Listener counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Sessions accepted.
    pub accepted: AtomicU64,
    /// Handshakes refused (any reason).
    pub refused: AtomicU64,
    /// Resumes accepted.
    pub resumed: AtomicU64,
    /// Carriers dropped before a first record (timeouts, garbage).
    pub dropped: AtomicU64,
    /// Cookie replies sent (HELLOs under load without a valid cookie).
    pub cookies: AtomicU64,
}

/// What an endpoint reports as it works (for journals and audits).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum EndpointEvent {
    /// A listener accepted a new session.
    Accepted {
        /// Session id.
        id: SessionId,
        /// Authenticated peer key.
        peer: PublicKey,
        /// Carrier address.
        from: SocketAddr,
    },
    /// A handshake was refused.
    Refused {
        /// Carrier address.
        from: SocketAddr,
        /// The key presented, when it authenticated (untrusted key).
        key: Option<PublicKey>,
        /// Why.
        reason: String,
    },
    /// A session resumed on a new carrier from this address.
    Resumed {
        /// Session id.
        id: SessionId,
        /// Peer key.
        peer: PublicKey,
        /// New carrier address.
        from: SocketAddr,
    },
    /// Target: a session was handed to this node and committed here.
    HandedIn {
        /// Session id.
        id: SessionId,
        /// The client.
        client: PublicKey,
        /// The worker it came from.
        from: PublicKey,
    },
    /// Client: a dialled session moved to another server.
    Moved {
        /// Session id.
        id: SessionId,
        /// The server it left.
        from: PublicKey,
        /// The server that holds it now.
        to: PublicKey,
    },
    /// Client: a dialled session declined its server's handoff offer.
    HandoffDeclined {
        /// Session id.
        id: SessionId,
        /// The target offered.
        to: PublicKey,
        /// Why.
        reason: String,
    },
}

/// A listener's registration at one relay.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStatus {
    /// The relay (`HOST:PORT`, as configured).
    pub relay: String,
    /// Whether the registration is up now.
    pub registered: bool,
    /// Our address as the relay saw it (last registration).
    pub observed: Option<SocketAddr>,
    /// What went wrong last, if the registration is down.
    pub error: Option<String>,
}

pub(crate) struct ListenCtx {
    pub(crate) paths: Arc<PathCtx>,
    pub(crate) relays: Mutex<Vec<RelayStatus>>,
    pub(crate) config: RwLock<EndpointConfig>,
    /// The listener's rules: handshake slots, "under load", the HELLO
    /// gate. Held only for decisions, never across I/O or Diffie-Hellman.
    pub(crate) rules: Mutex<Listener>,
    /// Handshake timestamps accepted; survives reloads.
    pub(crate) replay: Mutex<ReplayTable>,
    pub(crate) events: tokio::sync::broadcast::Sender<EndpointEvent>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) incoming: mpsc::Sender<Session>,
    pub(crate) stats: Arc<ListenerStats>,
    /// The handoffs this node is the target of.
    pub(crate) imported: crate::handoff::Imported,
    /// Draining: new sessions are refused (code 13), resumes go on.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl ListenCtx {
    pub(crate) fn new(
        config: EndpointConfig,
        incoming: mpsc::Sender<Session>,
        paths: Arc<PathCtx>,
    ) -> Arc<ListenCtx> {
        let relays = config
            .relays
            .iter()
            .map(|r| RelayStatus {
                relay: r.clone(),
                registered: false,
                observed: None,
                error: None,
            })
            .collect();
        Arc::new(ListenCtx {
            paths,
            relays: Mutex::new(relays),
            rules: Mutex::new(Listener::new(
                &config.protocol,
                config.key.clone(),
                config.trust.fleet_secret().cloned(),
                config.max_pending_handshakes,
            )),
            replay: Mutex::new(ReplayTable::new()),
            config: RwLock::new(config),
            registry: Arc::new(Registry {
                sessions: Mutex::new(HashMap::new()),
            }),
            incoming,
            stats: Arc::default(),
            events: tokio::sync::broadcast::channel(1024).0,
            imported: crate::handoff::Imported::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn registry_get(&self, id: &SessionId) -> Option<Arc<Shared>> {
        self.registry.get(id)
    }

    pub(crate) fn registry_has(&self, id: &SessionId) -> bool {
        self.registry
            .get(id)
            .is_some_and(|s| !s.lock().core.is_closed())
    }

    /// This node's key now (it changes on reload).
    pub(crate) fn key(&self) -> SecretKey {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }

    /// The listener's rules, for one decision.
    pub(crate) fn rules(&self) -> MutexGuard<'_, Listener> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) async fn accept_loop(listener: TcpListener, ctx: Arc<ListenCtx>) {
    loop {
        let (sock, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tune(&sock);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let Some(_slot) = PendingSlot::take(&ctx, source_key(from, None)) else {
                ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(%from, "too many handshakes in progress (in all, or from this source); dropping connection");
                return;
            };
            if let Err(e) = handle_carrier(&ctx, Box::new(sock), from, None).await {
                debug!(%from, error = %e, "incoming carrier failed");
            }
        });
    }
}

/// A handshake slot: one of the listener's, and one of its source's
/// (`pool_core::listener::HandshakeSlots`); given back when dropped.
struct PendingSlot<'a> {
    ctx: &'a ListenCtx,
    source: Vec<u8>,
}

impl<'a> PendingSlot<'a> {
    fn take(ctx: &'a ListenCtx, source: Vec<u8>) -> Option<Self> {
        ctx.rules()
            .take_slot(&source)
            .then_some(PendingSlot { ctx, source })
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.ctx.rules().release_slot(&self.source);
    }
}

/// Tells the listener an admitted HELLO's Diffie-Hellman is over, however
/// it ended (also when its job never ran: then it was wasted).
struct HelloDone(Option<Arc<ListenCtx>>);

impl HelloDone {
    fn report(mut self, wasted: bool) {
        if let Some(ctx) = self.0.take() {
            ctx.rules().hello_done(Instant::now(), wasted);
        }
    }
}

impl Drop for HelloDone {
    fn drop(&mut self) {
        if let Some(ctx) = self.0.take() {
            ctx.rules().hello_done(Instant::now(), true);
        }
    }
}

/// A HELLO: the gate (rate limit, size, version, mac1, cookie under load)
/// runs here, on the runtime thread, under the listener's short lock, so a
/// flood is answered with cookies or refusals for one or two MACs each and
/// no thread hop. Only a HELLO past the gate goes to the blocking pool for
/// its Diffie-Hellman, which holds no lock: the keys it was checked against
/// travel with it, and the replay table is locked only to check and record
/// its timestamp.
async fn accept_hello(
    ctx: &Arc<ListenCtx>,
    source: &[u8],
    record: Vec<u8>,
    trust: Trust,
) -> (Result<pool_core::Session, HandshakeError>, Vec<u8>) {
    let mut out = Vec::new();
    let decision = ctx.rules().handle_hello(
        Instant::now(),
        source,
        &record,
        &mut rand_core::OsRng,
        &mut out,
    );
    let admitted = match decision {
        HelloDecision::Cookie => return (Err(HandshakeError::CookieRequired), out),
        HelloDecision::Refuse(e) => return (Err(e), out),
        HelloDecision::Admit(a) => a,
    };
    let done = HelloDone(Some(ctx.clone()));
    let ctx2 = ctx.clone();
    let job = tokio::task::spawn_blocking(move || {
        let res = (|| {
            let opened = admitted.open(&record, &mut rand_core::OsRng)?;
            let trusted = trust.check_client(&opened.peer());
            ctx2.replay
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(&opened, unix_nanos(), &mut |_: &PublicKey| trusted)?;
            let mut out = Vec::new();
            let session = opened.welcome(Instant::now(), &mut out)?;
            Ok((session, out))
        })();
        done.report(res.is_err());
        res
    });
    match job.await {
        Ok(Ok((session, out))) => (Ok(session), out),
        Ok(Err(e)) => (Err(e), Vec::new()),
        Err(_) => (
            Err(HandshakeError::Unexpected("handshake task failed")),
            Vec::new(),
        ),
    }
}

/// The greeting's stream, written and finished in `core`, its records
/// appended to `out` (after the WELCOME already there).
fn greet(core: &mut pool_core::Session, g: &crate::config::Greeting, out: &mut Vec<u8>) {
    let Some(bytes) = (g.0)(&core.peer_key()) else {
        return;
    };
    let Ok(id) = core.open_stream() else {
        return;
    };
    let mut at = 0;
    while at < bytes.len() {
        match core.stream_write(id, &bytes[at..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => at += n,
        }
    }
    let _ = core.stream_finish(id);
    let mut buf = vec![0u8; pool_core::MAX_RECORD_LEN];
    let now = Instant::now();
    while let Some(n) = core.poll_transmit(now, &mut buf) {
        out.extend_from_slice(&buf[..n]);
    }
}

async fn handle_carrier(
    ctx: &Arc<ListenCtx>,
    mut sock: BoxedCarrier,
    from: SocketAddr,
    relayed: Option<PublicKey>,
) -> Result<(), Error> {
    let addr = from.to_string();
    let (handshake_timeout, trust, greeting) = {
        let c = ctx.config.read().unwrap_or_else(|e| e.into_inner());
        (c.handshake_timeout, c.trust.clone(), c.greeting.clone())
    };
    let record = match read_record(&mut sock, &addr, handshake_timeout).await {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let mut out = Vec::new();
    match first_record(&record) {
        FirstRecord::Hello if ctx.draining.load(Ordering::Relaxed) => {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            pool_core::write_refusal(&HandshakeError::Draining, &mut out);
            let _ = sock.write_all(&out).await;
        }
        FirstRecord::Hello => {
            let source = source_key(from, relayed.as_ref());
            let (mut res, mut reply) = accept_hello(ctx, &source, record, trust.clone()).await;
            if matches!(res, Err(HandshakeError::CookieRequired)) {
                // One cookie round trip on the same carrier: the retried
                // HELLO must carry it.
                ctx.stats.cookies.fetch_add(1, Ordering::Relaxed);
                sock.write_all(&reply).await?;
                let again = read_record(&mut sock, &addr, handshake_timeout).await?;
                (res, reply) = accept_hello(ctx, &source, again, trust).await;
                if matches!(res, Err(HandshakeError::CookieRequired)) {
                    return Ok(());
                }
            }
            out = reply;
            let res = match res {
                Ok(mut core) => {
                    if let Some(g) = &greeting {
                        greet(&mut core, g, &mut out);
                    }
                    sock.write_all(&out).await?;
                    // Key confirmation: nothing is created, registered or
                    // reported until the initiator's first record
                    // authenticates (it proves the keys, and the fleet
                    // secret, which its HELLO alone does not). A replayed
                    // or forged HELLO ends here, after at most the
                    // handshake timeout.
                    match read_record(&mut sock, &addr, handshake_timeout).await {
                        Ok(mut first) => {
                            core.handle_carrier_data(Instant::now(), &mut first);
                            if core.stats().records_received == 1 && core.carrier_up() {
                                Ok(core)
                            } else {
                                Err(HandshakeError::Crypto)
                            }
                        }
                        Err(e) => {
                            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                            let _ = ctx.events.send(EndpointEvent::Refused {
                                from,
                                key: None,
                                reason: format!("no key confirmation: {e}"),
                            });
                            return Err(e);
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(core) => {
                    let id = core.id();
                    info!(%from, peer = %core.peer_key(), session = %id, "session accepted");
                    let reg = Arc::downgrade(&ctx.registry);
                    // Candidates only matter to a peer that reached us
                    // through a relay, i.e. when we register at relays.
                    let paths = (!ctx.paths.relays.is_empty()).then(|| ctx.paths.clone());
                    let on_end: session::OnEnd = Box::new(move |id| {
                        if let Some(reg) = reg.upgrade() {
                            reg.remove(&id);
                        }
                    });
                    let session = session::spawn(core, Some(sock), None, None, Some(on_end));
                    if let Some(pc) = paths {
                        crate::paths::start(&session, pc, None);
                    }
                    ctx.registry.insert(id, &session);
                    ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = ctx.events.send(EndpointEvent::Accepted {
                        id,
                        peer: session.peer_key(),
                        from,
                    });
                    if ctx.incoming.try_send(session).is_err() {
                        warn!(%from, "accept queue full; closing the new session");
                    }
                }
                Err(e) => {
                    ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                    match &e {
                        HandshakeError::Untrusted { key } => {
                            warn!(%from, %key, "refused untrusted key: {e}")
                        }
                        _ => info!(%from, "handshake refused: {e}"),
                    }
                    let key = match &e {
                        HandshakeError::Untrusted { key } | HandshakeError::Replayed { key } => {
                            Some(*key)
                        }
                        _ => None,
                    };
                    let _ = ctx.events.send(EndpointEvent::Refused {
                        from,
                        key,
                        reason: e.to_string(),
                    });
                    pool_core::write_refusal(&e, &mut out);
                    let _ = sock.write_all(&out).await;
                    let _ = sock.shutdown().await;
                }
            }
        }
        FirstRecord::Resume => {
            let res = match resume_target(&record, |id| ctx.registry.get(id)) {
                ResumeTarget::Known(shared) => {
                    // Answered, not switched: the session keeps its
                    // carrier until the first record of the new epoch
                    // arrives on this one.
                    let r = shared.lock().core.handle_resume(
                        Instant::now(),
                        &record,
                        &mut rand_core::OsRng,
                        &mut out,
                    );
                    r.map(|()| shared)
                }
                ResumeTarget::Unknown => Err(HandshakeError::UnknownSession),
                ResumeTarget::Malformed(e) => Err(e),
            };
            let res = match res {
                Ok(shared) => {
                    sock.write_all(&out).await?;
                    match read_record(&mut sock, &addr, handshake_timeout).await {
                        Ok(mut first) => {
                            let mut st = shared.lock();
                            match st.core.confirm_resume(Instant::now(), &mut first) {
                                Ok(()) => {
                                    // A handed-in session waiting for its
                                    // commit: this was it.
                                    if let Some(hook) = shared
                                        .on_commit
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .take()
                                    {
                                        let _ = hook.send(());
                                    }
                                    // Retire the old carrier under the same
                                    // lock: its reader must not see the new
                                    // epoch's keys.
                                    session::invalidate_carrier(&mut st, &shared);
                                    session::process_events(&mut st, &shared);
                                    drop(st);
                                    Ok(shared)
                                }
                                Err(e) => {
                                    session::process_events(&mut st, &shared);
                                    Err(e)
                                }
                            }
                        }
                        Err(e) => {
                            shared.lock().core.abandon_resume();
                            debug!(%from, "resume answered but never confirmed: {e}");
                            return Err(e);
                        }
                    }
                }
                Err(HandshakeError::UnknownSession) => {
                    // Proven, so the peer closes at once instead of trying
                    // until its deadline.
                    ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                    info!(%from, "resume refused: unknown session");
                    // The keys are cloned under the lock; the proof's
                    // X25519 runs outside it.
                    let keys = ctx.rules().keys();
                    keys.write_resume_refusal(&record, &mut out);
                    let _ = sock.write_all(&out).await;
                    return Ok(());
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(shared) => {
                    ctx.stats.resumed.fetch_add(1, Ordering::Relaxed);
                    let peer = shared.lock().core.peer_key();
                    let _ = ctx.events.send(EndpointEvent::Resumed {
                        id: shared.id,
                        peer,
                        from,
                    });
                    info!(%from, session = %shared.id, "session resumed on a new carrier");
                    session::attach(&shared, sock);
                }
                Err(e) => {
                    ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                    info!(%from, "resume refused: {e}");
                    pool_core::write_refusal(&e, &mut out);
                    let _ = sock.write_all(&out).await;
                }
            }
        }
        FirstRecord::ResumeHandoff => {
            return crate::handoff::handle_resume_handoff(ctx, sock, from, record).await;
        }
        FirstRecord::Probe => {
            let keys = ctx.rules().keys();
            keys.write_key_info(&mut out);
            sock.write_all(&out).await?;
        }
        _ => {
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            write_unexpected_first(&mut out);
            let _ = sock.write_all(&out).await;
        }
    }
    Ok(())
}

/// How often a registered node pings its relay, and how long it waits
/// for any answer before it reconnects.
const RELAY_PING: Duration = Duration::from_secs(15);
const RELAY_SILENT: Duration = Duration::from_secs(40);

/// Keeps this listener registered at one relay: reconnects with backoff
/// when the relay goes away, and accepts the circuits it announces.
pub(crate) async fn register_loop(ctx: Weak<ListenCtx>, relay: String) {
    let mut backoff = Duration::from_millis(100);
    let set = |registered: bool, observed: Option<SocketAddr>, error: Option<String>| {
        if let Some(c) = ctx.upgrade() {
            if let Ok(mut r) = c.relays.lock() {
                if let Some(s) = r.iter_mut().find(|s| s.relay == relay) {
                    s.registered = registered;
                    s.observed = observed.or(s.observed);
                    s.error = error;
                }
            }
        }
    };
    loop {
        let Some(c) = ctx.upgrade() else { return };
        let key = c.key();
        drop(c);
        match crate::relay::handshake(&relay, &key, pool_core::relay::Intent::Register).await {
            Ok((sock, relay_addr, observed)) => {
                info!(%relay, %observed, "registered at relay");
                backoff = Duration::from_millis(100);
                if let Some(c) = ctx.upgrade() {
                    c.paths.set_observed(observed.ip());
                }
                set(true, Some(observed), None);
                let e = serve_registration(&ctx, sock, &relay, relay_addr).await;
                warn!(%relay, "relay registration lost: {e}; registering again");
                set(false, None, Some(e.to_string()));
            }
            Err(e) => {
                warn!(%relay, "cannot register at relay: {e}; retrying in {backoff:?}");
                set(false, None, Some(e.to_string()));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn serve_registration(
    ctx: &Weak<ListenCtx>,
    sock: TcpStream,
    relay: &str,
    relay_addr: SocketAddr,
) -> Error {
    use pool_core::relay::Msg;
    let (mut rd, mut wr) = sock.into_split();
    // Reads run in their own task: a read cut short by the ping timer
    // would lose bytes.
    let (tx, mut rx) = mpsc::channel(16);
    let name = relay.to_string();
    let reader = tokio::spawn(async move {
        loop {
            let m = crate::relay::read_msg(&mut rd, &name).await;
            let stop = m.is_err();
            if tx.send(m).await.is_err() || stop {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    let mut ping = tokio::time::interval(RELAY_PING);
    ping.tick().await;
    let mut last_heard = Instant::now();
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return Error::Relay { addr: relay.to_string(), code: 0, message: "connection closed".into() },
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > RELAY_SILENT {
                    return Error::Relay { addr: relay.to_string(), code: 0, message: "relay silent".into() };
                }
                if let Err(e) = crate::relay::write_msg(&mut wr, &Msg::Ping(unix_nanos())).await {
                    return e.into();
                }
                continue;
            }
        };
        last_heard = Instant::now();
        match msg {
            Err(e) => return e,
            Ok(Msg::Ping(t)) => {
                if let Err(e) = crate::relay::write_msg(&mut wr, &Msg::Pong(t)).await {
                    return e.into();
                }
            }
            Ok(Msg::Pong(_)) => {}
            Ok(Msg::Incoming { circuit, from }) => {
                let Some(c) = ctx.upgrade() else {
                    return Error::NotListening;
                };
                let relay = relay.to_string();
                tokio::spawn(async move {
                    let key = c.key();
                    let Some(_slot) = PendingSlot::take(&c, source_key(relay_addr, Some(&from)))
                    else {
                        c.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    match crate::relay::accept_circuit(&relay, &key, circuit).await {
                        Ok(carrier) => {
                            debug!(%relay, peer = %from.short(), "relayed carrier");
                            if let Err(e) =
                                handle_carrier(&c, Box::new(carrier), relay_addr, Some(from)).await
                            {
                                debug!(%relay, error = %e, "relayed carrier failed");
                            }
                        }
                        Err(e) => debug!(%relay, error = %e, "cannot accept relayed circuit"),
                    }
                });
            }
            Ok(Msg::Error { code, message }) => {
                return Error::Relay {
                    addr: relay.to_string(),
                    code,
                    message,
                };
            }
            Ok(other) => {
                return Error::Relay {
                    addr: relay.to_string(),
                    code: 0,
                    message: format!("unexpected {other:?} on the control connection"),
                };
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
