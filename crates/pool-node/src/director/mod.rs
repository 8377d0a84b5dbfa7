//! The director's runtime (docs/director.md): a POOL listener that places
//! clients on workers, keeps the workers' leases, and orders handoffs on
//! drains and skewed load. The rules are the sans-IO
//! [`pool_director::registry::Registry`]; the fleet's state lives in a
//! [`Store`] (embedded, or etcd).

mod control;
mod links;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_director::registry::{Move, Registry, Rules};
use pool_director::store::{Store, WorkerState};
use pool_director::wire::{Placement, PlacementReply, ToWorker};
use pool_journal::{Event, Journal};
use pool_net::{Endpoint, EndpointConfig, PublicKey, SecretKey, Session, Trust};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::daemon::DaemonError;

pub use control::{request as control_request, DirectorRequest};

/// How a director runs.
pub struct DirectorOptions {
    /// Where it listens for workers and clients (`[::]:9260`).
    pub listen: String,
    /// Its key.
    pub key: SecretKey,
    /// Whom it accepts at all: clients and workers.
    pub trust: Trust,
    /// The keys that may register as workers (trusted too).
    pub workers: Vec<PublicKey>,
    /// Its rules (lease, placement policy, rebalancing).
    pub rules: Rules,
    /// Its control socket (`pool director workers`, `drain`).
    pub control: Option<PathBuf>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<String>,
    /// Its change journal.
    pub journal: Option<Journal>,
}

/// What the director counts.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) registrations: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) placements: AtomicU64,
    pub(crate) placements_failed: AtomicU64,
    pub(crate) drains: AtomicU64,
    pub(crate) rebalance_orders: AtomicU64,
    pub(crate) sessions_moved: AtomicU64,
    pub(crate) moves_failed: AtomicU64,
    pub(crate) claims: AtomicU64,
    pub(crate) claims_refused: AtomicU64,
}

/// A worker's link: where its orders go.
pub(crate) struct LinkTx {
    pub(crate) tx: mpsc::UnboundedSender<ToWorker>,
    pub(crate) generation: u64,
    /// The worker's session, closed when its lease expires (it registers
    /// afresh when it comes back).
    pub(crate) session: Session,
}

/// A running director.
pub struct Director {
    pub(crate) endpoint: Endpoint,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) links: Mutex<HashMap<PublicKey, LinkTx>>,
    pub(crate) orders: Mutex<HashMap<u64, Move>>,
    /// Sources whose last move failed somewhere: no new drain order until.
    pub(crate) backoff: Mutex<HashMap<PublicKey, Instant>>,
    /// Handoffs a source announced: session → (source, target, when). A
    /// target may claim only a session its owner announced to it.
    pub(crate) handing: Mutex<HashMap<String, (PublicKey, PublicKey, Instant)>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) journal: Option<Journal>,
    workers: HashSet<PublicKey>,
    started: Instant,
}

impl Director {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn journal(&self, event: Event, fields: Value) {
        if let Some(j) = &self.journal {
            j.record(event, fields);
        }
    }

    fn journal_bulk(&self, event: Event, fields: Value) {
        if let Some(j) = &self.journal {
            j.record_bulk(event, fields);
        }
    }

    /// The lease the workers get.
    pub(crate) fn lease(&self) -> Duration {
        self.lock().rules().lease
    }

    /// Where a new client goes.
    pub(crate) fn place(&self, client: &PublicKey) -> PlacementReply {
        let chosen = self.lock().place(Instant::now(), client);
        match chosen {
            Some(w) => {
                self.counters.placements.fetch_add(1, Ordering::Relaxed);
                self.journal_bulk(
                    Event::ClientPlaced,
                    json!({"client": client.to_string(), "worker": w.key.to_string()}),
                );
                PlacementReply::Placed(Placement {
                    worker: w.key,
                    addrs: w.addrs,
                })
            }
            None => {
                self.counters
                    .placements_failed
                    .fetch_add(1, Ordering::Relaxed);
                let n = self.lock().records().len();
                PlacementReply::Error {
                    error: format!("no active worker is connected ({n} known)"),
                }
            }
        }
    }

    /// Marks `key` draining (from `pool director drain` or the worker's
    /// own SIGTERM); the ticker orders its sessions out.
    pub(crate) async fn drain(&self, key: &PublicKey, why: &str) -> Result<u32, String> {
        let (rec, sessions) = {
            let mut r = self.lock();
            let sessions = r.get(key).map(|w| w.load.sessions).unwrap_or(0);
            let rec = r
                .set_state(key, WorkerState::Draining)
                .ok_or_else(|| format!("no worker {key} is registered"))?;
            (rec, sessions)
        };
        let lease = self.lease();
        if let Err(e) = self.store.put_worker(&rec, lease).await {
            warn!("drain of {}: {e}", key.short());
        }
        self.send(
            key,
            ToWorker::State {
                state: WorkerState::Draining,
            },
        );
        self.counters.drains.fetch_add(1, Ordering::Relaxed);
        self.journal(
            Event::WorkerDraining,
            json!({"worker": key.to_string(), "sessions": sessions, "by": why}),
        );
        info!(worker = %key.short(), sessions, by = why, "draining");
        Ok(sessions)
    }

    /// Sends an order to a connected worker.
    pub(crate) fn send(&self, key: &PublicKey, msg: ToWorker) -> bool {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.get(key).is_some_and(|l| l.tx.send(msg).is_ok())
    }

    /// One tick: leases, drain and rebalance orders.
    async fn tick(&self) {
        let now = Instant::now();
        let (lost, moves) = {
            let mut r = self.lock();
            let lost = r.expire(now);
            let mut moves = r.drain_moves();
            moves.extend(r.rebalance_moves(now));
            (lost, moves)
        };
        for k in lost {
            self.counters.leases_lost.fetch_add(1, Ordering::Relaxed);
            warn!(worker = %k.short(), "lease expired: worker lost");
            self.journal(
                Event::WorkerLost,
                json!({"worker": k.to_string(), "lease_ms": self.lease().as_millis() as u64}),
            );
            let link = self
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&k);
            if let Some(l) = link {
                tokio::spawn(async move {
                    l.session.close("lease expired").await;
                });
            }
            if let Err(e) = self.store.remove_worker(&k).await {
                warn!("store: {e}");
            }
        }
        for m in moves {
            let waiting = self
                .backoff
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&m.from)
                .is_some_and(|t| *t > now);
            if waiting {
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let order = ToWorker::Move {
                id,
                count: m.count,
                to: m.to_addr.clone(),
                to_key: m.to,
                why: m.why.into(),
            };
            if !self.send(&m.from, order) {
                continue;
            }
            self.lock().move_sent(&m.from, id);
            if m.why == "rebalance" {
                self.counters
                    .rebalance_orders
                    .fetch_add(1, Ordering::Relaxed);
                self.journal(
                    Event::SessionsRebalanced,
                    json!({"from": m.from.to_string(), "to": m.to.to_string(), "count": m.count}),
                );
            }
            info!(from = %m.from.short(), to = %m.to.short(), count = m.count, why = m.why, "move ordered");
            self.orders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, m);
        }
    }

    /// A client's session (its placement went with the handshake's
    /// answer, as the endpoint's greeting): answer its questions about its
    /// worker for a while.
    async fn serve_client(self: Arc<Self>, s: Session) {
        let until = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(until);
        loop {
            tokio::select! {
                st = s.accept_stream() => match st {
                    Some(st) => { tokio::spawn(links::answer_query(self.clone(), st, s.peer_key())); }
                    None => break,
                },
                _ = &mut until => break,
            }
        }
        s.close("placed").await;
    }

    /// Counters for `pool director status` and metrics.
    pub(crate) fn status(&self) -> Value {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = self.lock();
        let mut by_state: HashMap<String, u64> = HashMap::new();
        for w in r.records() {
            *by_state.entry(w.state.to_string()).or_default() += 1;
        }
        json!({
            "key": self.endpoint.public_key().to_string(),
            "listen": self.endpoint.local_addr().map(|a| a.to_string()),
            "store": self.store.describe(),
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "lease_ms": r.rules().lease.as_millis() as u64,
            "policy": r.rules().policy,
            "rebalancing": r.rebalancing(),
            "workers": by_state,
            "registrations": g(&c.registrations),
            "leases_lost": g(&c.leases_lost),
            "placements": g(&c.placements),
            "placements_failed": g(&c.placements_failed),
            "drains": g(&c.drains),
            "rebalance_orders": g(&c.rebalance_orders),
            "sessions_moved": g(&c.sessions_moved),
            "moves_failed": g(&c.moves_failed),
            "claims": g(&c.claims),
            "claims_refused": g(&c.claims_refused),
        })
    }
}

/// Runs a director until `stop` turns true (or, with a shared store, it
/// loses the lead: then an error).
///
/// # Errors
///
/// The listener, control socket or metrics could not be opened, the store
/// could not be read, or the lead was lost.
pub async fn run(
    opts: DirectorOptions,
    store: Arc<dyn Store>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let name = format!("{} {}", opts.key.public_key(), opts.listen);
    info!(store = %store.describe(), "waiting to lead");
    tokio::select! {
        r = store.campaign(&name) => r.map_err(|e| DaemonError::State(e.to_string()))?,
        _ = stop.changed() => return Ok(()),
    }
    let fleet = store
        .load()
        .await
        .map_err(|e| DaemonError::State(e.to_string()))?;
    let mut trust = opts.trust;
    for k in &opts.workers {
        trust = trust.allow(*k);
    }
    // The placement goes in the same flight as the handshake's answer: a
    // client knows its worker one round trip after its HELLO.
    let me: Arc<std::sync::OnceLock<std::sync::Weak<Director>>> = Arc::default();
    let greeter = me.clone();
    let worker_keys: HashSet<PublicKey> = opts.workers.iter().copied().collect();
    let greeting = pool_net::Greeting(Arc::new(move |peer: &PublicKey| {
        if worker_keys.contains(peer) {
            return None;
        }
        let d = greeter.get()?.upgrade()?;
        let mut line = serde_json::to_vec(&d.place(peer)).ok()?;
        line.push(b'\n');
        Some(line)
    }));
    let endpoint = Endpoint::bind(
        &opts.listen,
        EndpointConfig::new(opts.key)
            .trust(trust)
            .greeting(greeting),
    )
    .await?;
    let mut registry = Registry::new(opts.rules);
    let restored = fleet.workers.len();
    registry.restore(Instant::now(), fleet.workers);
    let d = Arc::new(Director {
        endpoint,
        registry: Mutex::new(registry),
        store,
        links: Mutex::new(HashMap::new()),
        orders: Mutex::new(HashMap::new()),
        backoff: Mutex::new(HashMap::new()),
        handing: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        counters: Counters::default(),
        journal: opts.journal,
        workers: opts.workers.into_iter().collect(),
        started: Instant::now(),
    });
    let _ = me.set(Arc::downgrade(&d));
    let addr = d.endpoint.local_addr().map(|a| a.to_string());
    info!(listen = ?addr, restored, store = %d.store.describe(), "director up");
    d.journal(
        Event::DirectorStarted,
        json!({"listen": addr, "store": d.store.describe(), "workers_restored": restored,
               "owners_restored": fleet.owners.len()}),
    );
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &opts.control {
        let l = crate::control::bind_control(path).map_err(|source| DaemonError::Listen {
            what: format!("control socket {}", path.display()),
            source,
        })?;
        tasks.spawn(control::serve(d.clone(), l));
    }
    if let Some(m) = &opts.metrics {
        let (bound, task) = crate::metrics::serve_registry(m, control::metrics_registry(d.clone()))
            .await
            .map_err(|source| DaemonError::Listen {
                what: format!("metrics {m}"),
                source,
            })?;
        info!(%bound, "metrics");
        tasks.spawn(async move {
            let _ = task.await;
        });
    }
    {
        let d = d.clone();
        tasks.spawn(async move {
            while let Some(s) = d.endpoint.accept().await {
                let d = d.clone();
                if d.workers.contains(&s.peer_key()) {
                    tokio::spawn(links::serve_worker(d, s));
                } else {
                    tokio::spawn(d.serve_client(s));
                }
            }
        });
    }
    {
        let d = d.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                d.tick().await;
            }
        });
    }
    let result = tokio::select! {
        _ = stop.changed() => Ok(()),
        r = d.store.deposed() => {
            let why = r.err().map_or("lead lost".to_string(), |e| e.to_string());
            Err(DaemonError::State(format!("this director lost the lead ({why}); stopping so that only the leader directs")))
        }
    };
    tasks.abort_all();
    if let Err(e) = d.store.flush().await {
        warn!("{e}");
    }
    if let Some(p) = &opts.control {
        crate::control::remove_control(p);
    }
    if let Some(j) = &d.journal {
        j.checkpoint().await;
    }
    result
}
