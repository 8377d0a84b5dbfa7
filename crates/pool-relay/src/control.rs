//! A registered node's control connection: INCOMING notices, PING and
//! replacement by a newer registration.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pool_core::relay::{Msg, ERR_PROTOCOL};
use pool_journal::Event;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tracing::info;

use crate::conn::{write_msg, Authed};
use crate::state::{lock, Ctl, Refusal, Registration, Shared};

/// Control messages that may wait for one node's control connection.
pub(crate) const CONTROL_QUEUE: usize = 64;

/// A registered node's control connection: INCOMING out, PING / PONG.
pub(crate) async fn control(shared: Arc<Shared>, a: Authed) {
    let Authed {
        conn, key, node, ..
    } = a;
    let addr = conn.addr;
    let (tx, mut rx) = mpsc::channel(CONTROL_QUEUE);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let old = {
        let mut nodes = lock(&shared.nodes);
        let old = nodes.insert(key, Registration { id, tx });
        shared.peering.announce(key, false);
        old
    };
    if let Some(old) = old {
        // Dropping its sender ends it too, should its queue be full.
        let _ = old.tx.try_send(Ctl::Replaced);
    }
    info!(node = %key, %addr, "relay: node registered");
    shared.journal(
        Event::NodeRegistered,
        json!({ "key": key.to_string(), "addr": addr.to_string() }),
    );
    let (mut rd, mut wr) = conn.stream.into_split();
    let mut buf = conn.buf;
    let reason = control_loop(&shared, &mut rd, &mut wr, &mut buf, &mut rx, addr).await;
    {
        let mut nodes = lock(&shared.nodes);
        if nodes.get(&key).is_some_and(|r| r.id == id) {
            nodes.remove(&key);
            shared.peering.announce(key, true);
        }
    }
    info!(node = %key, %addr, reason, "relay: node unregistered");
    shared.journal(
        Event::NodeUnregistered,
        json!({ "key": key.to_string(), "addr": addr.to_string(), "reason": reason }),
    );
    drop(node);
}

pub(crate) async fn control_loop(
    shared: &Shared,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut Vec<u8>,
    rx: &mut mpsc::Receiver<Ctl>,
    addr: SocketAddr,
) -> &'static str {
    let idle = shared.cfg.control_idle_timeout;
    if write_msg(wr, &Msg::Welcome { observed: addr })
        .await
        .is_err()
    {
        return "could not send WELCOME";
    }
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut tmp = [0u8; 2048];
    loop {
        loop {
            match Msg::decode(buf) {
                Ok(Some((msg, used))) => {
                    buf.drain(..used);
                    match msg {
                        Msg::Ping(t) => {
                            if write_msg(wr, &Msg::Pong(t)).await.is_err() {
                                return "could not send PONG";
                            }
                        }
                        Msg::Pong(_) => {}
                        _ => {
                            shared.refused(Refusal::Protocol);
                            let _ = write_msg(
                                wr,
                                &Msg::Error {
                                    code: ERR_PROTOCOL,
                                    message: "only PING and PONG may follow WELCOME on a control connection".into(),
                                },
                            )
                            .await;
                            return "protocol error";
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    shared.refused(Refusal::Protocol);
                    let _ = write_msg(
                        wr,
                        &Msg::Error {
                            code: ERR_PROTOCOL,
                            message: e.to_string(),
                        },
                    )
                    .await;
                    return "protocol error";
                }
            }
        }
        tokio::select! {
            r = rd.read(&mut tmp) => match r {
                Ok(0) => return "closed by the node",
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    deadline = tokio::time::Instant::now() + idle;
                }
                Err(_) => return "connection failed",
            },
            c = rx.recv() => match c {
                Some(Ctl::Incoming { circuit, from }) => {
                    if write_msg(wr, &Msg::Incoming { circuit, from }).await.is_err() {
                        return "could not send INCOMING";
                    }
                }
                Some(Ctl::Replaced) | None => {
                    let _ = write_msg(
                        wr,
                        &Msg::Error {
                            code: ERR_PROTOCOL,
                            message: "replaced by a newer registration of this key".into(),
                        },
                    )
                    .await;
                    let _ = wr.shutdown().await;
                    return "replaced by a newer registration";
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                let _ = write_msg(
                    wr,
                    &Msg::Error {
                        code: ERR_PROTOCOL,
                        message: format!("control connection silent for {} s (PING every 15 s)", idle.as_secs()),
                    },
                )
                .await;
                return "silent too long";
            }
        }
    }
}
