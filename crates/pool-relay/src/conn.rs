//! One accepted connection: the HELLO / CHALLENGE / AUTH handshake, then
//! the dispatch of its intent (control, CONNECT, ACCEPT).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pool_core::relay::{
    Challenge, Intent, Msg, RouteHop, ERR_AUTH, ERR_CAPACITY, ERR_PROTOCOL, VERSION,
};
use pool_core::PublicKey;
use pool_journal::Event;
use rand_core::OsRng;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use crate::circuit::{accept, connect};
use crate::control::control;
use crate::peering::PeerGuard;
use crate::server::tune;
use crate::state::{NodeGuard, Refusal, Shared, UnauthGuard};

/// Time a node has to take one control message or a WELCOME / ERROR.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long unread input is drained after an ERROR, so that closing does
/// not reset the connection before the node has read it.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// An accepted TCP connection and what was read from it past the last
/// relay message (it belongs to the spliced stream).
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) addr: SocketAddr,
    pub(crate) buf: Vec<u8>,
    pub(crate) _slot: OwnedSemaphorePermit,
}

/// What the relay says to one end of a circuit once it is spliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// WELCOME (CONNECT, ACCEPT, PEER_CIRCUIT).
    Welcome,
    /// ROUTE, then WELCOME (the `*_ROUTED` intents).
    Routed,
    /// Nothing: our own connection to a peer relay (it greeted us).
    Nothing,
}

/// A connection whose key is proven.
pub(crate) struct Authed {
    pub(crate) conn: Conn,
    /// The node at this end (for a circuit from a peer relay: the peer's
    /// node).
    pub(crate) key: PublicKey,
    pub(crate) node: NodeGuard,
    pub(crate) greeting: Greeting,
    /// For [`Greeting::Routed`]: the relays past this one.
    pub(crate) route: Vec<RouteHop>,
    /// This end is a peer relay: its circuit counts against its caps.
    pub(crate) peer: Option<PeerGuard>,
}

impl Authed {
    /// A node's own connection.
    pub(crate) fn node(conn: Conn, key: PublicKey, node: NodeGuard, intent: &Intent) -> Authed {
        Authed {
            conn,
            key,
            node,
            greeting: if intent.wants_route() {
                Greeting::Routed
            } else {
                Greeting::Welcome
            },
            route: Vec::new(),
            peer: None,
        }
    }
}

/// Writes ERROR, closes the write side, and drains input for a moment so
/// the ERROR is not destroyed by a reset.
pub(crate) async fn send_error(stream: &mut TcpStream, code: u8, message: &str) {
    let mut out = Vec::with_capacity(message.len() + 4);
    Msg::Error {
        code,
        message: message.to_owned(),
    }
    .encode(&mut out);
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    if !matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
        return;
    }
    pool_node::net::drain_before_close(stream, LINGER).await;
}

pub(crate) async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    msg.encode(&mut out);
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&out)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the node did not take a relay message within 10 s",
        )),
    }
}

/// How a handshake ended without a proven key.
pub(crate) enum HsEnd {
    /// The node closed or the socket failed: nothing to answer.
    Gone(String),
    /// Answer with ERROR, then close.
    Refuse(Refusal, String),
    /// A failed proof (already counted and journaled): answer ERR_AUTH.
    Auth(String),
}

/// Reads one relay message from `conn`, keeping bytes past it in
/// `conn.buf`.
pub(crate) async fn read_msg(conn: &mut Conn) -> Result<Msg, HsEnd> {
    loop {
        match Msg::decode(&conn.buf) {
            Ok(Some((msg, used))) => {
                conn.buf.drain(..used);
                return Ok(msg);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(HsEnd::Refuse(
                    Refusal::Protocol,
                    format!("{e}; this is a POOL relay (POOL-RELAY/{VERSION})"),
                ))
            }
        }
        let mut tmp = [0u8; 2048];
        let n = conn
            .stream
            .read(&mut tmp)
            .await
            .map_err(|e| HsEnd::Gone(e.to_string()))?;
        if n == 0 {
            return Err(HsEnd::Gone("closed during the handshake".into()));
        }
        conn.buf.extend_from_slice(&tmp[..n]);
    }
}

/// HELLO, CHALLENGE, AUTH: the proven key and what it wants.
pub(crate) async fn handshake(
    shared: &Shared,
    conn: &mut Conn,
) -> Result<(PublicKey, Intent), HsEnd> {
    match read_msg(conn).await? {
        Msg::Hello { version } if version == VERSION => {}
        Msg::Hello { version } => {
            return Err(HsEnd::Refuse(
                Refusal::Protocol,
                format!("this relay speaks POOL-RELAY/{VERSION}, the node POOL-RELAY/{version}: upgrade the older side"),
            ))
        }
        _ => {
            return Err(HsEnd::Refuse(
                Refusal::Protocol,
                "expected HELLO first; this is a POOL relay".into(),
            ))
        }
    }
    let challenge = Challenge::new(&mut OsRng);
    write_msg(&mut conn.stream, &challenge.msg())
        .await
        .map_err(|e| HsEnd::Gone(e.to_string()))?;
    let Msg::Auth { key, proof, intent } = read_msg(conn).await? else {
        return Err(HsEnd::Refuse(
            Refusal::Protocol,
            "expected AUTH after CHALLENGE".into(),
        ));
    };
    if !challenge.verify(&key, &proof, &intent) {
        shared
            .counters
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        warn!(addr = %conn.addr, claimed = %key, "relay: proof of key ownership failed");
        shared.journal_bulk(
            Event::RelayAuthFailed,
            json!({
                "addr": conn.addr.to_string(),
                "claimed_key": key.to_string(),
                "reason": "wrong proof of key ownership",
            }),
        );
        return Err(HsEnd::Auth(format!(
            "the proof for key {key} is wrong: this node does not hold that key's secret (check the key file it uses)"
        )));
    }
    // Relay keys are checked against the enrolments instead (crate::forward).
    if !intent.is_relay() && !shared.cfg.allow.is_empty() && !shared.cfg.allow.contains(&key) {
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::NotAllowed.label(),
                "addr": conn.addr.to_string(),
                "key": key.to_string(),
            }),
        );
        return Err(HsEnd::Refuse(
            Refusal::NotAllowed,
            format!("key {key} is not served by this relay (ask its operator to add it with --allow or --authorized)"),
        ));
    }
    Ok((key, intent))
}

/// One accepted connection, from HELLO to close.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    slot: OwnedSemaphorePermit,
    unauth: UnauthGuard,
) {
    tune(&stream);
    let mut conn = Conn {
        stream,
        addr,
        buf: Vec::new(),
        _slot: slot,
    };
    let hs =
        tokio::time::timeout(shared.cfg.handshake_timeout, handshake(&shared, &mut conn)).await;
    let (key, intent) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(HsEnd::Gone(why))) => {
            debug!(%addr, why, "relay: connection ended during the handshake");
            return;
        }
        Ok(Err(HsEnd::Auth(message))) => {
            send_error(&mut conn.stream, ERR_AUTH, &message).await;
            return;
        }
        Ok(Err(HsEnd::Refuse(why, message))) => {
            shared.refused(why);
            debug!(%addr, reason = why.label(), message, "relay: refused during the handshake");
            send_error(&mut conn.stream, why.code(), &message).await;
            return;
        }
        Err(_) => {
            shared.refused(Refusal::Protocol);
            debug!(%addr, "relay: handshake timed out");
            let message = format!(
                "no valid HELLO and AUTH within {} s",
                shared.cfg.handshake_timeout.as_secs_f32()
            );
            send_error(&mut conn.stream, ERR_PROTOCOL, &message).await;
            return;
        }
    };
    // Authenticated: no longer counted against its address (a refusal
    // above keeps it counted while the ERROR lingers).
    drop(unauth);
    if intent.is_relay() {
        return crate::forward::from_relay(shared, conn, key, intent).await;
    }
    let Some(node) = shared.enter_node(key) else {
        shared.refused(Refusal::Capacity);
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": Refusal::Capacity.label(),
                "addr": addr.to_string(),
                "key": key.to_string(),
                "cap": "max_connections_per_node",
            }),
        );
        let message = format!(
            "node {key} already has {} connections to this relay, its cap; close some or ask the operator to raise --max-per-node",
            shared.cfg.max_connections_per_node
        );
        send_error(&mut conn.stream, ERR_CAPACITY, &message).await;
        return;
    };
    let authed = Authed::node(conn, key, node, &intent);
    match intent {
        Intent::Register => control(shared, authed).await,
        Intent::Connect(peer) | Intent::ConnectRouted(peer) => connect(shared, authed, peer).await,
        Intent::Accept(circuit) | Intent::AcceptRouted(circuit) => {
            accept(shared, authed, circuit).await
        }
        Intent::Peer(_) | Intent::PeerCircuit { .. } => {}
    }
}
