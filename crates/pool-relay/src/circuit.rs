//! Circuits: CONNECT waits for the peer's ACCEPT, then the two TCP
//! connections are spliced, one read-then-write loop per direction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::relay::{
    CircuitId, Msg, RouteHop, ERR_AUTH, ERR_NO_ANSWER, ERR_PROTOCOL, ERR_UNKNOWN_PEER,
};
use pool_core::PublicKey;
use pool_journal::Event;
use rand_core::{OsRng, RngCore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::conn::{send_error, write_msg, Authed, Greeting};
use crate::peering::PeerState;
use crate::state::{lock, Ctl, NodeState, Pending, Refusal, Shared};

/// Bytes each circuit direction reads and writes at a time.
pub(crate) const SPLICE_BUF: usize = 128 * 1024;

/// A CONNECT: find the peer (here, or at a peer relay), offer it the
/// circuit, wait for its ACCEPT, splice.
pub(crate) async fn connect(shared: Arc<Shared>, a: Authed, peer: PublicKey) {
    let here = lock(&shared.nodes).contains_key(&peer);
    if !here {
        if let Some(via) = shared.peering.lookup(&peer) {
            return crate::forward::connect_via(shared, a, peer, via).await;
        }
    }
    connect_local(shared, a, peer, Vec::new()).await;
}

/// A CONNECT to a node registered here; `route`: the relays before this
/// one, for an acceptor that asks.
pub(crate) async fn connect_local(
    shared: Arc<Shared>,
    mut a: Authed,
    peer: PublicKey,
    route: Vec<RouteHop>,
) {
    let addr = a.conn.addr;
    let key = a.key;
    let peer_tx = lock(&shared.nodes).get(&peer).map(|r| r.tx.clone());
    let Some(peer_tx) = peer_tx else {
        shared.refused(Refusal::UnknownPeer);
        debug!(node = %key, %peer, "relay: CONNECT to an unregistered key");
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::UnknownPeer.label(),
                "addr": addr.to_string(),
                "key": key.to_string(),
                "peer": peer.to_string(),
            }),
        );
        let message = if a.peer.is_some() {
            format!("peer {peer} is not registered at this relay (it may have moved; the asking relay's directory is out of date)")
        } else {
            format!("peer {peer} is not registered at this relay nor at a peer relay it knows (it is not running, not connected, or uses a relay this one does not peer with)")
        };
        send_error(&mut a.conn.stream, ERR_UNKNOWN_PEER, &message).await;
        return;
    };
    let mut circuit = [0u8; 16];
    OsRng.fill_bytes(&mut circuit);
    let (tx, rx) = oneshot::channel();
    lock(&shared.pending).insert(
        circuit,
        Pending {
            acceptor: peer,
            tx,
            route,
        },
    );
    let offered = peer_tx
        .try_send(Ctl::Incoming { circuit, from: key })
        .is_ok();
    drop(peer_tx);
    // Waits for the ACCEPT, unless the node hangs up first (bytes it sends
    // meanwhile stay in the socket for the circuit). `None`: it hung up.
    let accepted = if offered {
        let stream = &a.conn.stream;
        let gone = async {
            let mut one = [0u8; 1];
            if matches!(stream.peek(&mut one).await, Ok(n) if n > 0) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(shared.cfg.accept_timeout, rx) => Some(r.ok().and_then(Result::ok)),
            () = gone => None,
        }
    } else {
        Some(None)
    };
    let Some(accepted) = accepted else {
        lock(&shared.pending).remove(&circuit);
        debug!(node = %key, %peer, "relay: node left before its CONNECT was accepted");
        return;
    };
    lock(&shared.pending).remove(&circuit);
    let Some(b) = accepted else {
        shared.refused(Refusal::NoAnswer);
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::NoAnswer.label(),
                "addr": addr.to_string(),
                "key": key.to_string(),
                "peer": peer.to_string(),
            }),
        );
        let message = if offered {
            format!(
                "peer {peer} did not accept within {} s (it is registered but may be overloaded or its control connection broken); try again",
                shared.cfg.accept_timeout.as_secs_f32()
            )
        } else {
            format!("peer {peer} is not taking control messages (its queue is full); try again")
        };
        debug!(node = %key, %peer, "relay: no ACCEPT");
        send_error(&mut a.conn.stream, ERR_NO_ANSWER, &message).await;
        return;
    };
    splice(shared, a, b, circuit).await;
}

/// An ACCEPT: hand the connection to the waiting CONNECT.
pub(crate) async fn accept(shared: Arc<Shared>, mut b: Authed, circuit: CircuitId) {
    let addr = b.conn.addr;
    let key = b.key;
    enum Found {
        Ok(Pending),
        Unknown,
        WrongKey(PublicKey),
    }
    let found = {
        let mut pending = lock(&shared.pending);
        match pending.get(&circuit) {
            None => Found::Unknown,
            Some(p) if p.acceptor != key => Found::WrongKey(p.acceptor),
            Some(_) => match pending.remove(&circuit) {
                Some(p) => Found::Ok(p),
                None => Found::Unknown,
            },
        }
    };
    let (code, message, reason) = match found {
        Found::Ok(p) => match p.tx.send({
            b.route = p.route;
            b
        }) {
            Ok(()) => return,
            Err(back) => {
                b = back;
                (
                    ERR_NO_ANSWER,
                    "the connecting node gave up on this circuit".to_owned(),
                    Refusal::NoAnswer,
                )
            }
        },
        Found::Unknown => (
            ERR_PROTOCOL,
            format!(
                "circuit {} is unknown or has expired (answer INCOMING within {} s)",
                hex(&circuit),
                shared.cfg.accept_timeout.as_secs_f32()
            ),
            Refusal::Protocol,
        ),
        Found::WrongKey(want) => {
            warn!(node = %key, %addr, "relay: ACCEPT of a circuit offered to another key");
            (
                ERR_AUTH,
                format!(
                    "circuit {} was offered to {want}, not to {key}",
                    hex(&circuit)
                ),
                Refusal::Protocol,
            )
        }
    };
    shared.refused(reason);
    shared.journal_bulk(
        Event::RelayRefused,
        json!({
            "reason": if code == ERR_AUTH { "wrong_acceptor" } else { reason.label() },
            "addr": addr.to_string(),
            "key": key.to_string(),
            "circuit": hex(&circuit),
        }),
    );
    send_error(&mut b.conn.stream, code, &message).await;
}

pub(crate) fn hex(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 0xf)]));
    }
    s
}

/// A task aborted when this is dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    pub(crate) async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a circuit direction ended: `Ok` for a clean EOF (carried to the
/// other side as a half-close), `Err` for a reset or failure (ends both).
type PumpResult = std::io::Result<()>;

/// WELCOME both sides, then copy both directions until both end (or one
/// fails, which ends both).
pub(crate) async fn splice(shared: Arc<Shared>, a: Authed, b: Authed, circuit: CircuitId) {
    let Authed {
        conn: mut ca,
        key: ka,
        node: na,
        greeting: ga,
        route: route_a,
        peer: pa,
    } = a;
    let Authed {
        conn: mut cb,
        key: kb,
        node: nb,
        greeting: gb,
        route: route_b,
        peer: pb,
    } = b;
    let (wa, wb) = tokio::join!(
        greet(&mut ca.stream, ga, route_a, ca.addr),
        greet(&mut cb.stream, gb, route_b, cb.addr),
    );
    if wa.is_err() || wb.is_err() {
        debug!(from = %ka, to = %kb, "relay: circuit ended before WELCOME was sent");
        return;
    }
    let id = hex(&circuit);
    let c = &shared.counters;
    c.circuits.fetch_add(1, Ordering::Relaxed);
    c.circuits_total.fetch_add(1, Ordering::Relaxed);
    na.state.account.circuits.fetch_add(1, Ordering::Relaxed);
    nb.state.account.circuits.fetch_add(1, Ordering::Relaxed);
    let peer_a = pa.as_ref().map(|g| g.peer.clone());
    let peer_b = pb.as_ref().map(|g| g.peer.clone());
    let via = peer_a
        .as_ref()
        .or(peer_b.as_ref())
        .map(|p| p.key.to_string());
    info!(circuit = %id, from = %ka, to = %kb, via, "relay: circuit opened");
    let mut opened = json!({
        "circuit": id,
        "from": ka.to_string(),
        "from_addr": ca.addr.to_string(),
        "to": kb.to_string(),
        "to_addr": cb.addr.to_string(),
    });
    if let Some(v) = &via {
        opened["via"] = json!(v);
    }
    shared.journal(Event::CircuitOpened, opened);
    let started = Instant::now();
    let a_to_b = Arc::new(AtomicU64::new(0));
    let b_to_a = Arc::new(AtomicU64::new(0));
    let (ra, wa) = ca.stream.into_split();
    let (rb, wb) = cb.stream.into_split();
    // Each direction on its own task (both cores can copy), aborted with
    // this one (the relay stopping aborts connection tasks).
    let (stop_1, stop_2) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (idle_1, idle_2) = (stop_1.clone(), stop_2.clone());
    // Milliseconds after `started` of the last byte read either way.
    let activity = Arc::new(AtomicU64::new(0));
    let t1 = AbortOnDrop(tokio::spawn(pump(
        ra,
        std::mem::take(&mut ca.buf),
        wb,
        Direction {
            shared: shared.clone(),
            from: na.state.clone(),
            to: nb.state.clone(),
            from_peer: peer_a.clone(),
            to_peer: peer_b.clone(),
            count: a_to_b.clone(),
            stop: stop_1.clone(),
            stop_other: stop_2.clone(),
            activity: activity.clone(),
            started,
        },
    )));
    let t2 = AbortOnDrop(tokio::spawn(pump(
        rb,
        std::mem::take(&mut cb.buf),
        wa,
        Direction {
            shared: shared.clone(),
            from: nb.state.clone(),
            to: na.state.clone(),
            from_peer: peer_b,
            to_peer: peer_a,
            count: b_to_a.clone(),
            stop: stop_2,
            stop_other: stop_1,
            activity: activity.clone(),
            started,
        },
    )));
    let both = async { tokio::join!(t1.join(), t2.join()) };
    tokio::pin!(both);
    let idle_limit = shared.cfg.circuit_idle_timeout;
    let watchdog = async {
        let Some(limit) = idle_limit else {
            return std::future::pending::<()>().await;
        };
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let due = tokio::time::Instant::from_std(started + last + limit);
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let mut idled = false;
    let (r1, r2) = tokio::select! {
        r = &mut both => r,
        () = watchdog => {
            idled = true;
            idle_1.notify_one();
            idle_2.notify_one();
            both.await
        }
    };
    let why = |r: Result<PumpResult, tokio::task::JoinError>| match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    let reason = match (why(r1), why(r2)) {
        _ if idled => {
            c.idle_closed.fetch_add(1, Ordering::Relaxed);
            format!(
                "idle: no byte either way for {} s",
                idle_limit.unwrap_or_default().as_secs_f64()
            )
        }
        (None, None) => "closed".to_owned(),
        (Some(e), None) | (None, Some(e)) => e,
        // One failed and stopped the other: name the first cause.
        (Some(e1), Some(e2)) => {
            if e1 == STOPPED {
                e2
            } else {
                e1
            }
        }
    };
    c.circuits.fetch_sub(1, Ordering::Relaxed);
    let (ab, ba) = (
        a_to_b.load(Ordering::Relaxed),
        b_to_a.load(Ordering::Relaxed),
    );
    let secs = started.elapsed().as_secs_f64();
    info!(circuit = %id, from = %ka, to = %kb, bytes_from_to = ab, bytes_to_from = ba, secs, %reason, "relay: circuit closed");
    let mut closed = json!({
        "circuit": id,
        "from": ka.to_string(),
        "to": kb.to_string(),
        "bytes_from_to": ab,
        "bytes_to_from": ba,
        "duration_ms": (secs * 1000.0) as u64,
        "reason": reason,
    });
    if let Some(v) = via {
        closed["via"] = json!(v);
    }
    shared.journal(Event::CircuitClosed, closed);
    drop((na, nb, ca._slot, cb._slot, pa, pb));
}

/// WELCOME (after ROUTE when asked) to one end of a new circuit.
async fn greet(
    s: &mut TcpStream,
    g: Greeting,
    route: Vec<RouteHop>,
    observed: std::net::SocketAddr,
) -> std::io::Result<()> {
    match g {
        Greeting::Nothing => Ok(()),
        Greeting::Welcome => write_msg(s, &Msg::Welcome { observed }).await,
        Greeting::Routed => {
            write_msg(s, &Msg::Route(route)).await?;
            write_msg(s, &Msg::Welcome { observed }).await
        }
    }
}

/// What one circuit direction counts into and how it is stopped.
pub(crate) struct Direction {
    pub(crate) shared: Arc<Shared>,
    pub(crate) from: Arc<NodeState>,
    pub(crate) to: Arc<NodeState>,
    /// The peer relay this direction reads from, if it does (its caps
    /// apply, its bytes in count).
    pub(crate) from_peer: Option<Arc<PeerState>>,
    /// The peer relay this direction writes to, if it does.
    pub(crate) to_peer: Option<Arc<PeerState>>,
    pub(crate) count: Arc<AtomicU64>,
    /// Notified when the other direction failed.
    pub(crate) stop: Arc<Notify>,
    /// Notifies the other direction when this one fails.
    pub(crate) stop_other: Arc<Notify>,
    /// Milliseconds after `started` of the circuit's last byte read.
    pub(crate) activity: Arc<AtomicU64>,
    pub(crate) started: Instant,
}

impl Direction {
    pub(crate) fn moved(&self, n: usize) {
        let n = n as u64;
        self.count.fetch_add(n, Ordering::Relaxed);
        self.shared.counters.bytes.fetch_add(n, Ordering::Relaxed);
        self.from.sent.fetch_add(n, Ordering::Relaxed);
        self.to.received.fetch_add(n, Ordering::Relaxed);
        self.from.account.sent.fetch_add(n, Ordering::Relaxed);
        self.to.account.received.fetch_add(n, Ordering::Relaxed);
        if let Some(p) = &self.from_peer {
            p.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(p) = &self.to_peer {
            p.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) async fn limit(&self, n: usize) {
        let mut wait = self
            .from
            .bucket
            .as_ref()
            .map(|b| lock(b).take(Instant::now(), n))
            .unwrap_or(Duration::ZERO);
        if let Some(p) = &self.from_peer {
            let w = self.shared.peer_wait(p, n);
            if !w.is_zero() {
                self.shared.cap_hit(
                    p,
                    "rate",
                    json!({
                        "max_rate": p.max_rate.load(Ordering::Relaxed),
                        "fair_share": self.shared.cfg.peer_fair_share,
                    }),
                );
            }
            wait = wait.max(w);
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// One circuit direction: `first` (bytes read with the handshake), then
/// everything `r` sends, into `w`. EOF is carried as a half-close; a reset
/// or failure on either socket resets both (no FIN first) and stops the
/// other direction.
pub(crate) async fn pump(
    mut r: OwnedReadHalf,
    first: Vec<u8>,
    mut w: OwnedWriteHalf,
    d: Direction,
) -> PumpResult {
    let mut buf = first;
    let mut n = buf.len();
    let result = loop {
        if n > 0 {
            d.limit(n).await;
            let written = tokio::select! {
                biased;
                () = d.stop.notified() => break Err(stopped()),
                w = w.write_all(&buf[..n]) => w,
            };
            if let Err(e) = written {
                break Err(e);
            }
            d.moved(n);
        }
        if buf.len() < SPLICE_BUF {
            buf.resize(SPLICE_BUF, 0);
        }
        let read = tokio::select! {
            biased;
            () = d.stop.notified() => break Err(stopped()),
            r = r.read(&mut buf) => r,
        };
        n = match read {
            Ok(0) => return w.shutdown().await,
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        let ms = d.started.elapsed().as_millis() as u64;
        d.activity.fetch_max(ms, Ordering::Relaxed);
    };
    // Both sockets close abortively once both directions have let go;
    // `forget` keeps tokio from sending FIN when the write half drops.
    abort_on_close(r.as_ref());
    abort_on_close(w.as_ref());
    w.forget();
    d.stop_other.notify_one();
    result
}

pub(crate) const STOPPED: &str = "the other direction of the circuit failed";

pub(crate) fn stopped() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, STOPPED)
}

/// Abortive close: once the socket is dropped its TCP peer sees RST.
pub(crate) fn abort_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
