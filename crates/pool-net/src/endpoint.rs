//! The endpoint: a node's key, trust and (optionally) its listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pool_core::{
    Acceptor, Config, HandshakeError, Initiator, PublicKey, RecordType, SecretKey, SessionId,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::carrier::{tune, BoxedCarrier, Dialer, TcpDialer};
use crate::error::Error;
use crate::paths::{PathCtx, PathDialer};
use crate::session::{self, Session, Shared};
use crate::trust::Trust;

/// How an endpoint is set up. A key is required: there is no default
/// identity, and no default trust (an endpoint that trusts nobody refuses
/// every client).
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    key: SecretKey,
    protocol: Config,
    trust: Trust,
    handshake_timeout: Duration,
    max_pending_handshakes: usize,
    relays: Vec<String>,
    direct_retry: Duration,
    relay_only: bool,
}

impl EndpointConfig {
    /// A configuration for this node's key.
    pub fn new(key: SecretKey) -> Self {
        EndpointConfig {
            key,
            protocol: Config::default(),
            trust: Trust::new(),
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 1024,
            relays: Vec::new(),
            direct_retry: Duration::from_secs(60),
            relay_only: false,
        }
    }
    /// Protocol knobs (windows, timers, ciphers).
    pub fn protocol(mut self, config: Config) -> Self {
        self.protocol = config;
        self
    }
    /// Who may connect (listener) and the fleet secret (both sides).
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }
    /// How long a new carrier may take to present its first record and to
    /// finish the handshake (default 5 s; slowloris connections are cut).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
    /// Relays (`HOST:PORT`, default port 9255): a listening endpoint
    /// registers at each so that peers can reach it by key alone; every
    /// endpoint uses them to reach peers without a direct path, and falls
    /// back to them when a direct path dies.
    pub fn relays(mut self, relays: Vec<String>) -> Self {
        self.relays = relays
            .into_iter()
            .map(|r| {
                if r.parse::<SocketAddr>().is_ok()
                    || r.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok())
                {
                    r
                } else {
                    format!("{r}:{}", pool_core::relay::DEFAULT_PORT)
                }
            })
            .collect();
        self
    }
    /// While a session runs through a relay, how often direct paths are
    /// tried again (default 60 s; also at once when candidates arrive or a
    /// local address changes).
    pub fn direct_retry(mut self, every: Duration) -> Self {
        self.direct_retry = every.max(Duration::from_millis(100));
        self
    }
    /// Keep dialled sessions on the relays: never try direct paths (for
    /// measuring or debugging a relay; default off).
    pub fn relay_only(mut self, on: bool) -> Self {
        self.relay_only = on;
        self
    }
    /// Handshakes in progress at once on a listener (default 1024).
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.max_pending_handshakes = n.max(1);
        self
    }
}

/// Sessions a listener can resume, by id.
pub(crate) struct Registry {
    sessions: Mutex<HashMap<SessionId, Weak<Shared>>>,
}

impl Registry {
    pub(crate) fn remove(&self, id: &SessionId) {
        if let Ok(mut m) = self.sessions.lock() {
            m.remove(id);
        }
    }
    fn get(&self, id: &SessionId) -> Option<Arc<Shared>> {
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

struct Inner {
    ctx: Arc<ListenCtx>,
    relay_tasks: Vec<tokio::task::JoinHandle<()>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Session>>,
    local_addr: Option<SocketAddr>,
    task: Option<tokio::task::JoinHandle<()>>,
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
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        for t in &self.relay_tasks {
            t.abort();
        }
    }
}

/// A POOL node: dials sessions and, when bound, accepts them.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Endpoint({}, {:?})",
            self.public_key().short(),
            self.inner.local_addr
        )
    }
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads exactly one record (handshake class) from a carrier, within `t`.
pub(crate) async fn read_record<R: AsyncRead + Unpin + ?Sized>(
    rd: &mut R,
    addr: &str,
    t: Duration,
) -> Result<Vec<u8>, Error> {
    let fut = async {
        let mut buf = vec![0u8; 4];
        rd.read_exact(&mut buf).await?;
        let len = match pool_core::peek_record(&buf) {
            Ok(_) => (usize::from(buf[1]) << 16) | (usize::from(buf[2]) << 8) | usize::from(buf[3]),
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            }
        };
        buf.resize(4 + len, 0);
        rd.read_exact(&mut buf[4..]).await?;
        Ok(buf)
    };
    match tokio::time::timeout(t, fut).await {
        Err(_) => Err(Error::Timeout {
            addr: addr.to_string(),
            secs: t.as_secs(),
        }),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::HandshakeEof {
            addr: addr.to_string(),
        }),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Err(Error::Handshake {
            addr: addr.to_string(),
            source: HandshakeError::Unexpected("not a POOL record"),
        }),
        Ok(Err(e)) => Err(Error::Io(e)),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Binds a TCP listener; `[::]:PORT` is dual-stack (accepts IPv4 too).
/// Every listener of POOL (sessions, bridges, metrics) binds this way.
pub async fn bind_tcp(addr: &str) -> Result<TcpListener, Error> {
    let sa: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| Error::Resolve {
            addr: addr.into(),
            source,
        })?
        .next()
        .ok_or_else(|| Error::Resolve {
            addr: addr.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let bind_err = |source| Error::Bind {
        addr: addr.to_string(),
        source,
    };
    let domain = if sa.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(bind_err)?;
    if sa.is_ipv6() {
        sock.set_only_v6(false).map_err(bind_err)?;
    }
    sock.set_reuse_address(true).map_err(bind_err)?;
    sock.set_nonblocking(true).map_err(bind_err)?;
    sock.bind(&sa.into()).map_err(bind_err)?;
    sock.listen(1024).map_err(bind_err)?;
    TcpListener::from_std(sock.into()).map_err(bind_err)
}

impl Endpoint {
    fn ctx(
        config: EndpointConfig,
        incoming: mpsc::Sender<Session>,
        listen: Option<SocketAddr>,
    ) -> Arc<ListenCtx> {
        let paths = PathCtx::new(listen, config.relays.clone(), config.direct_retry);
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
            acceptor: Mutex::new(Acceptor::new(
                &config.protocol,
                config.key.clone(),
                config.trust.fleet_secret().cloned(),
            )),
            pending: Semaphore::new(config.max_pending_handshakes),
            max_pending: config.max_pending_handshakes,
            pending_by_source: Mutex::new(HashMap::new()),
            hello_jobs: std::sync::atomic::AtomicUsize::new(0),
            config: std::sync::RwLock::new(config),
            registry: Arc::new(Registry {
                sessions: Mutex::new(HashMap::new()),
            }),
            incoming,
            stats: Arc::default(),
            events: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// An endpoint that only dials.
    pub fn client(config: EndpointConfig) -> Endpoint {
        let (tx, rx) = mpsc::channel(1);
        Endpoint {
            inner: Arc::new(Inner {
                ctx: Self::ctx(config, tx, None),
                relay_tasks: Vec::new(),
                incoming: tokio::sync::Mutex::new(rx),
                local_addr: None,
                task: None,
            }),
        }
    }

    /// An endpoint listening on `addr` (`[::]:9253`, `0.0.0.0:9253`,
    /// `127.0.0.1:0`, `host:port`).
    pub async fn bind(addr: &str, config: EndpointConfig) -> Result<Endpoint, Error> {
        let listener = bind_tcp(addr).await?;
        let local_addr = listener.local_addr().ok();
        let (tx, rx) = mpsc::channel(256);
        info!(addr = ?local_addr, key = %config.key.public_key(), "listening");
        let relays = config.relays.clone();
        let ctx = Self::ctx(config, tx, local_addr);
        let task = tokio::spawn(accept_loop(listener, ctx.clone()));
        let relay_tasks = relays
            .into_iter()
            .map(|r| tokio::spawn(register_loop(Arc::downgrade(&ctx), r)))
            .collect();
        Ok(Endpoint {
            inner: Arc::new(Inner {
                ctx,
                relay_tasks,
                incoming: tokio::sync::Mutex::new(rx),
                local_addr,
                task: Some(task),
            }),
        })
    }

    fn config(&self) -> EndpointConfig {
        self.inner
            .ctx
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the key and trust for new sessions (SIGHUP reload). Live
    /// sessions, and their resumes, are not touched.
    pub fn reload(&self, key: SecretKey, trust: Trust) {
        let ctx = &self.inner.ctx;
        let mut cfg = ctx.config.write().unwrap_or_else(|e| e.into_inner());
        // The replay table and rate limiter survive: a HELLO captured
        // before the reload is still a replay after it.
        ctx.acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reconfigure(&cfg.protocol, key.clone(), trust.fleet_secret().cloned());
        cfg.key = key;
        cfg.trust = trust;
    }

    /// Subscribes to what the listener does (accepts, refusals, resumes).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<EndpointEvent> {
        self.inner.ctx.events.subscribe()
    }

    /// Live sessions this endpoint accepted.
    pub fn sessions(&self) -> Vec<Session> {
        let m = self.inner.ctx.registry.sessions.lock();
        let Ok(m) = m else { return Vec::new() };
        m.values()
            .filter_map(|w| w.upgrade())
            .map(|shared| {
                shared.add_handle();
                Session { shared }
            })
            .collect()
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.config().key.public_key()
    }

    /// The listening address, if bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr
    }

    /// Listener counters.
    pub fn listener_stats(&self) -> &ListenerStats {
        &self.inner.ctx.stats
    }

    /// The next session a peer opened with us; `None` if not listening.
    pub async fn accept(&self) -> Option<Session> {
        self.inner.incoming.lock().await.recv().await
    }

    /// Connects to `addr` (`HOST:PORT`, `1.2.3.4:PORT`, `[::1]:PORT`) and
    /// authenticates it as `peer`. If the carrier dies later the session
    /// reconnects and resumes on its own.
    ///
    /// With relays configured ([`EndpointConfig::relays`]) the session can
    /// also start on, and fall back to, a relay.
    pub async fn connect(&self, addr: &str, peer: PublicKey) -> Result<Session, Error> {
        self.connect_paths(Some(addr.to_string()), peer).await
    }

    /// Connects to `peer` by key alone, through the configured relays; the
    /// session moves to a direct path by itself when one works.
    pub async fn connect_key(&self, peer: PublicKey) -> Result<Session, Error> {
        if self.inner.ctx.paths.relays.is_empty() {
            return Err(Error::NoPath {
                peer: peer.to_token(),
            });
        }
        self.connect_paths(None, peer).await
    }

    async fn connect_paths(
        &self,
        direct: Option<String>,
        peer: PublicKey,
    ) -> Result<Session, Error> {
        let cfg = self.config();
        let direct = if cfg.relay_only && !cfg.relays.is_empty() {
            None
        } else {
            direct
        };
        let dialer = Arc::new(PathDialer::new(
            cfg.key.clone(),
            peer,
            direct,
            self.inner.ctx.paths.relays.clone(),
        ));
        let upgrade = (!cfg.relay_only).then(|| dialer.clone());
        let paths = dialer
            .has_relays()
            .then(|| (self.inner.ctx.paths.clone(), upgrade));
        self.handshake(dialer, peer, paths).await
    }

    /// Like [`Endpoint::connect`], over any carrier a [`Dialer`] opens.
    pub async fn connect_with(
        &self,
        dialer: Arc<dyn Dialer>,
        peer: PublicKey,
    ) -> Result<Session, Error> {
        self.handshake(dialer, peer, None).await
    }

    async fn handshake(
        &self,
        dialer: Arc<dyn Dialer>,
        peer: PublicKey,
        paths: Option<(Arc<PathCtx>, Option<Arc<PathDialer>>)>,
    ) -> Result<Session, Error> {
        let addr = dialer.describe();
        let cfg = self.config();
        let t = cfg.handshake_timeout;
        let mut carrier =
            tokio::time::timeout(t, dialer.dial())
                .await
                .map_err(|_| Error::Timeout {
                    addr: addr.clone(),
                    secs: t.as_secs(),
                })??;
        // A listener under load answers the first HELLO with a cookie: then
        // a new HELLO (fresh timestamp) carrying it, on the same carrier.
        let mut cookie = None;
        let core = loop {
            let mut hello = Vec::new();
            let init = Initiator::start_with_cookie(
                &cfg.protocol,
                &cfg.key,
                peer,
                cfg.trust.fleet_secret(),
                unix_nanos(),
                cookie.as_ref(),
                &mut rand_core::OsRng,
                &mut hello,
            )
            .map_err(|source| Error::Handshake {
                addr: addr.clone(),
                source,
            })?;
            carrier.write_all(&hello).await?;
            let record = read_record(&mut carrier, &addr, t).await?;
            match init.finish(Instant::now(), &record) {
                Err(HandshakeError::CookieReply { cookie: c }) if cookie.is_none() => {
                    cookie = Some(c);
                }
                other => break other,
            }
        }
        .map_err(|source| Error::Handshake {
            addr: addr.clone(),
            source: match source {
                // The listener does not name our key (it would cross the
                // wire in clear); we do, so our operator can pass it on.
                HandshakeError::Refused { code: 4, reason } => HandshakeError::Refused {
                    code: 4,
                    reason: format!("{reason} (this node's key: {})", cfg.key.public_key()),
                },
                other => other,
            },
        })?;
        debug!(to = %addr, session = %core.id(), cipher = core.cipher().name(), "session established");
        Ok(session::spawn(core, carrier, Some(dialer), None, paths))
    }

    /// Asks the listener at `addr` for its public key (for trust on first
    /// use). The answer is unauthenticated: pin it, then every later
    /// handshake proves it.
    pub async fn probe_key(addr: &str) -> Result<PublicKey, Error> {
        let dialer = TcpDialer::new(addr);
        let mut carrier = dialer.dial().await?;
        let mut msg = Vec::new();
        pool_core::write_key_probe(&mut msg);
        carrier.write_all(&msg).await?;
        let record = read_record(&mut carrier, addr, Duration::from_secs(5)).await?;
        pool_core::read_key_info(&record).map_err(|source| Error::Handshake {
            addr: addr.to_string(),
            source,
        })
    }

    /// The relays this listener registers at, and how that goes.
    pub fn relay_status(&self) -> Vec<RelayStatus> {
        self.inner
            .ctx
            .relays
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Sessions this endpoint accepted that are still alive.
    pub fn session_count(&self) -> usize {
        self.inner
            .ctx
            .registry
            .sessions
            .lock()
            .map(|m| m.len())
            .unwrap_or(0)
    }
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

struct ListenCtx {
    paths: Arc<PathCtx>,
    relays: Mutex<Vec<RelayStatus>>,
    config: std::sync::RwLock<EndpointConfig>,
    acceptor: Mutex<Acceptor>,
    events: tokio::sync::broadcast::Sender<EndpointEvent>,
    registry: Arc<Registry>,
    incoming: mpsc::Sender<Session>,
    stats: Arc<ListenerStats>,
    pending: Semaphore,
    max_pending: usize,
    /// Handshakes in progress per source (see [`PENDING_PER_SOURCE`]).
    pending_by_source: Mutex<HashMap<Vec<u8>, usize>>,
    /// HELLOs queued for or in their checks on the blocking pool.
    hello_jobs: std::sync::atomic::AtomicUsize,
}

impl ListenCtx {
    /// This node's key now (it changes on reload).
    fn key(&self) -> SecretKey {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ListenCtx>) {
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

/// HELLOs waiting for (or in) their Diffie-Hellman work beyond which the
/// listener counts as under load.
const HELLO_BACKLOG: usize = 4;

/// Handshakes in progress one source may hold at once: one address (or
/// /64, or relayed key) cannot take all of the listener's slots.
const PENDING_PER_SOURCE: usize = 32;

/// A handshake slot: one of the listener's, and one of its source's.
struct PendingSlot<'a> {
    ctx: &'a ListenCtx,
    source: Vec<u8>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl<'a> PendingSlot<'a> {
    fn take(ctx: &'a ListenCtx, source: Vec<u8>) -> Option<Self> {
        let permit = ctx.pending.try_acquire().ok()?;
        let mut m = ctx
            .pending_by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = m.entry(source.clone()).or_insert(0);
        if *n >= PENDING_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(PendingSlot {
            ctx,
            source,
            _permit: permit,
        })
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        let mut m = self
            .ctx
            .pending_by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// The rate-limit and cookie key of a carrier's source: the IPv4 address,
/// the IPv6 /64 (one host usually holds a whole /64), or, for a relayed
/// carrier, the key the relay authenticated (all relayed clients share the
/// relay's address).
fn source_key(from: SocketAddr, relayed: Option<&PublicKey>) -> Vec<u8> {
    if let Some(k) = relayed {
        let mut v = b"relayed:".to_vec();
        v.extend_from_slice(&k.0);
        return v;
    }
    match from.ip() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => a.octets()[..8].to_vec(),
        },
    }
}

/// Runs the HELLO checks (rate limit, MACs, cookie, Noise, trust) on the
/// blocking pool: the Diffie-Hellman work of a handshake flood must not
/// stall the runtime threads that drive live sessions.
async fn accept_hello(
    ctx: &Arc<ListenCtx>,
    source: Vec<u8>,
    record: Vec<u8>,
    trust: Trust,
) -> (Result<pool_core::Session, HandshakeError>, Vec<u8>) {
    let ctx2 = ctx.clone();
    let max = ctx.max_pending;
    let backlog = ctx.hello_jobs.fetch_add(1, Ordering::Relaxed);
    let job = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut acc = ctx2.acceptor.lock().unwrap_or_else(|e| e.into_inner());
        // Under load when HELLOs queue up for the Diffie-Hellman work, or
        // half the handshake slots are taken: then every HELLO first
        // proves its source with a cookie round trip, which costs one MAC.
        acc.set_under_load(backlog >= HELLO_BACKLOG || ctx2.pending.available_permits() < max / 2);
        let res = acc.accept(
            Instant::now(),
            unix_nanos(),
            &source,
            &record,
            &mut |k: &PublicKey| trust.check_client(k),
            &mut rand_core::OsRng,
            &mut out,
        );
        drop(acc);
        ctx2.hello_jobs.fetch_sub(1, Ordering::Relaxed);
        (res, out)
    });
    job.await.unwrap_or_else(|_| {
        (
            Err(HandshakeError::Unexpected("handshake task failed")),
            Vec::new(),
        )
    })
}

async fn handle_carrier(
    ctx: &Arc<ListenCtx>,
    mut sock: BoxedCarrier,
    from: SocketAddr,
    relayed: Option<PublicKey>,
) -> Result<(), Error> {
    let addr = from.to_string();
    let (handshake_timeout, trust) = {
        let c = ctx.config.read().unwrap_or_else(|e| e.into_inner());
        (c.handshake_timeout, c.trust.clone())
    };
    let record = match read_record(&mut sock, &addr, handshake_timeout).await {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let mut out = Vec::new();
    match record[0] {
        t if t == RecordType::Hello as u8 => {
            let source = source_key(from, relayed.as_ref());
            let (mut res, mut reply) =
                accept_hello(ctx, source.clone(), record, trust.clone()).await;
            if matches!(res, Err(HandshakeError::CookieRequired)) {
                // One cookie round trip on the same carrier: the retried
                // HELLO must carry it.
                ctx.stats.cookies.fetch_add(1, Ordering::Relaxed);
                sock.write_all(&reply).await?;
                let again = read_record(&mut sock, &addr, handshake_timeout).await?;
                (res, reply) = accept_hello(ctx, source, again, trust).await;
                if matches!(res, Err(HandshakeError::CookieRequired)) {
                    return Ok(());
                }
            }
            out = reply;
            let res = match res {
                Ok(mut core) => {
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
                    let paths = (!ctx.paths.relays.is_empty()).then(|| (ctx.paths.clone(), None));
                    let session = session::spawn(core, sock, None, Some(reg), paths);
                    if let Ok(mut m) = ctx.registry.sessions.lock() {
                        m.insert(id, Arc::downgrade(&session.shared));
                    }
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
        t if t == RecordType::Resume as u8 => {
            let res = match pool_core::resume_session_id(&record) {
                Ok(id) => match ctx.registry.get(&id) {
                    Some(shared) => {
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
                    None => Err(HandshakeError::UnknownSession),
                },
                Err(e) => Err(e),
            };
            let res = match res {
                Ok(shared) => {
                    sock.write_all(&out).await?;
                    match read_record(&mut sock, &addr, handshake_timeout).await {
                        Ok(mut first) => {
                            let mut st = shared.lock();
                            match st.core.confirm_resume(Instant::now(), &mut first) {
                                Ok(()) => {
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
                    ctx.acceptor
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write_resume_refusal(&record, &mut out);
                    let _ = sock.write_all(&out).await;
                    return Ok(());
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(shared) => {
                    ctx.stats.resumed.fetch_add(1, Ordering::Relaxed);
                    let _ = ctx.events.send(EndpointEvent::Resumed {
                        id: shared.id,
                        peer: shared.peer,
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
        t if t == RecordType::KeyProbe as u8 => {
            ctx.acceptor
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_key_info(&mut out);
            sock.write_all(&out).await?;
        }
        _ => {
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let e = HandshakeError::Unexpected("first record must be HELLO, RESUME or KEY_PROBE");
            pool_core::write_refusal(&e, &mut out);
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
async fn register_loop(ctx: Weak<ListenCtx>, relay: String) {
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
