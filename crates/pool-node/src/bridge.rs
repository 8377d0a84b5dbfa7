//! The TCP bridge: `tcp2pool` accepts TCP connections and carries each as
//! one stream of a shared session to a peer; at the far end the
//! [`Router`](crate::router::Router) hands each stream to the `[[pool2tcp]]`
//! target ([`TcpTarget`](crate::services::TcpTarget)) its preamble names.
//!
//! Every bridge stream starts with a small preamble from the `tcp2pool`
//! end: the original client's address (for PROXY protocol v2 at the
//! target) and the service name that selects the target. The target itself
//! is never chosen by the peer.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_net::{Endpoint, PublicKey, RecvStream, SendStream, Session};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tracing::{debug, info, warn};

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

/// Which way a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Fin,
    Reset,
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Abortive close: once the socket is dropped the TCP peer sees RST, as
/// if the far end had reset.
pub(crate) fn abort_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

fn reset_tcp(w: &OwnedWriteHalf) {
    abort_on_close(w.as_ref());
}

/// The most one read of a bridged socket puts into the session at once
/// (then the other directions and sessions get their turn).
const UP_BATCH: usize = 256 << 10;

/// Carries bytes both ways between a TCP connection and a stream until
/// both directions end, carrying FIN and reset faithfully.
pub(crate) async fn splice(
    tcp: TcpStream,
    mut rs: RecvStream,
    mut ws: SendStream,
    idle: Option<Duration>,
    stats: &BridgeStats,
) {
    let (tr, mut tw): (OwnedReadHalf, OwnedWriteHalf) = tcp.into_split();
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);

    let up = async {
        // What the socket has goes straight into the session's replay
        // buffer (where it waits for the peer's acknowledgement anyway): no
        // buffer of our own, no copy through it. The stream waits for
        // flow-control credit first, so a slow peer holds back the socket.
        loop {
            if let Err(e) = tr.readable().await {
                if is_reset(&e) {
                    ws.reset(RESET_TCP);
                }
                return End::Reset;
            }
            let mut tcp_failed = false;
            let res = ws
                .write_with(UP_BATCH, |rooms| {
                    let r = tr.try_read_vectored(rooms);
                    tcp_failed = r.is_err();
                    r
                })
                .await;
            match res {
                Ok(0) => {
                    let _ = ws.shutdown().await;
                    return End::Fin;
                }
                Ok(n) => {
                    touch();
                    stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                // Readiness was stale: wait for the socket again.
                Err(e) if tcp_failed && e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if tcp_failed => {
                    if is_reset(&e) {
                        ws.reset(RESET_TCP);
                    }
                    return End::Reset;
                }
                Err(_) => return End::Reset,
            }
        }
    };
    let down = async {
        // What arrived on the stream goes straight from the session's
        // buffer to the socket (one copy fewer than reading it into a
        // buffer of our own first); it stays there until the socket takes
        // it, so a slow target holds back the peer through flow control.
        loop {
            let mut tcp_failed = false;
            let res = rs
                .read_with(|a, b| {
                    let r = tw.try_write_vectored(&[IoSlice::new(a), IoSlice::new(b)]);
                    tcp_failed = r.is_err();
                    r
                })
                .await;
            match res {
                Ok(0) => {
                    let _ = tw.shutdown().await;
                    return End::Fin;
                }
                Ok(n) => {
                    touch();
                    stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if tcp_failed && e.kind() == std::io::ErrorKind::WouldBlock => {
                    if tw.writable().await.is_err() {
                        return End::Reset;
                    }
                }
                Err(e) if tcp_failed => {
                    if is_reset(&e) {
                        rs.reset(RESET_TCP);
                    }
                    return End::Reset;
                }
                Err(_) => {
                    reset_tcp(&tw);
                    return End::Reset;
                }
            }
        }
    };
    let idle_watch = async {
        let Some(limit) = idle else {
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::time::sleep(limit / 4).await;
            let quiet = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
            if quiet >= limit.as_millis() as u64 {
                return;
            }
        }
    };
    let reset = {
        tokio::pin!(up, down, idle_watch);
        let (mut up_end, mut down_end) = (None, None);
        loop {
            if up_end.is_some() && down_end.is_some() {
                break false;
            }
            tokio::select! {
                e = &mut up, if up_end.is_none() => {
                    up_end = Some(e);
                    if e == End::Reset { break true; }
                }
                e = &mut down, if down_end.is_none() => {
                    down_end = Some(e);
                    if e == End::Reset { break true; }
                }
                () = &mut idle_watch => {
                    debug!("idle timeout: resetting the connection");
                    break true;
                }
            }
        }
    };
    if reset {
        rs.reset(RESET_TCP);
        reset_tcp(&tw);
    }
    // Dropping an `OwnedWriteHalf` shuts the write side down first, which
    // sends a FIN ahead of the RST: the peer would read a clean end of
    // stream instead of a reset. Close the socket with the read half only.
    tw.forget();
    drop(tr);
}

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
