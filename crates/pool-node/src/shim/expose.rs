//! The destination side of the shim: which ports peers' shimmed
//! connections may reach (`[[expose]]`), as a service on the router.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

use pool_journal::{Event, Journal};
use pool_net::{Endpoint, PublicKey, RecvStream, SendStream};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{journal_to, SessionCounts, ShimStats};
use super::{STATUS_NOT_EXPOSED, STATUS_OK, STATUS_REFUSED, STATUS_TIMED_OUT};
use crate::bridge::{splice, BridgeStats, Limits, Preamble};
use crate::config::ExposeSection;

/// The destination side: which ports peers' shimmed connections may reach.
#[derive(Default)]
pub struct ShimExpose {
    rules: RwLock<Vec<ExposeSection>>,
    limits: RwLock<Limits>,
    journal: RwLock<Option<Journal>>,
    endpoint: OnceLock<Endpoint>,
    pub(super) per_session: SessionCounts,
    /// Counters ([`ShimStats::exposed`], [`ShimStats::refused`]).
    pub stats: Arc<ShimStats>,
    /// Bytes carried.
    pub bytes: Arc<BridgeStats>,
}

impl ShimExpose {
    /// Sets the exposed ports (on start and reload) and the journal.
    pub fn configure(&self, rules: Vec<ExposeSection>, journal: Option<Journal>) {
        if let Ok(mut r) = self.rules.write() {
            *r = rules;
        }
        if let Ok(mut j) = self.journal.write() {
            *j = journal;
        }
    }

    /// The limits of exposed connections (connect and idle timeouts).
    pub fn set_limits(&self, limits: Limits) {
        if let Ok(mut l) = self.limits.write() {
            *l = limits;
        }
    }

    /// The endpoint whose sessions the streams arrive on: each session's
    /// count is dropped when it closes. Without it nothing is counted per
    /// session.
    pub fn track_sessions(&self, endpoint: Endpoint) {
        let _ = self.endpoint.set(endpoint);
    }

    /// Sessions with a count now (each an open session).
    pub fn sessions_tracked(&self) -> usize {
        self.per_session.len()
    }

    /// The exposed ports.
    pub fn rules(&self) -> Vec<ExposeSection> {
        self.rules.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Shim streams served per session id.
    pub fn per_session(&self, session: &str) -> u64 {
        self.per_session.get(session)
    }

    fn journal(&self, event: Event, fields: serde_json::Value) {
        let j = self.journal.read().ok().and_then(|j| j.clone());
        journal_to(&j, event, fields);
    }

    /// Serves one `":PORT"` stream of `session` from `peer`.
    async fn serve_stream(
        &self,
        session: &str,
        peer: PublicKey,
        pre: Preamble,
        rs: RecvStream,
        mut ws: SendStream,
    ) {
        let limits = self.limits.read().map(|l| l.clone()).unwrap_or_default();
        let port = pre.service[1..].parse::<u16>().ok().filter(|p| *p != 0);
        let rule = port.and_then(|p| self.rules().into_iter().find(|r| r.port == p));
        let refuse = |status: u8, reason: String| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(peer = %peer, service = %pre.service, destination = %pre.destination, "shim connection refused: {reason}");
            self.journal(
                Event::ShimRefused,
                json!({
                    "peer": peer.to_string(),
                    "port": port,
                    "destination": pre.destination.to_string(),
                    "source": pre.source.to_string(),
                    "reason": reason,
                }),
            );
            status
        };
        let (Some(port), Some(rule)) = (port, rule) else {
            let status = refuse(
                STATUS_NOT_EXPOSED,
                format!(
                    "port {} is not exposed here (add an [[expose]] port = {} to allow it)",
                    &pre.service[1..],
                    &pre.service[1..]
                ),
            );
            let _ = ws.write_all(&[status]).await;
            let _ = ws.shutdown().await;
            return;
        };
        let target = match &rule.target {
            Some(t) => t.clone(),
            None => {
                let lo = if pre.destination.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                };
                SocketAddr::new(lo, port).to_string()
            }
        };
        let sock =
            match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(&target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let status = refuse(
                        STATUS_REFUSED,
                        format!("cannot connect to the exposed target {target}: {e}"),
                    );
                    let _ = ws.write_all(&[status]).await;
                    let _ = ws.shutdown().await;
                    return;
                }
                Err(_) => {
                    let status = refuse(
                        STATUS_TIMED_OUT,
                        format!("connecting to the exposed target {target} timed out"),
                    );
                    let _ = ws.write_all(&[status]).await;
                    let _ = ws.shutdown().await;
                    return;
                }
            };
        let _ = sock.set_nodelay(true);
        if ws.write_all(&[STATUS_OK]).await.is_err() {
            return;
        }
        self.stats.exposed.fetch_add(1, Ordering::Relaxed);
        self.per_session.bump(session, || {
            self.endpoint
                .get()?
                .sessions()
                .into_iter()
                .find(|s| s.id().to_string() == session)
        });
        debug!(peer = %peer, %target, "shim stream connected");
        splice(sock, rs, ws, limits.idle_timeout, &self.bytes).await;
    }
}

impl crate::router::Service for ShimExpose {
    fn serve(self: Arc<Self>, s: crate::router::Incoming) -> crate::router::ServeFuture {
        Box::pin(async move {
            self.bytes.active.fetch_add(1, Ordering::Relaxed);
            self.serve_stream(&s.session_id, s.peer, s.preamble, s.recv, s.send)
                .await;
            self.bytes.active.fetch_sub(1, Ordering::Relaxed);
        })
    }
}
