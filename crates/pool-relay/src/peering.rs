//! What the relay keeps about its peer relays: the enrolments, the links
//! up now, the directory of their nodes, and the per-peer accounting and
//! caps (circuits at once, a rate, a fair share of a total). Also the
//! per-node-key accounts, which outlive connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_core::PublicKey;
use pool_journal::Event;
use serde_json::json;
use tokio::sync::{mpsc, Notify};

use crate::circuit::SPLICE_BUF;
use crate::config::{PeerConfig, RelayConfig};
use crate::directory::Directory;
use crate::state::{lock, Bucket, Shared};

/// One enrolled peer relay's accounting, as
/// [`RelayHandle::peers`](crate::RelayHandle::peers) and `pool relay
/// status` list it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerStats {
    /// The peer relay's key.
    #[serde(serialize_with = "key_str")]
    pub key: PublicKey,
    /// Where it is dialled.
    pub addr: String,
    /// Whether the peering link is up now.
    pub up: bool,
    /// Circuits through it open now (either way).
    pub circuits_open: u64,
    /// Circuits through it since it was enrolled.
    pub circuits_total: u64,
    /// Bytes it sent us through circuits.
    pub bytes_in: u64,
    /// Bytes we sent it through circuits.
    pub bytes_out: u64,
    /// Node keys it announces now.
    pub nodes: u64,
    /// Times one of its caps was hit (circuits refused, rate limited, keys ignored).
    pub caps_hit: u64,
    /// Its cap of circuits open at once.
    pub max_circuits: usize,
    /// Its cap of bytes per second towards us (0: none).
    pub max_rate: u64,
}

/// One node key's accounting since the relay started: its own
/// connections and circuits, and those of nodes at peer relays that
/// reached (or were reached from) here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeAccount {
    /// The node's key.
    #[serde(serialize_with = "key_str")]
    pub key: PublicKey,
    /// Bytes it sent into circuits through this relay.
    pub sent: u64,
    /// Bytes circuits through this relay delivered to it.
    pub received: u64,
    /// Circuits it was an end of.
    pub circuits: u64,
}

fn key_str<S: serde::Serializer>(k: &PublicKey, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(k)
}

/// Node keys accounted one by one; past this many, new keys are
/// accounted together under the all-zero key.
pub(crate) const MAX_ACCOUNTS: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct Account {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) circuits: AtomicU64,
}

/// A command to a peering link's task.
#[derive(Debug)]
pub(crate) enum LinkCmd {
    Have(PublicKey),
    Gone(PublicKey),
    /// Send END with this message and close.
    End(String),
    /// Close (a newer link replaced this one).
    Close(&'static str),
}

/// A peering link up now.
pub(crate) struct Link {
    pub(crate) id: u64,
    /// The relay that dialled it.
    pub(crate) initiator: PublicKey,
    pub(crate) tx: mpsc::Sender<LinkCmd>,
}

pub(crate) struct PeerState {
    pub(crate) key: PublicKey,
    pub(crate) addr: Mutex<String>,
    pub(crate) max_circuits: AtomicUsize,
    pub(crate) max_rate: AtomicU64,
    pub(crate) up: AtomicBool,
    pub(crate) circuits_open: AtomicU64,
    pub(crate) circuits_total: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) caps_hit: AtomicU64,
    pub(crate) bucket: Mutex<Bucket>,
    /// When a cap was last journaled (at most one entry per cap a minute).
    pub(crate) last_cap_journal: Mutex<HashMap<&'static str, Instant>>,
    /// Set when the enrolment ends: its dialler stops.
    pub(crate) ended: AtomicBool,
    /// Wakes the dialler (the link went down, or the enrolment ended).
    pub(crate) wake: Notify,
}

impl PeerState {
    fn new(p: &PeerConfig, cfg: &RelayConfig) -> PeerState {
        PeerState {
            key: p.key,
            addr: Mutex::new(p.addr.clone()),
            max_circuits: AtomicUsize::new(p.max_circuits.unwrap_or(cfg.max_circuits_per_peer)),
            max_rate: AtomicU64::new(p.max_rate.unwrap_or(cfg.max_rate_per_peer)),
            up: AtomicBool::new(false),
            circuits_open: AtomicU64::new(0),
            circuits_total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            caps_hit: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                rate: 0.0,
                burst: 0.0,
                tokens: 0.0,
                last: Instant::now(),
            }),
            last_cap_journal: Mutex::new(HashMap::new()),
            ended: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    pub(crate) fn addr(&self) -> String {
        lock(&self.addr).clone()
    }
}

/// Peering state of one relay.
#[derive(Default)]
pub(crate) struct Peering {
    pub(crate) peers: Mutex<HashMap<PublicKey, Arc<PeerState>>>,
    pub(crate) links: Mutex<HashMap<PublicKey, Link>>,
    pub(crate) directory: Mutex<Directory>,
    /// Peers with circuits open now (for the fair share).
    pub(crate) active: AtomicUsize,
    pub(crate) accounts: Mutex<HashMap<PublicKey, Arc<Account>>>,
}

impl Peering {
    pub(crate) fn peer(&self, key: &PublicKey) -> Option<Arc<PeerState>> {
        lock(&self.peers).get(key).cloned()
    }

    /// The enrolled peer relay with a link up that announced `node` last.
    pub(crate) fn lookup(&self, node: &PublicKey) -> Option<Arc<PeerState>> {
        let via = lock(&self.directory).lookup(node)?;
        self.peer(&via).filter(|p| p.up.load(Ordering::Relaxed))
    }

    /// The account of `key` (shared by everything past [`MAX_ACCOUNTS`]).
    pub(crate) fn account(&self, key: PublicKey) -> Arc<Account> {
        let mut map = lock(&self.accounts);
        if let Some(a) = map.get(&key) {
            return a.clone();
        }
        let k = if map.len() >= MAX_ACCOUNTS {
            PublicKey([0; 32])
        } else {
            key
        };
        map.entry(k).or_default().clone()
    }

    pub(crate) fn accounts(&self) -> Vec<NodeAccount> {
        let mut rows: Vec<NodeAccount> = lock(&self.accounts)
            .iter()
            .map(|(k, a)| NodeAccount {
                key: *k,
                sent: a.sent.load(Ordering::Relaxed),
                received: a.received.load(Ordering::Relaxed),
                circuits: a.circuits.load(Ordering::Relaxed),
            })
            .collect();
        rows.sort_by_key(|r| r.key);
        rows
    }

    /// Tells every link that `key` registered here (`gone`: left).
    /// Called with the registrations' lock held, so a link installed
    /// meanwhile (which snapshots them under that lock) misses nothing.
    pub(crate) fn announce(&self, key: PublicKey, gone: bool) {
        let links = lock(&self.links);
        for l in links.values() {
            let cmd = if gone {
                LinkCmd::Gone(key)
            } else {
                LinkCmd::Have(key)
            };
            if l.tx.try_send(cmd).is_err() {
                // A link that cannot keep up is closed; it resyncs in full
                // when it comes back.
                let _ = l.tx.try_send(LinkCmd::Close("gossip queue full"));
            }
        }
    }
}

impl Shared {
    /// Enrols (or updates) a peer relay; `true` when it is new.
    pub(crate) fn enroll(self: &Arc<Self>, p: &PeerConfig, by: &str) -> (Arc<PeerState>, bool) {
        let mut peers = lock(&self.peering.peers);
        if let Some(old) = peers.get(&p.key) {
            *lock(&old.addr) = p.addr.clone();
            if let Some(n) = p.max_circuits {
                old.max_circuits.store(n, Ordering::Relaxed);
            }
            if let Some(r) = p.max_rate {
                old.max_rate.store(r, Ordering::Relaxed);
            }
            return (old.clone(), false);
        }
        let st = Arc::new(PeerState::new(p, &self.cfg));
        peers.insert(p.key, st.clone());
        drop(peers);
        self.journal(
            Event::RelayPeerEnrolled,
            json!({
                "peer": p.key.to_string(),
                "addr": p.addr,
                "by": by,
                "max_circuits": st.max_circuits.load(Ordering::Relaxed),
                "max_rate": st.max_rate.load(Ordering::Relaxed),
            }),
        );
        (st, true)
    }

    /// Ends the enrolment of `key` (`by`: "operator" or "peer"); tells the
    /// peer with END when it was us. `false` when it was not enrolled.
    pub(crate) fn end_enrolment(&self, key: &PublicKey, by: &str, message: &str) -> bool {
        let Some(st) = lock(&self.peering.peers).remove(key) else {
            return false;
        };
        st.ended.store(true, Ordering::Relaxed);
        st.wake.notify_one();
        if let Some(l) = lock(&self.peering.links).get(key) {
            let cmd = if by == "peer" {
                LinkCmd::Close("the peer ended the enrolment")
            } else {
                LinkCmd::End(message.to_owned())
            };
            let _ = l.tx.try_send(cmd);
        }
        lock(&self.peering.directory).drop_peer(*key);
        self.journal(
            Event::RelayPeerEnded,
            json!({ "peer": key.to_string(), "by": by, "message": message }),
        );
        true
    }

    /// Journals that `peer` hit `cap` (at most once a minute per cap).
    pub(crate) fn cap_hit(&self, peer: &PeerState, cap: &'static str, detail: serde_json::Value) {
        peer.caps_hit.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = lock(&peer.last_cap_journal);
        if last
            .get(cap)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
        {
            return;
        }
        last.insert(cap, now);
        drop(last);
        self.journal_bulk(
            Event::RelayPeerCap,
            json!({ "peer": peer.key.to_string(), "cap": cap, "detail": detail }),
        );
    }

    pub(crate) fn peers(&self) -> Vec<PeerStats> {
        let dir = lock(&self.peering.directory);
        let mut rows: Vec<PeerStats> = lock(&self.peering.peers)
            .values()
            .map(|p| PeerStats {
                key: p.key,
                addr: p.addr(),
                up: p.up.load(Ordering::Relaxed),
                circuits_open: p.circuits_open.load(Ordering::Relaxed),
                circuits_total: p.circuits_total.load(Ordering::Relaxed),
                bytes_in: p.bytes_in.load(Ordering::Relaxed),
                bytes_out: p.bytes_out.load(Ordering::Relaxed),
                nodes: dir.count(&p.key) as u64,
                caps_hit: p.caps_hit.load(Ordering::Relaxed),
                max_circuits: p.max_circuits.load(Ordering::Relaxed),
                max_rate: p.max_rate.load(Ordering::Relaxed),
            })
            .collect();
        rows.sort_by_key(|r| r.key);
        rows
    }

    /// Counts a circuit through `peer` against its cap; `None` at the cap.
    pub(crate) fn enter_peer(self: &Arc<Self>, peer: &Arc<PeerState>) -> Option<PeerGuard> {
        let max = peer.max_circuits.load(Ordering::Relaxed) as u64;
        let r = peer
            .circuits_open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        match r {
            Ok(0) => {
                self.peering.active.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => return None,
        }
        peer.circuits_total.fetch_add(1, Ordering::Relaxed);
        Some(PeerGuard {
            shared: self.clone(),
            peer: peer.clone(),
        })
    }

    /// How long a read of `n` bytes from `peer` must wait under its rate
    /// cap and its fair share.
    pub(crate) fn peer_wait(&self, peer: &PeerState, n: usize) -> Duration {
        let Some(rate) = effective_rate(
            peer.max_rate.load(Ordering::Relaxed),
            self.cfg.peer_fair_share,
            self.peering.active.load(Ordering::Relaxed),
        ) else {
            return Duration::ZERO;
        };
        let mut b = lock(&peer.bucket);
        if b.rate != rate {
            let first = b.rate == 0.0;
            b.rate = rate;
            b.burst = rate.max(SPLICE_BUF as f64);
            // A peer starts with a full second of burst, like a node.
            b.tokens = if first {
                b.burst
            } else {
                b.tokens.min(b.burst)
            };
            if first {
                b.last = Instant::now();
            }
        }
        b.take(Instant::now(), n)
    }
}

/// The rate (bytes per second) a peer may send us: its own cap (`own`, 0:
/// none) and its equal share of `total` (0: none) among the `active` peers
/// with circuits open, whichever is lower; `None`: no limit.
fn effective_rate(own: u64, total: u64, active: usize) -> Option<f64> {
    let share = total as f64 / active.max(1) as f64;
    match (own > 0, total > 0) {
        (false, false) => None,
        (true, false) => Some(own as f64),
        (false, true) => Some(share),
        (true, true) => Some((own as f64).min(share)),
    }
}

/// A circuit counted against a peer relay's cap; uncounted when dropped.
pub(crate) struct PeerGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: Arc<PeerState>,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        if self.peer.circuits_open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.peering.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The address a peer relay is known by in ROUTE messages.
pub(crate) fn route_addr(peer: &PeerState, seen: SocketAddr) -> SocketAddr {
    peer.addr().parse().unwrap_or(seen)
}

#[cfg(test)]
mod tests {
    use super::effective_rate;

    #[test]
    fn a_peer_gets_its_cap_or_its_equal_share_whichever_is_lower() {
        assert_eq!(effective_rate(0, 0, 3), None);
        assert_eq!(effective_rate(1000, 0, 3), Some(1000.0));
        // Three peers with circuits open share 900 equally.
        assert_eq!(effective_rate(0, 900, 3), Some(300.0));
        assert_eq!(effective_rate(200, 900, 3), Some(200.0));
        // Alone, a peer may take the whole total (up to its own cap).
        assert_eq!(effective_rate(0, 900, 1), Some(900.0));
        assert_eq!(effective_rate(0, 900, 0), Some(900.0));
        assert_eq!(effective_rate(500, 900, 1), Some(500.0));
    }
}
