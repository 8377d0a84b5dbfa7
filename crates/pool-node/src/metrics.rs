//! Prometheus metrics: a scrape-time collector over the daemon's state and a
//! small HTTP/1.1 endpoint that serves it.
//!
//! The daemon implements [`MetricsSource`]; [`PoolCollector`] reads it on
//! every scrape and encodes OpenMetrics text through `prometheus-client`;
//! [`serve`] answers `GET /metrics` and `GET /health`.
//!
//! Per-peer counters stay monotonic when sessions come and go: the collector
//! remembers the last values it saw for each session and, once the session is
//! gone, folds them into a per-peer total that later scrapes add back in.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::model::{NodeCounters, SessionRow};

/// What the metrics read from the daemon on each scrape.
pub trait MetricsSource: Send + Sync + 'static {
    /// The sessions open now.
    fn sessions(&self) -> Vec<SessionRow>;
    /// Node-wide counters since the daemon started.
    fn counters(&self) -> NodeCounters;
}

/// `Content-Type` of a `/metrics` response.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most bytes a request head may take.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its whole request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, at most, unread input is drained after a response so that
/// closing does not reset the connection before the client reads it.
const LINGER: Duration = Duration::from_secs(1);
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Peers whose closed sessions' counters are remembered.
const MAX_RETIRED_PEERS: usize = 4096;

/// Per-session counters that only grow.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    sent: u64,
    received: u64,
    streams_opened: u64,
    resumes: u64,
    frames_resent: u64,
    tcp_retransmits: Option<u64>,
}

impl Totals {
    fn of(row: &SessionRow) -> Self {
        Totals {
            sent: row.bytes_sent,
            received: row.bytes_received,
            streams_opened: row.streams_total,
            resumes: row.resumes,
            frames_resent: row.frames_resent,
            tcp_retransmits: row.tcp_retransmits,
        }
    }

    fn add(&mut self, o: &Totals) {
        self.sent = self.sent.saturating_add(o.sent);
        self.received = self.received.saturating_add(o.received);
        self.streams_opened = self.streams_opened.saturating_add(o.streams_opened);
        self.resumes = self.resumes.saturating_add(o.resumes);
        self.frames_resent = self.frames_resent.saturating_add(o.frames_resent);
        self.tcp_retransmits = match (self.tcp_retransmits, o.tcp_retransmits) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (a, b) => a.or(b),
        };
    }
}

/// One peer's line in a scrape.
#[derive(Debug, Default)]
struct PeerView {
    totals: Totals,
    /// Streams open now; `None` when the peer has no live session.
    streams: Option<u64>,
    rtt_secs: Option<f64>,
    jitter_secs: Option<f64>,
}

/// What the collector remembers between scrapes.
#[derive(Debug, Default)]
struct History {
    /// Last values seen, by (session id, peer).
    live: HashMap<(String, String), Totals>,
    /// Counters of sessions that have ended, by peer.
    retired: HashMap<String, Totals>,
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// A `prometheus-client` [`Collector`] that reads a [`MetricsSource`] on each
/// scrape. Register it with [`Registry::register_collector`].
pub struct PoolCollector {
    source: Arc<dyn MetricsSource>,
    history: Mutex<History>,
}

impl fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCollector").finish_non_exhaustive()
    }
}

impl PoolCollector {
    /// A collector over `source`.
    pub fn new(source: Arc<dyn MetricsSource>) -> Self {
        PoolCollector {
            source,
            history: Mutex::new(History::default()),
        }
    }

    /// A registry holding just this collector, ready for
    /// `prometheus_client::encoding::text::encode`.
    pub fn registry(source: Arc<dyn MetricsSource>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(PoolCollector::new(source)));
        registry
    }

    /// Folds the current sessions into per-peer views, retiring the sessions
    /// that have gone since the last scrape.
    fn peers(&self, sessions: &[SessionRow]) -> BTreeMap<String, PeerView> {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let mut live = HashMap::with_capacity(sessions.len());
        let mut peers: BTreeMap<String, PeerView> = BTreeMap::new();
        for row in sessions {
            let totals = Totals::of(row);
            live.insert((row.id.clone(), row.peer.clone()), totals);
            let view = peers.entry(row.peer.clone()).or_default();
            view.totals.add(&totals);
            view.streams = Some(view.streams.unwrap_or(0).saturating_add(row.streams));
            if let Some(rtt_ms) = row.rtt_ms {
                // Jitter means nothing until there are RTT samples.
                view.rtt_secs = max_opt(view.rtt_secs, Some(rtt_ms / 1000.0));
                view.jitter_secs = max_opt(view.jitter_secs, Some(row.jitter_ms / 1000.0));
            }
        }
        let gone: Vec<_> = history
            .live
            .iter()
            .filter(|(key, _)| !live.contains_key(*key))
            .map(|((_, peer), totals)| (peer.clone(), *totals))
            .collect();
        for (peer, totals) in gone {
            let full = history.retired.len() >= MAX_RETIRED_PEERS;
            match history.retired.get_mut(&peer) {
                Some(t) => t.add(&totals),
                None if !full => {
                    history.retired.insert(peer, totals);
                }
                None => debug!(%peer, "metrics: too many retired peers, dropping its totals"),
            }
        }
        history.live = live;
        for (peer, retired) in &history.retired {
            peers.entry(peer.clone()).or_default().totals.add(retired);
        }
        peers
    }
}

/// Encodes one metric family: a descriptor, then one sample per peer that
/// has a value.
fn peer_family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    peers: &BTreeMap<String, PeerView>,
    value: impl Fn(&PeerView) -> Option<M>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (peer, view) in peers {
        if let Some(metric) = value(view) {
            let labels = [("peer", peer.as_str())];
            metric.encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let sessions = self.source.sessions();
        let c = self.source.counters();
        let e = &mut encoder;

        let sessions_now = ConstGauge::new(sessions.len() as u64);
        sessions_now.encode(e.encode_descriptor(
            "pool_sessions",
            "Sessions open now.",
            None,
            sessions_now.metric_type(),
        )?)?;
        {
            let mut family = e.encode_descriptor(
                "pool_sessions_on_path",
                "Sessions open now by path: direct, relay, or none (resuming).",
                None,
                MetricType::Gauge,
            )?;
            for path in ["direct", "relay", "none"] {
                let n = sessions.iter().filter(|r| r.path == path).count() as u64;
                ConstGauge::new(n).encode(family.encode_family(&[("path", path)])?)?;
            }
        }
        let moves = ConstGauge::new(sessions.iter().map(|r| r.path_changes).sum::<u64>());
        moves.encode(e.encode_descriptor(
            "pool_session_path_changes",
            "Path changes (relay to direct, back, new addresses) summed over the sessions open now; falls when sessions close.",
            None,
            moves.metric_type(),
        )?)?;
        counter(
            e,
            "pool_sessions_accepted",
            "Sessions accepted by the listener.",
            c.sessions_accepted,
        )?;
        counter(
            e,
            "pool_sessions_dialled",
            "Sessions dialled by this node.",
            c.sessions_dialled,
        )?;
        counter(
            e,
            "pool_handshakes_refused",
            "Handshakes refused, for any reason.",
            c.handshakes_refused,
        )?;
        counter(
            e,
            "pool_resumes_accepted",
            "Session resumes accepted by the listener.",
            c.resumes_accepted,
        )?;
        counter(
            e,
            "pool_shim_connections",
            "Connections from programs under libpool_shim.so accepted by this node.",
            c.shim_connections,
        )?;
        counter(
            e,
            "pool_shim_streams",
            "Shimmed connections carried to their destination's daemon.",
            c.shim_streams,
        )?;
        counter(
            e,
            "pool_shim_failed",
            "Shimmed connections that failed here (no route, peer down) or were refused by the destination.",
            c.shim_failed,
        )?;
        counter(
            e,
            "pool_shim_exposed",
            "Shim streams from peers connected to an exposed port.",
            c.shim_exposed,
        )?;
        counter(
            e,
            "pool_shim_refused",
            "Shim streams from peers refused (port not exposed, target down).",
            c.shim_refused,
        )?;
        counter(
            e,
            "pool_bridge_connections",
            "Bridge TCP connections accepted (tcp2pool) or made (pool2tcp).",
            c.bridge_connections,
        )?;
        counter(
            e,
            "pool_bridge_errors",
            "Bridge connections refused or failed (cap reached, target down, timeouts).",
            c.bridge_errors,
        )?;
        counter(
            e,
            "pool_journal_entries_written",
            "Change journal entries written.",
            c.journal_written,
        )?;
        counter(
            e,
            "pool_journal_entries_failed",
            "Change journal entries that could not be written.",
            c.journal_failed,
        )?;
        let pending = ConstGauge::new(i64::from(c.config_pending));
        pending.encode(e.encode_descriptor(
            "pool_config_pending",
            "1 while an applied config awaits `pool config confirm` (it rolls back by itself at the deadline).",
            None,
            pending.metric_type(),
        )?)?;
        counter(
            e,
            "pool_journal_rotations",
            "Times the change journal was sealed and a new file started.",
            c.journal_rotations,
        )?;

        counter(
            e,
            "pool_handoffs_started",
            "Live handoffs this node started as the source.",
            c.handoffs_started,
        )?;
        counter(
            e,
            "pool_handoffs_committed",
            "Live handoffs this node started that committed at the target.",
            c.handoffs_committed,
        )?;
        counter(
            e,
            "pool_handoffs_imported",
            "Sessions handed to this node that committed here.",
            c.handoffs_imported,
        )?;
        {
            let mut family = e.encode_descriptor(
                "pool_handoffs_aborted",
                "Live handoffs that failed before the commit (the session stayed where it was), by reason.",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in &c.handoffs_aborted {
                ConstCounter::new(*n)
                    .encode(family.encode_family(&[("reason", reason.as_str())])?)?;
            }
        }
        let peers = self.peers(&sessions);
        let bytes = Unit::Bytes;
        let seconds = Unit::Seconds;
        let ctr = MetricType::Counter;
        let gauge = MetricType::Gauge;
        peer_family(
            e,
            "pool_peer_sent",
            "Carrier bytes sent to the peer.",
            Some(&bytes),
            ctr,
            &peers,
            |v| Some(ConstCounter::new(v.totals.sent)),
        )?;
        peer_family(
            e,
            "pool_peer_received",
            "Carrier bytes received from the peer.",
            Some(&bytes),
            ctr,
            &peers,
            |v| Some(ConstCounter::new(v.totals.received)),
        )?;
        peer_family(
            e,
            "pool_peer_streams",
            "Streams open now with the peer.",
            None,
            gauge,
            &peers,
            |v| v.streams.map(ConstGauge::new),
        )?;
        peer_family(
            e,
            "pool_peer_streams_opened",
            "Streams opened with the peer.",
            None,
            ctr,
            &peers,
            |v| Some(ConstCounter::new(v.totals.streams_opened)),
        )?;
        peer_family(
            e,
            "pool_peer_rtt",
            "Smoothed round-trip time to the peer (the largest over its sessions).",
            Some(&seconds),
            gauge,
            &peers,
            |v| v.rtt_secs.map(ConstGauge::new),
        )?;
        peer_family(
            e,
            "pool_peer_jitter",
            "Round-trip time jitter to the peer, RFC 3550 estimator (the largest over its sessions).",
            Some(&seconds),
            gauge,
            &peers,
            |v| v.jitter_secs.map(ConstGauge::new),
        )?;
        peer_family(
            e,
            "pool_peer_resumes",
            "Session resumes (carrier changes) with the peer.",
            None,
            ctr,
            &peers,
            |v| Some(ConstCounter::new(v.totals.resumes)),
        )?;
        peer_family(
            e,
            "pool_peer_frames_resent",
            "Frames resent to the peer after resumes.",
            None,
            ctr,
            &peers,
            |v| Some(ConstCounter::new(v.totals.frames_resent)),
        )?;
        peer_family(
            e,
            "pool_peer_tcp_retransmits",
            "TCP retransmissions on carriers to the peer (from TCP_INFO, where known).",
            None,
            ctr,
            &peers,
            |v| v.totals.tcp_retransmits.map(ConstCounter::new),
        )?;
        Ok(())
    }
}

/// Serves `GET /metrics` (OpenMetrics text) and `GET /health` (`ok`) on
/// `addr`, e.g. `"127.0.0.1:9254"` or `"[::1]:9254"`; `"[::]:PORT"` also
/// takes IPv4. Returns the bound address and the accept task; aborting the
/// task stops the server and the connections it is serving.
pub async fn serve(
    addr: &str,
    source: Arc<dyn MetricsSource>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_registry(addr, PoolCollector::registry(source)).await
}

/// Like [`serve`], for any registry (the relay serves its own).
pub async fn serve_registry(
    addr: &str,
    registry: Registry,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = crate::net::bind_tcp(addr).await?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            if conns.len() >= MAX_CONNECTIONS {
                conns.join_next().await;
                continue;
            }
            match listener.accept().await {
                Ok((stream, _)) => {
                    conns.spawn(handle(stream, registry.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors; wait rather than spin.
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((bound, task))
}

/// Why a request head could not be read.
enum HeadError {
    TooLarge,
    Closed,
    Io(std::io::Error),
}

/// Where the empty line that ends a head finishes, if it has arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match &buf[i + 1..] {
            [b'\n', ..] => Some(i + 2),
            [b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        }
    })
}

async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Err(HeadError::TooLarge);
        }
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        filled += n;
        if let Some(end) = head_end(&buf[..filled]) {
            buf.truncate(end);
            return Ok(buf);
        }
    }
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    allow: bool,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: body.as_bytes().to_vec(),
        }
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if self.allow {
            out.extend_from_slice(b"Allow: GET, HEAD\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A request line, once the head has been checked.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
}

/// Checks a request head; `None` means 400.
fn parse_head(head: &[u8]) -> Option<Request<'_>> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return None;
    }
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, _) = line.split_once(':')?;
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return None;
        }
    }
    // Absolute form (`http://host/metrics`) names the path after the authority.
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(Request { method, path })
}

fn route(req: &Request<'_>, registry: &Registry) -> Response {
    let known = matches!(req.path, "/metrics" | "/health");
    if !known {
        return Response::text(404, "Not Found", "not found\n");
    }
    if !matches!(req.method, "GET" | "HEAD") {
        let mut r = Response::text(405, "Method Not Allowed", "use GET\n");
        r.allow = true;
        return r;
    }
    if req.path == "/health" {
        return Response::text(200, "OK", "ok\n");
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => Response {
            status: 200,
            reason: "OK",
            content_type: CONTENT_TYPE,
            allow: false,
            body: body.into_bytes(),
        },
        Err(_) => {
            warn!("metrics: encoding failed");
            Response::text(500, "Internal Server Error", "cannot encode metrics\n")
        }
    }
}

async fn handle(mut stream: TcpStream, registry: Arc<Registry>) {
    let (response, head_only) =
        match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
            Err(_) => (
                Response::text(408, "Request Timeout", "request head took too long\n"),
                false,
            ),
            Ok(Err(HeadError::TooLarge)) => (
                Response::text(
                    431,
                    "Request Header Fields Too Large",
                    "request head over 8 KiB\n",
                ),
                false,
            ),
            Ok(Err(HeadError::Closed)) => return,
            Ok(Err(HeadError::Io(e))) => {
                debug!(error = %e, "metrics: read failed");
                return;
            }
            Ok(Ok(head)) => match parse_head(&head) {
                Some(req) => (route(&req, &registry), req.method == "HEAD"),
                None => (Response::text(400, "Bad Request", "bad request\n"), false),
            },
        };
    let bytes = response.bytes(head_only);
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "metrics: write failed");
            return;
        }
        Err(_) => {
            debug!("metrics: client too slow to take the response");
            return;
        }
    }
    // Lingering close: closing with unread input (an oversized head, a
    // body) sends a reset that can destroy the response in flight.
    crate::net::drain_before_close(&mut stream, LINGER).await;
}
