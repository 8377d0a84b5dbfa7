//! The director's side of a worker's link (registration, heartbeats,
//! orders, claims) and of a client's question about its worker.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_director::store::{StoreError, WorkerState};
use pool_director::wire::{
    write_line, FromWorker, LineReader, ToWorker, WorkerAnswer, WorkerQuery,
};
use pool_journal::Event;
use pool_net::{PublicKey, Session, Stream};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Director, LinkTx};

/// How long a worker has to say hello after its handshake.
const HELLO_WAIT: Duration = Duration::from_secs(5);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves one worker's session: its first stream is the link.
pub(crate) async fn serve_worker(d: Arc<Director>, s: Session) {
    let key = s.peer_key();
    let stream = match tokio::time::timeout(HELLO_WAIT, s.accept_stream()).await {
        Ok(Some(st)) => st,
        _ => {
            info!(worker = %key.short(), "worker opened no link in time");
            s.close("no link").await;
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    let mut r = LineReader::new(r);
    let hello = match tokio::time::timeout(HELLO_WAIT, r.next::<FromWorker>()).await {
        Ok(Ok(Some(FromWorker::Hello {
            addrs,
            sessions,
            load,
            was,
        }))) => (addrs, sessions, load, was),
        other => {
            info!(worker = %key.short(), "not a hello: {other:?}");
            s.close("no hello").await;
            return;
        }
    };
    let (addrs, sessions, load, was) = hello;
    let lease = d.lease();
    let beat = lease / 3;
    let rec = d.lock().register(
        Instant::now(),
        key,
        addrs.clone(),
        sessions.iter().cloned().collect::<BTreeSet<_>>(),
        load,
        was,
        unix_ms(),
    );
    if let Err(e) = d.store.put_worker(&rec, lease).await {
        warn!(worker = %key.short(), "store refused the registration: {e}");
        s.close("store unavailable").await;
        return;
    }
    sync_owners(&d, key, sessions, Vec::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let generation = d.next_id.fetch_add(1, Ordering::Relaxed);
    d.links.lock().unwrap_or_else(|e| e.into_inner()).insert(
        key,
        LinkTx {
            tx: tx.clone(),
            generation,
            session: s.clone(),
        },
    );
    d.counters.registrations.fetch_add(1, Ordering::Relaxed);
    d.journal(
        Event::WorkerRegistered,
        json!({"worker": key.to_string(), "addrs": addrs, "state": rec.state, "sessions": load.sessions}),
    );
    info!(worker = %key.short(), ?addrs, sessions = load.sessions, "worker registered");
    let _ = tx.send(ToWorker::Welcome {
        lease_ms: lease.as_millis() as u64,
        beat_ms: beat.as_millis() as u64,
        state: rec.state,
    });
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_line(&mut w, &m).await.is_err() {
                break;
            }
        }
    });
    loop {
        let msg = match r.next::<FromWorker>().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                warn!(worker = %key.short(), "bad message on the worker link: {e}");
                break;
            }
        };
        match msg {
            FromWorker::Hello { .. } => {
                warn!(worker = %key.short(), "a second hello; ending the link");
                break;
            }
            FromWorker::Beat {
                load,
                added,
                removed,
            } => {
                let changed = d
                    .lock()
                    .heartbeat(Instant::now(), &key, load, &added, &removed);
                match d.store.renew(&key).await {
                    Ok(()) => {}
                    Err(StoreError::Lapsed { .. }) => {
                        // Back after a lapse: register it again (it claims
                        // nothing it did not hold).
                        let rec = d.lock().get(&key).map(|w| w.record.clone());
                        if let Some(rec) = rec {
                            let _ = d.store.put_worker(&rec, lease).await;
                        }
                    }
                    Err(e) => warn!(worker = %key.short(), "lease not renewed: {e}"),
                }
                sync_owners(&d, key, added, removed);
                if let Some(Some(WorkerState::Drained)) = changed {
                    let rec = d.lock().get(&key).map(|w| w.record.clone());
                    if let Some(rec) = rec {
                        let _ = d.store.put_worker(&rec, lease).await;
                    }
                    let _ = tx.send(ToWorker::State {
                        state: WorkerState::Drained,
                    });
                    d.journal(Event::WorkerDrained, json!({"worker": key.to_string()}));
                    info!(worker = %key.short(), "drained");
                }
            }
            FromWorker::Moved { id, handed, failed } => {
                let order = d
                    .orders
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                let to = order.as_ref().map(|m| m.to);
                d.lock().move_done(&key, id, to.as_ref(), handed);
                d.counters
                    .sessions_moved
                    .fetch_add(u64::from(handed), Ordering::Relaxed);
                d.counters
                    .moves_failed
                    .fetch_add(u64::from(failed), Ordering::Relaxed);
                if failed > 0 || handed == 0 {
                    d.backoff
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, Instant::now() + Duration::from_secs(1));
                }
                debug!(worker = %key.short(), id, handed, failed, "move answered");
            }
            FromWorker::Handing { session, to } => {
                let mut h = d.handing.lock().unwrap_or_else(|e| e.into_inner());
                h.retain(|_, (_, _, at)| at.elapsed() < ANNOUNCED_FOR);
                h.insert(session, (key, to, Instant::now()));
            }
            FromWorker::Claim { id, session, from } => {
                let (d, tx) = (d.clone(), tx.clone());
                tokio::spawn(async move {
                    let reply = claim(&d, &session, from, key).await;
                    let _ = tx.send(reply.with_id(id));
                });
            }
            FromWorker::Unclaim { session, source } => {
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(e) = d.store.claim(&session, Some(key), source).await {
                        debug!(session = %session, "ownership not given back: {e}");
                    }
                });
            }
            FromWorker::Leave => {
                if let Err(e) = d.drain(&key, "worker").await {
                    warn!("{e}");
                }
            }
        }
    }
    writer.abort();
    let mut links = d.links.lock().unwrap_or_else(|e| e.into_inner());
    if links.get(&key).is_some_and(|l| l.generation == generation) {
        links.remove(&key);
        drop(links);
        d.lock().disconnected(&key);
        info!(worker = %key.short(), "worker link closed (its lease runs on)");
    }
}

/// A claim's answer before its id is set.
struct Claimed(Result<u64, String>);

impl Claimed {
    fn with_id(self, id: u64) -> ToWorker {
        match self.0 {
            Ok(revision) => ToWorker::Claimed {
                id,
                ok: true,
                revision,
                error: None,
            },
            Err(e) => ToWorker::Claimed {
                id,
                ok: false,
                revision: 0,
                error: Some(e),
            },
        }
    }
}

/// `to` asks to take `session` from `from` (a handoff's target, before it
/// takes the state).
async fn claim(d: &Director, session: &str, from: PublicKey, to: PublicKey) -> Claimed {
    d.counters.claims.fetch_add(1, Ordering::Relaxed);
    let known = d
        .lock()
        .get(&to)
        .is_some_and(|w| matches!(w.record.state, WorkerState::Active));
    let r = if !known {
        Err(format!(
            "worker {} is not active here: it takes no sessions",
            to.short()
        ))
    } else if !announced(d, session, from, to).await {
        Err(format!(
            "worker {} did not announce a handoff of this session to {}",
            from.short(),
            to.short()
        ))
    } else {
        match d.store.claim(session, Some(from), to).await {
            Ok(rev) => Ok(rev),
            // Not recorded yet (its first heartbeat since): the source's
            // word stands if no one else owns it.
            Err(StoreError::Conflict { owner, .. }) if owner == "nobody" => d
                .store
                .claim(session, None, to)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    if r.is_ok() {
        d.handing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session);
    }
    if let Err(e) = &r {
        d.counters.claims_refused.fetch_add(1, Ordering::Relaxed);
        d.journal(
            Event::ClaimRefused,
            json!({"session": session, "from": from.to_string(), "to": to.to_string(), "reason": e}),
        );
        info!(session, to = %to.short(), "claim refused: {e}");
    }
    Claimed(r)
}

/// How long a source's announcement of a handoff stands (the token's
/// life, at most).
const ANNOUNCED_FOR: Duration = Duration::from_secs(120);

/// Whether `from` announced handing `session` to `to` (waiting a little:
/// the announcement and the claim come over different links).
async fn announced(d: &Director, session: &str, from: PublicKey, to: PublicKey) -> bool {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let found = d
            .handing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
            .is_some_and(|(f, t, at)| *f == from && *t == to && at.elapsed() < ANNOUNCED_FOR);
        if found || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records the sessions a worker reported: new ones become its own (if no
/// one else holds them), ended ones are released.
fn sync_owners(d: &Arc<Director>, worker: PublicKey, added: Vec<String>, removed: Vec<String>) {
    if added.is_empty() && removed.is_empty() {
        return;
    }
    let d = d.clone();
    tokio::spawn(async move {
        for s in removed {
            let _ = d.store.release(&s, worker).await;
        }
        for s in added {
            match d.store.claim(&s, None, worker).await {
                Ok(_) => {}
                Err(StoreError::Conflict { owner, .. }) if owner == worker.to_string() => {}
                Err(e) => debug!(session = %s, "not recorded: {e}"),
            }
        }
    });
}

/// A client asks whether its worker lives; if not, where to go.
pub(crate) async fn answer_query(d: Arc<Director>, st: Stream, client: PublicKey) {
    let (r, mut w) = st.into_split();
    let q = tokio::time::timeout(HELLO_WAIT, LineReader::new(r).next::<WorkerQuery>()).await;
    let Ok(Ok(Some(q))) = q else {
        return;
    };
    let state = d.lock().get(&q.worker).map(|w| w.record.state);
    let alive = matches!(state, Some(WorkerState::Active | WorkerState::Draining));
    let answer = WorkerAnswer {
        state,
        placement: (!alive).then(|| d.place(&client)),
    };
    let _ = write_line(&mut w, &answer).await;
    use tokio::io::AsyncWriteExt;
    let _ = w.shutdown().await;
}
