//! The endpoint: a node's key, trust and (optionally) its listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::{HandshakeError, Initiator, PublicKey, SecretKey};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::carrier::{read_record, unix_nanos, Dialer, TcpDialer};
pub use crate::config::EndpointConfig;
use crate::error::Error;
use crate::listener::{accept_loop, register_loop, ListenCtx};
pub use crate::listener::{EndpointEvent, ListenerStats, RelayStatus};
use crate::paths::{PathCtx, PathDialer};
use crate::session::{self, Session};
use crate::trust::Trust;

struct Inner {
    ctx: Arc<ListenCtx>,
    relay_tasks: Vec<tokio::task::JoinHandle<()>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Session>>,
    local_addr: Option<SocketAddr>,
    task: Option<tokio::task::JoinHandle<()>>,
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
        ListenCtx::new(config, incoming, paths)
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

    pub(crate) fn listen_ctx(&self) -> &Arc<ListenCtx> {
        &self.inner.ctx
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
        ctx.rules()
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
        let follow = crate::handoff::Follow {
            key: cfg.key.clone(),
            policy: cfg.handoff.clone(),
            relays: self.inner.ctx.paths.relays.clone(),
            events: self.inner.ctx.events.clone(),
        };
        let session = session::spawn(core, Some(carrier), Some(dialer), Some(follow), None);
        if let Some((ctx, upgrade)) = paths {
            crate::paths::start(&session, ctx, upgrade);
        }
        Ok(session)
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

    /// Draining: the listener refuses new sessions (refusal code 13) while
    /// resumes, and handoffs of its sessions to other workers, go on.
    pub fn set_draining(&self, on: bool) {
        self.inner
            .ctx
            .draining
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the listener is draining ([`Endpoint::set_draining`]).
    pub fn is_draining(&self) -> bool {
        self.inner
            .ctx
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
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
