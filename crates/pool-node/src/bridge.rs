//! The TCP bridge: `tcp2pool` accepts TCP connections and carries each as
//! one stream of a shared session to a peer; at the far end the
//! [`Router`](crate::router::Router) hands each stream to the `[[pool2tcp]]`
//! target ([`TcpTarget`](crate::services::TcpTarget)) its preamble names.
//!
//! Every bridge stream starts with a small preamble from the `tcp2pool`
//! end: the original client's address (for PROXY protocol v2 at the
//! target) and the service name that selects the target. The target itself
//! is never chosen by the peer.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pool_net::{Endpoint, PublicKey, Session};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tracing::{info, warn};

pub use crate::router::{RESET_IDLE, RESET_NO_SERVICE, RESET_TARGET_UNREACHABLE, RESET_TCP};
pub use crate::services::DISCARD_SERVICE;

pub use pool_net::Preamble;

/// The PROXY protocol v2 header for a TCP connection (so the target sees
/// the real client address).
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(src).octets());
            h.extend_from_slice(&v6(dst).octets());
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    h
}

/// Timeouts and limits shared by both ends.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Concurrent connections (further ones are refused at once).
    pub max_connections: usize,
    /// Dialling the peer (tcp2pool) or the target (pool2tcp).
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is reset.
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
        }
    }
}

/// Counters of one bridge.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Connections carried.
    pub connections: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections refused or failed (cap, peer or target down, timeouts).
    pub errors: AtomicU64,
    /// Bytes from TCP into POOL.
    pub bytes_in: AtomicU64,
    /// Bytes from POOL out to TCP.
    pub bytes_out: AtomicU64,
}

pub(crate) use crate::splice::{abort_on_close, splice};

/// The `tcp2pool` end.
#[derive(Clone, Debug)]
pub struct Tcp2PoolConfig {
    /// TCP address to listen on.
    pub listen: String,
    /// The peer's POOL address; empty: by key, through the relays.
    pub peer: String,
    /// The peer's public key.
    pub peer_key: PublicKey,
    /// Service name at the peer (empty: its default target).
    pub service: String,
    /// Limits.
    pub limits: Limits,
    /// `peer` is a director: ask it for a worker (docs/director.md).
    pub director: bool,
}

/// A running `tcp2pool` bridge: one shared session to the peer, opened on
/// the first connection and again whenever it has closed.
pub struct Tcp2Pool {
    me: std::sync::Weak<Tcp2Pool>,
    cfg: Tcp2PoolConfig,
    endpoint: Endpoint,
    session: Mutex<Option<Session>>,
    current: std::sync::Mutex<Option<Session>>,
    dialled: AtomicU64,
    permits: Arc<Semaphore>,
    /// Counters.
    pub stats: Arc<BridgeStats>,
}

impl Tcp2Pool {
    /// The session to the peer, if one is open (without waiting).
    pub fn session_now(&self) -> Option<Session> {
        self.current.lock().ok()?.clone().filter(|s| !s.is_closed())
    }

    /// Sessions this bridge has dialled.
    pub fn sessions_dialled(&self) -> u64 {
        self.dialled.load(Ordering::Relaxed)
    }

    /// A bridge dialling through `endpoint`.
    pub fn new(cfg: Tcp2PoolConfig, endpoint: Endpoint) -> Arc<Self> {
        Arc::new_cyclic(|me| Tcp2Pool {
            me: me.clone(),
            permits: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            cfg,
            endpoint,
            session: Mutex::new(None),
            current: std::sync::Mutex::new(None),
            dialled: AtomicU64::new(0),
            stats: Arc::default(),
        })
    }

    /// The session to the peer, if one is open.
    pub async fn session(&self) -> Option<Session> {
        self.session.lock().await.clone().filter(|s| !s.is_closed())
    }

    async fn get_session(&self) -> Result<Session, pool_net::Error> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let connect = async {
            if self.cfg.director {
                return self.placed().await;
            }
            if self.cfg.peer.is_empty() {
                self.endpoint.connect_key(self.cfg.peer_key).await
            } else {
                self.endpoint
                    .connect(&self.cfg.peer, self.cfg.peer_key)
                    .await
            }
        };
        let s = tokio::time::timeout(self.cfg.limits.connect_timeout, connect)
            .await
            .map_err(|_| pool_net::Error::Timeout {
                addr: self.cfg.peer.clone(),
                secs: self.cfg.limits.connect_timeout.as_secs(),
            })??;
        info!(peer = %self.cfg.peer, session = %s.id(), "bridge session up");
        *guard = Some(s.clone());
        self.dialled.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.current.lock() {
            *c = Some(s.clone());
        }
        Ok(s)
    }

    /// A session with the worker the director places us on, watched: when
    /// the director declares that worker lost, the bridge moves to the
    /// worker it names next and closes the old session (its streams are
    /// reset; they lived only on the dead worker).
    async fn placed(&self) -> Result<Session, pool_net::Error> {
        let (session, _) =
            pool_director::client::connect(&self.endpoint, &self.cfg.peer, self.cfg.peer_key)
                .await
                .map_err(|e| match e {
                    pool_director::client::PlaceError::Net(e) => e,
                    other => pool_net::Error::Io(std::io::Error::other(other.to_string())),
                })?;
        let me = self.me.clone();
        let first = session.clone();
        tokio::spawn(async move {
            let mut current = first;
            loop {
                let Some(b) = me.upgrade() else { return };
                let (ep, peer, key) = (b.endpoint.clone(), b.cfg.peer.clone(), b.cfg.peer_key);
                drop(b);
                let Some((next, p)) = pool_director::client::watch(&ep, &peer, key, &current).await
                else {
                    return;
                };
                let Some(b) = me.upgrade() else { return };
                warn!(lost = %current.peer_key().short(), to = %p.worker.short(),
                      "the director declared our worker lost; moved to another (streams in flight there are reset)");
                {
                    let mut guard = b.session.lock().await;
                    *guard = Some(next.clone());
                }
                if let Ok(mut c) = b.current.lock() {
                    *c = Some(next.clone());
                }
                b.dialled.fetch_add(1, Ordering::Relaxed);
                let old = std::mem::replace(&mut current, next);
                tokio::spawn(async move {
                    old.close("worker lost").await;
                });
            }
        });
        Ok(session)
    }

    /// Binds the TCP listener (dual-stack for `[::]`).
    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        crate::net::bind_tcp(&self.cfg.listen).await
    }

    /// Accepts connections until `stop` turns true, then returns (live
    /// connections go on; the caller waits for [`BridgeStats::active`]).
    pub async fn run(self: Arc<Self>, listener: Arc<TcpListener>, mut stop: watch::Receiver<bool>) {
        while let Some((sock, from)) =
            crate::net::accept_next(&listener, &mut stop, "tcp2pool").await
        {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(%from, max = self.cfg.limits.max_connections, "connection cap reached; refusing");
                abort_on_close(&sock);
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.stats.active.fetch_add(1, Ordering::Relaxed);
                me.handle(sock, from).await;
                me.stats.active.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }

    async fn handle(&self, sock: TcpStream, from: SocketAddr) {
        let _ = sock.set_nodelay(true);
        let local = sock.local_addr().unwrap_or(from);
        let stream = async {
            let s = self.get_session().await?;
            let st = s.open_stream().await?;
            Ok::<_, pool_net::Error>(st)
        };
        let stream = match stream.await {
            Ok(st) => st,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(%from, peer = %self.cfg.peer, "cannot reach the POOL peer: {e}");
                abort_on_close(&sock);
                return;
            }
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let (rs, mut ws) = stream.into_split();
        let pre = Preamble {
            source: from,
            destination: local,
            service: self.cfg.service.clone(),
        };
        if ws.write_all(&pre.encode()).await.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        splice(sock, rs, ws, self.cfg.limits.idle_timeout, &self.stats).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_layout() {
        let h = proxy_v2_header("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[1, 2, 3, 4]);
        assert_eq!(h.len(), 16 + 12);
    }
}
