//! Applying a config, atomically: **plan** (what changes), **prepare**
//! everything that can fail (load the key, build the trust, bind every new
//! listener), then **swap** (nothing in it can fail), then **commit**
//! (journal the new config's digest and what changed). A failure before
//! the swap leaves the running config exactly as it was, and says so.
//!
//! Start, SIGHUP, `pool ctl reload`, `pool config apply` and rollbacks all
//! go through [`Daemon::apply_text`].
//!
//! What cannot change without a restart (the POOL listener's address, the
//! relays, the metrics and control endpoints, the journal, the `[shim]`
//! socket) is listed in the plan as such and keeps its running value.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use pool_journal::Event;
use pool_net::{SecretKey, Trust};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bridge::{Limits, Tcp2Pool, Tcp2PoolConfig};
use crate::config::{Config, Tcp2PoolSection};
use crate::control::{ControlService, CONTROL_SERVICE};
use crate::daemon::{Daemon, DaemonError, RunningBridge};
use crate::keys::{build_trust, load_or_create_key, sha256_hex};
use crate::router::{Access, Table};
use crate::services::{Discard, TcpTarget, DISCARD_SERVICE};

/// What applying a config changes, in words.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Changes applied live.
    pub changes: Vec<String>,
    /// Changes that only take effect when the daemon restarts.
    pub restart_needed: Vec<String>,
}

impl Plan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.restart_needed.is_empty()
    }
}

fn keys_diff(
    what: &str,
    old: &[pool_net::PublicKey],
    new: &[pool_net::PublicKey],
    out: &mut Vec<String>,
) {
    let added: Vec<String> = new
        .iter()
        .filter(|k| !old.contains(k))
        .map(|k| k.to_string())
        .collect();
    let removed: Vec<String> = old
        .iter()
        .filter(|k| !new.contains(k))
        .map(|k| k.to_string())
        .collect();
    if !added.is_empty() {
        out.push(format!("{what}: adds {}", added.join(", ")));
    }
    if !removed.is_empty() {
        out.push(format!("{what}: removes {}", removed.join(", ")));
    }
}

/// What changes from `old` to `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    let c = &mut p.changes;
    let (on, nn) = (&old.node, &new.node);
    if on.key != nn.key {
        c.push(format!(
            "[node] key: {} -> {}",
            on.key.display(),
            nn.key.display()
        ));
    }
    keys_diff("[trust] allow", &old.trust.allow, &new.trust.allow, c);
    let (ot, nt) = (&old.trust, &new.trust);
    if (
        ot.authorized.as_ref(),
        ot.fleet_secret.as_ref(),
        ot.tofu,
        ot.known_peers.as_ref(),
    ) != (
        nt.authorized.as_ref(),
        nt.fleet_secret.as_ref(),
        nt.tofu,
        nt.known_peers.as_ref(),
    ) {
        c.push("[trust]: authorized file, fleet secret or TOFU settings change".into());
    }
    let old_b: HashMap<&str, &Tcp2PoolSection> =
        old.tcp2pool.iter().map(|b| (b.name.as_str(), b)).collect();
    for b in &new.tcp2pool {
        match old_b.get(b.name.as_str()) {
            None => c.push(format!("[[tcp2pool]] `{}`: added, on {} to {}", b.name, b.listen, b.peer)),
            Some(o) if *o != b => c.push(format!("[[tcp2pool]] `{}`: changed (live connections go on; new ones use the new settings)", b.name)),
            _ => {}
        }
    }
    for b in &old.tcp2pool {
        if !new.tcp2pool.iter().any(|n| n.name == b.name) {
            c.push(format!(
                "[[tcp2pool]] `{}`: removed (stops listening on {}; live connections go on)",
                b.name, b.listen
            ));
        }
    }
    for t in &new.pool2tcp {
        match old.pool2tcp.iter().find(|o| o.service == t.service) {
            None => c.push(format!(
                "[[pool2tcp]] service `{}`: added, to {}",
                t.service, t.target
            )),
            Some(o) if o != t => c.push(format!("[[pool2tcp]] service `{}`: changed", t.service)),
            _ => {}
        }
    }
    for t in &old.pool2tcp {
        if !new.pool2tcp.iter().any(|n| n.service == t.service) {
            c.push(format!("[[pool2tcp]] service `{}`: removed", t.service));
        }
    }
    if old.route != new.route {
        c.push(format!(
            "[[route]]: {} -> {} routes",
            old.route.len(),
            new.route.len()
        ));
    }
    if old.expose != new.expose {
        let ports = |v: &[crate::config::ExposeSection]| {
            v.iter()
                .map(|e| e.port.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        c.push(format!(
            "[[expose]]: ports [{}] -> [{}]",
            ports(&old.expose),
            ports(&new.expose)
        ));
    }
    keys_diff(
        "[control] admins",
        &old.control.admins,
        &new.control.admins,
        c,
    );
    keys_diff(
        "[control] readers",
        &old.control.readers,
        &new.control.readers,
        c,
    );
    let r = &mut p.restart_needed;
    let mut restart = |what: &str, changed: bool| {
        if changed {
            r.push(format!("{what} (takes effect at restart)"));
        }
    };
    restart("[node] listen", on.listen != nn.listen);
    restart("[node] control", on.control != nn.control);
    restart("[node] metrics", on.metrics != nn.metrics);
    restart("[node] journal", on.journal != nn.journal);
    restart(
        "[node] journal_rotate_bytes",
        on.journal_rotate_bytes != nn.journal_rotate_bytes,
    );
    restart("[node] relays", on.relays != nn.relays);
    restart("[node] state_dir", on.state_dir != nn.state_dir);
    restart(
        "[node] timers (drain, direct_retry, probe_timeout, refusal_window, resume_deadline)",
        (
            on.drain_timeout_secs,
            on.direct_retry_secs,
            on.probe_timeout_ms,
            on.refusal_window_secs,
            on.resume_deadline_secs,
        ) != (
            nn.drain_timeout_secs,
            nn.direct_retry_secs,
            nn.probe_timeout_ms,
            nn.refusal_window_secs,
            nn.resume_deadline_secs,
        ),
    );
    restart("[shim]", old.shim != new.shim);
    p
}

/// Everything that could fail, done: what the swap puts in place.
pub(crate) struct Prepared {
    cfg: Config,
    text: String,
    key: SecretKey,
    trust: Trust,
    table: Table,
    /// Bridges to start (new or changed), each with its listener.
    start: Vec<(Tcp2PoolSection, Arc<Tcp2Pool>, Arc<TcpListener>)>,
    /// Running bridges to stop (removed or changed).
    stop: Vec<String>,
}

/// The limits of the node's exposed ports: those of the first
/// `[[pool2tcp]]`, or the defaults.
fn expose_limits(cfg: &Config) -> Limits {
    cfg.pool2tcp.first().map(|t| t.limits()).unwrap_or_default()
}

impl Daemon {
    /// The service table a config describes.
    fn service_table(self: &Arc<Self>, cfg: &Config) -> Result<Table, DaemonError> {
        let mut t = Table::new();
        if let Some(v) = &cfg.vault {
            let svc = crate::vault::VaultService::new(v, self.journal.clone())
                .map_err(DaemonError::State)?;
            t.add(pool_vault::SERVICE, Access::Trusted, svc);
        }
        for (i, s) in cfg.pool2tcp.iter().enumerate() {
            let target: Arc<TcpTarget> = TcpTarget::new(
                s.target.clone(),
                s.proxy_protocol,
                s.limits(),
                self.targets.clone(),
            );
            let access = Access::from_keys(&s.allow);
            if i == 0 && !cfg.pool2tcp.iter().any(|x| x.service.is_empty()) {
                // Streams that name no service go to the first target.
                t.add("", access.clone(), target.clone());
            }
            t.add(&s.service, access, target);
        }
        t.add(DISCARD_SERVICE, Access::Trusted, Arc::new(Discard));
        t.add_prefix(":", Access::Trusted, self.expose.clone());
        for e in cfg.expose.iter().filter(|e| !e.allow.is_empty()) {
            t.add(
                &format!(":{}", e.port),
                Access::from_keys(&e.allow),
                self.expose.clone(),
            );
        }
        t.add(
            crate::handoff_test::HANDOFF_TEST_SERVICE,
            Access::Trusted,
            crate::handoff::test_service(),
        );
        for (name, svc) in crate::handoff::services(self, &cfg.handoff.peers) {
            t.add(name, Access::from_keys(&cfg.handoff.peers), svc);
        }
        let (admins, readers) = (&cfg.control.admins, &cfg.control.readers);
        if !admins.is_empty() || !readers.is_empty() {
            let all: Vec<_> = admins.iter().chain(readers).copied().collect();
            t.add(
                CONTROL_SERVICE,
                Access::from_keys(&all),
                ControlService::new(Arc::downgrade(self), admins.clone()),
            );
        }
        Ok(t)
    }

    /// Prepares `cfg`: every step that can fail, nothing changed yet.
    pub(crate) async fn prepare(
        self: &Arc<Self>,
        cfg: Config,
        text: String,
    ) -> Result<Prepared, DaemonError> {
        let key = load_or_create_key(&cfg.node.key, false)?;
        let trust = build_trust(&cfg.trust, &crate::daemon::default_known_peers(&cfg))?;
        if self.listening
            && !trust.accepts_clients()
            && !(cfg.pool2tcp.is_empty() && cfg.expose.is_empty())
        {
            return Err(DaemonError::Trust(
                "this config trusts no client, so every session would be refused: \
                 set [trust] allow, authorized or fleet_secret"
                    .into(),
            ));
        }
        let running: HashMap<String, (Tcp2PoolSection, Arc<TcpListener>)> = self
            .bridges
            .lock()
            .map(|b| {
                b.iter()
                    .map(|(k, v)| (k.clone(), (v.section.clone(), v.listener.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let kept = |name: &str| {
            running
                .get(name)
                .is_some_and(|(s, _)| cfg.tcp2pool.iter().any(|n| n == s))
        };
        let stop: Vec<String> = running.keys().filter(|n| !kept(n)).cloned().collect();
        let mut start = Vec::new();
        for section in cfg.tcp2pool.iter().filter(|s| !kept(&s.name)) {
            let bridge = Tcp2Pool::new(
                Tcp2PoolConfig {
                    listen: section.listen.clone(),
                    peer: section.peer.clone(),
                    peer_key: section.peer_key,
                    service: section.service.clone(),
                    limits: section.limits(),
                    director: section.director,
                },
                self.endpoint.clone(),
            );
            // A bridge that goes away (or changes) hands its listening
            // socket to the new one on the same address: no moment in
            // which connections are refused, nothing to rebind.
            let reuse = stop
                .iter()
                .filter_map(|n| running.get(n))
                .find(|(s, _)| s.listen == section.listen)
                .map(|(_, l)| l.clone());
            let listener = match reuse {
                Some(l) => l,
                None => Arc::new(bridge.bind().await.map_err(|source| DaemonError::Listen {
                    what: format!("tcp2pool `{}` on {}", section.name, section.listen),
                    source,
                })?),
            };
            start.push((section.clone(), bridge, listener));
        }
        let table = self.service_table(&cfg)?;
        Ok(Prepared {
            cfg,
            text,
            key,
            trust,
            table,
            start,
            stop,
        })
    }

    /// Puts a prepared config in place. Nothing here can fail.
    pub(crate) fn swap(self: &Arc<Self>, p: Prepared) {
        // Sessions of peers the new trust no longer covers end now; the
        // others, and their connections, go on.
        for s in self.endpoint.sessions() {
            if !p.trust.trusts(&s.peer_key()) {
                warn!(peer = %s.peer_key(), "key no longer trusted: closing its session");
                self.journal(
                    Event::SessionRevoked,
                    json!({"session": s.id().to_string(), "peer": s.peer_key().to_string()}),
                );
                let s2 = s.clone();
                tokio::spawn(async move {
                    s2.close("your key is no longer trusted by this node").await;
                });
            }
        }
        let old_key = self.endpoint.public_key();
        self.endpoint.reload(p.key.clone(), p.trust.clone());
        if p.key.public_key() != old_key {
            self.journal(
                Event::KeyChanged,
                json!({"old": old_key.to_string(), "new": p.key.public_key().to_string()}),
            );
        }
        self.router.set_table(p.table);
        self.expose
            .configure(p.cfg.expose.clone(), self.journal.clone());
        self.expose.set_limits(expose_limits(&p.cfg));
        if let Some(shim) = &self.shim {
            // The same trust (and known-peers store) as the endpoint's.
            shim.node.configure(&p.cfg.route, p.trust.clone());
        }
        for name in &p.stop {
            self.stop_bridge(name);
        }
        for (section, bridge, listener) in p.start {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            info!(name = %section.name, listen = %addr, peer = %section.peer, "tcp2pool bridge up");
            let (stop, stop_rx) = watch::channel(false);
            tokio::spawn(bridge.clone().run(listener.clone(), stop_rx));
            if let Ok(mut b) = self.bridges.lock() {
                b.insert(
                    section.name.clone(),
                    RunningBridge {
                        section,
                        bridge,
                        stop,
                        addr,
                        listener,
                    },
                );
            }
        }
        if let Ok(mut r) = self.running.lock() {
            *r = (p.cfg, p.text);
        }
    }

    /// The config running now and its text.
    pub fn running_config(&self) -> (Config, String) {
        self.running.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Parses `text` (named `source` in errors), then plans, prepares and
    /// swaps it in, journaling the outcome as `how` (`start`, `reload`,
    /// `apply`, `rollback`, `automatic_rollback`). On an error nothing has
    /// changed.
    pub async fn apply_text(
        self: &Arc<Self>,
        text: &str,
        source: &Path,
        how: &str,
    ) -> Result<Plan, DaemonError> {
        let _one = self.apply_lock.lock().await;
        let digest = sha256_hex(text);
        let result = async {
            let cfg = Config::parse(text, source)?;
            let (old, old_text) = self.running_config();
            let plan = plan(&old, &cfg);
            let prepared = self.prepare(cfg, text.to_owned()).await?;
            self.swap(prepared);
            Ok::<_, DaemonError>((plan, sha256_hex(&old_text)))
        }
        .await;
        match result {
            Ok((plan, previous)) => {
                info!(how, sha256 = %digest, changes = plan.changes.len(), "configuration applied");
                for c in plan.changes.iter().chain(&plan.restart_needed) {
                    info!(how, "  {c}");
                }
                self.journal(
                    Event::ConfigApplied,
                    json!({"how": how, "source": source.display().to_string(), "sha256": digest,
                           "previous_sha256": previous, "changes": plan.changes,
                           "restart_needed": plan.restart_needed}),
                );
                Ok(plan)
            }
            Err(e) => {
                warn!(how, sha256 = %digest, "configuration NOT applied; the running one is unchanged: {e}");
                self.journal(
                    Event::ConfigNotApplied,
                    json!({"how": how, "source": source.display().to_string(), "sha256": digest,
                           "error": e.to_string()}),
                );
                Err(e)
            }
        }
    }

    /// `pool config check`: parses `text` and says what applying it would
    /// change, binding nothing.
    pub fn check_text(&self, text: &str, source: &Path) -> Result<Plan, DaemonError> {
        let cfg = Config::parse(text, source)?;
        load_or_create_key(&cfg.node.key, false)?;
        let trust = build_trust(&cfg.trust, &crate::daemon::default_known_peers(&cfg))?;
        crate::keys::check_listener_trust(&cfg, &trust, self.listening)?;
        Ok(plan(&self.running_config().0, &cfg))
    }
}
