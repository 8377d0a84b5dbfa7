//! The node's own services on POOL streams: `[[pool2tcp]]` targets and
//! `pool.discard`. (The shim's exposed ports are a service too, in
//! [`crate::shim::ShimExpose`]; the control service is in
//! [`crate::control`].) Each is registered with the [`Router`](crate::router::Router).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::bridge::{proxy_v2_header, splice, BridgeStats, Limits};
use crate::router::{Incoming, ServeFuture, Service, RESET_TARGET_UNREACHABLE};

/// The reserved service that reads a stream to its end, discards it and
/// answers with the byte count (8 bytes, big-endian): what
/// `pool migrate test` measures throughput against. Only authenticated,
/// trusted peers reach it, like every service.
pub const DISCARD_SERVICE: &str = "pool.discard";

/// `pool.discard`.
pub struct Discard;

impl Service for Discard {
    /// A measurement against this node: it does not move with a handoff.
    fn handoff_policy(&self) -> pool_net::StreamPolicy {
        pool_net::StreamPolicy::Reset
    }

    fn serve(self: Arc<Self>, s: Incoming) -> ServeFuture {
        Box::pin(async move {
            let (mut rs, mut ws) = (s.recv, s.send);
            // Counted where the bytes arrived: no buffer per stream (a
            // fleet's idle measurement streams would cost 64 KiB each).
            let mut n = 0u64;
            loop {
                match rs.read_with(|a, b| Ok(a.len() + b.len())).await {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(_) => return,
                }
            }
            let _ = ws.write_all(&n.to_be_bytes()).await;
            let _ = ws.shutdown().await;
        })
    }
}

/// One `[[pool2tcp]]` target: each stream is connected to a fixed
/// `HOST:PORT` that the peer can never choose.
pub struct TcpTarget {
    address: String,
    proxy_protocol: bool,
    limits: Limits,
    permits: Arc<Semaphore>,
    stats: Arc<BridgeStats>,
}

impl TcpTarget {
    /// A target counted in `stats` (shared by all of a node's targets).
    pub fn new(
        address: String,
        proxy_protocol: bool,
        limits: Limits,
        stats: Arc<BridgeStats>,
    ) -> Arc<Self> {
        Arc::new(TcpTarget {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            address,
            proxy_protocol,
            limits,
            stats,
        })
    }

    async fn handle(&self, s: Incoming) {
        let (rs, mut ws) = (s.recv, s.send);
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            warn!(target = %self.address, max = self.limits.max_connections, "connection cap reached; resetting stream");
            ws.reset(RESET_TARGET_UNREACHABLE);
            return;
        };
        let sock = match tokio::time::timeout(
            self.limits.connect_timeout,
            TcpStream::connect(&self.address),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(target = %self.address, "cannot connect to the target: {e}");
                ws.reset(RESET_TARGET_UNREACHABLE);
                return;
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(target = %self.address, "connecting to the target timed out");
                ws.reset(RESET_TARGET_UNREACHABLE);
                return;
            }
        };
        let _ = sock.set_nodelay(true);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let mut sock = sock;
        if self.proxy_protocol {
            let h = proxy_v2_header(s.preamble.source, s.preamble.destination);
            if sock.write_all(&h).await.is_err() {
                ws.reset(RESET_TARGET_UNREACHABLE);
                return;
            }
        }
        splice(sock, rs, ws, self.limits.idle_timeout, &self.stats).await;
    }
}

impl Service for TcpTarget {
    fn serve(self: Arc<Self>, s: Incoming) -> ServeFuture {
        Box::pin(async move {
            self.stats.active.fetch_add(1, Ordering::Relaxed);
            self.handle(s).await;
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
        })
    }
}
