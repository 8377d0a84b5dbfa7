//! The director's view of its workers, sans IO: registrations, leases,
//! load, placement, drains and rebalancing. Every rule takes `now` from
//! the caller, so each is tested on a virtual clock; the runtime
//! (`pool_node::director`) only feeds it messages and timer ticks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use pool_net::PublicKey;
use serde::{Deserialize, Serialize};

use crate::store::{WorkerRecord, WorkerState};

/// What a worker reports of itself in each heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Client sessions it holds (worker links excluded).
    pub sessions: u32,
    /// Streams open on them.
    pub streams: u32,
    /// Bytes per second, both directions, over the last interval.
    pub bytes_per_sec: u64,
    /// The process's CPU use over the last interval, in percent of one core.
    pub cpu_percent: f32,
    /// Streams still forwarded for sessions already handed away.
    #[serde(default)]
    pub forwarding: u32,
}

/// How clients are placed on workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The worker with the fewest sessions (counting placements not yet
    /// reported). The default: every session costs a worker about the
    /// same, it balances from the first placement, and it needs no
    /// stickiness because handoffs move state anyway.
    #[default]
    LeastSessions,
    /// The worker with the least CPU use in its last heartbeat.
    LeastLoad,
    /// Rendezvous hash of the client's key: a client returns to the same
    /// worker while the set of workers stays the same.
    Hash,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "least-sessions" => Ok(Policy::LeastSessions),
            "least-load" => Ok(Policy::LeastLoad),
            "hash" => Ok(Policy::Hash),
            other => Err(format!(
                "unknown placement policy `{other}` (least-sessions, least-load or hash)"
            )),
        }
    }
}

/// The director's rules and their numbers.
#[derive(Clone, Debug)]
pub struct Rules {
    /// A worker not heard from for this long is lost.
    pub lease: Duration,
    /// How often workers send heartbeats (a third of the lease).
    pub heartbeat: Duration,
    /// Placement policy.
    pub policy: Policy,
    /// Rebalancing starts when the busiest worker holds this much more
    /// than the mean (0.25: 25 % more)...
    pub skew_start: f64,
    /// ... and stops once it holds no more than this over the mean.
    pub skew_stop: f64,
    /// Never rebalance over a gap smaller than this many sessions.
    pub min_gap: u32,
    /// At most this many sessions moved per second by rebalancing.
    pub moves_per_sec: u32,
    /// Rebalancing is off when false.
    pub rebalance: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            lease: Duration::from_secs(3),
            heartbeat: Duration::from_secs(1),
            policy: Policy::LeastSessions,
            skew_start: 0.25,
            skew_stop: 0.10,
            min_gap: 2,
            moves_per_sec: 50,
            rebalance: true,
        }
    }
}

/// One worker as the director sees it.
#[derive(Clone, Debug)]
pub struct Worker {
    /// What the store keeps.
    pub record: WorkerRecord,
    /// Its last heartbeat (or registration).
    pub last_heard: Instant,
    /// Its last reported load.
    pub load: Load,
    /// The sessions it holds, by id.
    pub sessions: BTreeSet<String>,
    /// Placements not yet visible in a heartbeat.
    placed: VecDeque<Instant>,
    /// A move command sent and not yet answered.
    pub moving: Option<u64>,
    /// Whether it is connected to this director now.
    pub connected: bool,
}

impl Worker {
    /// Sessions counted for placement and balance.
    fn weight(&self) -> u32 {
        self.load.sessions + self.placed.len() as u32
    }
}

/// One move to order: `count` sessions from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The source worker.
    pub from: PublicKey,
    /// The target worker.
    pub to: PublicKey,
    /// The target's address.
    pub to_addr: String,
    /// How many sessions.
    pub count: u32,
    /// Why: "drain" or "rebalance".
    pub why: &'static str,
}

/// A row of `pool director workers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerRow {
    /// The worker's key.
    pub key: String,
    /// Its first address.
    pub address: String,
    /// active / draining / drained / lost.
    pub state: WorkerState,
    /// Its last reported load.
    pub load: Load,
    /// Seconds since its last heartbeat.
    pub lease_age_secs: f64,
    /// Whether it is connected to this director.
    pub connected: bool,
}

/// The registry.
pub struct Registry {
    rules: Rules,
    workers: BTreeMap<PublicKey, Worker>,
    rebalancing: bool,
    /// Rebalance moves allowed, refilled at `moves_per_sec`.
    budget: f64,
    refilled: Option<Instant>,
}

impl Registry {
    /// An empty registry.
    pub fn new(rules: Rules) -> Registry {
        Registry {
            rules,
            workers: BTreeMap::new(),
            rebalancing: false,
            budget: 0.0,
            refilled: None,
        }
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Workers restored from the store: each gets one lease from `now` to
    /// come back before it is declared lost.
    pub fn restore(&mut self, now: Instant, records: Vec<WorkerRecord>) {
        for record in records {
            self.workers.insert(
                record.key,
                Worker {
                    record,
                    last_heard: now,
                    load: Load::default(),
                    sessions: BTreeSet::new(),
                    placed: VecDeque::new(),
                    moving: None,
                    connected: false,
                },
            );
        }
    }

    /// A worker (re)registered with its addresses, the sessions it holds
    /// and the standing it was last given (`was`, from its own memory: a
    /// worker that reconnects mid-drain stays draining, a drained one
    /// stays drained; a new process run starts active). Returns its record.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        now: Instant,
        key: PublicKey,
        addrs: Vec<String>,
        sessions: BTreeSet<String>,
        load: Load,
        was: Option<WorkerState>,
        unix_ms: u64,
    ) -> WorkerRecord {
        let state = match was {
            Some(s @ (WorkerState::Draining | WorkerState::Drained)) => s,
            _ => WorkerState::Active,
        };
        let w = Worker {
            record: WorkerRecord {
                key,
                addrs,
                state,
                registered_ms: unix_ms,
            },
            last_heard: now,
            load,
            sessions,
            placed: VecDeque::new(),
            moving: None,
            connected: true,
        };
        let rec = w.record.clone();
        self.workers.insert(key, w);
        rec
    }

    /// A heartbeat: the lease is renewed, the load and sessions updated.
    /// Returns the worker's new state if it changed (a draining worker
    /// that is empty is drained). `None` for an unknown worker.
    pub fn heartbeat(
        &mut self,
        now: Instant,
        key: &PublicKey,
        load: Load,
        added: &[String],
        removed: &[String],
    ) -> Option<Option<WorkerState>> {
        let heartbeat = self.rules.heartbeat;
        let w = self.workers.get_mut(key)?;
        w.last_heard = now;
        w.load = load;
        w.connected = true;
        for s in removed {
            w.sessions.remove(s);
        }
        w.sessions.extend(added.iter().cloned());
        // Placements older than a heartbeat are in the count now.
        while w
            .placed
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > heartbeat)
        {
            w.placed.pop_front();
        }
        if w.record.state == WorkerState::Draining && load.sessions == 0 && w.moving.is_none() {
            w.record.state = WorkerState::Drained;
            return Some(Some(WorkerState::Drained));
        }
        Some(None)
    }

    /// The worker's link to this director closed (its lease still runs).
    pub fn disconnected(&mut self, key: &PublicKey) {
        if let Some(w) = self.workers.get_mut(key) {
            w.connected = false;
            w.moving = None;
        }
    }

    /// Workers whose lease ran out by `now`: marked lost and returned
    /// (each once), their sessions forgotten.
    pub fn expire(&mut self, now: Instant) -> Vec<PublicKey> {
        let lease = self.rules.lease;
        let mut lost = Vec::new();
        for (k, w) in &mut self.workers {
            let live = matches!(w.record.state, WorkerState::Active | WorkerState::Draining);
            if live && now.saturating_duration_since(w.last_heard) > lease {
                w.record.state = WorkerState::Lost;
                w.sessions.clear();
                w.load = Load::default();
                w.placed.clear();
                w.moving = None;
                lost.push(*k);
            }
        }
        lost
    }

    /// Forgets a worker altogether.
    pub fn remove(&mut self, key: &PublicKey) -> bool {
        self.workers.remove(key).is_some()
    }

    /// The worker for a new client `client`, by the policy; `None` when no
    /// worker is active.
    pub fn place(&mut self, now: Instant, client: &PublicKey) -> Option<WorkerRecord> {
        let active = self.workers.values_mut().filter(|w| {
            w.record.state == WorkerState::Active && w.connected && !w.record.addrs.is_empty()
        });
        let chosen = match self.rules.policy {
            Policy::LeastSessions => active.min_by_key(|w| w.weight()),
            Policy::LeastLoad => active.min_by(|a, b| {
                (a.load.cpu_percent, a.weight())
                    .partial_cmp(&(b.load.cpu_percent, b.weight()))
                    .unwrap_or(std::cmp::Ordering::Equal)
            }),
            Policy::Hash => active.max_by_key(|w| rendezvous(client, &w.record.key)),
        }?;
        chosen.placed.push_back(now);
        Some(chosen.record.clone())
    }

    /// Sets a worker's state (`pool director drain`, a worker's own
    /// request at SIGTERM). `None` for an unknown worker.
    pub fn set_state(&mut self, key: &PublicKey, state: WorkerState) -> Option<WorkerRecord> {
        let w = self.workers.get_mut(key)?;
        w.record.state = state;
        Some(w.record.clone())
    }

    /// The moves that empty the draining workers onto the active ones,
    /// filling the emptiest first. Workers with a move under way are left
    /// until it is answered.
    pub fn drain_moves(&mut self) -> Vec<Move> {
        let mut targets: Vec<(u32, PublicKey, String)> = self
            .workers
            .values()
            .filter(|w| w.record.state == WorkerState::Active && w.connected)
            .filter_map(|w| Some((w.weight(), w.record.key, w.record.addrs.first()?.clone())))
            .collect();
        let mut moves = Vec::new();
        if targets.is_empty() {
            return moves;
        }
        let sources: Vec<(PublicKey, u32)> = self
            .workers
            .values()
            .filter(|w| w.record.state == WorkerState::Draining && w.connected)
            .filter(|w| w.moving.is_none() && w.load.sessions > 0)
            .map(|w| (w.record.key, w.load.sessions))
            .collect();
        for (from, mut left) in sources {
            // Water-filling: top up the emptiest target one level at a time.
            let mut per: BTreeMap<PublicKey, (u32, String)> = BTreeMap::new();
            while left > 0 {
                targets.sort();
                let Some(t) = targets.first_mut() else {
                    break;
                };
                t.0 += 1;
                left -= 1;
                per.entry(t.1).or_insert((0, t.2.clone())).0 += 1;
            }
            for (to, (count, to_addr)) in per {
                moves.push(Move {
                    from,
                    to,
                    to_addr,
                    count,
                    why: "drain",
                });
            }
        }
        moves
    }

    /// Rebalancing moves due at `now`: from the busiest active worker to
    /// the least busy, while the skew lasts (hysteresis between
    /// `skew_start` and `skew_stop`), at most `moves_per_sec`.
    pub fn rebalance_moves(&mut self, now: Instant) -> Vec<Move> {
        let rate = f64::from(self.rules.moves_per_sec);
        if let Some(t) = self.refilled {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            self.budget = (self.budget + dt * rate).min(rate);
        }
        self.refilled = Some(now);
        if !self.rules.rebalance {
            return Vec::new();
        }
        let active: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| w.record.state == WorkerState::Active && w.connected)
            .collect();
        if active.len() < 2 || active.iter().any(|w| w.moving.is_some()) {
            return Vec::new();
        }
        let total: u32 = active.iter().map(|w| w.load.sessions).sum();
        let mean = f64::from(total) / active.len() as f64;
        let (Some(hi), Some(lo)) = (
            active
                .iter()
                .max_by_key(|w| (w.load.sessions, w.record.key)),
            active
                .iter()
                .min_by_key(|w| (w.load.sessions, w.record.key)),
        ) else {
            return Vec::new();
        };
        let (h, l) = (hi.load.sessions, lo.load.sessions);
        let skew = if mean > 0.0 {
            f64::from(h) / mean - 1.0
        } else {
            0.0
        };
        let gap_ok = h.saturating_sub(l) >= self.rules.min_gap;
        if !self.rebalancing && gap_ok && skew > self.rules.skew_start {
            self.rebalancing = true;
        } else if self.rebalancing && (!gap_ok || skew <= self.rules.skew_stop) {
            self.rebalancing = false;
        }
        if !self.rebalancing {
            return Vec::new();
        }
        let target = mean.ceil() as u32;
        let want = h
            .saturating_sub(target)
            .min(target.saturating_sub(l))
            .max(1);
        let count = want.min(self.budget.floor() as u32);
        if count == 0 {
            return Vec::new();
        }
        let Some(to_addr) = lo.record.addrs.first().cloned() else {
            return Vec::new();
        };
        self.budget -= f64::from(count);
        vec![Move {
            from: hi.record.key,
            to: lo.record.key,
            to_addr,
            count,
            why: "rebalance",
        }]
    }

    /// Whether rebalancing is under way.
    pub fn rebalancing(&self) -> bool {
        self.rebalancing
    }

    /// A move command `id` went to `from`.
    pub fn move_sent(&mut self, from: &PublicKey, id: u64) {
        if let Some(w) = self.workers.get_mut(from) {
            w.moving = Some(id);
        }
    }

    /// The answer to move `id` came from `from`, with how many sessions
    /// it handed over; the counts shift until the next heartbeats say.
    pub fn move_done(&mut self, from: &PublicKey, id: u64, to: Option<&PublicKey>, handed: u32) {
        if let Some(w) = self.workers.get_mut(from) {
            if w.moving == Some(id) {
                w.moving = None;
            }
            w.load.sessions = w.load.sessions.saturating_sub(handed);
        }
        if let Some(t) = to.and_then(|t| self.workers.get_mut(t)) {
            t.load.sessions += handed;
        }
    }

    /// One worker.
    pub fn get(&self, key: &PublicKey) -> Option<&Worker> {
        self.workers.get(key)
    }

    /// Every worker's record (for the store).
    pub fn records(&self) -> Vec<WorkerRecord> {
        self.workers.values().map(|w| w.record.clone()).collect()
    }

    /// The rows of `pool director workers`.
    pub fn rows(&self, now: Instant) -> Vec<WorkerRow> {
        self.workers
            .values()
            .map(|w| WorkerRow {
                key: w.record.key.to_string(),
                address: w.record.addrs.first().cloned().unwrap_or_default(),
                state: w.record.state,
                load: w.load,
                lease_age_secs: now.saturating_duration_since(w.last_heard).as_secs_f64(),
                connected: w.connected,
            })
            .collect()
    }

    /// The worker that holds `session`, as last reported.
    pub fn owner_of(&self, session: &str) -> Option<PublicKey> {
        self.workers
            .values()
            .find(|w| w.sessions.contains(session))
            .map(|w| w.record.key)
    }
}

/// The rendezvous (highest random weight) score of `worker` for `client`.
fn rendezvous(client: &PublicKey, worker: &PublicKey) -> u64 {
    // FNV-1a over both keys: stable across processes and releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client.0.iter().chain(worker.0.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests;
