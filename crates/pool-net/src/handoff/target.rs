//! The target's side: mint the token, take the client's RESUME_HANDOFF,
//! pull and restore the state, commit, forward the source's streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_core::handoff::Imports;
use pool_core::listener::handoff_resume_fields;
use pool_core::{HandshakeError, PublicKey, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::*;
use crate::carrier::{read_record, unix_nanos, BoxedCarrier};
use crate::listener::{EndpointEvent, ListenCtx};
use crate::session::{self, process_events, Session};
use crate::Endpoint;

/// A client arrived with a good token: the link task pulls the state.
pub(crate) struct Arrival {
    epoch: u32,
    state: oneshot::Sender<Result<pool_core::Session, String>>,
    outcome: oneshot::Receiver<Outcome>,
}

enum Outcome {
    /// The client's first record in the new epoch arrived: committed.
    Committed(Session),
    /// RESUMED went out but no first record came on that carrier: the
    /// session waits, detached, for the client's resume.
    Waiting(Session, oneshot::Receiver<()>),
    /// Refused before any answer: nothing can commit.
    Failed,
}

/// The target's handoff state, beside the listener's.
pub(crate) struct Imported {
    pub(crate) imports: Mutex<Imports>,
    arrivals: Mutex<HashMap<SessionId, oneshot::Sender<Arrival>>>,
    /// Sessions handed in, by id: the source that may forward their
    /// streams, and until when.
    handed_in: Mutex<HashMap<SessionId, (PublicKey, Instant)>>,
}

impl Imported {
    pub(crate) fn new() -> Imported {
        Imported {
            imports: Mutex::new(Imports::new(&mut rand_core::OsRng)),
            arrivals: Mutex::new(HashMap::new()),
            handed_in: Mutex::new(HashMap::new()),
        }
    }
    fn imports(&self) -> std::sync::MutexGuard<'_, Imports> {
        self.imports.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn now_ms() -> u64 {
    unix_nanos() / 1_000_000
}

impl Endpoint {
    /// Target side of a handoff: serves one handoff stream from the source
    /// worker `source` (an authenticated peer the caller trusts for
    /// handoffs). Returns when the handoff committed or failed.
    pub async fn serve_handoff(&self, link: Stream, source: PublicKey) -> Result<(), Error> {
        self.serve_handoff_with(link, source, None).await
    }

    /// Like [`Endpoint::serve_handoff`], with `importer` taking over the
    /// streams that move (without one they are reset with
    /// [`RESET_HANDOFF`]).
    pub async fn serve_handoff_with(
        &self,
        mut link: Stream,
        source: PublicKey,
        importer: Option<&dyn Importer>,
    ) -> Result<(), Error> {
        let ctx = self.listen_ctx().clone();
        let (ty, body) = read_msg(&mut link).await?;
        let moved = match (ty, body.get(64..).map(parse_manifest)) {
            (PREPARE, Some(Some(m))) => m,
            _ => return Err(fail("prepare", "target_refused", "not a PREPARE")),
        };
        let hid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let mut sid = [0u8; 16];
        sid.copy_from_slice(&body[4..20]);
        let id = SessionId(sid);
        let mut ck = [0u8; 32];
        ck.copy_from_slice(&body[20..52]);
        let client = PublicKey(ck);
        let floor = u32::from_be_bytes([body[52], body[53], body[54], body[55]]);
        let lifetime = Duration::from_millis(u64::from(u32::from_be_bytes([
            body[56], body[57], body[58], body[59],
        ])))
        .clamp(Duration::from_millis(100), Duration::from_secs(120));
        let forward = Duration::from_millis(u64::from(u32::from_be_bytes([
            body[60], body[61], body[62], body[63],
        ])));
        let (key, trust) = {
            let c = ctx.config.read().unwrap_or_else(|e| e.into_inner());
            (c.key.clone(), c.trust.clone())
        };
        let me = key.public_key();
        let refuse = |code: &str, reason: String| (code.to_string(), reason);
        let checked: Result<[u8; 48], (String, String)> = if !trust.check_client(&client) {
            Err(refuse(
                "target_refused",
                format!("the client's key {} is not trusted here", client.short()),
            ))
        } else if ctx.registry_has(&id) {
            Err(refuse(
                "pending",
                "this node holds the session already".into(),
            ))
        } else {
            ctx.imported
                .imports()
                .prepare(
                    now_ms(),
                    id,
                    hid,
                    &me,
                    source,
                    client,
                    floor,
                    lifetime,
                    &mut rand_core::OsRng,
                )
                .map_err(|e| refuse("pending", e.to_string()))
        };
        let token = match checked {
            Ok(t) => t,
            Err((code, reason)) => {
                info!(session = %id, from = %source.short(), "handoff refused: {reason}");
                let _ = write_msg(&mut link, REFUSED, &abort_body(&code, &reason)).await;
                return Err(fail("prepare", label(&code), reason));
            }
        };
        let (arrive_tx, arrive_rx) = oneshot::channel();
        ctx.imported
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, arrive_tx);
        let cleanup = || {
            ctx.imported
                .arrivals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            ctx.imported.imports().spend(&id);
        };
        if let Err(e) = write_msg(&mut link, PREPARED, &token).await {
            cleanup();
            return Err(e.into());
        }
        info!(session = %id, from = %source.short(), client = %client.short(), "handoff prepared");
        // Wait for the client (the listener hands us its arrival).
        let arrival = tokio::select! {
            a = arrive_rx => a.ok(),
            m = read_msg(&mut link) => {
                debug!(session = %id, "source ended the handoff before the client came: {:?}", m.map(|(t, _)| t));
                None
            }
            _ = tokio::time::sleep(lifetime) => {
                let _ = write_msg(&mut link, ABORT, &abort_body("token_expired", "the client did not arrive in time")).await;
                None
            }
        };
        let Some(arrival) = arrival else {
            cleanup();
            return Err(fail("offer", "token_expired", "the client did not arrive"));
        };
        if let Some(i) = importer {
            if let Err(why) = i.claim(id, source).await {
                let _ = arrival.state.send(Err(format!("fenced: {why}")));
                cleanup();
                let _ = write_msg(&mut link, ABORT, &abort_body("fenced", &why)).await;
                info!(session = %id, from = %source.short(), "handoff refused by the claim: {why}");
                return Err(fail("claim", "fenced", why));
            }
        }
        let unclaim = || {
            if let Some(i) = importer {
                i.unclaim(id, source);
            }
        };
        let result = pull_state(&mut link, arrival.epoch, &ctx, &me, &client, &source).await;
        let ok = result.is_ok();
        let _ = arrival.state.send(result.map_err(|e| e.to_string()));
        if !ok {
            cleanup();
            unclaim();
            let _ = write_msg(
                &mut link,
                ABORT,
                &abort_body("target_refused", "the state did not restore"),
            )
            .await;
            return Err(fail("state", "target_refused", "the state did not restore"));
        }
        let session = match arrival.outcome.await {
            Ok(Outcome::Committed(s)) => Some(s),
            Ok(Outcome::Waiting(s, commit)) => {
                // A later resume may still commit; the token's life bounds it.
                match tokio::time::timeout(lifetime, commit).await {
                    Ok(Ok(())) => Some(s),
                    _ => {
                        // Under the session lock: either the commit came
                        // first, or none can come now.
                        let mut st = s.shared.lock();
                        let hook = s
                            .shared
                            .on_commit
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                        if hook.is_some() {
                            st.core.close(
                                Instant::now(),
                                pool_core::CloseCode::Normal,
                                "handoff aborted",
                            );
                            process_events(&mut st, &s.shared);
                            None
                        } else {
                            drop(st);
                            Some(s)
                        }
                    }
                }
            }
            Ok(Outcome::Failed) | Err(_) => None,
        };
        ctx.imported.imports().spend(&id);
        let Some(session) = session else {
            unclaim();
            let _ = write_msg(
                &mut link,
                ABORT,
                &abort_body("client_unreachable", "the client never committed"),
            )
            .await;
            return Err(fail(
                "commit",
                "client_unreachable",
                "the client never committed",
            ));
        };
        ctx.imported
            .handed_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (source, Instant::now() + forward));
        let _ = ctx.events.send(EndpointEvent::HandedIn {
            id,
            client,
            from: source,
        });
        // Before COMMITTED: the source opens forward streams right after.
        if ctx.incoming.try_send(session).is_err() {
            warn!(session = %id, "accept queue full; the handed-in session is not served");
        }
        write_msg(&mut link, COMMITTED, &[]).await?;
        info!(session = %id, from = %source.short(), moved = moved.len(), "handoff committed here");
        if !moved.is_empty() {
            if let Some(shared) = ctx.registry_get(&id) {
                let handle = Session::from_shared(shared.clone());
                for (sid, service) in moved {
                    let offsets = shared.lock().core.stream_offsets(sid);
                    let Some((read, written)) = offsets else {
                        continue;
                    };
                    let mut stream = Stream::new(shared.clone(), sid);
                    match importer {
                        Some(i) => i.moved(handle.clone(), stream, service, read, written),
                        None => stream.reset(RESET_HANDOFF),
                    }
                }
            }
        }
        Ok(())
    }

    /// Target side of one stream the source forwards after a handoff: joins
    /// it to the client's stream of the handed-in session until either
    /// ends, or the forward deadline passes (then both are reset with
    /// [`RESET_HANDOFF_DEADLINE`]).
    pub async fn serve_forward(&self, mut link: Stream, source: PublicKey) -> Result<(), Error> {
        let ctx = self.listen_ctx().clone();
        let mut head = [0u8; 24];
        link.read_exact(&mut head).await?;
        let mut sid = [0u8; 16];
        sid.copy_from_slice(&head[..16]);
        let id = SessionId(sid);
        let stream = u64::from_be_bytes(head[16..].try_into().unwrap_or([0; 8]));
        let until = match ctx
            .imported
            .handed_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            Some((from, until)) if *from == source => *until,
            _ => {
                link.reset(RESET_HANDOFF_DEADLINE);
                return Err(fail(
                    "forward",
                    "target_refused",
                    "no such session handed in from this source",
                ));
            }
        };
        let Some(shared) = ctx.registry_get(&id) else {
            link.reset(RESET_HANDOFF_DEADLINE);
            return Err(fail("forward", "target_lost", "the session is gone"));
        };
        if !shared.lock().core.stream_ids().contains(&stream) {
            link.reset(RESET_HANDOFF_DEADLINE);
            return Ok(());
        }
        let mut client = Stream::new(shared, stream);
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tokio::io::copy_bidirectional(&mut client, &mut link))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(session = %id, stream, "forwarded stream ended: {e}");
                client.reset(RESET_HANDOFF_DEADLINE);
                link.reset(RESET_HANDOFF_DEADLINE);
            }
            Err(_) => {
                info!(session = %id, stream, "forwarded stream outlived the forward deadline; reset");
                client.reset(RESET_HANDOFF_DEADLINE);
                link.reset(RESET_HANDOFF_DEADLINE);
            }
        }
        Ok(())
    }
}

/// The PREPARE's manifest: `count u16`, then per moved stream `id u64,
/// name len u8, name`. `None` if malformed.
fn parse_manifest(b: &[u8]) -> Option<Vec<(u64, String)>> {
    let n = u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let id = u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?);
        let len = usize::from(*b.get(at + 8)?);
        let name = std::str::from_utf8(b.get(at + 9..at + 9 + len)?).ok()?;
        out.push((id, name.to_string()));
        at += 9 + len;
    }
    (at == b.len()).then_some(out)
}

async fn pull_state(
    link: &mut Stream,
    epoch: u32,
    ctx: &ListenCtx,
    me: &PublicKey,
    client: &PublicKey,
    source: &PublicKey,
) -> Result<pool_core::Session, Error> {
    write_msg(link, FREEZE, &epoch.to_be_bytes()).await?;
    let (ty, body) = tokio::time::timeout(Duration::from_secs(5), read_msg(link))
        .await
        .map_err(|_| fail("state", "target_lost", "no state within 5 s"))??;
    let body = zeroize::Zeroizing::new(body);
    if ty != STATE {
        return Err(fail("state", "target_refused", "the source sent no state"));
    }
    let protocol = ctx
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .protocol
        .clone();
    let mut core = pool_core::Session::restore(Instant::now(), protocol, &body)
        .map_err(|e| fail("state", "target_refused", e.to_string()))?;
    if core.peer_key() != *client || core.local_key() != *source {
        return Err(fail(
            "state",
            "target_refused",
            "the state is not the prepared session's",
        ));
    }
    core.rebind_local(*me);
    Ok(core)
}

/// A RESUME_HANDOFF on the listener: the token is checked (one MAC) before
/// anything else; then the handoff's link task pulls the state, and the
/// restored session answers. The client's first record commits.
pub(crate) async fn handle_resume_handoff(
    ctx: &Arc<ListenCtx>,
    mut sock: BoxedCarrier,
    from: SocketAddr,
    record: Vec<u8>,
) -> Result<(), Error> {
    let addr = from.to_string();
    let mut out = Vec::new();
    let refuse = |e: HandshakeError, out: &mut Vec<u8>| {
        ctx.stats
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(%from, "handoff resume refused: {e}");
        pool_core::write_refusal(&e, out);
    };
    let key = ctx.key();
    let checked = handoff_resume_fields(&record).and_then(|(id, epoch, token)| {
        let imports = ctx.imported.imports();
        let client = imports.get(&id).map(|i| i.client).ok_or_else(|| {
            HandshakeError::HandoffToken("no handoff of this session is prepared here".into())
        })?;
        imports
            .check(now_ms(), &id, &key.public_key(), &client, &token, epoch)
            .map_err(|e| HandshakeError::HandoffToken(e.to_string()))?;
        Ok((id, epoch))
    });
    let (id, epoch) = match checked {
        Ok(x) => x,
        Err(e) => {
            refuse(e, &mut out);
            let _ = sock.write_all(&out).await;
            return Ok(());
        }
    };
    let slot = ctx
        .imported
        .arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let Some(slot) = slot else {
        // A second arrival while the first is being served: try again.
        refuse(HandshakeError::HandoffPending, &mut out);
        let _ = sock.write_all(&out).await;
        return Ok(());
    };
    let (state_tx, state_rx) = oneshot::channel();
    let (outcome_tx, outcome_rx) = oneshot::channel();
    if slot
        .send(Arrival {
            epoch,
            state: state_tx,
            outcome: outcome_rx,
        })
        .is_err()
    {
        refuse(
            HandshakeError::HandoffToken("the handoff ended".into()),
            &mut out,
        );
        let _ = sock.write_all(&out).await;
        return Ok(());
    }
    let core = match tokio::time::timeout(Duration::from_secs(6), state_rx).await {
        Ok(Ok(Ok(core))) => core,
        other => {
            let why = match other {
                Ok(Ok(Err(e))) => e,
                _ => "the state did not arrive".into(),
            };
            let _ = outcome_tx.send(Outcome::Failed);
            refuse(HandshakeError::HandoffToken(why), &mut out);
            let _ = sock.write_all(&out).await;
            return Ok(());
        }
    };
    let mut core = core;
    if let Err(e) = core.answer_handoff(
        Instant::now(),
        &record,
        &key,
        &mut rand_core::OsRng,
        &mut out,
    ) {
        let _ = outcome_tx.send(Outcome::Failed);
        out.clear();
        refuse(e, &mut out);
        let _ = sock.write_all(&out).await;
        return Ok(());
    }
    let timeout = ctx
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .handshake_timeout;
    let written = sock.write_all(&out).await;
    let first = match written {
        Ok(()) => read_record(&mut sock, &addr, timeout).await.ok(),
        Err(_) => None,
    };
    let committed = match first {
        Some(mut rec) => core.confirm_resume(Instant::now(), &mut rec).is_ok(),
        None => false,
    };
    let reg = Arc::downgrade(&ctx.registry);
    let on_end: session::OnEnd = Box::new(move |id| {
        if let Some(reg) = reg.upgrade() {
            reg.remove(&id);
        }
    });
    if committed {
        let s = session::spawn(core, Some(sock), None, None, Some(on_end));
        ctx.registry.insert(id, &s);
        ctx.stats
            .resumed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(%from, session = %id, "handed-in session committed");
        let _ = outcome_tx.send(Outcome::Committed(s));
    } else {
        // RESUMED may have reached the client, which then holds the new
        // epoch: keep the session, detached, for its next resume (the
        // listener's resume path commits it and fires the hook).
        let s = session::spawn(core, None, None, None, Some(on_end));
        let (hook_tx, hook_rx) = oneshot::channel();
        *s.shared.on_commit.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook_tx);
        ctx.registry.insert(id, &s);
        debug!(%from, session = %id, "handed-in session answered, not yet committed");
        let _ = outcome_tx.send(Outcome::Waiting(s, hook_rx));
    }
    Ok(())
}
