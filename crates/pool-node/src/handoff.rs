//! Live handoffs at the node (docs/handoff.md): the `pool.handoff` and
//! `pool.handoff.fwd` services (the target's side), the worker links to
//! other workers (the source's side), and `pool ctl handoff` / `drain`.
//!
//! Only the workers in `[handoff] peers` may use the services, and only
//! they are handed sessions: fleet trust.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pool_net::{
    HandoffLink, HandoffOptions, HandoffReport, LinkFuture, LinkPurpose, PublicKey, Session, Stream,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::bridge::Preamble;
use crate::daemon::Daemon;
use crate::router::{Incoming, ServeFuture, Service};
use pool_journal::Event;

/// The service a source opens to hand a session over.
pub const HANDOFF_SERVICE: &str = "pool.handoff";
/// The service a source opens for each stream it forwards after a handoff.
pub const FORWARD_SERVICE: &str = "pool.handoff.fwd";

/// `pool.handoff` or `pool.handoff.fwd`.
pub struct HandoffService {
    daemon: Weak<Daemon>,
    forward: bool,
}

impl HandoffService {
    /// The service for handoffs (`forward` false) or forwarded streams.
    pub fn new(daemon: Weak<Daemon>, forward: bool) -> Arc<Self> {
        Arc::new(HandoffService { daemon, forward })
    }
}

impl Service for HandoffService {
    fn serve(self: Arc<Self>, s: Incoming) -> ServeFuture {
        Box::pin(async move {
            let Some(d) = self.daemon.upgrade() else {
                return;
            };
            let peer = s.peer;
            let Ok(stream) = Stream::reunite(s.recv, s.send) else {
                return;
            };
            let r = if self.forward {
                d.endpoint.serve_forward(stream, peer).await
            } else {
                let importer = NodeImporter(self.daemon.clone());
                let r = d
                    .endpoint
                    .serve_handoff_with(stream, peer, Some(&importer))
                    .await;
                if let Err(e) = &r {
                    d.handoffs.count_aborted(error_code(e));
                }
                r
            };
            if let Err(e) = r {
                info!(from = %peer.short(), "handoff (target side) ended: {e}");
            }
        })
    }
}

/// Hands streams that moved to this node's services (the router).
struct NodeImporter(Weak<Daemon>);

impl pool_net::Importer for NodeImporter {
    fn moved(&self, session: Session, stream: Stream, service: String, read: u64, written: u64) {
        let Some(d) = self.0.upgrade() else {
            return;
        };
        let router = d.router.clone();
        tokio::spawn(async move { router.import(stream, session, service, read, written).await });
    }

    /// With a director, the target asks it first (fencing).
    fn claim(&self, session: pool_net::SessionId, source: PublicKey) -> pool_net::ClaimFuture<'_> {
        Box::pin(async move {
            match crate::worker::claim_link(&self.0) {
                Some(link) => link.claim(session, source).await.map(|_| ()),
                None => Ok(()),
            }
        })
    }

    fn unclaim(&self, session: pool_net::SessionId, source: PublicKey) {
        if let Some(link) = crate::worker::claim_link(&self.0) {
            link.unclaim(session, source);
        }
    }
}

/// The worker links and counters.
#[derive(Default)]
pub struct Handoffs {
    links: tokio::sync::Mutex<HashMap<PublicKey, Session>>,
    /// Handoffs started here (as the source).
    pub started: std::sync::atomic::AtomicU64,
    /// Committed at the target.
    pub committed: std::sync::atomic::AtomicU64,
    /// Sessions handed in (as the target).
    pub imported: std::sync::atomic::AtomicU64,
    /// Aborted, by reason.
    pub aborted: std::sync::Mutex<BTreeMap<&'static str, u64>>,
}

impl Handoffs {
    fn count_aborted(&self, code: &'static str) {
        if let Ok(mut m) = self.aborted.lock() {
            *m.entry(code).or_default() += 1;
        }
    }
}

fn error_code(e: &pool_net::Error) -> &'static str {
    match e {
        pool_net::Error::Handoff { code, .. } => code,
        _ => "target_unreachable",
    }
}

/// Streams on a worker session to one target.
struct Link(Session);

impl HandoffLink for Link {
    fn open(&self, purpose: LinkPurpose) -> LinkFuture<'_> {
        Box::pin(async move {
            let mut s = self.0.open_stream().await?;
            let any: SocketAddr = "[::]:0".parse().unwrap_or(SocketAddr::from(([0; 16], 0)));
            let service = match purpose {
                LinkPurpose::Handoff => HANDOFF_SERVICE,
                _ => FORWARD_SERVICE,
            };
            let pre = Preamble {
                source: any,
                destination: any,
                service: service.into(),
            };
            s.write_all(&pre.encode()).await?;
            Ok(s)
        })
    }
}

impl Daemon {
    /// The worker session to `key` at `addr`: the one open, or a new one.
    async fn link(&self, addr: &str, key: PublicKey) -> Result<Session, pool_net::Error> {
        let mut links = self.handoffs.links.lock().await;
        if let Some(s) = links.get(&key).filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let s = tokio::time::timeout(Duration::from_secs(5), self.endpoint.connect(addr, key))
            .await
            .map_err(|_| pool_net::Error::Timeout {
                addr: addr.to_string(),
                secs: 5,
            })??;
        links.insert(key, s.clone());
        Ok(s)
    }

    /// Whether `key` is one of this node's handoff peers.
    pub(crate) fn fleet_peer(&self, key: &PublicKey) -> bool {
        self.running_config().0.handoff.peers.contains(key)
    }

    /// Hands one accepted session to the worker `to_key` at `to`.
    pub(crate) async fn hand_off(
        &self,
        session: &Session,
        to: &str,
        to_key: PublicKey,
        deadline: Option<Duration>,
    ) -> Result<HandoffReport, pool_net::Error> {
        let cfg = self.running_config().0.handoff;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(to)
            .await
            .map_err(|source| pool_net::Error::Resolve {
                addr: to.into(),
                source,
            })?
            .take(4)
            .collect();
        let peer = session.peer_key();
        let id = session.id().to_string();
        self.handoffs
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.journal_event(
            Event::HandoffStarted,
            json!({"session": id, "peer": peer.to_string(), "to": to_key.to_string(), "to_addr": to}),
        );
        if let Some(link) = &self.director {
            // A director's fleet: the target may claim the session only
            // once its owner (this node) has announced the handoff.
            if !link.announce(session.id(), to_key) {
                let e = pool_net::Error::Handoff {
                    stage: "prepare",
                    reason: "this worker has no link to its director, so the target could not claim the session".into(),
                    code: "fenced",
                };
                self.handoffs.count_aborted("fenced");
                self.journal_event(
                    Event::HandoffAborted,
                    json!({"session": id, "to": to_key.to_string(), "reason": "fenced", "detail": e.to_string()}),
                );
                return Err(e);
            }
        }
        let opts = HandoffOptions::default()
            .token_lifetime(cfg.token_lifetime)
            .forward_deadline(deadline.unwrap_or(cfg.forward_deadline))
            .policies(self.router.policies(&id));
        let res = match self.link(to, to_key).await {
            Ok(link) => session.handoff_to(&Link(link), to_key, addrs, opts).await,
            Err(e) => Err(pool_net::Error::Handoff {
                stage: "prepare",
                reason: e.to_string(),
                code: "target_unreachable",
            }),
        };
        match &res {
            Ok(r) => {
                self.handoffs
                    .committed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.journal_event(
                    Event::HandoffCommitted,
                    json!({"session": id, "peer": peer.to_string(), "to": to_key.to_string(),
                           "frozen_ms": r.frozen.as_secs_f64() * 1e3, "forwarded": r.forwarded}),
                );
            }
            Err(e) => {
                let code = error_code(e);
                self.handoffs.count_aborted(code);
                self.journal_event(
                    Event::HandoffAborted,
                    json!({"session": id, "to": to_key.to_string(), "reason": code, "detail": e.to_string()}),
                );
            }
        }
        res
    }

    /// `pool ctl handoff SESSION --to HOST:PORT --to-key KEY`.
    pub(crate) async fn ctl_handoff(
        &self,
        which: &str,
        to: &str,
        to_key: &str,
    ) -> serde_json::Value {
        let to_key: PublicKey = match to_key.parse() {
            Ok(k) => k,
            Err(e) => return json!({"error": e.to_string()}),
        };
        if !self.fleet_peer(&to_key) {
            return json!({"error": format!("{to_key} is not in [handoff] peers: this node hands sessions only to the workers listed there")});
        }
        let sessions: Vec<Session> = self
            .endpoint
            .sessions()
            .into_iter()
            .filter(|s| !self.fleet_peer(&s.peer_key()))
            .filter(|s| {
                s.id().to_string().starts_with(which) || s.peer_key().to_string().starts_with(which)
            })
            .collect();
        let session = match sessions.as_slice() {
            [one] => one,
            [] => {
                return json!({"error": format!("no session matches `{which}` (see `pool ctl sessions`)")})
            }
            many => {
                let ids: Vec<String> = many.iter().map(|s| s.id().to_string()).collect();
                return json!({"error": format!("`{which}` matches {} sessions: {}", many.len(), ids.join(", "))});
            }
        };
        match self.hand_off(session, to, to_key, None).await {
            Ok(r) => json!({
                "ok": true, "session": r.session.to_string(), "to": r.to.to_string(),
                "frozen_ms": r.frozen.as_secs_f64() * 1e3, "total_ms": r.total.as_secs_f64() * 1e3,
                "forwarded": r.forwarded, "moved": r.moved, "reset": r.reset,
                "state_bytes": r.state_bytes,
            }),
            Err(e) => json!({"error": e.to_string(), "reason": error_code(&e)}),
        }
    }

    /// `pool ctl drain --to HOST:PORT --to-key KEY`: hands every accepted
    /// session over (32 at a time), then reports.
    /// `deadline` overrides `[handoff] forward_deadline` for the streams
    /// left here: at it they are reset (code 7).
    pub(crate) async fn ctl_drain(
        self: &Arc<Self>,
        to: &str,
        to_key: &str,
        deadline: Option<Duration>,
    ) -> serde_json::Value {
        let started = Instant::now();
        let key: PublicKey = match to_key.parse() {
            Ok(k) => k,
            Err(e) => return json!({"error": e.to_string()}),
        };
        if !self.fleet_peer(&key) {
            return json!({"error": format!("{key} is not in [handoff] peers")});
        }
        // No new sessions from now on (until a restart); resumes go on.
        self.endpoint.set_draining(true);
        let sessions: Vec<Session> = self
            .endpoint
            .sessions()
            .into_iter()
            .filter(|s| !self.fleet_peer(&s.peer_key()) && !s.is_closed())
            .collect();
        let total = sessions.len();
        let permits = Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::with_capacity(total);
        for s in sessions {
            let (d, to, permits) = (self.clone(), to.to_string(), permits.clone());
            tasks.push(tokio::spawn(async move {
                let _p = permits.acquire_owned().await;
                d.hand_off(&s, &to, key, deadline).await.map(|r| r.frozen)
            }));
        }
        let mut handed = 0u64;
        let mut aborted: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut worst = Duration::ZERO;
        for t in tasks {
            match t.await {
                Ok(Ok(frozen)) => {
                    handed += 1;
                    worst = worst.max(frozen);
                }
                Ok(Err(e)) => *aborted.entry(error_code(&e)).or_default() += 1,
                Err(_) => *aborted.entry("task_failed").or_default() += 1,
            }
        }
        if handed < total as u64 {
            warn!(handed, total, "drain: some sessions stayed here");
        }
        json!({
            "ok": true, "sessions": total, "handed": handed, "aborted": aborted,
            "seconds": started.elapsed().as_secs_f64(), "max_frozen_ms": worst.as_secs_f64() * 1e3,
        })
    }
}

/// The services to register (with the router) for `peers`.
pub(crate) fn services(
    daemon: &Arc<Daemon>,
    peers: &[PublicKey],
) -> Vec<(&'static str, Arc<dyn Service>)> {
    if peers.is_empty() {
        return Vec::new();
    }
    vec![
        (
            HANDOFF_SERVICE,
            HandoffService::new(Arc::downgrade(daemon), false) as Arc<dyn Service>,
        ),
        (
            FORWARD_SERVICE,
            HandoffService::new(Arc::downgrade(daemon), true),
        ),
    ]
}

/// `pool.handoff.test`, registered on every node (it moves with handoffs;
/// trusted peers only, like every service).
pub(crate) fn test_service() -> Arc<dyn Service> {
    Arc::new(crate::handoff_test::HandoffTest)
}
