//! The daemon: one POOL listener, the bridges of its config, the control
//! socket, metrics and the journal. SIGHUP reloads key, trust and bridges
//! without dropping live connections; SIGTERM drains with a deadline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_journal::{Event, Journal};
use pool_net::{Endpoint, EndpointConfig, EndpointEvent, PublicKey, Session};
use serde_json::json;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::bridge::{BridgeStats, Tcp2Pool};
use crate::config::{Config, ConfigError, Tcp2PoolSection};
use crate::metrics::MetricsSource;
use crate::model::{NodeCounters, SessionRow};
use crate::router::Router;
use crate::shim::ShimExpose;
use crate::shim::ShimNode;

use crate::keys::sha256_hex;
pub use crate::keys::{build_trust, create_key_file, load_or_create_key, read_private_file};

/// Why the daemon could not start or go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Key file.
    #[error("{0}")]
    Key(String),
    /// Trust settings.
    #[error("{0}")]
    Trust(String),
    /// A listener could not be opened.
    #[error("{what}: {source}")]
    Listen {
        /// Which listener.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The POOL runtime.
    #[error(transparent)]
    Net(#[from] pool_net::Error),
    /// A pending change is in the way, or there is none.
    #[error("{0}")]
    Pending(String),
    /// The daemon's state files.
    #[error("{0}")]
    State(String),
}

pub(crate) struct RunningBridge {
    pub(crate) section: Tcp2PoolSection,
    pub(crate) bridge: Arc<Tcp2Pool>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) addr: String,
    pub(crate) listener: Arc<tokio::net::TcpListener>,
}

/// Shared state of a running daemon.
pub struct Daemon {
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) endpoint: Endpoint,
    pub(crate) listening: bool,
    pub(crate) journal: Option<Journal>,
    pub(crate) bridges: Mutex<HashMap<String, RunningBridge>>,
    retired: Mutex<Vec<Arc<Tcp2Pool>>>,
    /// Every accepted stream goes through it.
    pub(crate) router: Arc<Router>,
    /// The counters of all `[[pool2tcp]]` targets together.
    pub(crate) targets: Arc<BridgeStats>,
    /// The exposed ports (`[[expose]]`).
    pub(crate) expose: Arc<ShimExpose>,
    /// The config applied now, and its text.
    pub(crate) running: Mutex<(Config, String)>,
    /// One apply at a time.
    pub(crate) apply_lock: tokio::sync::Mutex<()>,
    /// A `pool config apply --confirm-within` not yet confirmed.
    pub(crate) pending: Mutex<Option<crate::pending::PendingChange>>,
    /// Where the pending change is kept.
    pub(crate) state_dir: PathBuf,
    started: Instant,
    metrics_addr: Mutex<Option<String>>,
    control_path: Option<PathBuf>,
    pub(crate) shim: Option<RunningShim>,
    refusals: Mutex<crate::refusals::RefusalLog>,
    /// Worker links and handoff counters.
    pub(crate) handoffs: crate::handoff::Handoffs,
    /// The link to this worker's director (`[director]`).
    pub(crate) director: Option<Arc<crate::worker::DirectorLink>>,
}

pub(crate) struct RunningShim {
    pub(crate) node: Arc<ShimNode>,
    addr: String,
    stop: watch::Sender<bool>,
}

fn row(s: &Session) -> SessionRow {
    let st = s.stats();
    let c = &st.core;
    SessionRow {
        id: s.id().to_string(),
        peer: s.peer_key().to_string(),
        address: st.remote.map(|a| a.to_string()),
        carrier: st.carrier.to_string(),
        path: st.path.to_string(),
        path_changes: st.path_changes,
        last_path_change_secs: st.last_path_change.map(|d| d.as_secs_f64()),
        role: String::new(),
        age_secs: st.age.as_secs_f64(),
        streams: c.streams_active,
        streams_total: c.streams_opened,
        bytes_sent: c.bytes_sent,
        bytes_received: c.bytes_received,
        rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1e3),
        jitter_ms: c.jitter.as_secs_f64() * 1e3,
        tcp_retransmits: st.tcp_retransmits,
        frames_resent: c.frames_resent,
        resumes: c.resumes,
        epoch: c.epoch,
        cipher: c.cipher.to_string(),
        moved_from: st.moved_from.map(|k| k.to_string()),
        handoffs: st.handoffs,
        handing_off: st.handing_off,
        shim_streams: 0,
    }
}

impl Daemon {
    /// All live sessions: accepted ones and the bridges' dialled ones.
    pub fn sessions(&self) -> Vec<SessionRow> {
        let mut rows: Vec<SessionRow> = self
            .endpoint
            .sessions()
            .iter()
            .map(|s| {
                let mut r = row(s);
                r.role = "responder".into();
                r
            })
            .collect();
        let bridges: Vec<Arc<Tcp2Pool>> = self
            .bridges
            .lock()
            .map(|b| b.values().map(|r| r.bridge.clone()).collect())
            .unwrap_or_default();
        for b in bridges {
            if let Some(s) = b.session_now() {
                let mut r = row(&s);
                r.role = "initiator".into();
                rows.push(r);
            }
        }
        if let Some(shim) = &self.shim {
            for s in shim.node.sessions() {
                let mut r = row(&s);
                r.role = "initiator".into();
                rows.push(r);
            }
        }
        for r in &mut rows {
            r.shim_streams = self.expose.per_session(&r.id)
                + self.shim.as_ref().map_or(0, |s| s.node.per_session(&r.id));
        }
        rows
    }

    /// Node-wide counters.
    pub fn counters(&self) -> NodeCounters {
        let ls = self.endpoint.listener_stats();
        let mut c = NodeCounters {
            sessions_accepted: ls.accepted.load(Ordering::Relaxed),
            handshakes_refused: ls.refused.load(Ordering::Relaxed),
            resumes_accepted: ls.resumed.load(Ordering::Relaxed),
            ..NodeCounters::default()
        };
        c.bridge_connections = self.targets.connections.load(Ordering::Relaxed);
        c.bridge_errors = self.targets.errors.load(Ordering::Relaxed);
        if let Ok(b) = self.bridges.lock() {
            for r in b.values() {
                c.bridge_connections += r.bridge.stats.connections.load(Ordering::Relaxed);
                c.bridge_errors += r.bridge.stats.errors.load(Ordering::Relaxed);
                c.sessions_dialled += r.bridge.sessions_dialled();
            }
        }
        let h = &self.handoffs;
        c.handoffs_started = h.started.load(Ordering::Relaxed);
        c.handoffs_committed = h.committed.load(Ordering::Relaxed);
        c.handoffs_imported = h.imported.load(Ordering::Relaxed);
        if let Ok(a) = h.aborted.lock() {
            c.handoffs_aborted = a.iter().map(|(k, v)| ((*k).to_string(), *v)).collect();
        }
        let ex = &self.expose.stats;
        c.shim_exposed = ex.exposed.load(Ordering::Relaxed);
        c.shim_refused = ex.refused.load(Ordering::Relaxed);
        if let Some(shim) = &self.shim {
            let st = &shim.node.stats;
            c.shim_connections = st.connections.load(Ordering::Relaxed);
            c.shim_streams = st.streams.load(Ordering::Relaxed);
            c.shim_failed = st.failed.load(Ordering::Relaxed);
            c.sessions_dialled += shim.node.sessions_dialled();
        }
        if let Some(j) = &self.journal {
            let s = j.stats();
            c.journal_written = s.written;
            c.journal_failed = s.failed + s.dropped;
            c.journal_rotations = s.rotations;
        }
        if let Ok(p) = self.pending.lock() {
            c.config_pending = p.is_some();
        }
        c
    }

    /// `pool ctl status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (running, running_text) = self.running_config();
        let bridges: Vec<serde_json::Value> = self
            .bridges
            .lock()
            .map(|b| {
                let mut v: Vec<_> = b
                    .values()
                    .map(|r| {
                        json!({
                            "name": r.section.name,
                            "mode": "tcp2pool",
                            "listen": r.addr,
                            "peer": r.section.peer,
                            "active": r.bridge.stats.active.load(Ordering::Relaxed),
                            "connections": r.bridge.stats.connections.load(Ordering::Relaxed),
                            "errors": r.bridge.stats.errors.load(Ordering::Relaxed),
                            "bytes_in": r.bridge.stats.bytes_in.load(Ordering::Relaxed),
                            "bytes_out": r.bridge.stats.bytes_out.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                v
            })
            .unwrap_or_default();
        let p = &self.targets;
        let shim = self.shim.as_ref().map(|s| {
            let st = &s.node.stats;
            json!({
                "listen": s.addr,
                "active": st.active.load(Ordering::Relaxed),
                "connections": st.connections.load(Ordering::Relaxed),
                "streams": st.streams.load(Ordering::Relaxed),
                "failed": st.failed.load(Ordering::Relaxed),
            })
        });
        let ex = &self.expose.stats;
        let expose = json!({
            "ports": self.expose.rules().iter().map(|r| json!({"port": r.port, "target": r.target})).collect::<Vec<_>>(),
            "exposed": ex.exposed.load(Ordering::Relaxed),
            "refused": ex.refused.load(Ordering::Relaxed),
        });
        json!({
            "key": self.endpoint.public_key().to_string(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "listen": self.endpoint.local_addr().map(|a| a.to_string()),
            "listening": self.listening,
            "control": self.control_path.as_ref().map(|p| p.display().to_string()),
            "metrics": self.metrics_addr.lock().ok().and_then(|m| m.clone()),
            "journal": self.journal.as_ref().map(|j| j.path().display().to_string()),
            "sessions": self.sessions().len(),
            "relays": self.endpoint.relay_status().iter().map(|r| json!({
                "relay": r.relay, "registered": r.registered,
                "observed": r.observed.map(|a| a.to_string()), "error": r.error,
            })).collect::<Vec<_>>(),
            "tcp2pool": bridges,
            "pool2tcp": {
                "targets": running.pool2tcp.iter().map(|t| json!({"service": t.service, "target": t.target, "proxy_protocol": t.proxy_protocol})).collect::<Vec<_>>(),
                "active": p.active.load(Ordering::Relaxed),
                "connections": p.connections.load(Ordering::Relaxed),
                "errors": p.errors.load(Ordering::Relaxed),
            },
            "shim": shim,
            "expose": expose,
            "services": self.router.table().names(),
            "streams_refused": {
                "unknown_service": self.router.stats.unknown.load(Ordering::Relaxed),
                "forbidden": self.router.stats.forbidden.load(Ordering::Relaxed),
            },
            "config_sha256": sha256_hex(&running_text),
            "pending": self.pending().map(|p| json!({
                "sha256": p.sha256, "previous_sha256": p.previous_sha256,
                "applied_by": p.applied_by, "seconds_left": p.seconds_left(),
            })),
            "counters": serde_json::to_value(self.counters()).unwrap_or_default(),
            "draining": self.endpoint.is_draining(),
            "director": self.director.as_ref().map(|l| json!({
                "key": l.director_key().to_string(),
                "linked": l.linked(),
                "state": l.state(),
            })),
        })
    }

    pub(crate) fn journal_event(&self, event: Event, fields: serde_json::Value) {
        self.journal(event, fields);
    }

    pub(crate) fn journal(&self, event: Event, fields: serde_json::Value) {
        if let Some(j) = &self.journal {
            j.record(event, fields);
        }
    }

    /// Journals what refusals produced, on the path that may be shed.
    fn journal_refusals(&self, lines: Vec<(Event, serde_json::Value)>) {
        if let Some(j) = &self.journal {
            for (event, fields) in lines {
                j.record_bulk(event, fields);
            }
        }
    }

    fn refused(&self, from: std::net::SocketAddr, key: Option<PublicKey>, reason: &str) {
        let mut out = Vec::new();
        if let Ok(mut log) = self.refusals.lock() {
            log.refused(Instant::now(), from, key, reason, &mut out);
        }
        self.journal_refusals(out);
    }

    fn expire_refusals(&self, all: bool) {
        let mut out = Vec::new();
        if let Ok(mut log) = self.refusals.lock() {
            log.expire(Instant::now(), all, &mut out);
        }
        self.journal_refusals(out);
        self.router.expire();
    }

    /// Seals the journal and starts a new file continuing its chain
    /// (`pool journal rotate`, SIGUSR1). Returns the sealed file's path.
    pub async fn rotate_journal(&self) -> Result<Option<PathBuf>, String> {
        let Some(j) = &self.journal else {
            return Err("this node keeps no journal ([node] journal)".to_owned());
        };
        j.rotate().await.map_err(|e| {
            error!("{e}");
            e.to_string()
        })
    }

    /// Journals the refusal counts of every open window now, and waits
    /// until everything journaled so far is written and fsynced.
    pub async fn flush_journal(&self) {
        self.expire_refusals(true);
        if let Some(j) = &self.journal {
            j.flush().await;
        }
    }

    pub(crate) fn stop_bridge(&self, name: &str) {
        let removed = self.bridges.lock().ok().and_then(|mut b| b.remove(name));
        if let Some(r) = removed {
            let _ = r.stop.send(true);
            info!(
                name,
                "tcp2pool bridge stopped accepting; live connections go on"
            );
            if let Ok(mut ret) = self.retired.lock() {
                ret.push(r.bridge);
            }
        }
    }

    /// The listen addresses of the running tcp2pool bridges, by name.
    pub fn bridge_addrs(&self) -> HashMap<String, String> {
        self.bridges
            .lock()
            .map(|b| b.iter().map(|(k, v)| (k.clone(), v.addr.clone())).collect())
            .unwrap_or_default()
    }

    /// Re-reads the config file and applies it (SIGHUP, `pool ctl
    /// reload`): atomically, see [`crate::apply`]. Live connections stay.
    pub async fn reload(self: &Arc<Self>) -> Result<crate::apply::Plan, DaemonError> {
        let Some(path) = self.config_path.clone() else {
            return Ok(crate::apply::Plan::default());
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.apply_text(&text, &path, "reload").await
    }

    /// The shim socket's path, if `[shim]` is on.
    pub fn shim_addr(&self) -> Option<String> {
        self.shim.as_ref().map(|s| s.addr.clone())
    }

    /// Connections still open on all bridges and the shim listener.
    pub fn active_connections(&self) -> u64 {
        let mut n = self.targets.active.load(Ordering::Relaxed)
            + self.expose.bytes.active.load(Ordering::Relaxed);
        if let Some(s) = &self.shim {
            n += s.node.stats.active.load(Ordering::Relaxed);
        }
        if let Ok(b) = self.bridges.lock() {
            n += b
                .values()
                .map(|r| r.bridge.stats.active.load(Ordering::Relaxed))
                .sum::<u64>();
        }
        if let Ok(r) = self.retired.lock() {
            n += r
                .iter()
                .map(|b| b.stats.active.load(Ordering::Relaxed))
                .sum::<u64>();
        }
        n
    }
}

impl MetricsSource for Daemon {
    fn sessions(&self) -> Vec<SessionRow> {
        Daemon::sessions(self)
    }
    fn counters(&self) -> NodeCounters {
        Daemon::counters(self)
    }
}

pub(crate) fn default_known_peers(cfg: &Config) -> PathBuf {
    cfg.node
        .key
        .parent()
        .map(|d| d.join("known_peers"))
        .unwrap_or_else(|| PathBuf::from("known_peers"))
}

/// Test-only: `POOL_TEST_REKEY_MS=N` makes every session of this process
/// rekey every N ms (the chaos test uses it). Read once; ignored when
/// unset or not a positive integer.
pub fn test_rekey_after() -> Option<Duration> {
    static EVERY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        let ms: u64 = std::env::var("POOL_TEST_REKEY_MS")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (ms > 0).then(|| Duration::from_millis(ms))
    })
}

/// Starts everything a config describes. Returns the running daemon; the
/// caller runs [`run_until_signal`].
pub async fn start(
    config_path: Option<PathBuf>,
    cfg: Config,
    text: &str,
) -> Result<Arc<Daemon>, DaemonError> {
    let key = load_or_create_key(&cfg.node.key, true)?;
    let trust = build_trust(&cfg.trust, &default_known_peers(&cfg))?;
    let listening = !cfg.node.listen.is_empty();
    crate::keys::check_listener_trust(&cfg, &trust, listening)?;
    let mut protocol = pool_net::Config::default();
    protocol.probe_timeout(Some(Duration::from_millis(
        cfg.node.probe_timeout_ms.max(50),
    )));
    protocol.resume_deadline(Duration::from_secs(cfg.node.resume_deadline_secs.max(1)));
    if let Some(every) = test_rekey_after() {
        protocol.rekey_after(every);
    }
    let epcfg = EndpointConfig::new(key.clone())
        .protocol(protocol)
        .trust(trust.clone())
        .relays(cfg.node.relays.clone())
        .direct_retry(Duration::from_secs(cfg.node.direct_retry_secs))
        .handoff(cfg.handoff.policy().map_err(DaemonError::Key)?);
    let director = match &cfg.director {
        Some(dir) => Some(crate::worker::DirectorLink::new(
            dir.clone(),
            dir.addrs(&cfg.node.listen).map_err(DaemonError::Key)?,
        )),
        None => None,
    };
    let endpoint = if listening {
        Endpoint::bind(&cfg.node.listen, epcfg).await?
    } else {
        Endpoint::client(epcfg)
    };
    let journal = match &cfg.node.journal {
        Some(p) if !p.as_os_str().is_empty() => Some(
            Journal::open_with(
                p,
                pool_journal::JournalConfig::default()
                    .rotate_at_bytes(cfg.node.journal_rotate_bytes),
            )
            .await
            .map_err(|e| DaemonError::Key(format!("journal: {e}")))?,
        ),
        _ => None,
    };
    let expose = Arc::new(ShimExpose::default());
    expose.track_sessions(endpoint.clone());
    let shim = match cfg.shim.as_ref().filter(|s| s.enabled) {
        Some(section) => {
            if std::env::var("LD_PRELOAD").is_ok_and(|p| p.contains("pool_shim")) {
                warn!("LD_PRELOAD names the shim; it leaves the `pool` process alone");
            }
            let listener = ShimNode::bind(section)
                .await
                .map_err(|source| DaemonError::Listen {
                    what: format!("[shim] socket {}", section.socket.display()),
                    source,
                })?;
            let addr = listener.path().display().to_string();
            let node = ShimNode::new(
                endpoint.clone(),
                &cfg.route,
                trust,
                section.default_peer_port,
                section.limits(),
                journal.clone(),
            );
            let (stop, stop_rx) = watch::channel(false);
            tokio::spawn(node.clone().run(listener, stop_rx));
            info!(socket = %addr, "shim listener up");
            Some(RunningShim { node, addr, stop })
        }
        None => None,
    };
    let daemon = Arc::new(Daemon {
        config_path,
        endpoint: endpoint.clone(),
        listening,
        journal: journal.clone(),
        bridges: Mutex::new(HashMap::new()),
        retired: Mutex::new(Vec::new()),
        router: Router::new(journal.clone()),
        targets: Arc::default(),
        expose,
        running: Mutex::new((Config::default(), String::new())),
        apply_lock: tokio::sync::Mutex::new(()),
        pending: Mutex::new(None),
        state_dir: cfg
            .node
            .state_dir
            .clone()
            .or_else(|| cfg.node.key.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from(".")),
        started: Instant::now(),
        metrics_addr: Mutex::new(None),
        control_path: cfg.node.control.clone(),
        shim,
        handoffs: crate::handoff::Handoffs::default(),
        director,
        refusals: Mutex::new(crate::refusals::RefusalLog::new(Duration::from_secs(
            cfg.node.refusal_window_secs.max(1),
        ))),
    });
    let hex = sha256_hex(text);
    daemon.journal(
        Event::NodeStarted,
        json!({"key": key.public_key().to_string(), "listen": endpoint.local_addr().map(|a| a.to_string()), "config_sha256": hex,
               "journal_key": daemon.journal.as_ref().and_then(|j| j.public_key().map(str::to_owned))}),
    );
    // The first config goes in the way every later one does: prepared
    // whole (every bridge bound), then swapped in.
    let prepared = daemon.prepare(cfg.clone(), text.to_owned()).await?;
    daemon.swap(prepared);
    daemon.resume_pending()?;
    if listening {
        // Sessions accepted: serve their streams, journal open and close.
        let d = daemon.clone();
        tokio::spawn(async move {
            while let Some(s) = d.endpoint.accept().await {
                let router = d.router.clone();
                let d2 = d.clone();
                tokio::spawn(async move {
                    let watch = s.clone();
                    let id = s.id().to_string();
                    let peer = s.peer_key().to_string();
                    // Journaled from here, not from the listener's events:
                    // those are a broadcast that a flood of refusals can
                    // make a slow reader miss.
                    d2.journal(
                        Event::SessionOpened,
                        json!({"session": id, "peer": peer, "from": s.stats().remote.map(|a| a.to_string())}),
                    );
                    tokio::spawn(router.serve_session(s));
                    let reason = watch.closed().await;
                    d2.journal(
                        Event::SessionClosed,
                        json!({"session": id, "peer": peer, "reason": reason.to_string()}),
                    );
                });
            }
        });
        // Listener events: journal refusals (in aggregate) and resumes.
        let d = daemon.clone();
        let mut events = endpoint.events();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(EndpointEvent::Refused { from, key, reason }) => d.refused(from, key, &reason),
                    Ok(EndpointEvent::Resumed { id, peer, from }) => d.journal(
                        Event::SessionResumed,
                        json!({"session": id.to_string(), "peer": peer.to_string(), "from": from.to_string()}),
                    ),
                    Ok(EndpointEvent::HandedIn { id, client, from }) => {
                        d.handoffs.imported.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        d.journal(
                            Event::HandoffImported,
                            json!({"session": id.to_string(), "client": client.to_string(), "from": from.to_string()}),
                        )
                    }
                    Ok(EndpointEvent::Moved { id, from, to }) => d.journal(
                        Event::SessionMoved,
                        json!({"session": id.to_string(), "from": from.to_string(), "to": to.to_string()}),
                    ),
                    Ok(EndpointEvent::HandoffDeclined { id, to, reason }) => d.journal(
                        Event::HandoffDeclined,
                        json!({"session": id.to_string(), "to": to.to_string(), "reason": reason}),
                    ),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "journal fell behind listener events");
                        d.journal_refusals(vec![(Event::ListenerEventsMissed, json!({"count": n}))]);
                    }
                    Err(_) => return,
                }
            }
        });
        // Refusal windows end on time even when no refusal follows.
        let d = Arc::downgrade(&daemon);
        let every = Duration::from_secs(cfg.node.refusal_window_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match d.upgrade() {
                    Some(d) => d.expire_refusals(false),
                    None => return,
                }
            }
        });
    }
    if let Some(link) = &daemon.director {
        crate::worker::start(&daemon, link.clone());
    }
    if let Some(addr) = cfg.node.metrics.as_ref().filter(|a| !a.is_empty()) {
        let (bound, _task) = crate::metrics::serve(addr, daemon.clone() as Arc<dyn MetricsSource>)
            .await
            .map_err(|source| DaemonError::Listen {
                what: format!("metrics on {addr}"),
                source,
            })?;
        info!(addr = %bound, "metrics at http://{bound}/metrics");
        if let Ok(mut m) = daemon.metrics_addr.lock() {
            *m = Some(bound.to_string());
        }
    }
    if let Some(path) = &cfg.node.control {
        crate::control::serve_control(path, daemon.clone()).map_err(|source| {
            DaemonError::Listen {
                what: format!("control socket {}", path.display()),
                source,
            }
        })?;
    }
    Ok(daemon)
}

/// A worker of a director at SIGTERM: asks to be drained, and waits until
/// its sessions are on other workers and the streams it still forwards
/// have ended, or `[director] leave_deadline` passes.
async fn leave(daemon: &Arc<Daemon>, link: &crate::worker::DirectorLink) {
    let deadline = Instant::now() + link.leave_deadline();
    let sessions = daemon.client_sessions().len();
    info!(
        sessions,
        deadline_secs = link.leave_deadline().as_secs(),
        "asking the director to drain this worker"
    );
    link.leave();
    loop {
        let left = daemon.client_sessions().len();
        let forwarding = daemon.active_connections();
        if left == 0 && forwarding == 0 {
            info!("empty: every session is on another worker");
            break;
        }
        if Instant::now() >= deadline {
            warn!(
                sessions = left,
                connections = forwarding,
                "leave deadline passed; stopping anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs until SIGTERM or SIGINT (then drains for up to `drain`), reloading
/// on SIGHUP.
pub async fn run_until_signal(daemon: Arc<Daemon>, drain: Duration) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| {
        signal(k).map_err(|source| DaemonError::Listen {
            what: "signal handler".into(),
            source,
        })
    };
    let mut hup = sig(SignalKind::hangup())?;
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut usr1 = sig(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                info!("SIGUSR1: rotating the journal");
                let _ = daemon.rotate_journal().await;
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading");
                if let Err(e) = daemon.reload().await {
                    // Journaled by the apply as `config_not_applied`.
                    error!("reload failed, keeping the running configuration: {e}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if let Some(link) = daemon.director.clone() {
        leave(&daemon, &link).await;
    }
    info!(
        deadline_secs = drain.as_secs(),
        "draining: no new connections; waiting for live ones"
    );
    let names: Vec<String> = daemon
        .bridges
        .lock()
        .map(|b| b.keys().cloned().collect())
        .unwrap_or_default();
    for n in names {
        daemon.stop_bridge(&n);
    }
    if let Some(s) = &daemon.shim {
        let _ = s.stop.send(true);
    }
    let deadline = Instant::now() + drain;
    while daemon.active_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = daemon.active_connections();
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline passed; closing the rest"
        );
    }
    daemon.expire_refusals(true);
    daemon.journal(Event::NodeStopped, json!({"connections_cut": left}));
    if let Some(j) = &daemon.journal {
        j.checkpoint().await;
    }
    if let Some(p) = &daemon.control_path {
        crate::control::remove_control(p);
    }
    Ok(())
}
