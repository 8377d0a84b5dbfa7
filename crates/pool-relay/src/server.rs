//! The listener: [`RelayServer`] binds, accepts under the caps and
//! hands each connection on; [`RelayHandle`] reads and stops a running
//! relay.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_core::relay::ERR_CAPACITY;
use pool_journal::{Event, Journal};
use pool_node::net::address_bucket;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info};

use crate::circuit::AbortOnDrop;
use crate::config::{RelayConfig, RelayServerError};
use crate::conn::{handle, send_error};
use crate::metrics::RelayCollector;
use crate::state::{Counters, NodeStats, Refusal, RelayStats, Shared};

/// Socket send and receive buffers.
pub(crate) const SOCKET_BUF: usize = 4 << 20;
/// Refusals (connection cap reached) being answered at once; beyond this
/// connections are just closed.
pub(crate) const MAX_REFUSING: usize = 64;

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
        let listener = pool_node::net::bind_tcp(&cfg.listen)
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
            Some(p) => Some(
                Journal::open_with(
                    p,
                    pool_journal::JournalConfig::default()
                        .rotate_at_bytes(cfg.journal_rotate_bytes),
                )
                .await?,
            ),
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
                let served = pool_node::metrics::serve_registry(addr, registry)
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

    /// The relay's journal, if it keeps one (to rotate it while it runs).
    #[must_use]
    pub fn journal(&self) -> Option<Journal> {
        self.shared.journal.clone()
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
            pool_node::net::accept_next(&listener, &mut stop, "relay").await
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
pub(crate) fn tune(s: &TcpStream) {
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
pub(crate) async fn refuse_at_cap(
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
