//! Peering links: one TCP connection per enrolled peer relay, whichever
//! side dialled it, carrying the gossip of registrations (HAVE / GONE,
//! a full list when it comes up, changes after), PING / PONG and END.
//!
//! Both sides dial while no link is up. When two links to the same peer
//! meet, both sides keep the one dialled by the smaller key (a newer link
//! from the same dialler replaces the older: the dialler restarted).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pool_core::relay::{key_batches, Intent, Msg, ERR_PROTOCOL};
use pool_core::PublicKey;
use pool_journal::Event;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::PeerConfig;
use crate::conn::{read_msg, write_msg, Conn};
use crate::directory::Added;
use crate::forward::{dial_relay, DialError};
use crate::peering::{Link, LinkCmd, PeerState};
use crate::state::{lock, Shared};

/// Gossip waiting for one link; a link that falls this far behind is
/// closed and resyncs when it comes back.
const LINK_QUEUE: usize = 4096;
/// PING on an idle link this often.
const PING_EVERY: Duration = Duration::from_secs(15);

/// Enrols `p` and, when it is new, starts keeping a link to it up.
pub(crate) fn start_peer(shared: &Arc<Shared>, p: &PeerConfig, by: &str) -> bool {
    let (st, new) = shared.enroll(p, by);
    if new {
        tokio::spawn(dialler(shared.clone(), st));
    } else {
        st.wake.notify_one();
    }
    new
}

/// Keeps a link to `peer` up while it is enrolled and the relay runs:
/// dials when there is none, backs off while it fails.
async fn dialler(shared: Arc<Shared>, peer: Arc<PeerState>) {
    let mut stop = shared.stopping.subscribe();
    let mut backoff = Duration::from_millis(200);
    let mut last_failure: Option<String> = None;
    loop {
        if peer.ended.load(Ordering::Relaxed) || *stop.borrow() {
            return;
        }
        let up = lock(&shared.peering.links).contains_key(&peer.key);
        if up {
            tokio::select! {
                () = peer.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let result = match dial_relay(&shared, &peer, Intent::Peer).await {
            Ok(mut conn) => match read_msg(&mut conn).await {
                Ok(Msg::Welcome { .. }) => Ok(conn),
                Ok(Msg::Error { code, message }) => Err(DialError::Refused { code, message }),
                Ok(other) => Err(DialError::Protocol(format!("{other:?} instead of WELCOME"))),
                Err(_) => Err(DialError::Io("closed before WELCOME".into())),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(conn) => {
                last_failure = None;
                backoff = Duration::from_millis(200);
                let me = shared.cfg.key.as_ref().map(|k| k.public_key());
                if let Some(me) = me {
                    run_link(shared.clone(), conn, peer.clone(), me).await;
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_failure.as_deref() != Some(text.as_str()) {
                    warn!(peer = %peer.key, addr = %peer.addr(), error = %text, "relay: cannot link to a peer relay (retrying)");
                    let refused = matches!(e, DialError::Refused { .. } | DialError::Impostor(_));
                    let event = if refused {
                        Event::RelayPeerRefused
                    } else {
                        Event::RelayPeerDown
                    };
                    shared.journal(
                        event,
                        json!({
                            "direction": "out",
                            "peer": peer.key.to_string(),
                            "addr": peer.addr(),
                            "reason": text,
                        }),
                    );
                    last_failure = Some(text);
                }
                backoff = (backoff * 2).min(shared.cfg.peer_retry_max);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = peer.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// A peer relay dialled us for a link (its key is proven and enrolled,
/// our proof sent).
pub(crate) async fn accepted(shared: Arc<Shared>, mut conn: Conn, peer: Arc<PeerState>) {
    if write_msg(
        &mut conn.stream,
        &Msg::Welcome {
            observed: conn.addr,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    let initiator = peer.key;
    run_link(shared, conn, peer, initiator).await;
}

/// Installs the link (or refuses it as a duplicate), runs it, removes it.
async fn run_link(shared: Arc<Shared>, conn: Conn, peer: Arc<PeerState>, initiator: PublicKey) {
    let Some(me) = shared.cfg.key.as_ref().map(|k| k.public_key()) else {
        return;
    };
    let canonical = me.min(peer.key);
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let snapshot: Option<Vec<PublicKey>> = {
        let nodes = lock(&shared.nodes);
        let mut links = lock(&shared.peering.links);
        let keep_old = links
            .get(&peer.key)
            .is_some_and(|old| old.initiator == canonical && initiator != canonical);
        if keep_old {
            None
        } else {
            if let Some(old) = links.get(&peer.key) {
                let _ = old.tx.try_send(LinkCmd::Close("replaced by a newer link"));
            }
            links.insert(peer.key, Link { id, initiator, tx });
            Some(nodes.keys().copied().collect())
        }
    };
    let Some(snapshot) = snapshot else {
        let mut stream = conn.stream;
        let _ = write_msg(
            &mut stream,
            &Msg::Error {
                code: ERR_PROTOCOL,
                message: "a link between these relays is up already".into(),
            },
        )
        .await;
        return;
    };
    lock(&shared.peering.directory).drop_peer(peer.key);
    peer.up.store(true, Ordering::Relaxed);
    let dialled = if initiator == me { "us" } else { "peer" };
    info!(peer = %peer.key, addr = %conn.addr, dialled, "relay: peering link up");
    shared.journal(
        Event::RelayPeerUp,
        json!({ "peer": peer.key.to_string(), "addr": conn.addr.to_string(), "dialled_by": dialled }),
    );
    let reason = link_loop(&shared, conn, &peer, rx, &snapshot, id).await;
    let current = {
        let mut links = lock(&shared.peering.links);
        let cur = links.get(&peer.key).is_some_and(|l| l.id == id);
        if cur {
            links.remove(&peer.key);
        }
        cur
    };
    if current {
        lock(&shared.peering.directory).drop_peer(peer.key);
        peer.up.store(false, Ordering::Relaxed);
    }
    info!(peer = %peer.key, %reason, "relay: peering link down");
    shared.journal(
        Event::RelayPeerDown,
        json!({ "peer": peer.key.to_string(), "reason": reason }),
    );
    peer.wake.notify_one();
}

fn is_current(shared: &Shared, peer: &PublicKey, id: u64) -> bool {
    lock(&shared.peering.links)
        .get(peer)
        .is_some_and(|l| l.id == id)
}

/// What one message from the peer asks of the link.
enum Step {
    Go,
    Pong(u64),
    Stop(String),
    Bad(String),
}

fn on_msg(shared: &Shared, peer: &PeerState, id: u64, m: Msg) -> Step {
    match m {
        Msg::Have(keys) => {
            if is_current(shared, &peer.key, id) {
                let cap = shared.cfg.max_keys_per_peer;
                let mut over = 0usize;
                {
                    let mut dir = lock(&shared.peering.directory);
                    for k in keys {
                        if dir.have(peer.key, k, cap) == Added::OverCap {
                            over += 1;
                        }
                    }
                }
                if over > 0 {
                    shared.cap_hit(
                        peer,
                        "keys",
                        json!({ "max_keys_per_peer": cap, "ignored": over }),
                    );
                }
            }
            Step::Go
        }
        Msg::Gone(keys) => {
            if is_current(shared, &peer.key, id) {
                let mut dir = lock(&shared.peering.directory);
                for k in keys {
                    dir.gone(peer.key, k);
                }
            }
            Step::Go
        }
        Msg::Ping(t) => Step::Pong(t),
        Msg::Pong(_) => Step::Go,
        Msg::End { message } => {
            shared.end_enrolment(&peer.key, "peer", &message);
            Step::Stop(format!("the peer ended the enrolment: {message}"))
        }
        Msg::Error { code, message } => {
            Step::Stop(format!("the peer sent ERROR {code}: {message}"))
        }
        other => Step::Bad(format!("{other:?} is not allowed on a peering link")),
    }
}

async fn send_gossip(wr: &mut OwnedWriteHalf, have: &mut Vec<PublicKey>, gone: bool) -> bool {
    for m in key_batches(have, gone) {
        if write_msg(wr, &m).await.is_err() {
            return false;
        }
    }
    have.clear();
    true
}

async fn link_loop(
    shared: &Shared,
    conn: Conn,
    peer: &PeerState,
    mut rx: mpsc::Receiver<LinkCmd>,
    snapshot: &[PublicKey],
    id: u64,
) -> String {
    let Conn {
        stream, mut buf, ..
    } = conn;
    let (mut rd, mut wr) = stream.into_split();
    for m in key_batches(snapshot, false) {
        if write_msg(&mut wr, &m).await.is_err() {
            return "could not send the registrations".into();
        }
    }
    let idle = shared.cfg.control_idle_timeout;
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut stop = shared.stopping.subscribe();
    let mut tmp = vec![0u8; 16 << 10];
    loop {
        loop {
            match Msg::decode(&buf) {
                Ok(Some((m, used))) => {
                    buf.drain(..used);
                    match on_msg(shared, peer, id, m) {
                        Step::Go => {}
                        Step::Pong(t) => {
                            if write_msg(&mut wr, &Msg::Pong(t)).await.is_err() {
                                return "could not send PONG".into();
                            }
                        }
                        Step::Stop(why) => return why,
                        Step::Bad(why) => {
                            let _ = write_msg(
                                &mut wr,
                                &Msg::Error {
                                    code: ERR_PROTOCOL,
                                    message: why.clone(),
                                },
                            )
                            .await;
                            return format!("protocol error: {why}");
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = write_msg(
                        &mut wr,
                        &Msg::Error {
                            code: ERR_PROTOCOL,
                            message: e.to_string(),
                        },
                    )
                    .await;
                    return format!("protocol error: {e}");
                }
            }
        }
        tokio::select! {
            r = rd.read(&mut tmp) => match r {
                Ok(0) => return "closed by the peer".into(),
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    deadline = tokio::time::Instant::now() + idle;
                }
                Err(e) => return format!("connection failed: {e}"),
            },
            c = rx.recv() => {
                if c.is_none() {
                    return "link replaced".into();
                }
                // This command and whatever else is queued, in order:
                // runs of HAVE or GONE go out in batches.
                let mut next = c;
                let mut keys = Vec::new();
                let mut gone = false;
                loop {
                    match next {
                        Some(LinkCmd::Have(k)) | Some(LinkCmd::Gone(k)) => {
                            let g = matches!(next, Some(LinkCmd::Gone(_)));
                            if g != gone && !keys.is_empty() && !send_gossip(&mut wr, &mut keys, gone).await {
                                return "could not send gossip".into();
                            }
                            gone = g;
                            keys.push(k);
                        }
                        Some(LinkCmd::End(message)) => {
                            let _ = send_gossip(&mut wr, &mut keys, gone).await;
                            let _ = write_msg(&mut wr, &Msg::End { message }).await;
                            return "we ended the enrolment".into();
                        }
                        Some(LinkCmd::Close(why)) => return why.into(),
                        None => break,
                    }
                    next = rx.try_recv().ok();
                    if keys.len() >= 1024 {
                        break;
                    }
                }
                if !send_gossip(&mut wr, &mut keys, gone).await {
                    return "could not send gossip".into();
                }
            },
            _ = ping.tick() => {
                if write_msg(&mut wr, &Msg::Ping(0)).await.is_err() {
                    return "could not send PING".into();
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                return format!("silent for {} s", idle.as_secs());
            },
            _ = stop.changed() => return "relay stopping".into(),
        }
    }
}
