//! A worker's side of the director (`[director]`, docs/director.md): the
//! link that registers this node, beats its lease with its load, carries
//! out the director's move orders by handoff, asks for claims before
//! taking a handed-in session (fencing), and asks to be drained at
//! SIGTERM.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pool_director::registry::Load;
use pool_director::store::WorkerState;
use pool_director::wire::{write_line, FromWorker, LineReader, ToWorker};
use pool_net::{EndpointEvent, PublicKey, Session, SessionId};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use crate::config::DirectorSection;
use crate::daemon::Daemon;

/// How long a claim may wait for the director's answer.
const CLAIM_WAIT: Duration = Duration::from_secs(2);
/// Sessions handed in less than this long ago are moved last.
const SETTLE: Duration = Duration::from_secs(30);
/// Sessions with open streams are handed this many at a time.
const PARALLEL_BUSY: usize = 2;

/// The link to the director.
pub struct DirectorLink {
    cfg: DirectorSection,
    addrs: Vec<String>,
    tx: Mutex<Option<mpsc::UnboundedSender<FromWorker>>>,
    claims: Mutex<HashMap<u64, oneshot::Sender<Result<u64, String>>>>,
    next: AtomicU64,
    state: Mutex<Option<WorkerState>>,
    /// Sessions handed in here, and when.
    arrived: Mutex<HashMap<SessionId, Instant>>,
    /// Sessions a move order has picked and not finished with: two orders
    /// at once (a drain to two workers) never pick the same session.
    picked: Mutex<std::collections::HashSet<SessionId>>,
    /// Set at SIGTERM: ask the director to drain us (again after a reconnect).
    leaving: std::sync::atomic::AtomicBool,
    changed: Notify,
}

impl DirectorLink {
    /// A link for `cfg`, advertising `addrs`.
    pub fn new(cfg: DirectorSection, addrs: Vec<String>) -> Arc<Self> {
        Arc::new(DirectorLink {
            cfg,
            addrs,
            tx: Mutex::new(None),
            claims: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            state: Mutex::new(None),
            arrived: Mutex::new(HashMap::new()),
            picked: Mutex::new(std::collections::HashSet::new()),
            leaving: std::sync::atomic::AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    /// The standing the director gave us last (`None`: not registered).
    pub fn state(&self) -> Option<WorkerState> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the link to the director is up now.
    pub fn linked(&self) -> bool {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The director's key.
    pub fn director_key(&self) -> PublicKey {
        self.cfg.key
    }

    /// How long SIGTERM waits for the drain.
    pub fn leave_deadline(&self) -> Duration {
        self.cfg.leave_deadline
    }

    fn send(&self, m: FromWorker) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref().is_some_and(|t| t.send(m).is_ok())
    }

    /// Asks the director whether this worker may take `session` from
    /// `from`. Without a live link the answer is no: a worker cut off
    /// from its director takes no session (fencing).
    pub async fn claim(&self, session: SessionId, from: PublicKey) -> Result<u64, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let sent = self.send(FromWorker::Claim {
            id,
            session: session.to_string(),
            from,
        });
        let r = if !sent {
            Err("this worker has no link to its director, so it may not take sessions".into())
        } else {
            match tokio::time::timeout(CLAIM_WAIT, rx).await {
                Ok(Ok(r)) => r,
                _ => Err(format!(
                    "the director did not answer the claim within {} s",
                    CLAIM_WAIT.as_secs()
                )),
            }
        };
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        r
    }

    /// This worker is about to hand `session` to `to`: tell the director
    /// (the target's claim needs it). `false` without a live link: the
    /// handoff cannot be claimed then, so it is not started.
    pub fn announce(&self, session: SessionId, to: PublicKey) -> bool {
        self.send(FromWorker::Handing {
            session: session.to_string(),
            to,
        })
    }

    /// A handoff whose claim held did not commit: the session stays with
    /// `source`.
    pub fn unclaim(&self, session: SessionId, source: PublicKey) {
        self.send(FromWorker::Unclaim {
            session: session.to_string(),
            source,
        });
    }

    /// SIGTERM: ask the director to drain this worker.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.send(FromWorker::Leave);
    }

    /// Waits until the standing changes.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// What the node holds now, for a heartbeat.
struct Snapshot {
    sessions: BTreeSet<String>,
    load: Load,
    bytes: u64,
}

fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

impl Daemon {
    /// Client sessions: accepted, open, not other workers' links.
    pub(crate) fn client_sessions(&self) -> Vec<Session> {
        self.endpoint
            .sessions()
            .into_iter()
            .filter(|s| !s.is_closed() && !self.fleet_peer(&s.peer_key()))
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        let mut sessions = BTreeSet::new();
        let mut load = Load::default();
        let mut bytes = 0;
        for s in self.endpoint.sessions() {
            let st = s.stats();
            bytes += st.core.bytes_sent + st.core.bytes_received;
            if self.fleet_peer(&s.peer_key()) {
                load.forwarding += st.core.streams_active as u32;
            } else if !s.is_closed() {
                sessions.insert(s.id().to_string());
                load.streams += st.core.streams_active as u32;
            }
        }
        load.sessions = sessions.len() as u32;
        Snapshot {
            sessions,
            load,
            bytes,
        }
    }

    /// Carries out a move order: hands `count` client sessions to `to`.
    async fn carry_out(
        self: &Arc<Self>,
        link: &DirectorLink,
        count: u32,
        to: &str,
        to_key: PublicKey,
    ) -> (u32, u32) {
        if !self.fleet_peer(&to_key) {
            warn!(to = %to_key.short(), "the director ordered a handoff to a worker not in [handoff] peers; refused");
            return (0, count);
        }
        let arrived = link
            .arrived
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pick: Vec<(bool, Session)> = {
            let mut picked = link.picked.lock().unwrap_or_else(|e| e.into_inner());
            let mut pick: Vec<(bool, Session)> = self
                .client_sessions()
                .into_iter()
                .filter(|s| !s.stats().handing_off && !picked.contains(&s.id()))
                .map(|s| {
                    let fresh = arrived.get(&s.id()).is_some_and(|t| t.elapsed() < SETTLE);
                    (fresh, s)
                })
                .collect();
            pick.sort_by_key(|(fresh, s)| (*fresh, s.id().to_string()));
            pick.truncate(count as usize);
            picked.extend(pick.iter().map(|(_, s)| s.id()));
            pick
        };
        let ids: Vec<SessionId> = pick.iter().map(|(_, s)| s.id()).collect();
        // Sessions with open streams go first, a few at a time, so that the
        // data they carry stalls only for their own handoff and not for a
        // crowd's CPU; idle sessions then go many at a time.
        let (busy, idle): (Vec<Session>, Vec<Session>) = pick
            .into_iter()
            .map(|(_, s)| s)
            .partition(|s| s.stats().core.streams_active > 0);
        let (mut handed, mut failed) = (0, 0);
        let parallel = link.cfg.parallel.max(1);
        for (group, parallel) in [(busy, PARALLEL_BUSY), (idle, parallel)] {
            let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
            let mut tasks = Vec::new();
            for s in group {
                let (d, to, permits) = (self.clone(), to.to_string(), permits.clone());
                tasks.push(tokio::spawn(async move {
                    let _p = permits.acquire_owned().await;
                    d.hand_off(&s, &to, to_key, None).await.is_ok()
                }));
            }
            for t in tasks {
                match t.await {
                    Ok(true) => handed += 1,
                    _ => failed += 1,
                }
            }
        }
        {
            let mut picked = link.picked.lock().unwrap_or_else(|e| e.into_inner());
            for id in &ids {
                picked.remove(id);
            }
        }
        // Fewer sessions than ordered: the rest count as failed.
        failed += count.saturating_sub(handed + failed);
        (handed, failed)
    }
}

/// Keeps the link to the director up for the daemon's life.
pub(crate) fn start(daemon: &Arc<Daemon>, link: Arc<DirectorLink>) {
    // Sessions handed in: remembered so they are not moved straight on.
    let mut events = daemon.endpoint.events();
    let l = link.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(EndpointEvent::HandedIn { id, .. }) => {
                    let mut a = l.arrived.lock().unwrap_or_else(|e| e.into_inner());
                    a.retain(|_, t| t.elapsed() < SETTLE);
                    a.insert(id, Instant::now());
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
    let weak = Arc::downgrade(daemon);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let Some(d) = weak.upgrade() else { return };
            match run_link(&d, &link).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    warn!(director = %link.cfg.address, "director link: {e}");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            *link.tx.lock().unwrap_or_else(|e| e.into_inner()) = None;
            drop(d);
            tokio::time::sleep(backoff).await;
        }
    });
}

async fn run_link(d: &Arc<Daemon>, link: &Arc<DirectorLink>) -> Result<(), String> {
    let cfg = &link.cfg;
    let session = tokio::time::timeout(
        Duration::from_secs(5),
        pool_director::client::connect_any(&d.endpoint, &cfg.address, cfg.key),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    let stream = session.open_stream().await.map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let mut r = LineReader::new(r);
    let snap = d.snapshot();
    let hello = FromWorker::Hello {
        addrs: link.addrs.clone(),
        sessions: snap.sessions.iter().cloned().collect(),
        load: snap.load,
        was: link.state(),
    };
    write_line(&mut w, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let (beat, state) =
        match tokio::time::timeout(Duration::from_secs(5), r.next::<ToWorker>()).await {
            Ok(Ok(Some(ToWorker::Welcome { beat_ms, state, .. }))) => {
                (Duration::from_millis(beat_ms.clamp(50, 60_000)), state)
            }
            other => return Err(format!("the director did not welcome us: {other:?}")),
        };
    info!(director = %cfg.address, ?state, "registered with the director");
    set_state(d, link, state);
    let (tx, mut rx) = mpsc::unbounded_channel::<FromWorker>();
    *link.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
    if link.leaving.load(Ordering::Relaxed) {
        let _ = tx.send(FromWorker::Leave);
    }
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_line(&mut w, &m).await.is_err() {
                break;
            }
        }
    });
    let mut reported = snap.sessions;
    // A session to a dead director resumes for its whole deadline; give
    // it up after two heartbeats without a carrier and dial again (the
    // next director of the list may lead now).
    let mut no_carrier: Option<Instant> = None;
    let mut last = (Instant::now(), snap.bytes, cpu_ticks());
    let mut every = tokio::time::interval(beat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = every.tick() => {
                if session.stats().carrier == "none" {
                    let since = *no_carrier.get_or_insert_with(Instant::now);
                    if since.elapsed() >= beat * 2 {
                        break Err("no carrier to the director for two heartbeats; dialling again".to_string());
                    }
                    continue;
                }
                no_carrier = None;
                let mut snap = d.snapshot();
                let now = (Instant::now(), snap.bytes, cpu_ticks());
                let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
                snap.load.bytes_per_sec = (now.1.saturating_sub(last.1) as f64 / secs) as u64;
                if let (Some(a), Some(b)) = (last.2, now.2) {
                    // Clock ticks are 1/100 s on Linux.
                    snap.load.cpu_percent = (b.saturating_sub(a) as f64 / secs) as f32;
                }
                last = now;
                let added = snap.sessions.difference(&reported).cloned().collect();
                let removed = reported.difference(&snap.sessions).cloned().collect();
                reported = snap.sessions;
                if tx.send(FromWorker::Beat { load: snap.load, added, removed }).is_err() {
                    break Err("the link's writer stopped".to_string());
                }
            }
            m = r.next::<ToWorker>() => match m {
                Ok(Some(ToWorker::Move { id, count, to, to_key, why })) => {
                    info!(count, to = %to_key.short(), why, "the director orders a move");
                    let (d, link, tx) = (d.clone(), link.clone(), tx.clone());
                    tokio::spawn(async move {
                        let (handed, failed) = d.carry_out(&link, count, &to, to_key).await;
                        let _ = tx.send(FromWorker::Moved { id, handed, failed });
                    });
                }
                Ok(Some(ToWorker::State { state })) => set_state(d, link, state),
                Ok(Some(ToWorker::Claimed { id, ok, revision, error })) => {
                    let waiting = link.claims.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    if let Some(w) = waiting {
                        let _ = w.send(if ok { Ok(revision) } else {
                            Err(error.unwrap_or_else(|| "refused".into()))
                        });
                    }
                }
                Ok(Some(ToWorker::Welcome { .. })) => debug!("a second welcome; ignored"),
                Ok(None) => break Err("the director closed the link".to_string()),
                Err(e) => break Err(format!("bad message from the director: {e}")),
            },
            reason = session.closed() => break Err(format!("the session to the director closed: {reason}")),
        }
    };
    writer.abort();
    let s = session.clone();
    tokio::spawn(async move {
        s.close("director link ended").await;
    });
    result
}

fn set_state(d: &Daemon, link: &DirectorLink, state: WorkerState) {
    *link.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    // A draining or drained worker takes no new sessions; resumes go on.
    d.endpoint.set_draining(matches!(
        state,
        WorkerState::Draining | WorkerState::Drained
    ));
    link.changed.notify_waiters();
}

/// A weak handle for the importer's claims.
pub(crate) fn claim_link(d: &Weak<Daemon>) -> Option<Arc<DirectorLink>> {
    d.upgrade()?.director.clone()
}
