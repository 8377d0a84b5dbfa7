//! Relay-to-relay connections: dialling a peer relay (both keys proven),
//! the checks on a relay that dials us, and circuits forwarded both ways.
//!
//! A circuit from node A (here) to node B (at peer relay R2) is two
//! splices: A's connection to our connection to R2 (here), and that
//! connection to B's ACCEPT (at R2). Each relay checks its own node's key;
//! R2 takes our word for A's, as it takes A's sealed records: the session
//! handshake between A and B authenticates both end to end.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pool_core::relay::{
    authenticate, peer_proof, Challenge, Intent, Msg, PeerChallenge, RouteHop, ERR_CAPACITY,
    ERR_NOT_ALLOWED, ERR_NO_ANSWER, ERR_PROTOCOL, ERR_UNKNOWN_PEER, VERSION,
};
use pool_core::PublicKey;
use pool_journal::Event;
use rand_core::{OsRng, RngCore};
use serde_json::json;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::circuit::{connect_local, splice};
use crate::conn::{read_msg, send_error, write_msg, Authed, Conn, Greeting, HsEnd};
use crate::peering::{route_addr, PeerState};
use crate::server::tune;
use crate::state::{Refusal, Shared};

/// Why a connection to a peer relay failed.
#[derive(Debug)]
pub(crate) enum DialError {
    /// No TCP connection, or it broke.
    Io(String),
    /// The peer relay answered ERROR.
    Refused { code: u8, message: String },
    /// It did not prove the key it was enrolled with.
    Impostor(String),
    /// It said something out of order, or too late.
    Protocol(String),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Io(e) => write!(f, "cannot reach it: {e}"),
            DialError::Refused { code, message } => {
                write!(f, "it refused (code {code}): {message}")
            }
            DialError::Impostor(e) => write!(f, "it is not the enrolled relay: {e}"),
            DialError::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

fn hs(e: HsEnd) -> DialError {
    match e {
        HsEnd::Gone(w) => DialError::Io(w),
        HsEnd::Refuse(_, m) | HsEnd::Auth(m) => DialError::Protocol(m),
    }
}

/// Dials `peer`, proves our relay key with the intent `make` builds
/// around our challenge, and checks the peer's PEER_PROOF. The returned
/// connection's buffer holds what came past the proof.
pub(crate) async fn dial_relay(
    shared: &Arc<Shared>,
    peer: &PeerState,
    make: impl FnOnce(PeerChallenge) -> Intent,
) -> Result<Conn, DialError> {
    let Some(me) = shared.cfg.key.clone() else {
        return Err(DialError::Protocol(
            "this relay has no key (--key): it cannot peer".into(),
        ));
    };
    let slot = shared
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| DialError::Io("this relay is at its connection cap".into()))?;
    let addr = peer.addr();
    let fut = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&addr)
            .await
            .map_err(|e| DialError::Io(format!("cannot resolve {addr}: {e}")))?
            .collect();
        let mut last = format!("{addr} resolves to no address");
        let mut found = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    found = Some((s, a));
                    break;
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        let (stream, sa) = found.ok_or(DialError::Io(last))?;
        tune(&stream);
        let mut conn = Conn {
            stream,
            addr: sa,
            buf: Vec::new(),
            _slot: slot,
        };
        let io = |e: std::io::Error| DialError::Io(e.to_string());
        write_msg(&mut conn.stream, &Msg::Hello { version: VERSION })
            .await
            .map_err(io)?;
        let (ephemeral, nonce) = match read_msg(&mut conn).await.map_err(hs)? {
            Msg::Challenge { ephemeral, nonce } => (ephemeral, nonce),
            Msg::Error { code, message } => return Err(DialError::Refused { code, message }),
            other => {
                return Err(DialError::Protocol(format!(
                    "{other:?} instead of CHALLENGE"
                )))
            }
        };
        let mine = Challenge::new(&mut OsRng);
        let auth = authenticate(&me, &ephemeral, &nonce, make(mine.peer_challenge()))
            .ok_or_else(|| DialError::Protocol("its ephemeral key is invalid".into()))?;
        write_msg(&mut conn.stream, &auth).await.map_err(io)?;
        match read_msg(&mut conn).await.map_err(hs)? {
            Msg::PeerProof { key, proof } => {
                if key != peer.key {
                    return Err(DialError::Impostor(format!(
                        "it proved key {key}, enrolled was {}",
                        peer.key
                    )));
                }
                if !mine.verify_peer(&key, &me.public_key(), &proof) {
                    return Err(DialError::Impostor(format!(
                        "its proof for key {key} is wrong"
                    )));
                }
                Ok(conn)
            }
            Msg::Error { code, message } => Err(DialError::Refused { code, message }),
            other => Err(DialError::Protocol(format!(
                "{other:?} instead of PEER_PROOF (is it a relay that peers?)"
            ))),
        }
    };
    tokio::time::timeout(shared.cfg.handshake_timeout + Duration::from_secs(2), fut)
        .await
        .map_err(|_| DialError::Protocol("no PEER_PROOF in time".into()))?
}

/// A connection that proved a relay key (a PEER or PEER_CIRCUIT intent):
/// only enrolled relays get further, and they get our proof first.
pub(crate) async fn from_relay(
    shared: Arc<Shared>,
    mut conn: Conn,
    key: PublicKey,
    intent: Intent,
) {
    let addr = conn.addr;
    let peer = shared.peering.peer(&key);
    let (Some(me), Some(peer)) = (shared.cfg.key.clone(), peer) else {
        shared.refused(Refusal::NotAllowed);
        warn!(%addr, relay = %key, "relay: a relay key that is not enrolled here tried to peer");
        shared.journal_bulk(
            Event::RelayPeerRefused,
            json!({
                "direction": "in",
                "addr": addr.to_string(),
                "key": key.to_string(),
                "reason": if shared.cfg.key.is_none() { "this relay has no key" } else { "not an enrolled peer relay" },
            }),
        );
        let message = if shared.cfg.key.is_none() {
            "this relay has no key (--key), so it peers with no relay".to_owned()
        } else {
            format!(
                "relay key {key} is not enrolled here: only relays this relay's operator enrolled \
                 (`pool relay enroll HOST --relay-key {key}`, or [[relay.peer]]) may peer, and a node key cannot pose as one"
            )
        };
        send_error(&mut conn.stream, ERR_NOT_ALLOWED, &message).await;
        return;
    };
    let challenge = match intent {
        Intent::Peer(c) | Intent::PeerCircuit { challenge: c, .. } => c,
        _ => return,
    };
    let Some(proof) = peer_proof(&me, &challenge, &key) else {
        shared.refused(Refusal::Protocol);
        send_error(
            &mut conn.stream,
            ERR_PROTOCOL,
            "your challenge's ephemeral key is invalid",
        )
        .await;
        return;
    };
    if write_msg(&mut conn.stream, &proof).await.is_err() {
        return;
    }
    match intent {
        Intent::Peer(_) => crate::link::accepted(shared, conn, peer).await,
        Intent::PeerCircuit { from, to, .. } => {
            circuit_from_peer(shared, conn, peer, from, to).await
        }
        _ => {}
    }
}

async fn refuse_circuit_cap(shared: &Shared, stream: &mut TcpStream, peer: &PeerState) {
    shared.refused(Refusal::Capacity);
    let max = peer.max_circuits.load(Ordering::Relaxed);
    shared.cap_hit(peer, "circuits", json!({ "max_circuits": max }));
    let message = format!(
        "peer relay {} has {max} circuits open through this relay, its cap; try again later",
        peer.key
    );
    send_error(stream, ERR_CAPACITY, &message).await;
}

/// A circuit a peer relay forwards for its node `from` to our node `to`.
async fn circuit_from_peer(
    shared: Arc<Shared>,
    mut conn: Conn,
    peer: Arc<PeerState>,
    from: PublicKey,
    to: PublicKey,
) {
    let Some(guard) = shared.enter_peer(&peer) else {
        refuse_circuit_cap(&shared, &mut conn.stream, &peer).await;
        return;
    };
    let Some(node) = shared.enter_node(from) else {
        shared.refused(Refusal::Capacity);
        let message = format!(
            "node {from} already has {} connections through this relay, its cap",
            shared.cfg.max_connections_per_node
        );
        send_error(&mut conn.stream, ERR_CAPACITY, &message).await;
        return;
    };
    let route = vec![RouteHop {
        key: peer.key,
        addr: route_addr(&peer, conn.addr),
    }];
    let a = Authed {
        conn,
        key: from,
        node,
        greeting: Greeting::Welcome,
        route: Vec::new(),
        peer: Some(guard),
    };
    connect_local(shared, a, to, route).await;
}

/// A CONNECT here to `to`, a node registered at the peer relay `via`.
pub(crate) async fn connect_via(
    shared: Arc<Shared>,
    mut a: Authed,
    to: PublicKey,
    via: Arc<PeerState>,
) {
    let from = a.key;
    let refused = |why: Refusal, detail: String| {
        shared.refused(why);
        shared.journal_bulk(
            Event::RelayRefused,
            json!({
                "reason": why.label(),
                "addr": a.conn.addr.to_string(),
                "key": from.to_string(),
                "peer": to.to_string(),
                "via": via.key.to_string(),
                "detail": detail,
            }),
        );
    };
    let Some(guard) = shared.enter_peer(&via) else {
        refused(Refusal::Capacity, "max_circuits of the peer relay".into());
        refuse_circuit_cap(&shared, &mut a.conn.stream, &via).await;
        return;
    };
    let Some(node) = shared.enter_node(to) else {
        refused(Refusal::Capacity, "max_connections_per_node".into());
        let message = format!("node {to} already has its cap of connections through this relay");
        send_error(&mut a.conn.stream, ERR_CAPACITY, &message).await;
        return;
    };
    let dialled = dial_relay(&shared, &via, |challenge| Intent::PeerCircuit {
        challenge,
        from,
        to,
    })
    .await;
    let mut conn = match dialled {
        Ok(c) => c,
        Err(e) => {
            debug!(node = %from, %to, via = %via.key, error = %e, "relay: forwarding to a peer relay failed");
            refused(Refusal::NoAnswer, e.to_string());
            let message = format!(
                "peer {to} is at peer relay {} ({}), which {e}",
                via.key,
                via.addr()
            );
            send_error(&mut a.conn.stream, ERR_NO_ANSWER, &message).await;
            return;
        }
    };
    // The far relay WELCOMEs once its node accepted.
    let wait = shared.cfg.accept_timeout + Duration::from_secs(2);
    let answer = tokio::time::timeout(wait, read_msg(&mut conn)).await;
    match answer {
        Ok(Ok(Msg::Welcome { .. })) => {}
        Ok(Ok(Msg::Error { code, message })) => {
            let why = match code {
                ERR_UNKNOWN_PEER => Refusal::UnknownPeer,
                ERR_CAPACITY => Refusal::Capacity,
                ERR_NO_ANSWER => Refusal::NoAnswer,
                _ => Refusal::Protocol,
            };
            refused(why, message.clone());
            let message = format!("peer relay {}: {message}", via.key.short());
            send_error(&mut a.conn.stream, code, &message).await;
            return;
        }
        other => {
            let detail = match other {
                Err(_) => "no answer in time".to_owned(),
                Ok(Err(e)) => hs(e).to_string(),
                Ok(Ok(m)) => format!("{m:?} instead of WELCOME"),
            };
            refused(Refusal::NoAnswer, detail.clone());
            let message = format!("peer relay {}: {detail}", via.key.short());
            send_error(&mut a.conn.stream, ERR_NO_ANSWER, &message).await;
            return;
        }
    }
    a.route = vec![RouteHop {
        key: via.key,
        addr: route_addr(&via, conn.addr),
    }];
    let b = Authed {
        conn,
        key: to,
        node,
        greeting: Greeting::Nothing,
        route: Vec::new(),
        peer: Some(guard),
    };
    let mut circuit = [0u8; 16];
    OsRng.fill_bytes(&mut circuit);
    splice(shared, a, b, circuit).await;
}
