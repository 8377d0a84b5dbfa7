//! The stream router: every stream a peer opens on a session this node
//! accepted goes through one [`Router`], which reads the stream's preamble
//! (the service name), looks the service up, checks that the peer's key may
//! use it, and hands the stream to the service's handler.
//!
//! Services are registered under an exact name (`"web"`, `""` for the
//! default, `pool.discard`, `pool.control`) or under a prefix (`":"`: the
//! shim's `":PORT"` streams). The whole table is replaced at once when a
//! config is applied ([`Router::set_table`]): a stream is routed by the
//! table that was current when its preamble arrived, and live streams are
//! never touched.
//!
//! A stream is reset, counted and journaled (in aggregate, see
//! [`RefusalCounts`]) when:
//! - its preamble is malformed or does not arrive in time:
//!   [`RESET_NO_SERVICE`];
//! - it names no registered service: [`RESET_NO_SERVICE`];
//! - the service does not let this peer's key use it: [`RESET_FORBIDDEN`];
//! - the router already carries [`MAX_STREAMS`] streams:
//!   [`RESET_TARGET_UNREACHABLE`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pool_net::{PublicKey, RecvStream, SendStream, Session, StreamPolicy};
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::bridge::Preamble;
use pool_journal::{Event, Journal};

/// Stream reset code: the TCP client or target reset its connection.
pub const RESET_TCP: u64 = 1;
/// Stream reset code: the target refused or could not be reached, or the
/// node carries as many streams as it may.
pub const RESET_TARGET_UNREACHABLE: u64 = 2;
/// Stream reset code: idle timeout.
pub const RESET_IDLE: u64 = 3;
/// Stream reset code: no such service at this node (or no readable
/// preamble naming one).
pub const RESET_NO_SERVICE: u64 = 4;
/// Stream reset code: the service exists but does not let the peer's key
/// use it (its `allow` list, or the control service's roles).
pub const RESET_FORBIDDEN: u64 = 5;

/// What each reset code means, for messages on the dialling side.
pub fn reset_reason(code: u64) -> &'static str {
    match code {
        RESET_TCP => "the TCP connection at the far end was reset",
        RESET_TARGET_UNREACHABLE => {
            "the far end could not reach its target, or is at its stream limit"
        }
        RESET_IDLE => "idle timeout",
        RESET_NO_SERVICE => "no such service at the far end",
        RESET_FORBIDDEN => "the far end does not let this node's key use that service",
        _ => "reset by the far end",
    }
}

/// Streams the router carries at once, all services together; each service
/// may have a lower limit of its own. 262,144: room for a daemon with
/// 10,000 sessions of 10 streams each (issue 18; `scripts/bench-scale`)
/// with headroom. An idle stream costs the daemon about 4 KiB, so the cap
/// bounds the router at about 1 GiB. (It was 65,536, and a node at it
/// reset every new stream, an active session's included.)
pub const MAX_STREAMS: usize = 262_144;

/// How long a new stream may take to send its preamble.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A boxed handler future.
pub type ServeFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One stream handed to a service.
pub struct Incoming {
    /// The preamble the stream started with (service name, the TCP
    /// client's addresses at the dialling end).
    pub preamble: Preamble,
    /// What the peer sends.
    pub recv: RecvStream,
    /// What goes back.
    pub send: SendStream,
    /// The peer's authenticated key.
    pub peer: PublicKey,
    /// The session the stream arrived on.
    pub session: Session,
    /// The session's id, as text.
    pub session_id: String,
}

/// A service on POOL streams.
pub trait Service: Send + Sync + 'static {
    /// Serves one stream until it ends.
    fn serve(self: Arc<Self>, stream: Incoming) -> ServeFuture;

    /// What the service's streams do when their session is handed to
    /// another worker: stay here and be forwarded (the default), move to
    /// the target's instance of the service ([`Service::import`]), or be
    /// reset.
    fn handoff_policy(&self) -> StreamPolicy {
        StreamPolicy::Forward
    }

    /// At a handoff's target: go on serving a stream that moved, whose
    /// service at the source had read `read` and written `written` bytes
    /// of it. Services whose policy is not `Move` never get one; the
    /// default resets it.
    fn import(self: Arc<Self>, stream: Incoming, read: u64, written: u64) -> ServeFuture {
        let _ = (read, written);
        let mut send = stream.send;
        Box::pin(async move { send.reset(pool_net::RESET_HANDOFF) })
    }
}

/// Which peer keys may use a service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Every peer the node trusts (the default).
    #[default]
    Trusted,
    /// Only these keys (still subject to the node's trust).
    Keys(HashSet<PublicKey>),
}

impl Access {
    /// From a config's `allow` list: empty means every trusted peer.
    pub fn from_keys(keys: &[PublicKey]) -> Access {
        if keys.is_empty() {
            Access::Trusted
        } else {
            Access::Keys(keys.iter().copied().collect())
        }
    }

    /// Whether `peer` may use the service.
    pub fn allows(&self, peer: &PublicKey) -> bool {
        match self {
            Access::Trusted => true,
            Access::Keys(k) => k.contains(peer),
        }
    }
}

#[derive(Clone)]
struct Entry {
    service: Arc<dyn Service>,
    access: Access,
}

/// The services by name: built whole, then swapped in at once.
#[derive(Clone, Default)]
pub struct Table {
    exact: HashMap<String, Entry>,
    prefixes: Vec<(String, Entry)>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Table {
        Table::default()
    }

    /// Registers `service` under the exact name `name`; a later
    /// registration of the same name replaces it.
    pub fn add(&mut self, name: &str, access: Access, service: Arc<dyn Service>) {
        self.exact
            .insert(name.to_owned(), Entry { service, access });
    }

    /// Registers `service` for every name starting with `prefix` that has
    /// no exact entry.
    pub fn add_prefix(&mut self, prefix: &str, access: Access, service: Arc<dyn Service>) {
        self.prefixes.retain(|(p, _)| p != prefix);
        self.prefixes
            .push((prefix.to_owned(), Entry { service, access }));
    }

    /// Whether `name` is registered (exactly or by a prefix).
    pub fn contains(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }

    /// The exact names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exact.keys().cloned().collect();
        v.extend(self.prefixes.iter().map(|(p, _)| format!("{p}*")));
        v.sort();
        v
    }

    fn lookup(&self, name: &str) -> Option<&Entry> {
        self.exact.get(name).or_else(|| {
            self.prefixes
                .iter()
                .find(|(p, _)| name.starts_with(p.as_str()))
                .map(|(_, e)| e)
        })
    }
}

/// The router's counters.
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Streams handed to a service.
    pub routed: AtomicU64,
    /// Streams reset for naming no service (or a malformed preamble).
    pub unknown: AtomicU64,
    /// Streams reset because the peer's key may not use the service.
    pub forbidden: AtomicU64,
    /// Streams reset because the router was at [`MAX_STREAMS`].
    pub overloaded: AtomicU64,
}

/// Refused streams, counted per (peer, reason, service) and window: the
/// first of each in a window is journaled at once (`stream_refused`), the
/// rest are summed into one `stream_refusals` line when the window ends
/// ([`Router::expire`]). At most [`REFUSAL_KINDS`] kinds are tracked per
/// window; refusals of further kinds are summed under `"peer": "other"`.
#[derive(Default)]
pub struct RefusalCounts {
    counts: HashMap<(PublicKey, &'static str, String), u64>,
    other: u64,
}

/// Kinds of refusal tracked per window.
pub const REFUSAL_KINDS: usize = 256;

impl RefusalCounts {
    /// Counts one; returns whether it is the first of its kind this window.
    fn note(&mut self, peer: PublicKey, reason: &'static str, service: &str) -> bool {
        let key = (peer, reason, truncate(service));
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
            return false;
        }
        if self.counts.len() >= REFUSAL_KINDS {
            self.other += 1;
            return false;
        }
        self.counts.insert(key, 1);
        true
    }

    /// The window's summary lines (kinds refused more than once) and a
    /// fresh window.
    fn take(&mut self) -> Vec<serde_json::Value> {
        let mut out: Vec<serde_json::Value> = self
            .counts
            .drain()
            .filter(|(_, n)| *n > 1)
            .map(|((peer, reason, service), n)| {
                json!({"peer": peer.to_string(), "reason": reason, "service": service, "count": n - 1})
            })
            .collect();
        if self.other > 0 {
            out.push(json!({"peer": "other", "count": self.other}));
            self.other = 0;
        }
        out
    }
}

fn truncate(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(64)
        .collect()
}

/// The one place every accepted stream goes through.
pub struct Router {
    table: RwLock<Arc<Table>>,
    permits: Arc<Semaphore>,
    journal: RwLock<Option<Journal>>,
    refusals: Mutex<RefusalCounts>,
    /// The streams being served, by session: each one's policy at a
    /// handoff and its service's name.
    live: Mutex<HashMap<String, StreamPolicies>>,
    /// Counters.
    pub stats: RouterStats,
}

/// A session's live streams: each one's handoff policy and service name.
pub type StreamPolicies = HashMap<u64, (StreamPolicy, String)>;

/// Removes a stream from [`Router::live`] when its service is done.
struct Live<'a> {
    router: &'a Router,
    session: String,
    stream: u64,
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        let mut live = self.router.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = live.get_mut(&self.session) {
            m.remove(&self.stream);
            if m.is_empty() {
                live.remove(&self.session);
            }
        }
    }
}

impl Router {
    /// A router with an empty table.
    pub fn new(journal: Option<Journal>) -> Arc<Router> {
        Arc::new(Router {
            table: RwLock::new(Arc::new(Table::new())),
            permits: Arc::new(Semaphore::new(MAX_STREAMS)),
            journal: RwLock::new(journal),
            refusals: Mutex::default(),
            live: Mutex::default(),
            stats: RouterStats::default(),
        })
    }

    /// The streams of session `id` being served now: each one's handoff
    /// policy and service.
    pub fn policies(&self, id: &str) -> StreamPolicies {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn track(&self, session: &str, stream: u64, policy: StreamPolicy, service: &str) -> Live<'_> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(session.to_string())
            .or_default()
            .insert(stream, (policy, service.to_string()));
        Live {
            router: self,
            session: session.to_string(),
            stream,
        }
    }

    /// At a handoff's target: hands a stream that moved to the service
    /// named `service`, which goes on from the offsets (or the stream is
    /// reset if the service is gone).
    pub async fn import(
        &self,
        stream: pool_net::Stream,
        session: Session,
        service: String,
        read: u64,
        written: u64,
    ) {
        let peer = session.peer_key();
        let id = session.id().to_string();
        let sid = stream.id();
        let (recv, mut send) = stream.into_split();
        let entry = self.table().lookup(&service).cloned();
        let Some(entry) = entry.filter(|e| e.access.allows(&peer)) else {
            send.reset(pool_net::RESET_HANDOFF);
            return;
        };
        let any = std::net::SocketAddr::from(([0u8; 16], 0));
        let _live = self.track(&id, sid, entry.service.handoff_policy(), &service);
        let preamble = Preamble {
            source: any,
            destination: any,
            service,
        };
        entry
            .service
            .import(
                Incoming {
                    preamble,
                    recv,
                    send,
                    peer,
                    session,
                    session_id: id,
                },
                read,
                written,
            )
            .await;
    }

    /// Replaces the whole table at once (config apply). Streams already
    /// handed to a service go on.
    pub fn set_table(&self, table: Table) {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        *t = Arc::new(table);
    }

    /// The current table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves every stream of `session` until it closes.
    pub async fn serve_session(self: Arc<Self>, session: Session) {
        let peer = session.peer_key();
        let id = session.id().to_string();
        while let Some(stream) = session.accept_stream().await {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                warn!("stream limit reached; resetting stream");
                let mut stream = stream;
                stream.reset(RESET_TARGET_UNREACHABLE);
                continue;
            };
            let me = self.clone();
            let (session, id) = (session.clone(), id.clone());
            tokio::spawn(async move {
                me.route(stream, peer, session, id).await;
                drop(permit);
            });
        }
    }

    async fn route(&self, stream: pool_net::Stream, peer: PublicKey, session: Session, id: String) {
        let sid = stream.id();
        let (mut recv, mut send) = stream.into_split();
        let preamble = match tokio::time::timeout(PREAMBLE_TIMEOUT, Preamble::read(&mut recv)).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "unreadable stream preamble");
                self.refuse(peer, "bad_preamble", "", &mut send);
                return;
            }
            Err(_) => {
                self.refuse(peer, "preamble_timeout", "", &mut send);
                return;
            }
        };
        let entry = self.table().lookup(&preamble.service).cloned();
        let Some(entry) = entry else {
            warn!(%peer, service = %truncate(&preamble.service), "no such service here; resetting the stream");
            self.refuse(peer, "unknown_service", &preamble.service, &mut send);
            return;
        };
        if !entry.access.allows(&peer) {
            warn!(%peer, service = %truncate(&preamble.service), "this key may not use the service; resetting the stream");
            self.refuse(peer, "forbidden", &preamble.service, &mut send);
            return;
        }
        self.stats.routed.fetch_add(1, Ordering::Relaxed);
        let _live = self.track(&id, sid, entry.service.handoff_policy(), &preamble.service);
        entry
            .service
            .serve(Incoming {
                preamble,
                recv,
                send,
                peer,
                session,
                session_id: id,
            })
            .await;
    }

    fn refuse(&self, peer: PublicKey, reason: &'static str, service: &str, send: &mut SendStream) {
        let code = if reason == "forbidden" {
            self.stats.forbidden.fetch_add(1, Ordering::Relaxed);
            RESET_FORBIDDEN
        } else {
            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
            RESET_NO_SERVICE
        };
        send.reset(code);
        let first = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(peer, reason, service);
        if first {
            self.journal(
                Event::StreamRefused,
                json!({"peer": peer.to_string(), "reason": reason, "service": truncate(service), "code": code}),
            );
        }
    }

    fn journal(&self, event: Event, fields: serde_json::Value) {
        let j = self
            .journal
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(j) = j {
            j.record(event, fields);
        }
    }

    /// Ends the refusal window: journals one `stream_refusals` line per
    /// kind refused more than once since the last call.
    pub fn expire(&self) {
        let lines = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for l in lines {
            self.journal(Event::StreamRefusals, l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        pool_net::SecretKey::from_bytes([n; 32]).public_key()
    }

    struct Nop;
    impl Service for Nop {
        fn serve(self: Arc<Self>, _s: Incoming) -> ServeFuture {
            Box::pin(async {})
        }
    }

    #[test]
    fn exact_names_win_over_prefixes() {
        let mut t = Table::new();
        t.add_prefix(":", Access::Trusted, Arc::new(Nop));
        t.add(":80", Access::Keys([key(1)].into()), Arc::new(Nop));
        assert_eq!(
            t.lookup(":80").map(|e| e.access.allows(&key(2))),
            Some(false)
        );
        assert_eq!(
            t.lookup(":81").map(|e| e.access.allows(&key(2))),
            Some(true)
        );
        assert!(t.lookup("web").is_none());
        assert_eq!(t.names(), vec![":*".to_string(), ":80".to_string()]);
    }

    #[test]
    fn refusals_are_counted_once_per_kind_and_window() {
        let mut c = RefusalCounts::default();
        assert!(c.note(key(1), "unknown_service", "x"));
        assert!(!c.note(key(1), "unknown_service", "x"));
        assert!(!c.note(key(1), "unknown_service", "x"));
        assert!(c.note(key(1), "forbidden", "x"));
        let lines = c.take();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["count"], 2);
        assert!(c.take().is_empty());
        for i in 0..(REFUSAL_KINDS + 10) {
            c.note(key(1), "unknown_service", &i.to_string());
        }
        let lines = c.take();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["count"], 10);
    }
}
