//! What the relay keeps while it runs: counters, registrations, pending
//! CONNECTs, per-key state (caps, rate buckets) and the guards that
//! count connections against their caps.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pool_core::relay::{
    CircuitId, RouteHop, ERR_CAPACITY, ERR_NOT_ALLOWED, ERR_NO_ANSWER, ERR_PROTOCOL,
    ERR_UNKNOWN_PEER,
};
use pool_core::PublicKey;
use pool_journal::{Event, Journal};
use pool_node::net::address_bucket;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::circuit::SPLICE_BUF;
use crate::config::RelayConfig;
use crate::conn::Authed;
use crate::peering::{Account, Peering};

/// A snapshot of a relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// TCP connections open now (handshaking, control and circuits).
    pub connections: u64,
    /// Connections accepted since start (including refused ones).
    pub connections_accepted: u64,
    /// Nodes registered now.
    pub nodes: u64,
    /// CONNECTs waiting for the peer's ACCEPT now.
    pub pending: u64,
    /// Circuits spliced now.
    pub circuits: u64,
    /// Circuits spliced since start.
    pub circuits_total: u64,
    /// Bytes forwarded through circuits, both directions.
    pub bytes: u64,
    /// Proofs of key ownership that failed.
    pub auth_failures: u64,
    /// Refused: a connection cap was reached.
    pub refused_capacity: u64,
    /// Refused: the key is not on the allow-list.
    pub refused_not_allowed: u64,
    /// Refused: CONNECT to a key that is not registered.
    pub refused_unknown_peer: u64,
    /// Refused: the peer did not ACCEPT in time.
    pub refused_no_answer: u64,
    /// Refused: malformed or unexpected messages, handshake timeouts,
    /// ACCEPTs of unknown circuits or by the wrong key.
    pub refused_protocol: u64,
    /// Refused: too many unauthenticated connections from one source
    /// address (IPv6: one /64).
    pub refused_address: u64,
    /// Circuits closed because no byte crossed them for
    /// [`RelayConfig::circuit_idle_timeout`].
    pub circuits_idle_closed: u64,
    /// Connections open now that have not authenticated yet.
    pub unauthenticated: u64,
}

/// One node key with connections open at the relay, as
/// [`RelayHandle::nodes`](crate::RelayHandle::nodes) lists it. Byte counts start when the key's first
/// open connection did (they are forgotten once it has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStats {
    /// The node's key.
    pub key: PublicKey,
    /// Whether it has a control connection (is reachable by CONNECT).
    pub registered: bool,
    /// Its connections open now (control, circuits, pending).
    pub connections: u64,
    /// Bytes it sent into circuits.
    pub sent: u64,
    /// Bytes circuits delivered to it.
    pub received: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) circuits: AtomicU64,
    pub(crate) circuits_total: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) refused: [AtomicU64; Refusal::COUNT],
    pub(crate) idle_closed: AtomicU64,
}

/// Why a connection was refused, for counters and the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Capacity,
    NotAllowed,
    UnknownPeer,
    NoAnswer,
    Protocol,
    Address,
}

impl Refusal {
    pub(crate) const COUNT: usize = 6;
    pub(crate) const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::Capacity,
        Refusal::NotAllowed,
        Refusal::UnknownPeer,
        Refusal::NoAnswer,
        Refusal::Protocol,
        Refusal::Address,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::NotAllowed => "not_allowed",
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::NoAnswer => "no_answer",
            Refusal::Protocol => "protocol",
            Refusal::Address => "address",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Refusal::Capacity | Refusal::Address => ERR_CAPACITY,
            Refusal::NotAllowed => ERR_NOT_ALLOWED,
            Refusal::UnknownPeer => ERR_UNKNOWN_PEER,
            Refusal::NoAnswer => ERR_NO_ANSWER,
            Refusal::Protocol => ERR_PROTOCOL,
        }
    }
}

/// A message to a node's control connection.
pub(crate) enum Ctl {
    Incoming { circuit: CircuitId, from: PublicKey },
    Replaced,
}

pub(crate) struct Registration {
    pub(crate) id: u64,
    pub(crate) tx: mpsc::Sender<Ctl>,
}

/// A CONNECT waiting for its ACCEPT.
pub(crate) struct Pending {
    pub(crate) acceptor: PublicKey,
    pub(crate) tx: oneshot::Sender<Authed>,
    /// The relays past this one, for an acceptor that asked for ROUTE.
    pub(crate) route: Vec<RouteHop>,
}

/// Per-key state while the key has connections open.
pub(crate) struct NodeState {
    pub(crate) key: PublicKey,
    /// Bytes this node sent into circuits.
    pub(crate) sent: AtomicU64,
    /// Bytes circuits delivered to this node.
    pub(crate) received: AtomicU64,
    pub(crate) bucket: Option<Mutex<Bucket>>,
    /// Its accounting since the relay started.
    pub(crate) account: Arc<Account>,
}

pub(crate) struct NodeSlot {
    pub(crate) connections: usize,
    pub(crate) state: Arc<NodeState>,
}

/// A token bucket: `rate` bytes per second, `burst` bytes deep. Tokens may
/// go negative; the taker then sleeps the debt off, so one large write is
/// never refused, only delayed.
pub(crate) struct Bucket {
    pub(crate) rate: f64,
    pub(crate) burst: f64,
    pub(crate) tokens: f64,
    pub(crate) last: Instant,
}

impl Bucket {
    /// Takes `n` tokens at `now`; how long the taker must wait.
    pub(crate) fn take(&mut self, now: Instant, n: usize) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: RelayConfig,
    pub(crate) counters: Counters,
    pub(crate) nodes: Mutex<HashMap<PublicKey, Registration>>,
    pub(crate) pending: Mutex<HashMap<CircuitId, Pending>>,
    pub(crate) per_node: Mutex<HashMap<PublicKey, NodeSlot>>,
    /// Unauthenticated connections open now, per source bucket.
    pub(crate) unauth: Mutex<HashMap<IpAddr, usize>>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) refusing: Arc<Semaphore>,
    pub(crate) journal: Option<Journal>,
    pub(crate) next_id: AtomicU64,
    pub(crate) peering: Peering,
    /// Becomes `true` when the relay stops (background tasks end).
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; a poisoned lock still holds
    // consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn journal(&self, event: Event, fields: serde_json::Value) {
        if let Some(j) = &self.journal {
            j.record(event, fields);
        }
    }

    /// For entries an unauthenticated or costless sender can cause (failed
    /// proofs, refusals): shed before they crowd out the others.
    pub(crate) fn journal_bulk(&self, event: Event, fields: serde_json::Value) {
        if let Some(j) = &self.journal {
            j.record_bulk(event, fields);
        }
    }

    pub(crate) fn refused(&self, why: Refusal) {
        self.counters.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let r = |w: Refusal| c.refused[w as usize].load(Ordering::Relaxed);
        let max = self.cfg.max_connections;
        RelayStats {
            connections: max.saturating_sub(self.slots.available_permits()) as u64,
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            nodes: lock(&self.nodes).len() as u64,
            pending: lock(&self.pending).len() as u64,
            circuits: c.circuits.load(Ordering::Relaxed),
            circuits_total: c.circuits_total.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            refused_capacity: r(Refusal::Capacity),
            refused_not_allowed: r(Refusal::NotAllowed),
            refused_unknown_peer: r(Refusal::UnknownPeer),
            refused_no_answer: r(Refusal::NoAnswer),
            refused_protocol: r(Refusal::Protocol),
            refused_address: r(Refusal::Address),
            circuits_idle_closed: c.idle_closed.load(Ordering::Relaxed),
            unauthenticated: lock(&self.unauth).values().sum::<usize>() as u64,
        }
    }

    /// Counts an unauthenticated connection against its source's cap;
    /// `None` when the cap is reached.
    pub(crate) fn enter_unauth(self: &Arc<Self>, ip: IpAddr) -> Option<UnauthGuard> {
        let bucket = address_bucket(ip);
        let cap = self.cfg.max_unauthenticated_per_address;
        let mut map = lock(&self.unauth);
        let n = map.entry(bucket).or_insert(0);
        if cap > 0 && *n >= cap {
            if *n == 0 {
                map.remove(&bucket);
            }
            return None;
        }
        *n += 1;
        Some(UnauthGuard {
            shared: self.clone(),
            bucket,
        })
    }

    pub(crate) fn nodes(&self) -> Vec<NodeStats> {
        let registered: HashSet<PublicKey> = lock(&self.nodes).keys().copied().collect();
        let mut rows: Vec<NodeStats> = lock(&self.per_node)
            .values()
            .map(|slot| NodeStats {
                key: slot.state.key,
                registered: registered.contains(&slot.state.key),
                connections: slot.connections as u64,
                sent: slot.state.sent.load(Ordering::Relaxed),
                received: slot.state.received.load(Ordering::Relaxed),
            })
            .collect();
        rows.sort_by_key(|r| r.key);
        rows
    }

    /// Counts a connection against `key`'s cap; `None` when the cap is
    /// reached.
    pub(crate) fn enter_node(self: &Arc<Self>, key: PublicKey) -> Option<NodeGuard> {
        let account = self.peering.account(key);
        let mut map = lock(&self.per_node);
        let slot = map.entry(key).or_insert_with(|| NodeSlot {
            connections: 0,
            state: Arc::new(NodeState {
                key,
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                bucket: (self.cfg.max_rate_per_node > 0).then(|| {
                    let rate = self.cfg.max_rate_per_node as f64;
                    let burst = rate.max(SPLICE_BUF as f64);
                    Mutex::new(Bucket {
                        rate,
                        burst,
                        tokens: burst,
                        last: Instant::now(),
                    })
                }),
                account,
            }),
        });
        if slot.connections >= self.cfg.max_connections_per_node {
            if slot.connections == 0 {
                map.remove(&key);
            }
            return None;
        }
        slot.connections += 1;
        Some(NodeGuard {
            shared: self.clone(),
            state: slot.state.clone(),
        })
    }
}

/// One unauthenticated connection counted against its source's cap;
/// uncounted when dropped (once it authenticates, or closes).
pub(crate) struct UnauthGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) bucket: IpAddr,
}

impl Drop for UnauthGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.unauth);
        if let Some(n) = map.get_mut(&self.bucket) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.bucket);
            }
        }
    }
}

/// One connection counted against its node's cap; uncounted when dropped.
pub(crate) struct NodeGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) state: Arc<NodeState>,
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.per_node);
        if let Some(slot) = map.get_mut(&self.state.key) {
            slot.connections = slot.connections.saturating_sub(1);
            if slot.connections == 0 {
                map.remove(&self.state.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_delays_only_past_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 1000.0,
            burst: 1000.0,
            tokens: 1000.0,
            last: t0,
        };
        assert_eq!(b.take(t0, 1000), Duration::ZERO);
        let wait = b.take(t0, 500);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // A second later the debt is paid and 500 tokens are back.
        assert_eq!(b.take(t0 + Duration::from_secs(1), 500), Duration::ZERO);
    }
}
