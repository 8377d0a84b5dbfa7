//! The daemon side of the `LD_PRELOAD` shim (`libpool_shim.so`).
//!
//! **Source node** (`[shim]`): programs run under the shim reach the
//! daemon first over its Unix socket (`[shim] socket`), where the kernel
//! tells each side who the other is (`SO_PEERCRED`): the shim checks the
//! daemon's uid, the daemon checks the caller's against `allow_users` /
//! `allow_groups` and refuses (journal `shim_denied`) everyone else. An
//! allowed caller sends a 28-byte header naming the destination; the
//! daemon answers with its loopback data port and a one-time token; the
//! shim connects the program's own TCP socket there and presents the
//! token; the daemon confirms on the Unix socket. Only then does the
//! program's traffic flow. The daemon picks the POOL peer for the
//! destination (`[[route]]` rules, else the destination host itself on
//! port 9253), opens a stream on a session to it and carries the
//! connection like a `tcp2pool` bridge, with the reserved service name
//! `":PORT"`.
//!
//! **Destination node** (`[[expose]]`): a `":PORT"` stream is connected
//! only to a port the config exposes (by default on loopback), never to
//! another host; anything else is refused with a `shim_refused` journal
//! entry. The destination answers every shim stream with one status byte
//! first, so a blocking `connect` in the program can fail the way the
//! kernel's would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pool_journal::{Event, Journal};
use pool_net::{Endpoint, PublicKey, Session, Trust};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::bridge::{abort_on_close, splice, BridgeStats, Limits, Preamble};
use crate::config::RouteSection;
use crate::net::stopped;

mod allow;
mod expose;
mod listener;

use listener::remove_ours;
pub use listener::ShimListener;

pub use crate::types::Principal;
pub use allow::Allow;
pub use expose::ShimExpose;
pub use pool_shim_wire::{
    Header as ShimHeader, Reply, FLAG_WANT_STATUS, HEADER_LEN, MAGIC, REPLY_CONNECTED,
    REPLY_DENIED, REPLY_GO, REPLY_LEN, REQUEST_LEN, STATUS_NOT_EXPOSED, STATUS_OK, STATUS_REFUSED,
    STATUS_TIMED_OUT, STATUS_UNREACHABLE, TOKEN_LEN,
};

/// A reply's 20 bytes.
fn encode_reply(kind: u8, port: u16, token: &[u8; TOKEN_LEN]) -> [u8; REPLY_LEN] {
    Reply {
        kind,
        port,
        token: *token,
    }
    .encode()
}

/// The service name of a shim stream to `port`.
pub fn service_for_port(port: u16) -> String {
    format!(":{port}")
}

/// Counts per session id, pruned when the session closes (F11): an entry
/// is only made for a session that is open, and a task waiting on its
/// `closed()` removes it. `cap` bounds the map whatever happens.
#[derive(Debug)]
struct SessionCounts {
    map: Arc<Mutex<HashMap<String, u64>>>,
    cap: usize,
}

impl Default for SessionCounts {
    fn default() -> Self {
        SessionCounts {
            map: Arc::default(),
            cap: 1 << 16,
        }
    }
}

impl SessionCounts {
    fn get(&self, id: &str) -> u64 {
        self.map
            .lock()
            .ok()
            .and_then(|m| m.get(id).copied())
            .unwrap_or(0)
    }

    /// Counts one more for session `id`. The first time, `find` must give
    /// the open session (else nothing is counted), and the entry's removal
    /// is tied to its close.
    fn bump(&self, id: &str, find: impl FnOnce() -> Option<Session>) {
        if let Ok(mut m) = self.map.lock() {
            if let Some(n) = m.get_mut(id) {
                *n += 1;
                return;
            }
        }
        let Some(session) = find().filter(|s| !s.is_closed()) else {
            return;
        };
        match self.map.lock() {
            Ok(mut m) => {
                if let Some(n) = m.get_mut(id) {
                    *n += 1; // counted meanwhile by another stream
                    return;
                }
                if m.len() >= self.cap {
                    return;
                }
                m.insert(id.to_string(), 1);
            }
            Err(_) => return,
        }
        let map = Arc::downgrade(&self.map);
        let id = id.to_string();
        tokio::spawn(async move {
            session.closed().await;
            if let Some(m) = map.upgrade() {
                if let Ok(mut m) = m.lock() {
                    m.remove(&id);
                }
            }
        });
    }

    fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

pub use crate::types::Cidr;

/// Counters of shimmed connections.
#[derive(Debug, Default)]
pub struct ShimStats {
    /// Connections accepted from programs (source node).
    pub connections: AtomicU64,
    /// Of those, open now.
    pub active: AtomicU64,
    /// Carried to the destination (its daemon reached the program).
    pub streams: AtomicU64,
    /// Failed at this node or refused by the destination (denied callers,
    /// garbage and silent clients included).
    pub failed: AtomicU64,
    /// Of those, callers whose user is not allowed (`shim_denied`).
    pub denied: AtomicU64,
    /// Streams from peers connected to an exposed port (destination node).
    pub exposed: AtomicU64,
    /// Streams from peers refused (port not exposed, target down).
    pub refused: AtomicU64,
}

fn reason_of(status: u8) -> &'static str {
    match status {
        STATUS_OK => "connected",
        STATUS_TIMED_OUT => "timed out",
        STATUS_UNREACHABLE => "unreachable",
        STATUS_NOT_EXPOSED => "port not exposed",
        _ => "refused",
    }
}

fn journal_to(j: &Option<Journal>, event: Event, fields: serde_json::Value) {
    if let Some(j) = j {
        j.record(event, fields);
    }
}

struct Route {
    cidr: Cidr,
    peer: String,
    peer_key: Option<PublicKey>,
}

type SessionSlot = Arc<tokio::sync::Mutex<Option<Session>>>;
type SessionMap = Arc<Mutex<HashMap<String, SessionSlot>>>;
/// Where a caller on the socket and its TCP connection meet, by token:
/// whichever comes first waits for the other.
enum Meet {
    /// The caller is waiting for its connection.
    Caller(oneshot::Sender<(TcpStream, SocketAddr)>),
    /// The connection came first (the shim does not wait for `GO` once it
    /// knows the data port); it waits at most [`TOKEN_WAIT`].
    Conn {
        sock: TcpStream,
        from: SocketAddr,
        serial: u64,
        /// Counts against [`MAX_UNPROVEN`] while parked.
        _held: tokio::sync::OwnedSemaphorePermit,
    },
}
type Pending = Arc<Mutex<HashMap<[u8; TOKEN_LEN], Meet>>>;

/// How long a caller has to send its header on the Unix socket.
const HEADER_WAIT: Duration = Duration::from_secs(5);
/// How long a shim has to present its token on the data port once it was
/// given one (the shim does it at once; this bounds a shim that died).
const TOKEN_WAIT: Duration = Duration::from_secs(3);
/// TCP connections on the data port that have not presented a token yet.
const MAX_UNPROVEN: usize = 256;
/// `shim_denied` journal entries per second, at most (the count is kept).
const DENIED_PER_SEC: u32 = 20;

/// The source side: the Unix socket and the loopback data port programs
/// under the shim reach.
pub struct ShimNode {
    endpoint: Endpoint,
    routes: RwLock<Vec<Route>>,
    trust: RwLock<Trust>,
    default_peer_port: u16,
    limits: Limits,
    sessions: SessionMap,
    journal: Option<Journal>,
    per_session: SessionCounts,
    pending: Pending,
    denied_window: Mutex<(Instant, u32)>,
    dialled: AtomicU64,
    permits: Arc<Semaphore>,
    /// Counters.
    pub stats: Arc<ShimStats>,
    /// Bytes carried.
    pub bytes: Arc<BridgeStats>,
}

fn routes(sections: &[RouteSection]) -> Vec<Route> {
    // Validated when the config was parsed: nothing to drop here.
    sections
        .iter()
        .map(|r| Route {
            cidr: r.cidr,
            peer: r.peer.clone(),
            peer_key: r.peer_key,
        })
        .collect()
}

/// Removes a pending token when its caller is done with it, whatever
/// happened (so the table holds only callers being served now).
struct PendingGuard<'a>(&'a Pending, [u8; TOKEN_LEN]);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&self.1);
        }
    }
}

/// Drops `name`'s slot from the table if it is still `slot` (called with
/// the slot's lock held and the slot emptied).
fn forget_slot(map: &SessionMap, name: &str, slot: &SessionSlot) {
    if let Ok(mut m) = map.lock() {
        if m.get(name).is_some_and(|x| Arc::ptr_eq(x, slot)) {
            m.remove(name);
        }
    }
}

impl ShimNode {
    /// A shim listener dialling peers through `endpoint`.
    pub fn new(
        endpoint: Endpoint,
        route: &[RouteSection],
        trust: Trust,
        default_peer_port: u16,
        limits: Limits,
        journal: Option<Journal>,
    ) -> Arc<ShimNode> {
        Arc::new(ShimNode {
            endpoint,
            routes: RwLock::new(routes(route)),
            trust: RwLock::new(trust),
            default_peer_port,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            sessions: Arc::default(),
            journal,
            per_session: SessionCounts::default(),
            pending: Arc::default(),
            denied_window: Mutex::new((Instant::now(), 0)),
            dialled: AtomicU64::new(0),
            stats: Arc::default(),
            bytes: Arc::default(),
        })
    }

    /// New routes and trust (on reload); live connections are not touched.
    pub fn configure(&self, route: &[RouteSection], trust: Trust) {
        if let Ok(mut r) = self.routes.write() {
            *r = routes(route);
        }
        if let Ok(mut t) = self.trust.write() {
            *t = trust;
        }
    }

    /// Sessions this listener dialled that are open now.
    pub fn sessions(&self) -> Vec<Session> {
        let slots: Vec<SessionSlot> = self
            .sessions
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        slots
            .iter()
            .filter_map(|s| s.try_lock().ok().and_then(|g| g.clone()))
            .filter(|s| !s.is_closed())
            .collect()
    }

    /// Sessions dialled in total.
    pub fn sessions_dialled(&self) -> u64 {
        self.dialled.load(Ordering::Relaxed)
    }

    /// Shim streams carried per session id.
    pub fn per_session(&self, session: &str) -> u64 {
        self.per_session.get(session)
    }

    /// Entries in the per-peer session table, the per-session counts and
    /// the pending tokens (each pruned when what it describes ends).
    pub fn tables(&self) -> (usize, usize, usize) {
        (
            self.sessions.lock().map(|m| m.len()).unwrap_or(0),
            self.per_session.len(),
            self.pending.lock().map(|m| m.len()).unwrap_or(0),
        )
    }

    /// Serves the socket and the data port until `stop` turns true; then
    /// removes the socket file (if it is still ours).
    pub async fn run(self: Arc<Self>, listener: ShimListener, mut stop: watch::Receiver<bool>) {
        let ShimListener {
            unix,
            data,
            path,
            file,
            allow,
        } = listener;
        let data_port = data.local_addr().map(|a| a.port()).unwrap_or(0);
        let allow = Arc::new(allow);
        let me = self.clone();
        let data_stop = stop.clone();
        let data_task = tokio::spawn(me.serve_data(data, data_stop));
        loop {
            let sock = tokio::select! {
                r = unix.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "shim socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopped(&mut stop) => break,
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!("shim connection cap reached; refusing");
                continue;
            };
            let me = self.clone();
            let allow = allow.clone();
            tokio::spawn(async move {
                me.stats.active.fetch_add(1, Ordering::Relaxed);
                me.serve_caller(sock, &allow, data_port).await;
                me.stats.active.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        drop(unix);
        remove_ours(&path, file);
        let _ = data_task.await;
    }

    /// The data port: each connection must present a token at once; it is
    /// handed to the caller on the socket that sent the same token (now,
    /// or within [`TOKEN_WAIT`]); anything else is dropped, having carried
    /// nothing and reached no one.
    async fn serve_data(self: Arc<Self>, data: TcpListener, mut stop: watch::Receiver<bool>) {
        let gate = Arc::new(Semaphore::new(MAX_UNPROVEN));
        let serial = Arc::new(AtomicU64::new(0));
        while let Some((mut sock, from)) =
            crate::net::accept_next(&data, &mut stop, "shim data port").await
        {
            let Ok(permit) = gate.clone().try_acquire_owned() else {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                abort_on_close(&sock);
                continue;
            };
            let pending = self.pending.clone();
            let stats = self.stats.clone();
            let serial = serial.clone();
            tokio::spawn(async move {
                let mut token = [0u8; TOKEN_LEN];
                let read = tokio::time::timeout(TOKEN_WAIT, sock.read_exact(&mut token)).await;
                if !matches!(read, Ok(Ok(_))) {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    debug!(%from, "no token on the shim data port; closing");
                    abort_on_close(&sock);
                    return;
                }
                let n = serial.fetch_add(1, Ordering::Relaxed);
                // Ok(caller) or Err(parked): no lock is held across a wait.
                let caller = {
                    let Ok(mut m) = pending.lock() else { return };
                    match m.remove(&token) {
                        Some(Meet::Caller(tx)) => Ok((Some(tx), sock)),
                        Some(Meet::Conn { sock: other, .. }) => {
                            // The same token twice: neither is trusted.
                            abort_on_close(&other);
                            Ok((None, sock))
                        }
                        None => {
                            let parked = Meet::Conn {
                                sock,
                                from,
                                serial: n,
                                _held: permit,
                            };
                            m.insert(token, parked);
                            Err(())
                        }
                    }
                };
                let (caller, sock) = match caller {
                    Ok(c) => c,
                    Err(()) => {
                        tokio::time::sleep(TOKEN_WAIT).await;
                        let expired = pending.lock().ok().and_then(|mut m| match m.get(&token) {
                            Some(Meet::Conn { serial, .. }) if *serial == n => m.remove(&token),
                            _ => None,
                        });
                        if let Some(Meet::Conn { sock, .. }) = expired {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            debug!(%from, "a token no caller sent on the shim data port; closing");
                            abort_on_close(&sock);
                        }
                        return;
                    }
                };
                match caller {
                    Some(tx) => {
                        if let Err((sock, _)) = tx.send((sock, from)) {
                            abort_on_close(&sock);
                        }
                    }
                    None => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        abort_on_close(&sock);
                    }
                }
            });
        }
    }

    /// Journals a refused caller (at most [`DENIED_PER_SEC`] a second).
    fn deny(&self, uid: u32, gid: u32, pid: Option<i32>) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let n = self.stats.denied.fetch_add(1, Ordering::Relaxed) + 1;
        let log = match self.denied_window.lock() {
            Ok(mut w) => {
                if w.0.elapsed() >= Duration::from_secs(1) {
                    *w = (Instant::now(), 0);
                }
                w.1 += 1;
                w.1 <= DENIED_PER_SEC
            }
            Err(_) => false,
        };
        if log {
            let reason = format!(
                "uid {uid} (gid {gid}) is not allowed to use the shim socket: add it to [shim] allow_users or one of its groups to allow_groups"
            );
            warn!(uid, gid, pid, "shim caller refused: {reason}");
            journal_to(
                &self.journal,
                Event::ShimDenied,
                json!({"uid": uid, "gid": gid, "pid": pid, "reason": reason, "denied_total": n}),
            );
        }
    }

    /// One caller on the Unix socket: who it is, its header, the token
    /// exchange, then its connection is carried.
    async fn serve_caller(&self, mut unix: UnixStream, allow: &Allow, data_port: u16) {
        let cred = match unix.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "no credentials on a shim connection; closing");
                return;
            }
        };
        let uid = cred.uid();
        if !allow.permits(uid, cred.gid()) {
            self.deny(uid, cred.gid(), cred.pid());
            let _ = unix.try_write(&encode_reply(REPLY_DENIED, 0, &[0; TOKEN_LEN]));
            return;
        }
        let mut req = [0u8; REQUEST_LEN];
        let header = match tokio::time::timeout(HEADER_WAIT, unix.read_exact(&mut req)).await {
            Ok(Ok(_)) => {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&req[..HEADER_LEN]);
                ShimHeader::decode(&h)
            }
            _ => None,
        };
        let Some(header) = header else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(uid, "not a shim header; closing");
            return;
        };
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&req[HEADER_LEN..]);
        // The shim reads GO only when it does not know the data port yet:
        // a write that finds the caller gone is no error.
        let _ = unix.try_write(&encode_reply(REPLY_GO, data_port, &token));
        let (tx, rx) = oneshot::channel();
        let early = match self.pending.lock() {
            Ok(mut m) => match m.remove(&token) {
                Some(Meet::Conn { sock, from, .. }) => Some((sock, from)),
                Some(Meet::Caller(other)) => {
                    // Two callers with one token: neither is served.
                    drop(other);
                    None
                }
                None => {
                    m.insert(token, Meet::Caller(tx));
                    None
                }
            },
            Err(_) => return,
        };
        let _guard = PendingGuard(&self.pending, token);
        let got = match early {
            Some(x) => Some(x),
            None => tokio::time::timeout(TOKEN_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
        };
        let Some((sock, from)) = got else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(
                uid,
                pid = header.pid,
                "the shim never presented its token; closing"
            );
            return;
        };
        // Read by shims whose kernel cannot vouch for the TCP peer.
        let _ = unix.try_write(&encode_reply(REPLY_CONNECTED, from.port(), &token));
        drop(unix);
        self.carry(sock, from, header, uid).await;
    }

    fn route(&self, dest: SocketAddr) -> (String, Option<PublicKey>) {
        let found = self.routes.read().ok().and_then(|r| {
            r.iter()
                .find(|r| r.cidr.contains(dest.ip()))
                .map(|r| (r.peer.clone(), r.peer_key))
        });
        found.unwrap_or_else(|| {
            (
                SocketAddr::new(dest.ip(), self.default_peer_port).to_string(),
                None,
            )
        })
    }

    /// The key of a peer no route names one for: pinned (TOFU), or asked
    /// for and then proven by the handshake (TOFU pins it; a fleet secret
    /// authenticates it).
    async fn learn_key(&self, peer: &str) -> Result<PublicKey, String> {
        let trust = self.trust.read().map(|t| t.clone()).unwrap_or_default();
        let known = trust.known_peers();
        if let Some(k) = known.as_ref().and_then(|kp| kp.lock().ok()?.lookup(peer)) {
            return Ok(k);
        }
        if known.is_none() && trust.fleet_secret().is_none() {
            return Err(format!(
                "no key for {peer}: add a [[route]] with its peer_key, or set [trust] tofu or fleet_secret"
            ));
        }
        let key = tokio::time::timeout(self.limits.connect_timeout, Endpoint::probe_key(peer))
            .await
            .map_err(|_| format!("{peer} did not answer a key probe in time"))?
            .map_err(|e| e.to_string())?;
        if let Some(kp) = known {
            if let Ok(mut kp) = kp.lock() {
                kp.pin(peer, key).map_err(|e| e.to_string())?;
                info!(%peer, %key, "trust on first use: pinned the shim route's peer key");
            }
        }
        Ok(key)
    }

    /// The open session to `peer`, dialled if there is none. The table has
    /// one slot per peer being dialled or with an open session: a slot is
    /// removed when its dial fails or its session closes (F11).
    async fn session(&self, peer: &str, key: PublicKey) -> Result<Session, (u8, String)> {
        let name = format!("{peer} {key}");
        let (slot, mut g) = loop {
            let slot = match self.sessions.lock() {
                Ok(mut m) => m.entry(name.clone()).or_default().clone(),
                Err(_) => return Err((STATUS_UNREACHABLE, "session table unavailable".into())),
            };
            let g = slot.clone().lock_owned().await;
            // Removed while we waited for it: take the table's new one.
            let current = self
                .sessions
                .lock()
                .is_ok_and(|m| m.get(&name).is_some_and(|x| Arc::ptr_eq(x, &slot)));
            if current {
                break (slot, g);
            }
        };
        if let Some(s) = g.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let dialled = match tokio::time::timeout(
            self.limits.connect_timeout,
            self.endpoint.connect(peer, key),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err((STATUS_REFUSED, format!("cannot reach {peer}: {e}"))),
            Err(_) => Err((
                STATUS_TIMED_OUT,
                format!(
                    "{peer} did not answer within {:?}",
                    self.limits.connect_timeout
                ),
            )),
        };
        let s = match dialled {
            Ok(s) => s,
            Err(e) => {
                *g = None;
                forget_slot(&self.sessions, &name, &slot);
                return Err(e);
            }
        };
        info!(%peer, session = %s.id(), "shim session up");
        self.dialled.fetch_add(1, Ordering::Relaxed);
        *g = Some(s.clone());
        drop(g);
        let sessions = Arc::downgrade(&self.sessions);
        let watched = s.clone();
        tokio::spawn(async move {
            watched.closed().await;
            if let Some(m) = sessions.upgrade() {
                // Someone holding the slot is dialling anew: leave it.
                if let Ok(mut g) = slot.try_lock() {
                    if g.as_ref().is_some_and(|s| s.id() == watched.id()) {
                        *g = None;
                        forget_slot(&m, &name, &slot);
                    }
                }
            }
        });
        Ok(s)
    }

    /// Carries a program's connection, proven by its token, to the
    /// destination named in its header.
    async fn carry(&self, mut sock: TcpStream, from: SocketAddr, header: ShimHeader, uid: u32) {
        let _ = sock.set_nodelay(true);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let dest = header.destination;
        let want_status = header.flags & FLAG_WANT_STATUS != 0;
        let (peer, key) = self.route(dest);
        let carried = async {
            let key = match key {
                Some(k) => k,
                None => self
                    .learn_key(&peer)
                    .await
                    .map_err(|e| (STATUS_UNREACHABLE, e))?,
            };
            let session = self.session(&peer, key).await?;
            let stream = session.open_stream().await.map_err(|e| {
                (
                    STATUS_UNREACHABLE,
                    format!("cannot open a stream to {peer}: {e}"),
                )
            })?;
            let (mut rs, mut ws) = stream.into_split();
            let pre = Preamble {
                source: from,
                destination: dest,
                service: service_for_port(dest.port()),
            };
            let lost = |e: std::io::Error| (STATUS_REFUSED, format!("stream to {peer} lost: {e}"));
            ws.write_all(&pre.encode()).await.map_err(lost)?;
            let mut status = [0u8; 1];
            let wait = self.limits.connect_timeout + Duration::from_secs(2);
            match tokio::time::timeout(wait, rs.read_exact(&mut status)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(lost(e)),
                Err(_) => {
                    ws.reset(crate::bridge::RESET_TARGET_UNREACHABLE);
                    return Err((STATUS_TIMED_OUT, format!("no answer from {peer}")));
                }
            }
            if status[0] != STATUS_OK {
                return Err((
                    status[0],
                    format!("{peer} refused: {}", reason_of(status[0])),
                ));
            }
            Ok((session, rs, ws))
        };
        // Bounded as a whole: a session stuck resuming must not hold the
        // program's connection forever.
        let limit = self.limits.connect_timeout * 2 + Duration::from_secs(2);
        let carried = match tokio::time::timeout(limit, carried).await {
            Ok(r) => r,
            Err(_) => Err((
                STATUS_TIMED_OUT,
                format!("{peer} did not carry the connection within {limit:?}"),
            )),
        };
        match carried {
            Ok((session, rs, ws)) => {
                if want_status && sock.write_all(&[STATUS_OK]).await.is_err() {
                    rs.reset(crate::bridge::RESET_TCP);
                    return;
                }
                self.stats.streams.fetch_add(1, Ordering::Relaxed);
                self.per_session
                    .bump(&session.id().to_string(), || Some(session.clone()));
                splice(sock, rs, ws, self.limits.idle_timeout, &self.bytes).await;
            }
            Err((status, reason)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(pid = header.pid, uid, destination = %dest, %peer, "shim connection failed: {reason}");
                journal_to(
                    &self.journal,
                    Event::ShimFailed,
                    json!({
                        "pid": header.pid,
                        "uid": uid,
                        "destination": dest.to_string(),
                        "peer": peer,
                        "reason": reason,
                    }),
                );
                if want_status {
                    let _ = sock.write_all(&[status]).await;
                }
                abort_on_close(&sock);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShimSection;

    fn section(users: &str, groups: &str) -> ShimSection {
        let text = format!("[shim]\nallow_users = {users}\nallow_groups = {groups}\n");
        // Not Config::parse: that checks names against this host's files.
        toml::from_str::<crate::config::Config>(&text)
            .expect("parse")
            .shim
            .expect("[shim]")
    }

    #[test]
    fn allow_users_and_groups_by_name_or_id() {
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\n\
                      bob:x:1002:1002::/home/bob:/bin/sh\ncarol:x:1003:1003::/:/bin/sh\n";
        let group = "root:x:0:\nops:x:2000:bob,carol\nalice:x:1001:\n";
        // Default: the daemon's own uid and root, nobody else.
        let a = Allow::resolve(&section("[]", "[]"), 998, passwd, group).expect("resolve");
        assert!(a.permits(0, 0) && a.permits(998, 998));
        assert!(!a.permits(1001, 1001) && !a.permits(4242, 4242));
        // Names and ids, as strings or numbers.
        let a = Allow::resolve(
            &section("[\"alice\", 4242, \"4243\"]", "[]"),
            998,
            passwd,
            group,
        )
        .expect("resolve");
        for uid in [0, 998, 1001, 4242, 4243] {
            assert!(a.permits(uid, 65534), "{uid}");
        }
        assert!(!a.permits(1002, 1002));
        // A group: its gid as the caller's group, or its listed members.
        let a =
            Allow::resolve(&section("[]", "[\"ops\", 3000]"), 998, passwd, group).expect("resolve");
        assert!(
            a.permits(1002, 1002) && a.permits(1003, 1003),
            "members of ops"
        );
        assert!(
            a.permits(5000, 2000) && a.permits(5000, 3000),
            "primary group"
        );
        assert!(!a.permits(1001, 1001));
        let e = Allow::resolve(&section("[\"mallory\"]", "[]"), 998, passwd, group).unwrap_err();
        assert!(e.contains("no user `mallory`"), "{e}");
        let e = Allow::resolve(&section("[]", "[\"nogroup\"]"), 998, passwd, group).unwrap_err();
        assert!(e.contains("no group `nogroup`"), "{e}");
    }

    fn key(seed: u8) -> pool_net::SecretKey {
        pool_net::SecretKey::from_bytes([seed; 32])
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// F11: the source's per-peer session table and per-session counts,
    /// and the destination's per-session counts, lose a session's entries
    /// when it closes; a failed dial leaves nothing behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_session_tables_are_pruned_when_sessions_end() {
        let (skey, dkey) = (key(7), key(9));
        let dest = Endpoint::bind(
            "127.0.0.1:0",
            pool_net::EndpointConfig::new(dkey.clone())
                .trust(Trust::new().allow(skey.public_key())),
        )
        .await
        .expect("bind");
        let daddr = dest.local_addr().expect("addr").to_string();
        let source = Endpoint::client(
            pool_net::EndpointConfig::new(skey).trust(Trust::new().allow(dkey.public_key())),
        );
        let node = ShimNode::new(
            source,
            &[],
            Trust::new(),
            9253,
            Limits {
                connect_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
            None,
        );
        let expose = ShimExpose::default();
        expose.track_sessions(dest.clone());

        for _ in 0..3 {
            let s = node.session(&daddr, dkey.public_key()).await.expect("dial");
            let id = s.id().to_string();
            node.per_session.bump(&id, || Some(s.clone()));
            node.per_session.bump(&id, || None);
            assert_eq!(node.per_session(&id), 2);
            let ds = dest.accept().await.expect("accepted");
            let did = ds.id().to_string();
            expose.per_session.bump(&did, || {
                dest.sessions()
                    .into_iter()
                    .find(|x| x.id().to_string() == did)
            });
            assert_eq!(expose.per_session(&did), 1);
            assert_eq!(node.tables(), (1, 1, 0));
            assert_eq!(expose.sessions_tracked(), 1);
            // A peer that is not there: its slot goes with the failure.
            let e = node.session("127.0.0.1:1", key(3).public_key()).await;
            assert!(e.is_err());
            assert_eq!(node.tables().0, 1, "failed dial left a slot");
            s.close("test").await;
            wait_until("source tables pruned", || node.tables() == (0, 0, 0)).await;
            wait_until("destination counts pruned", || {
                expose.sessions_tracked() == 0
            })
            .await;
            assert_eq!(node.per_session(&id), 0);
        }
        // A closed session is never counted again.
        let s = node.session(&daddr, dkey.public_key()).await.expect("dial");
        s.close("test").await;
        node.per_session
            .bump(&s.id().to_string(), || Some(s.clone()));
        wait_until("nothing for a closed session", || {
            node.tables() == (0, 0, 0)
        })
        .await;
    }
}
