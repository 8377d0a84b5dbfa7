//! The relay server (POOL-RELAY/1, see [`pool_core::relay`]).
//!
//! Nodes that cannot reach each other both connect to a relay over TCP. A
//! node proves that it holds its key before anything else happens; the
//! relay then pairs a `CONNECT` with the peer's `ACCEPT` and splices the
//! two TCP connections byte for byte. What flows through a circuit is a
//! POOL session's sealed records: the relay cannot read or alter them
//! without the session noticing. It does see node keys, addresses, who
//! talks to whom, sizes and timing (see `docs/relay.md`).
//!
//! Isolation: every circuit direction is its own read-then-write loop with
//! its own buffer, so a receiver that stops reading blocks only the writes
//! towards it, which stops the reads from its sender, whose TCP window then
//! closes: back-pressure reaches that sender and nobody else. Control
//! messages to a node go through a small bounded queue per node.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pool_core::relay::{
    Challenge, CircuitId, Intent, Msg, ERR_AUTH, ERR_CAPACITY, ERR_NOT_ALLOWED, ERR_NO_ANSWER,
    ERR_PROTOCOL, ERR_UNKNOWN_PEER, VERSION,
};
use pool_core::PublicKey;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rand_core::{OsRng, RngCore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use pool_journal::{Event, Journal, JournalError};

use crate::net::address_bucket;

/// Bytes each circuit direction reads and writes at a time.
const SPLICE_BUF: usize = 128 * 1024;
/// Socket send and receive buffers.
const SOCKET_BUF: usize = 4 << 20;
/// Control messages that may wait for one node's control connection.
const CONTROL_QUEUE: usize = 64;
/// Time a node has to take one control message or a WELCOME / ERROR.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long unread input is drained after an ERROR, so that closing does
/// not reset the connection before the node has read it.
const LINGER: Duration = Duration::from_secs(1);
/// Refusals (connection cap reached) being answered at once; beyond this
/// connections are just closed.
const MAX_REFUSING: usize = 64;

/// How the relay is run. `Default` is the production setting on
/// `[::]:9255`; the setters chain.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Address to listen on: `[::]:9255` takes IPv6 and IPv4.
    pub listen: String,
    /// Connections open at once, all nodes together (handshaking ones too).
    pub max_connections: usize,
    /// Connections open at once for one node key (control and circuits).
    pub max_connections_per_node: usize,
    /// Bytes per second one node may send through circuits, over all its
    /// circuits (a token bucket with one second of burst); 0: no cap.
    pub max_rate_per_node: u64,
    /// Time from accept to a verified AUTH.
    pub handshake_timeout: Duration,
    /// Time the peer has to ACCEPT a circuit after INCOMING.
    pub accept_timeout: Duration,
    /// A control connection silent this long is closed (nodes PING every
    /// 15 s).
    pub control_idle_timeout: Duration,
    /// A circuit that carries no byte either way this long is closed
    /// (`None`: never). POOL sessions PING every 5 s, so a live session's
    /// circuit is never idle that long; without it, circuits opened by
    /// keys that cost nothing could hold every connection slot.
    pub circuit_idle_timeout: Option<Duration>,
    /// Connections from one source (an IPv4 address, or an IPv6 /64) that
    /// may be open at once before they authenticate; more are refused at
    /// once with `ERR_CAPACITY`. 0: no cap.
    pub max_unauthenticated_per_address: usize,
    /// Keys this relay serves; empty: any key that proves ownership.
    pub allow: HashSet<PublicKey>,
    /// Append the change journal to this file.
    pub journal: Option<PathBuf>,
    /// Serve `/metrics` and `/health` here, e.g. `127.0.0.1:9257`.
    pub metrics: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: format!("[::]:{}", pool_core::relay::DEFAULT_PORT),
            max_connections: 10_000,
            max_connections_per_node: 256,
            max_rate_per_node: 0,
            handshake_timeout: Duration::from_secs(5),
            accept_timeout: Duration::from_secs(5),
            control_idle_timeout: Duration::from_secs(60),
            circuit_idle_timeout: Some(Duration::from_secs(120)),
            max_unauthenticated_per_address: 64,
            allow: HashSet::new(),
            journal: None,
            metrics: None,
        }
    }
}

impl RelayConfig {
    /// The defaults, listening on `listen`.
    #[must_use]
    pub fn new(listen: impl Into<String>) -> Self {
        RelayConfig {
            listen: listen.into(),
            ..RelayConfig::default()
        }
    }

    /// Sets [`RelayConfig::max_connections`].
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`RelayConfig::max_connections_per_node`].
    #[must_use]
    pub fn max_connections_per_node(mut self, n: usize) -> Self {
        self.max_connections_per_node = n;
        self
    }

    /// Sets [`RelayConfig::max_rate_per_node`] (bytes per second, 0: none).
    #[must_use]
    pub fn max_rate_per_node(mut self, bytes_per_sec: u64) -> Self {
        self.max_rate_per_node = bytes_per_sec;
        self
    }

    /// Sets [`RelayConfig::handshake_timeout`].
    #[must_use]
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets [`RelayConfig::accept_timeout`].
    #[must_use]
    pub fn accept_timeout(mut self, t: Duration) -> Self {
        self.accept_timeout = t;
        self
    }

    /// Sets [`RelayConfig::control_idle_timeout`].
    #[must_use]
    pub fn control_idle_timeout(mut self, t: Duration) -> Self {
        self.control_idle_timeout = t;
        self
    }

    /// Sets [`RelayConfig::circuit_idle_timeout`] (`None`: never).
    #[must_use]
    pub fn circuit_idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.circuit_idle_timeout = t;
        self
    }

    /// Sets [`RelayConfig::max_unauthenticated_per_address`] (0: no cap).
    #[must_use]
    pub fn max_unauthenticated_per_address(mut self, n: usize) -> Self {
        self.max_unauthenticated_per_address = n;
        self
    }

    /// Serves this key (once any key is added, only the listed keys).
    #[must_use]
    pub fn allow(mut self, key: PublicKey) -> Self {
        self.allow.insert(key);
        self
    }

    /// Sets [`RelayConfig::journal`].
    #[must_use]
    pub fn journal(mut self, path: impl Into<PathBuf>) -> Self {
        self.journal = Some(path.into());
        self
    }

    /// Sets [`RelayConfig::metrics`].
    #[must_use]
    pub fn metrics(mut self, addr: impl Into<String>) -> Self {
        self.metrics = Some(addr.into());
        self
    }
}

/// Reads an authorized-keys file (one key token a line, optionally
/// followed by a name; `#` starts a comment), the format `--authorized`
/// takes everywhere.
///
/// # Errors
///
/// [`RelayServerError::Authorized`] naming the file (and line) that is
/// unreadable or holds something that is not a key.
pub fn load_authorized(path: &Path) -> Result<HashSet<PublicKey>, RelayServerError> {
    let bad = |line: usize, reason: String| RelayServerError::Authorized {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let text = {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let mut f = std::fs::File::open(path).map_err(|e| bad(0, e.to_string()))?;
        let mode = f
            .metadata()
            .map_err(|e| bad(0, e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(bad(
                0,
                format!(
                    "writable by other users (mode {:o}), so anyone could add a key; refused until you run `chmod go-w {}`",
                    mode & 0o777,
                    path.display()
                ),
            ));
        }
        let mut text = String::new();
        f.read_to_string(&mut text)
            .map_err(|e| bad(0, e.to_string()))?;
        text
    };
    let mut keys = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(token) = line.split_whitespace().next() else {
            continue;
        };
        let key = PublicKey::from_token(token).map_err(|e| bad(n + 1, e.to_string()))?;
        keys.insert(key);
    }
    Ok(keys)
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayServerError {
    /// The listening socket could not be bound.
    #[error("relay: cannot listen on {addr}: {source} (is another relay or program using that port? choose another --listen address)")]
    Listen {
        /// The address asked for.
        addr: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The metrics endpoint could not be bound.
    #[error("relay: cannot serve metrics on {addr}: {source} (choose another --metrics address)")]
    Metrics {
        /// The address asked for.
        addr: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The journal could not be opened.
    #[error("relay: {0}")]
    Journal(#[from] JournalError),
    /// An authorized-keys file could not be read.
    #[error("relay: authorized keys {}{}: {reason} (one key per line, `#` comments)",
        path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Authorized {
        /// The file.
        path: PathBuf,
        /// The line (1-based; 0 when the file itself could not be read).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("relay: {0}")]
    Config(String),
}

/// A snapshot of a relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// TCP connections open now (handshaking, control and circuits).
    pub connections: u64,
    /// Connections accepted since start (including refused ones).
    pub connections_accepted: u64,
    /// Nodes registered now.
    pub nodes: u64,
    /// CONNECTs waiting for the peer's ACCEPT now.
    pub pending: u64,
    /// Circuits spliced now.
    pub circuits: u64,
    /// Circuits spliced since start.
    pub circuits_total: u64,
    /// Bytes forwarded through circuits, both directions.
    pub bytes: u64,
    /// Proofs of key ownership that failed.
    pub auth_failures: u64,
    /// Refused: a connection cap was reached.
    pub refused_capacity: u64,
    /// Refused: the key is not on the allow-list.
    pub refused_not_allowed: u64,
    /// Refused: CONNECT to a key that is not registered.
    pub refused_unknown_peer: u64,
    /// Refused: the peer did not ACCEPT in time.
    pub refused_no_answer: u64,
    /// Refused: malformed or unexpected messages, handshake timeouts,
    /// ACCEPTs of unknown circuits or by the wrong key.
    pub refused_protocol: u64,
    /// Refused: too many unauthenticated connections from one source
    /// address (IPv6: one /64).
    pub refused_address: u64,
    /// Circuits closed because no byte crossed them for
    /// [`RelayConfig::circuit_idle_timeout`].
    pub circuits_idle_closed: u64,
    /// Connections open now that have not authenticated yet.
    pub unauthenticated: u64,
}

/// One node key with connections open at the relay, as
/// [`RelayHandle::nodes`] lists it. Byte counts start when the key's first
/// open connection did (they are forgotten once it has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStats {
    /// The node's key.
    pub key: PublicKey,
    /// Whether it has a control connection (is reachable by CONNECT).
    pub registered: bool,
    /// Its connections open now (control, circuits, pending).
    pub connections: u64,
    /// Bytes it sent into circuits.
    pub sent: u64,
    /// Bytes circuits delivered to it.
    pub received: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    circuits: AtomicU64,
    circuits_total: AtomicU64,
    bytes: AtomicU64,
    auth_failures: AtomicU64,
    refused: [AtomicU64; Refusal::COUNT],
    idle_closed: AtomicU64,
}

/// Why a connection was refused, for counters and the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Capacity,
    NotAllowed,
    UnknownPeer,
    NoAnswer,
    Protocol,
    Address,
}

impl Refusal {
    const COUNT: usize = 6;
    const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::Capacity,
        Refusal::NotAllowed,
        Refusal::UnknownPeer,
        Refusal::NoAnswer,
        Refusal::Protocol,
        Refusal::Address,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::NotAllowed => "not_allowed",
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::NoAnswer => "no_answer",
            Refusal::Protocol => "protocol",
            Refusal::Address => "address",
        }
    }

    fn code(self) -> u8 {
        match self {
            Refusal::Capacity | Refusal::Address => ERR_CAPACITY,
            Refusal::NotAllowed => ERR_NOT_ALLOWED,
            Refusal::UnknownPeer => ERR_UNKNOWN_PEER,
            Refusal::NoAnswer => ERR_NO_ANSWER,
            Refusal::Protocol => ERR_PROTOCOL,
        }
    }
}

/// A message to a node's control connection.
enum Ctl {
    Incoming { circuit: CircuitId, from: PublicKey },
    Replaced,
}

struct Registration {
    id: u64,
    tx: mpsc::Sender<Ctl>,
}

/// A CONNECT waiting for its ACCEPT.
struct Pending {
    acceptor: PublicKey,
    tx: oneshot::Sender<Authed>,
}

/// Per-key state while the key has connections open.
struct NodeState {
    key: PublicKey,
    /// Bytes this node sent into circuits.
    sent: AtomicU64,
    /// Bytes circuits delivered to this node.
    received: AtomicU64,
    bucket: Option<Mutex<Bucket>>,
}

struct NodeSlot {
    connections: usize,
    state: Arc<NodeState>,
}

/// A token bucket: `rate` bytes per second, `burst` bytes deep. Tokens may
/// go negative; the taker then sleeps the debt off, so one large write is
/// never refused, only delayed.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes `n` tokens at `now`; how long the taker must wait.
    fn take(&mut self, now: Instant, n: usize) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

struct Shared {
    cfg: RelayConfig,
    counters: Counters,
    nodes: Mutex<HashMap<PublicKey, Registration>>,
    pending: Mutex<HashMap<CircuitId, Pending>>,
    per_node: Mutex<HashMap<PublicKey, NodeSlot>>,
    /// Unauthenticated connections open now, per source bucket.
    unauth: Mutex<HashMap<IpAddr, usize>>,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    journal: Option<Journal>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; a poisoned lock still holds
    // consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn journal(&self, event: Event, fields: serde_json::Value) {
        if let Some(j) = &self.journal {
            j.record(event, fields);
        }
    }

    /// For entries an unauthenticated or costless sender can cause (failed
    /// proofs, refusals): shed before they crowd out the others.
    fn journal_bulk(&self, event: Event, fields: serde_json::Value) {
        if let Some(j) = &self.journal {
            j.record_bulk(event, fields);
        }
    }

    fn refused(&self, why: Refusal) {
        self.counters.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let r = |w: Refusal| c.refused[w as usize].load(Ordering::Relaxed);
        let max = self.cfg.max_connections;
        RelayStats {
            connections: max.saturating_sub(self.slots.available_permits()) as u64,
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            nodes: lock(&self.nodes).len() as u64,
            pending: lock(&self.pending).len() as u64,
            circuits: c.circuits.load(Ordering::Relaxed),
            circuits_total: c.circuits_total.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            refused_capacity: r(Refusal::Capacity),
            refused_not_allowed: r(Refusal::NotAllowed),
            refused_unknown_peer: r(Refusal::UnknownPeer),
            refused_no_answer: r(Refusal::NoAnswer),
            refused_protocol: r(Refusal::Protocol),
            refused_address: r(Refusal::Address),
            circuits_idle_closed: c.idle_closed.load(Ordering::Relaxed),
            unauthenticated: lock(&self.unauth).values().sum::<usize>() as u64,
        }
    }

    /// Counts an unauthenticated connection against its source's cap;
    /// `None` when the cap is reached.
    fn enter_unauth(self: &Arc<Self>, ip: IpAddr) -> Option<UnauthGuard> {
        let bucket = address_bucket(ip);
        let cap = self.cfg.max_unauthenticated_per_address;
        let mut map = lock(&self.unauth);
        let n = map.entry(bucket).or_insert(0);
        if cap > 0 && *n >= cap {
            if *n == 0 {
                map.remove(&bucket);
            }
            return None;
        }
        *n += 1;
        Some(UnauthGuard {
            shared: self.clone(),
            bucket,
        })
    }

    fn nodes(&self) -> Vec<NodeStats> {
        let registered: HashSet<PublicKey> = lock(&self.nodes).keys().copied().collect();
        let mut rows: Vec<NodeStats> = lock(&self.per_node)
            .values()
            .map(|slot| NodeStats {
                key: slot.state.key,
                registered: registered.contains(&slot.state.key),
                connections: slot.connections as u64,
                sent: slot.state.sent.load(Ordering::Relaxed),
                received: slot.state.received.load(Ordering::Relaxed),
            })
            .collect();
        rows.sort_by_key(|r| r.key);
        rows
    }

    /// Counts a connection against `key`'s cap; `None` when the cap is
    /// reached.
    fn enter_node(self: &Arc<Self>, key: PublicKey) -> Option<NodeGuard> {
        let mut map = lock(&self.per_node);
        let slot = map.entry(key).or_insert_with(|| NodeSlot {
            connections: 0,
            state: Arc::new(NodeState {
                key,
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                bucket: (self.cfg.max_rate_per_node > 0).then(|| {
                    let rate = self.cfg.max_rate_per_node as f64;
                    let burst = rate.max(SPLICE_BUF as f64);
                    Mutex::new(Bucket {
                        rate,
                        burst,
                        tokens: burst,
                        last: Instant::now(),
                    })
                }),
            }),
        });
        if slot.connections >= self.cfg.max_connections_per_node {
            if slot.connections == 0 {
                map.remove(&key);
            }
            return None;
        }
        slot.connections += 1;
        Some(NodeGuard {
            shared: self.clone(),
            state: slot.state.clone(),
        })
    }
}

/// One unauthenticated connection counted against its source's cap;
/// uncounted when dropped (once it authenticates, or closes).
struct UnauthGuard {
    shared: Arc<Shared>,
    bucket: IpAddr,
}

impl Drop for UnauthGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.unauth);
        if let Some(n) = map.get_mut(&self.bucket) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.bucket);
            }
        }
    }
}

/// One connection counted against its node's cap; uncounted when dropped.
struct NodeGuard {
    shared: Arc<Shared>,
    state: Arc<NodeState>,
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.per_node);
        if let Some(slot) = map.get_mut(&self.state.key) {
            slot.connections = slot.connections.saturating_sub(1);
            if slot.connections == 0 {
                map.remove(&self.state.key);
            }
        }
    }
}

/// An accepted TCP connection and what was read from it past the last
/// relay message (it belongs to the spliced stream).
struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
    _slot: OwnedSemaphorePermit,
}

/// A connection whose key is proven.
struct Authed {
    conn: Conn,
    key: PublicKey,
    node: NodeGuard,
}

/// A relay bound to its address, ready to [`run`](RelayServer::run).
pub struct RelayServer {
    listener: TcpListener,
    local: SocketAddr,
    shared: Arc<Shared>,
    /// Aborted (the endpoint stops) when the server is dropped or stops.
    metrics: Option<(SocketAddr, AbortOnDrop<()>)>,
}

impl fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayServer")
            .field("local", &self.local)
            .field("metrics", &self.metrics.as_ref().map(|m| m.0))
            .finish_non_exhaustive()
    }
}

impl RelayServer {
    /// Binds the listener (with `SO_REUSEADDR`, so a restarted relay gets
    /// its port back at once), opens the journal and starts the metrics
    /// endpoint, as configured.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound, the journal cannot be opened or a
    /// setting cannot work; the error says which.
    pub async fn bind(cfg: RelayConfig) -> Result<RelayServer, RelayServerError> {
        if cfg.max_connections == 0 || cfg.max_connections_per_node == 0 {
            return Err(RelayServerError::Config(
                "the connection caps must be at least 1".into(),
            ));
        }
        let listener =
            crate::net::bind_tcp(&cfg.listen)
                .await
                .map_err(|source| RelayServerError::Listen {
                    addr: cfg.listen.clone(),
                    source,
                })?;
        let local = listener
            .local_addr()
            .map_err(|source| RelayServerError::Listen {
                addr: cfg.listen.clone(),
                source,
            })?;
        let journal = match &cfg.journal {
            Some(p) => Some(Journal::open(p).await?),
            None => None,
        };
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            nodes: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            per_node: Mutex::new(HashMap::new()),
            unauth: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            journal,
            next_id: AtomicU64::new(1),
            cfg,
        });
        let metrics = match &shared.cfg.metrics {
            Some(addr) => {
                let mut registry = Registry::default();
                registry.register_collector(Box::new(RelayCollector {
                    shared: shared.clone(),
                }));
                let served = crate::metrics::serve_registry(addr, registry)
                    .await
                    .map_err(|source| RelayServerError::Metrics {
                        addr: addr.clone(),
                        source,
                    })?;
                Some((served.0, AbortOnDrop(served.1)))
            }
            None => None,
        };
        shared.journal(
            Event::RelayStarted,
            json!({
                "listen": local.to_string(),
                "max_connections": shared.cfg.max_connections,
                "max_connections_per_node": shared.cfg.max_connections_per_node,
                "max_rate_per_node": shared.cfg.max_rate_per_node,
                "max_unauthenticated_per_address": shared.cfg.max_unauthenticated_per_address,
                "circuit_idle_timeout_secs": shared.cfg.circuit_idle_timeout.map(|d| d.as_secs_f64()),
                "allow_list": shared.cfg.allow.len(),
            }),
        );
        Ok(RelayServer {
            listener,
            local,
            shared,
            metrics,
        })
    }

    /// The address the relay listens on (with the real port when bound to
    /// port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where `/metrics` is served, if it is.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.0)
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// Starts [`run`](RelayServer::run) on a task; the handle reads the
    /// counters and stops it.
    #[must_use]
    pub fn spawn(self) -> RelayHandle {
        let (stop, rx) = watch::channel(false);
        let local = self.local;
        let metrics = self.metrics_addr();
        let shared = self.shared.clone();
        let task = tokio::spawn(self.run(rx));
        RelayHandle {
            local,
            metrics,
            shared,
            stop,
            task,
        }
    }

    /// Serves until `stop` becomes `true` (or its sender is dropped), then
    /// closes every connection, stops the metrics endpoint and flushes the
    /// journal.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let RelayServer {
            listener,
            local,
            shared,
            metrics,
        } = self;
        info!(%local, "relay listening");
        let mut conns = JoinSet::new();
        while let Some((stream, addr)) =
            crate::bridge::accept_next(&listener, &mut stop, "relay").await
        {
            while conns.try_join_next().is_some() {}
            shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
            let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
            match shared.slots.clone().try_acquire_owned() {
                Ok(slot) => match shared.enter_unauth(addr.ip()) {
                    Some(unauth) => {
                        conns.spawn(handle(shared.clone(), stream, addr, slot, unauth));
                    }
                    None => {
                        shared.refused(Refusal::Address);
                        debug!(%addr, "relay: unauthenticated connections per address at cap, refusing");
                        drop(slot);
                        if let Ok(p) = shared.refusing.clone().try_acquire_owned() {
                            conns.spawn(refuse_at_cap(
                                shared.clone(),
                                stream,
                                addr,
                                p,
                                Refusal::Address,
                            ));
                        }
                    }
                },
                Err(_) => {
                    shared.refused(Refusal::Capacity);
                    debug!(%addr, "relay: connection cap reached, refusing");
                    if let Ok(p) = shared.refusing.clone().try_acquire_owned() {
                        conns.spawn(refuse_at_cap(
                            shared.clone(),
                            stream,
                            addr,
                            p,
                            Refusal::Capacity,
                        ));
                    }
                }
            }
        }
        drop(listener);
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        drop(metrics);
        let s = shared.stats();
        shared.journal(
            Event::RelayStopped,
            json!({ "circuits_total": s.circuits_total, "bytes": s.bytes }),
        );
        if let Some(j) = &shared.journal {
            j.checkpoint().await;
        }
        info!(%local, "relay stopped");
    }
}

/// A running relay (from [`RelayServer::spawn`]). Dropping it stops the
/// relay as [`shutdown`](RelayHandle::shutdown) does, without waiting.
#[derive(Debug)]
pub struct RelayHandle {
    local: SocketAddr,
    metrics: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// The address the relay listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where `/metrics` is served, if it is.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// The node keys with connections open now, sorted by key.
    #[must_use]
    pub fn nodes(&self) -> Vec<NodeStats> {
        self.shared.nodes()
    }

    /// Stops the relay: closes the listener and every connection, flushes
    /// the journal; returns when all that is done.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// `TCP_NODELAY`, large buffers and keepalive on a relay socket.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_send_buffer_size(SOCKET_BUF);
    let _ = sock.set_recv_buffer_size(SOCKET_BUF);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// Answers a connection over the total cap, or over its address's cap of
/// unauthenticated connections, with ERROR and closes it.
async fn refuse_at_cap(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    addr: SocketAddr,
    _p: OwnedSemaphorePermit,
    why: Refusal,
) {
    let msg = if why == Refusal::Address {
        format!(
            "{} already has {} connections to this relay that have not authenticated, its cap; \
             authenticate or close them first (the cap counts IPv6 addresses by /64)",
            address_bucket(addr.ip()),
            shared.cfg.max_unauthenticated_per_address
        )
    } else {
        format!(
            "this relay is at its cap of {} connections; try again later or use another relay",
            shared.cfg.max_connections
        )
    };
    send_error(&mut stream, ERR_CAPACITY, &msg).await;
    debug!(%addr, "relay: refused at the connection cap");
}

/// Writes ERROR, closes the write side, and drains input for a moment so
/// the ERROR is not destroyed by a reset.
async fn send_error(stream: &mut TcpStream, code: u8, message: &str) {
    let mut out = Vec::with_capacity(message.len() + 4);
    Msg::Error {
        code,
        message: message.to_owned(),
    }
    .encode(&mut out);
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    if !matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    msg.encode(&mut out);
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&out)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the node did not take a relay message within 10 s",
        )),
    }
}

/// How a handshake ended without a proven key.
enum HsEnd {
    /// The node closed or the socket failed: nothing to answer.
    Gone(String),
    /// Answer with ERROR, then close.
    Refuse(Refusal, String),
    /// A failed proof (already counted and journaled): answer ERR_AUTH.
    Auth(String),
}

/// Reads one relay message from `conn`, keeping bytes past it in
/// `conn.buf`.
async fn read_msg(conn: &mut Conn) -> Result<Msg, HsEnd> {
    loop {
        match Msg::decode(&conn.buf) {
            Ok(Some((msg, used))) => {
                conn.buf.drain(..used);
                return Ok(msg);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(HsEnd::Refuse(
                    Refusal::Protocol,
                    format!("{e}; this is a POOL relay (POOL-RELAY/{VERSION})"),
                ))
            }
        }
        let mut tmp = [0u8; 2048];
        let n = conn
            .stream
            .read(&mut tmp)
            .await
            .map_err(|e| HsEnd::Gone(e.to_string()))?;
        if n == 0 {
            return Err(HsEnd::Gone("closed during the handshake".into()));
        }
        conn.buf.extend_from_slice(&tmp[..n]);
    }
}

/// HELLO, CHALLENGE, AUTH: the proven key and what it wants.
async fn handshake(shared: &Shared, conn: &mut Conn) -> Result<(PublicKey, Intent), HsEnd> {
    match read_msg(conn).await? {
        Msg::Hello { version } if version == VERSION => {}
        Msg::Hello { version } => {
            return Err(HsEnd::Refuse(
                Refusal::Protocol,
                format!("this relay speaks POOL-RELAY/{VERSION}, the node POOL-RELAY/{version}: upgrade the older side"),
            ))
        }
        _ => {
            return Err(HsEnd::Refuse(
                Refusal::Protocol,
                "expected HELLO first; this is a POOL relay".into(),
            ))
        }
    }
    let challenge = Challenge::new(&mut OsRng);
    write_msg(&mut conn.stream, &challenge.msg())
        .await
        .map_err(|e| HsEnd::Gone(e.to_string()))?;
    let Msg::Auth { key, proof, intent } = read_msg(conn).await? else {
        return Err(HsEnd::Refuse(
            Refusal::Protocol,
            "expected AUTH after CHALLENGE".into(),
        ));
    };
    if !challenge.verify(&key, &proof, &intent) {
        shared
            .counters
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        warn!(addr = %conn.addr, claimed = %key, "relay: proof of key ownership failed");
        shared.journal_bulk(
            Event::RelayAuthFailed,
            json!({
                "addr": conn.addr.to_string(),
                "claimed_key": key.to_string(),
                "reason": "wrong proof of key ownership",
            }),
        );
        return Err(HsEnd::Auth(format!(
            "the proof for key {key} is wrong: this node does not hold that key's secret (check the key file it uses)"
        )));
    }
    if !shared.cfg.allow.is_empty() && !shared.cfg.allow.contains(&key) {
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::NotAllowed.label(),
                "addr": conn.addr.to_string(),
                "key": key.to_string(),
            }),
        );
        return Err(HsEnd::Refuse(
            Refusal::NotAllowed,
            format!("key {key} is not served by this relay (ask its operator to add it with --allow or --authorized)"),
        ));
    }
    Ok((key, intent))
}

/// One accepted connection, from HELLO to close.
async fn handle(
    shared: Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    slot: OwnedSemaphorePermit,
    unauth: UnauthGuard,
) {
    tune(&stream);
    let mut conn = Conn {
        stream,
        addr,
        buf: Vec::new(),
        _slot: slot,
    };
    let hs =
        tokio::time::timeout(shared.cfg.handshake_timeout, handshake(&shared, &mut conn)).await;
    let (key, intent) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(HsEnd::Gone(why))) => {
            debug!(%addr, why, "relay: connection ended during the handshake");
            return;
        }
        Ok(Err(HsEnd::Auth(message))) => {
            send_error(&mut conn.stream, ERR_AUTH, &message).await;
            return;
        }
        Ok(Err(HsEnd::Refuse(why, message))) => {
            shared.refused(why);
            debug!(%addr, reason = why.label(), message, "relay: refused during the handshake");
            send_error(&mut conn.stream, why.code(), &message).await;
            return;
        }
        Err(_) => {
            shared.refused(Refusal::Protocol);
            debug!(%addr, "relay: handshake timed out");
            let message = format!(
                "no valid HELLO and AUTH within {} s",
                shared.cfg.handshake_timeout.as_secs_f32()
            );
            send_error(&mut conn.stream, ERR_PROTOCOL, &message).await;
            return;
        }
    };
    // Authenticated: no longer counted against its address (a refusal
    // above keeps it counted while the ERROR lingers).
    drop(unauth);
    let Some(node) = shared.enter_node(key) else {
        shared.refused(Refusal::Capacity);
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::Capacity.label(),
                "addr": addr.to_string(),
                "key": key.to_string(),
                "cap": "max_connections_per_node",
            }),
        );
        let message = format!(
            "node {key} already has {} connections to this relay, its cap; close some or ask the operator to raise --max-per-node",
            shared.cfg.max_connections_per_node
        );
        send_error(&mut conn.stream, ERR_CAPACITY, &message).await;
        return;
    };
    let authed = Authed { conn, key, node };
    match intent {
        Intent::Register => control(shared, authed).await,
        Intent::Connect(peer) => connect(shared, authed, peer).await,
        Intent::Accept(circuit) => accept(shared, authed, circuit).await,
    }
}

/// A registered node's control connection: INCOMING out, PING / PONG.
async fn control(shared: Arc<Shared>, a: Authed) {
    let Authed { conn, key, node } = a;
    let addr = conn.addr;
    let (tx, mut rx) = mpsc::channel(CONTROL_QUEUE);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let old = lock(&shared.nodes).insert(key, Registration { id, tx });
    if let Some(old) = old {
        // Dropping its sender ends it too, should its queue be full.
        let _ = old.tx.try_send(Ctl::Replaced);
    }
    info!(node = %key, %addr, "relay: node registered");
    shared.journal(
        Event::NodeRegistered,
        json!({ "key": key.to_string(), "addr": addr.to_string() }),
    );
    let (mut rd, mut wr) = conn.stream.into_split();
    let mut buf = conn.buf;
    let reason = control_loop(&shared, &mut rd, &mut wr, &mut buf, &mut rx, addr).await;
    {
        let mut nodes = lock(&shared.nodes);
        if nodes.get(&key).is_some_and(|r| r.id == id) {
            nodes.remove(&key);
        }
    }
    info!(node = %key, %addr, reason, "relay: node unregistered");
    shared.journal(
        Event::NodeUnregistered,
        json!({ "key": key.to_string(), "addr": addr.to_string(), "reason": reason }),
    );
    drop(node);
}

async fn control_loop(
    shared: &Shared,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut Vec<u8>,
    rx: &mut mpsc::Receiver<Ctl>,
    addr: SocketAddr,
) -> &'static str {
    let idle = shared.cfg.control_idle_timeout;
    if write_msg(wr, &Msg::Welcome { observed: addr })
        .await
        .is_err()
    {
        return "could not send WELCOME";
    }
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut tmp = [0u8; 2048];
    loop {
        loop {
            match Msg::decode(buf) {
                Ok(Some((msg, used))) => {
                    buf.drain(..used);
                    match msg {
                        Msg::Ping(t) => {
                            if write_msg(wr, &Msg::Pong(t)).await.is_err() {
                                return "could not send PONG";
                            }
                        }
                        Msg::Pong(_) => {}
                        _ => {
                            shared.refused(Refusal::Protocol);
                            let _ = write_msg(
                                wr,
                                &Msg::Error {
                                    code: ERR_PROTOCOL,
                                    message: "only PING and PONG may follow WELCOME on a control connection".into(),
                                },
                            )
                            .await;
                            return "protocol error";
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    shared.refused(Refusal::Protocol);
                    let _ = write_msg(
                        wr,
                        &Msg::Error {
                            code: ERR_PROTOCOL,
                            message: e.to_string(),
                        },
                    )
                    .await;
                    return "protocol error";
                }
            }
        }
        tokio::select! {
            r = rd.read(&mut tmp) => match r {
                Ok(0) => return "closed by the node",
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    deadline = tokio::time::Instant::now() + idle;
                }
                Err(_) => return "connection failed",
            },
            c = rx.recv() => match c {
                Some(Ctl::Incoming { circuit, from }) => {
                    if write_msg(wr, &Msg::Incoming { circuit, from }).await.is_err() {
                        return "could not send INCOMING";
                    }
                }
                Some(Ctl::Replaced) | None => {
                    let _ = write_msg(
                        wr,
                        &Msg::Error {
                            code: ERR_PROTOCOL,
                            message: "replaced by a newer registration of this key".into(),
                        },
                    )
                    .await;
                    let _ = wr.shutdown().await;
                    return "replaced by a newer registration";
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                let _ = write_msg(
                    wr,
                    &Msg::Error {
                        code: ERR_PROTOCOL,
                        message: format!("control connection silent for {} s (PING every 15 s)", idle.as_secs()),
                    },
                )
                .await;
                return "silent too long";
            }
        }
    }
}

/// A CONNECT: find the peer, offer it the circuit, wait for its ACCEPT,
/// splice.
async fn connect(shared: Arc<Shared>, mut a: Authed, peer: PublicKey) {
    let addr = a.conn.addr;
    let key = a.key;
    let peer_tx = lock(&shared.nodes).get(&peer).map(|r| r.tx.clone());
    let Some(peer_tx) = peer_tx else {
        shared.refused(Refusal::UnknownPeer);
        debug!(node = %key, %peer, "relay: CONNECT to an unregistered key");
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::UnknownPeer.label(),
                "addr": addr.to_string(),
                "key": key.to_string(),
                "peer": peer.to_string(),
            }),
        );
        let message = format!("peer {peer} is not registered at this relay (it is not running, not connected to this relay, or uses another one)");
        send_error(&mut a.conn.stream, ERR_UNKNOWN_PEER, &message).await;
        return;
    };
    let mut circuit = [0u8; 16];
    OsRng.fill_bytes(&mut circuit);
    let (tx, rx) = oneshot::channel();
    lock(&shared.pending).insert(circuit, Pending { acceptor: peer, tx });
    let offered = peer_tx
        .try_send(Ctl::Incoming { circuit, from: key })
        .is_ok();
    drop(peer_tx);
    // Waits for the ACCEPT, unless the node hangs up first (bytes it sends
    // meanwhile stay in the socket for the circuit). `None`: it hung up.
    let accepted = if offered {
        let stream = &a.conn.stream;
        let gone = async {
            let mut one = [0u8; 1];
            if matches!(stream.peek(&mut one).await, Ok(n) if n > 0) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(shared.cfg.accept_timeout, rx) => Some(r.ok().and_then(Result::ok)),
            () = gone => None,
        }
    } else {
        Some(None)
    };
    let Some(accepted) = accepted else {
        lock(&shared.pending).remove(&circuit);
        debug!(node = %key, %peer, "relay: node left before its CONNECT was accepted");
        return;
    };
    lock(&shared.pending).remove(&circuit);
    let Some(b) = accepted else {
        shared.refused(Refusal::NoAnswer);
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::NoAnswer.label(),
                "addr": addr.to_string(),
                "key": key.to_string(),
                "peer": peer.to_string(),
            }),
        );
        let message = if offered {
            format!(
                "peer {peer} did not accept within {} s (it is registered but may be overloaded or its control connection broken); try again",
                shared.cfg.accept_timeout.as_secs_f32()
            )
        } else {
            format!("peer {peer} is not taking control messages (its queue is full); try again")
        };
        debug!(node = %key, %peer, "relay: no ACCEPT");
        send_error(&mut a.conn.stream, ERR_NO_ANSWER, &message).await;
        return;
    };
    splice(shared, a, b, circuit).await;
}

/// An ACCEPT: hand the connection to the waiting CONNECT.
async fn accept(shared: Arc<Shared>, mut b: Authed, circuit: CircuitId) {
    let addr = b.conn.addr;
    let key = b.key;
    enum Found {
        Ok(Pending),
        Unknown,
        WrongKey(PublicKey),
    }
    let found = {
        let mut pending = lock(&shared.pending);
        match pending.get(&circuit) {
            None => Found::Unknown,
            Some(p) if p.acceptor != key => Found::WrongKey(p.acceptor),
            Some(_) => match pending.remove(&circuit) {
                Some(p) => Found::Ok(p),
                None => Found::Unknown,
            },
        }
    };
    let (code, message, reason) = match found {
        Found::Ok(p) => match p.tx.send(b) {
            Ok(()) => return,
            Err(back) => {
                b = back;
                (
                    ERR_NO_ANSWER,
                    "the connecting node gave up on this circuit".to_owned(),
                    Refusal::NoAnswer,
                )
            }
        },
        Found::Unknown => (
            ERR_PROTOCOL,
            format!(
                "circuit {} is unknown or has expired (answer INCOMING within {} s)",
                hex(&circuit),
                shared.cfg.accept_timeout.as_secs_f32()
            ),
            Refusal::Protocol,
        ),
        Found::WrongKey(want) => {
            warn!(node = %key, %addr, "relay: ACCEPT of a circuit offered to another key");
            (
                ERR_AUTH,
                format!(
                    "circuit {} was offered to {want}, not to {key}",
                    hex(&circuit)
                ),
                Refusal::Protocol,
            )
        }
    };
    shared.refused(reason);
    shared.journal_bulk(
        Event::RelayRefused,
        json!({
            "reason": if code == ERR_AUTH { "wrong_acceptor" } else { reason.label() },
            "addr": addr.to_string(),
            "key": key.to_string(),
            "circuit": hex(&circuit),
        }),
    );
    send_error(&mut b.conn.stream, code, &message).await;
}

fn hex(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 0xf)]));
    }
    s
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a circuit direction ended: `Ok` for a clean EOF (carried to the
/// other side as a half-close), `Err` for a reset or failure (ends both).
type PumpResult = std::io::Result<()>;

/// WELCOME both sides, then copy both directions until both end (or one
/// fails, which ends both).
async fn splice(shared: Arc<Shared>, a: Authed, b: Authed, circuit: CircuitId) {
    let Authed {
        conn: mut ca,
        key: ka,
        node: na,
    } = a;
    let Authed {
        conn: mut cb,
        key: kb,
        node: nb,
    } = b;
    let (welcome_a, welcome_b) = (
        Msg::Welcome { observed: ca.addr },
        Msg::Welcome { observed: cb.addr },
    );
    let (wa, wb) = tokio::join!(
        write_msg(&mut ca.stream, &welcome_a),
        write_msg(&mut cb.stream, &welcome_b),
    );
    if wa.is_err() || wb.is_err() {
        debug!(from = %ka, to = %kb, "relay: circuit ended before WELCOME was sent");
        return;
    }
    let id = hex(&circuit);
    let c = &shared.counters;
    c.circuits.fetch_add(1, Ordering::Relaxed);
    c.circuits_total.fetch_add(1, Ordering::Relaxed);
    info!(circuit = %id, from = %ka, to = %kb, "relay: circuit opened");
    shared.journal(
        Event::CircuitOpened,
        json!({
            "circuit": id,
            "from": ka.to_string(),
            "from_addr": ca.addr.to_string(),
            "to": kb.to_string(),
            "to_addr": cb.addr.to_string(),
        }),
    );
    let started = Instant::now();
    let a_to_b = Arc::new(AtomicU64::new(0));
    let b_to_a = Arc::new(AtomicU64::new(0));
    let (ra, wa) = ca.stream.into_split();
    let (rb, wb) = cb.stream.into_split();
    // Each direction on its own task (both cores can copy), aborted with
    // this one (the relay stopping aborts connection tasks).
    let (stop_1, stop_2) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (idle_1, idle_2) = (stop_1.clone(), stop_2.clone());
    // Milliseconds after `started` of the last byte read either way.
    let activity = Arc::new(AtomicU64::new(0));
    let t1 = AbortOnDrop(tokio::spawn(pump(
        ra,
        std::mem::take(&mut ca.buf),
        wb,
        Direction {
            shared: shared.clone(),
            from: na.state.clone(),
            to: nb.state.clone(),
            count: a_to_b.clone(),
            stop: stop_1.clone(),
            stop_other: stop_2.clone(),
            activity: activity.clone(),
            started,
        },
    )));
    let t2 = AbortOnDrop(tokio::spawn(pump(
        rb,
        std::mem::take(&mut cb.buf),
        wa,
        Direction {
            shared: shared.clone(),
            from: nb.state.clone(),
            to: na.state.clone(),
            count: b_to_a.clone(),
            stop: stop_2,
            stop_other: stop_1,
            activity: activity.clone(),
            started,
        },
    )));
    let both = async { tokio::join!(t1.join(), t2.join()) };
    tokio::pin!(both);
    let idle_limit = shared.cfg.circuit_idle_timeout;
    let watchdog = async {
        let Some(limit) = idle_limit else {
            return std::future::pending::<()>().await;
        };
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let due = tokio::time::Instant::from_std(started + last + limit);
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let mut idled = false;
    let (r1, r2) = tokio::select! {
        r = &mut both => r,
        () = watchdog => {
            idled = true;
            idle_1.notify_one();
            idle_2.notify_one();
            both.await
        }
    };
    let why = |r: Result<PumpResult, tokio::task::JoinError>| match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    let reason = match (why(r1), why(r2)) {
        _ if idled => {
            c.idle_closed.fetch_add(1, Ordering::Relaxed);
            format!(
                "idle: no byte either way for {} s",
                idle_limit.unwrap_or_default().as_secs_f64()
            )
        }
        (None, None) => "closed".to_owned(),
        (Some(e), None) | (None, Some(e)) => e,
        // One failed and stopped the other: name the first cause.
        (Some(e1), Some(e2)) => {
            if e1 == STOPPED {
                e2
            } else {
                e1
            }
        }
    };
    c.circuits.fetch_sub(1, Ordering::Relaxed);
    let (ab, ba) = (
        a_to_b.load(Ordering::Relaxed),
        b_to_a.load(Ordering::Relaxed),
    );
    let secs = started.elapsed().as_secs_f64();
    info!(circuit = %id, from = %ka, to = %kb, bytes_from_to = ab, bytes_to_from = ba, secs, %reason, "relay: circuit closed");
    shared.journal(
        Event::CircuitClosed,
        json!({
            "circuit": id,
            "from": ka.to_string(),
            "to": kb.to_string(),
            "bytes_from_to": ab,
            "bytes_to_from": ba,
            "duration_ms": (secs * 1000.0) as u64,
            "reason": reason,
        }),
    );
    drop((na, nb, ca._slot, cb._slot));
}

/// What one circuit direction counts into and how it is stopped.
struct Direction {
    shared: Arc<Shared>,
    from: Arc<NodeState>,
    to: Arc<NodeState>,
    count: Arc<AtomicU64>,
    /// Notified when the other direction failed.
    stop: Arc<Notify>,
    /// Notifies the other direction when this one fails.
    stop_other: Arc<Notify>,
    /// Milliseconds after `started` of the circuit's last byte read.
    activity: Arc<AtomicU64>,
    started: Instant,
}

impl Direction {
    fn moved(&self, n: usize) {
        let n = n as u64;
        self.count.fetch_add(n, Ordering::Relaxed);
        self.shared.counters.bytes.fetch_add(n, Ordering::Relaxed);
        self.from.sent.fetch_add(n, Ordering::Relaxed);
        self.to.received.fetch_add(n, Ordering::Relaxed);
    }

    async fn limit(&self, n: usize) {
        let wait = self
            .from
            .bucket
            .as_ref()
            .map(|b| lock(b).take(Instant::now(), n))
            .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// One circuit direction: `first` (bytes read with the handshake), then
/// everything `r` sends, into `w`. EOF is carried as a half-close; a reset
/// or failure on either socket resets both (no FIN first) and stops the
/// other direction.
async fn pump(
    mut r: OwnedReadHalf,
    first: Vec<u8>,
    mut w: OwnedWriteHalf,
    d: Direction,
) -> PumpResult {
    let mut buf = first;
    let mut n = buf.len();
    let result = loop {
        if n > 0 {
            d.limit(n).await;
            let written = tokio::select! {
                biased;
                () = d.stop.notified() => break Err(stopped()),
                w = w.write_all(&buf[..n]) => w,
            };
            if let Err(e) = written {
                break Err(e);
            }
            d.moved(n);
        }
        if buf.len() < SPLICE_BUF {
            buf.resize(SPLICE_BUF, 0);
        }
        let read = tokio::select! {
            biased;
            () = d.stop.notified() => break Err(stopped()),
            r = r.read(&mut buf) => r,
        };
        n = match read {
            Ok(0) => return w.shutdown().await,
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        let ms = d.started.elapsed().as_millis() as u64;
        d.activity.fetch_max(ms, Ordering::Relaxed);
    };
    // Both sockets close abortively once both directions have let go;
    // `forget` keeps tokio from sending FIN when the write half drops.
    abort_on_close(r.as_ref());
    abort_on_close(w.as_ref());
    w.forget();
    d.stop_other.notify_one();
    result
}

const STOPPED: &str = "the other direction of the circuit failed";

fn stopped() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, STOPPED)
}

/// Abortive close: once the socket is dropped its TCP peer sees RST.
fn abort_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// The relay's metrics, read from its counters on each scrape.
struct RelayCollector {
    shared: Arc<Shared>,
}

impl fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayCollector").finish_non_exhaustive()
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstGauge::new(v as i64);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = self.shared.stats();
        let e = &mut encoder;
        gauge(e, "pool_relay_nodes", "Nodes registered now.", s.nodes)?;
        gauge(
            e,
            "pool_relay_connections",
            "TCP connections open now (handshaking, control and circuits).",
            s.connections,
        )?;
        counter(
            e,
            "pool_relay_connections_accepted",
            "TCP connections accepted, including refused ones.",
            s.connections_accepted,
        )?;
        gauge(
            e,
            "pool_relay_pending",
            "CONNECTs waiting for the peer's ACCEPT now.",
            s.pending,
        )?;
        gauge(
            e,
            "pool_relay_circuits_open",
            "Circuits spliced now.",
            s.circuits,
        )?;
        counter(
            e,
            "pool_relay_circuits",
            "Circuits spliced since start.",
            s.circuits_total,
        )?;
        counter(
            e,
            "pool_relay_bytes",
            "Bytes forwarded through circuits, both directions.",
            s.bytes,
        )?;
        counter(
            e,
            "pool_relay_auth_failures",
            "Proofs of key ownership that failed.",
            s.auth_failures,
        )?;
        counter(
            e,
            "pool_relay_circuits_idle_closed",
            "Circuits closed because no byte crossed them for the idle timeout.",
            s.circuits_idle_closed,
        )?;
        gauge(
            e,
            "pool_relay_unauthenticated",
            "Connections open now that have not authenticated yet.",
            s.unauthenticated,
        )?;
        let mut family = e.encode_descriptor(
            "pool_relay_refused",
            "Connections refused, by reason.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let c = &self.shared.counters;
        for why in Refusal::ALL {
            let m = ConstCounter::new(c.refused[why as usize].load(Ordering::Relaxed));
            m.encode(family.encode_family(&[("reason", why.label())])?)?;
        }
        if let Some(j) = &self.shared.journal {
            let js = j.stats();
            counter(
                e,
                "pool_relay_journal_entries_written",
                "Change journal entries written.",
                js.written,
            )?;
            counter(
                e,
                "pool_relay_journal_entries_failed",
                "Change journal entries lost (queue full or the disk refused them).",
                js.dropped.saturating_add(js.failed),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_delays_only_past_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 1000.0,
            burst: 1000.0,
            tokens: 1000.0,
            last: t0,
        };
        assert_eq!(b.take(t0, 1000), Duration::ZERO);
        let wait = b.take(t0, 500);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // A second later the debt is paid and 500 tokens are back.
        assert_eq!(b.take(t0 + Duration::from_secs(1), 500), Duration::ZERO);
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
