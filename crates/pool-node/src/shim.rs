//! The daemon side of the `LD_PRELOAD` shim (`libpool_shim.so`).
//!
//! **Source node** (`[shim]`): programs run under the shim connect to a
//! loopback listener and send a 28-byte header naming the destination
//! they asked for. The daemon picks the POOL peer for that destination
//! (`[[route]]` rules, else the destination host itself on port 9253),
//! opens a stream on a session to it and carries the connection like a
//! `tcp2pool` bridge, with the reserved service name `":PORT"`.
//!
//! **Destination node** (`[[expose]]`): a `":PORT"` stream is connected
//! only to a port the config exposes (by default on loopback), never to
//! another host; anything else is refused with a `shim_refused` journal
//! entry. The destination answers every shim stream with one status byte
//! first, so a blocking `connect` in the program can fail the way the
//! kernel's would.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pool_net::{Endpoint, PublicKey, RecvStream, SendStream, Session, Trust};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::bridge::{abort_on_close, splice, BridgeStats, Limits, Preamble};
use crate::config::{ExposeSection, RouteSection};
use crate::journal::Journal;

/// `PSH1`: the header's magic.
pub const MAGIC: [u8; 4] = *b"PSH1";
/// Length of the shim's header.
pub const HEADER_LEN: usize = 28;
/// Header flag: answer with a status byte (the program blocks in `connect`).
pub const FLAG_WANT_STATUS: u8 = 1;
/// Status: connected.
pub const STATUS_OK: u8 = 0;
/// Status: refused (by the destination program's host).
pub const STATUS_REFUSED: u8 = 1;
/// Status: timed out.
pub const STATUS_TIMED_OUT: u8 = 2;
/// Status: no route or the peer daemon cannot be reached.
pub const STATUS_UNREACHABLE: u8 = 3;
/// Status: the destination daemon does not expose the port.
pub const STATUS_NOT_EXPOSED: u8 = 4;

/// What the shim sends first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShimHeader {
    /// The address the program connected to.
    pub destination: SocketAddr,
    /// Header flags ([`FLAG_WANT_STATUS`]).
    pub flags: u8,
    /// The program's process id (for logs and the journal).
    pub pid: u32,
}

impl ShimHeader {
    /// `magic[4] flags u8, reserved u8, port u16be, address[16] (IPv4 as
    /// v4-mapped), pid u32be`.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Option<ShimHeader> {
        if h[..4] != MAGIC {
            return None;
        }
        let port = u16::from_be_bytes([h[6], h[7]]);
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&h[8..24]);
        let ip = Ipv6Addr::from(ip);
        let ip = match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        };
        Some(ShimHeader {
            destination: SocketAddr::new(ip, port),
            flags: h[4],
            pid: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        })
    }
}

/// The service name of a shim stream to `port`.
pub fn service_for_port(port: u16) -> String {
    format!(":{port}")
}

/// An address range: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or `ADDR`.
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = a.trim().parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { net, prefix })
    }

    /// Whether `ip` (v4-mapped IPv6 counts as IPv4) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Counters of shimmed connections.
#[derive(Debug, Default)]
pub struct ShimStats {
    /// Connections accepted from programs (source node).
    pub connections: AtomicU64,
    /// Of those, open now.
    pub active: AtomicU64,
    /// Carried to the destination (its daemon reached the program).
    pub streams: AtomicU64,
    /// Failed at this node or refused by the destination.
    pub failed: AtomicU64,
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

fn bump(map: &Mutex<HashMap<String, u64>>, session: &str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(session.to_string()).or_default() += 1;
    }
}

fn journal_to(j: &Option<Journal>, event: &str, fields: serde_json::Value) {
    if let Some(j) = j {
        j.record(event, fields);
    }
}

/// The destination side: which ports peers' shimmed connections may reach.
#[derive(Default)]
pub struct ShimExpose {
    rules: RwLock<Vec<ExposeSection>>,
    journal: RwLock<Option<Journal>>,
    per_session: Mutex<HashMap<String, u64>>,
    /// Counters ([`ShimStats::exposed`], [`ShimStats::refused`]).
    pub stats: Arc<ShimStats>,
    /// Bytes carried.
    pub bytes: Arc<BridgeStats>,
}

impl ShimExpose {
    /// Sets the exposed ports (on start and reload) and the journal.
    pub fn configure(&self, rules: Vec<ExposeSection>, journal: Option<Journal>) {
        if let Ok(mut r) = self.rules.write() {
            *r = rules;
        }
        if let Ok(mut j) = self.journal.write() {
            *j = journal;
        }
    }

    /// The exposed ports.
    pub fn rules(&self) -> Vec<ExposeSection> {
        self.rules.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Shim streams served per session id.
    pub fn per_session(&self, session: &str) -> u64 {
        self.per_session
            .lock()
            .ok()
            .and_then(|m| m.get(session).copied())
            .unwrap_or(0)
    }

    fn journal(&self, event: &str, fields: serde_json::Value) {
        let j = self.journal.read().ok().and_then(|j| j.clone());
        journal_to(&j, event, fields);
    }

    /// Serves one `":PORT"` stream of `session` from `peer`.
    pub(crate) async fn serve(
        &self,
        session: &str,
        peer: PublicKey,
        pre: Preamble,
        rs: RecvStream,
        mut ws: SendStream,
        limits: &Limits,
    ) {
        let port = pre.service[1..].parse::<u16>().ok().filter(|p| *p != 0);
        let rule = port.and_then(|p| self.rules().into_iter().find(|r| r.port == p));
        let refuse = |status: u8, reason: String| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(peer = %peer, service = %pre.service, destination = %pre.destination, "shim connection refused: {reason}");
            self.journal(
                "shim_refused",
                json!({
                    "peer": peer.to_string(),
                    "port": port,
                    "destination": pre.destination.to_string(),
                    "source": pre.source.to_string(),
                    "reason": reason,
                }),
            );
            status
        };
        let (Some(port), Some(rule)) = (port, rule) else {
            let status = refuse(
                STATUS_NOT_EXPOSED,
                format!(
                    "port {} is not exposed here (add an [[expose]] port = {} to allow it)",
                    &pre.service[1..],
                    &pre.service[1..]
                ),
            );
            let _ = ws.write_all(&[status]).await;
            let _ = ws.shutdown().await;
            return;
        };
        let target = match &rule.target {
            Some(t) => t.clone(),
            None => {
                let lo = if pre.destination.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                };
                SocketAddr::new(lo, port).to_string()
            }
        };
        let sock =
            match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(&target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let status = refuse(
                        STATUS_REFUSED,
                        format!("cannot connect to the exposed target {target}: {e}"),
                    );
                    let _ = ws.write_all(&[status]).await;
                    let _ = ws.shutdown().await;
                    return;
                }
                Err(_) => {
                    let status = refuse(
                        STATUS_TIMED_OUT,
                        format!("connecting to the exposed target {target} timed out"),
                    );
                    let _ = ws.write_all(&[status]).await;
                    let _ = ws.shutdown().await;
                    return;
                }
            };
        let _ = sock.set_nodelay(true);
        if ws.write_all(&[STATUS_OK]).await.is_err() {
            return;
        }
        self.stats.exposed.fetch_add(1, Ordering::Relaxed);
        bump(&self.per_session, session);
        debug!(peer = %peer, %target, "shim stream connected");
        splice(sock, rs, ws, limits.idle_timeout, &self.bytes).await;
    }
}

struct Route {
    cidr: Cidr,
    peer: String,
    peer_key: Option<PublicKey>,
}

type SessionSlot = Arc<tokio::sync::Mutex<Option<Session>>>;

/// The source side: the loopback listener programs under the shim reach.
pub struct ShimNode {
    endpoint: Endpoint,
    routes: RwLock<Vec<Route>>,
    trust: RwLock<Trust>,
    default_peer_port: u16,
    limits: Limits,
    sessions: Mutex<HashMap<String, SessionSlot>>,
    journal: Option<Journal>,
    per_session: Mutex<HashMap<String, u64>>,
    dialled: AtomicU64,
    permits: Arc<Semaphore>,
    /// Counters.
    pub stats: Arc<ShimStats>,
    /// Bytes carried.
    pub bytes: Arc<BridgeStats>,
}

fn routes(sections: &[RouteSection]) -> Vec<Route> {
    sections
        .iter()
        .filter_map(|r| {
            Some(Route {
                cidr: Cidr::parse(&r.cidr)?,
                peer: r.peer.clone(),
                peer_key: r
                    .peer_key
                    .as_deref()
                    .and_then(|k| PublicKey::from_token(k).ok()),
            })
        })
        .collect()
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
            sessions: Mutex::new(HashMap::new()),
            journal,
            per_session: Mutex::new(HashMap::new()),
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
        self.per_session
            .lock()
            .ok()
            .and_then(|m| m.get(session).copied())
            .unwrap_or(0)
    }

    /// Binds the loopback listener.
    pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
        crate::net::bind_tcp(addr).await
    }

    /// Accepts program connections until `stop` turns true.
    pub async fn run(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        while let Some((sock, from)) =
            crate::bridge::accept_next(&listener, &mut stop, "shim").await
        {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(%from, "shim connection cap reached; refusing");
                abort_on_close(&sock);
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.stats.active.fetch_add(1, Ordering::Relaxed);
                me.handle(sock, from).await;
                me.stats.active.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
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

    async fn session(&self, peer: &str, key: PublicKey) -> Result<Session, (u8, String)> {
        let slot = match self.sessions.lock() {
            Ok(mut m) => m.entry(format!("{peer} {key}")).or_default().clone(),
            Err(_) => return Err((STATUS_UNREACHABLE, "session table unavailable".into())),
        };
        let mut g = slot.lock().await;
        if let Some(s) = g.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let s = match tokio::time::timeout(
            self.limits.connect_timeout,
            self.endpoint.connect(peer, key),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err((STATUS_REFUSED, format!("cannot reach {peer}: {e}"))),
            Err(_) => {
                return Err((
                    STATUS_TIMED_OUT,
                    format!(
                        "{peer} did not answer within {:?}",
                        self.limits.connect_timeout
                    ),
                ))
            }
        };
        info!(%peer, session = %s.id(), "shim session up");
        self.dialled.fetch_add(1, Ordering::Relaxed);
        *g = Some(s.clone());
        Ok(s)
    }

    async fn handle(&self, mut sock: TcpStream, from: SocketAddr) {
        let _ = sock.set_nodelay(true);
        let mut h = [0u8; HEADER_LEN];
        let header =
            match tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut h)).await {
                Ok(Ok(_)) => ShimHeader::decode(&h),
                _ => None,
            };
        let Some(header) = header else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(%from, "not a shim header; closing");
            abort_on_close(&sock);
            return;
        };
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
                bump(&self.per_session, &session.id().to_string());
                splice(sock, rs, ws, self.limits.idle_timeout, &self.bytes).await;
            }
            Err((status, reason)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(pid = header.pid, destination = %dest, %peer, "shim connection failed: {reason}");
                journal_to(
                    &self.journal,
                    "shim_failed",
                    json!({
                        "pid": header.pid,
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

    /// The same bytes as `pool_shim::wire`'s test vector.
    #[test]
    fn header_test_vector() {
        let h: [u8; 28] = [
            b'P', b'S', b'H', b'1', 1, 0, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10,
            1, 2, 3, 1, 2, 3, 4,
        ];
        assert_eq!(
            ShimHeader::decode(&h),
            Some(ShimHeader {
                destination: "10.1.2.3:8080".parse().unwrap(),
                flags: FLAG_WANT_STATUS,
                pid: 0x0102_0304,
            })
        );
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(ShimHeader::decode(&bad), None);
    }

    #[test]
    fn cidr_ranges() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains("::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "fd00::/129"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }
}
