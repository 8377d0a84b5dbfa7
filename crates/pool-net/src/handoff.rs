//! The live handoff on tokio (docs/handoff.md): a session moves from this
//! server (the source) to another (the target) while its client keeps its
//! streams.
//!
//! - **Source** ([`Session::handoff_to`]): asks the target to prepare
//!   (PREPARE → PREPARED with a token) over a worker-to-worker stream the
//!   caller opens ([`HandoffLink`]); offers the client the move; when the
//!   client arrives at the target, the target pulls the state (FREEZE →
//!   STATE); on COMMITTED the streams this side serves are re-homed onto
//!   worker streams to the target (`pool.handoff.fwd`) and the session is
//!   fenced. Any failure before the commit unfreezes it: nothing moved.
//! - **Target** ([`Endpoint::serve_handoff`], [`Endpoint::serve_forward`]):
//!   mints the token, takes the client's RESUME_HANDOFF on its listener
//!   (token checked before any key exchange), restores the state, answers
//!   with `KKpsk0`, commits on the client's first record, and forwards the
//!   source's streams.
//! - **Client**: follows an offer by itself ([`offered`]), within its
//!   [`HandoffPolicy`].
//!
//! Link messages: `type u8 | len u32 | body`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_core::handoff::Imports;
use pool_core::listener::handoff_resume_fields;
use pool_core::wire::DeclineCode;
use pool_core::{
    HandoffError, HandoffOffer, HandshakeError, HeldOp, PublicKey, SecretKey, SessionId,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, warn, Instrument};

use crate::carrier::{read_record, unix_nanos, BoxedCarrier, Dialer};
use crate::config::HandoffPolicy;
use crate::error::Error;
use crate::listener::{EndpointEvent, ListenCtx};
use crate::paths::PathDialer;
use crate::session::{self, process_events, Session, Shared, State};
use crate::stream::{Rehomed, Stream};
use crate::Endpoint;

const PREPARE: u8 = 1;
const PREPARED: u8 = 2;
const REFUSED: u8 = 3;
const FREEZE: u8 = 4;
const STATE: u8 = 5;
const COMMITTED: u8 = 6;
const ABORT: u8 = 7;
/// The largest link message (STATE: a snapshot holds the replay buffer and
/// the streams' receive buffers).
const MAX_MSG: usize = 64 << 20;
/// The stream reset code for a forwarded stream that outlived the forward
/// deadline, or whose worker link died.
pub const RESET_HANDOFF_DEADLINE: u64 = 7;

/// What a worker-to-worker stream is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkPurpose {
    /// The handoff's own messages (served by [`Endpoint::serve_handoff`]).
    Handoff,
    /// One stream the source forwards (served by [`Endpoint::serve_forward`]).
    Forward,
}

/// A boxed future opening a worker stream.
pub type LinkFuture<'a> = Pin<Box<dyn Future<Output = Result<Stream, Error>> + Send + 'a>>;

/// Opens streams from the source to the target, for the handoff's messages
/// and the streams the source forwards; `pool-node` opens them on a
/// worker-to-worker session, with the service preamble for `purpose`.
pub trait HandoffLink: Send + Sync {
    /// A new stream to the target.
    fn open(&self, purpose: LinkPurpose) -> LinkFuture<'_>;
}

/// How a handoff is run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandoffOptions {
    /// How long the client has to reach the target (the token's life).
    pub token_lifetime: Duration,
    /// How long the target forwards streams that stay on the source.
    pub forward_deadline: Duration,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        HandoffOptions {
            token_lifetime: Duration::from_secs(10),
            forward_deadline: Duration::from_secs(600),
        }
    }
}

impl HandoffOptions {
    /// With this token lifetime.
    pub fn token_lifetime(mut self, d: Duration) -> Self {
        self.token_lifetime = d;
        self
    }
    /// With this forward deadline.
    pub fn forward_deadline(mut self, d: Duration) -> Self {
        self.forward_deadline = d;
        self
    }
}

/// A handoff that committed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandoffReport {
    /// The session.
    pub session: SessionId,
    /// The target's key.
    pub to: PublicKey,
    /// From the start to the commit.
    pub total: Duration,
    /// How long the session was frozen here (the stall bound).
    pub frozen: Duration,
    /// Streams left on this side and forwarded through the target.
    pub forwarded: usize,
    /// Bytes of state sent.
    pub state_bytes: usize,
}

fn fail(stage: &'static str, code: &'static str, reason: impl Into<String>) -> Error {
    Error::Handoff {
        stage,
        reason: reason.into(),
        code,
    }
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, ty: u8, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut head = [0u8; 5];
    head[0] = ty;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(body).await
}

async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MSG {
        return Err(std::io::Error::other(format!(
            "handoff message of {len} bytes exceeds {MAX_MSG}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

fn abort_body(code: &str, reason: &str) -> Vec<u8> {
    let mut b = vec![u8::try_from(code.len()).unwrap_or(0)];
    b.extend_from_slice(code.as_bytes());
    b.extend_from_slice(reason.as_bytes());
    b
}

fn parse_abort(body: &[u8]) -> (String, String) {
    let n = body.first().copied().unwrap_or(0) as usize;
    let code = body.get(1..1 + n).unwrap_or(b"target_refused");
    let reason = body.get(1 + n..).unwrap_or(&[]);
    (
        String::from_utf8_lossy(code).into_owned(),
        String::from_utf8_lossy(reason).into_owned(),
    )
}

/// The abort codes a target may send, as static labels (metrics).
fn label(code: &str) -> &'static str {
    match code {
        "token_expired" => "token_expired",
        "client_unreachable" => "client_unreachable",
        "target_lost" => "target_lost",
        "pending" => "pending",
        _ => "target_refused",
    }
}

// ---- source ----

impl Session {
    /// Hands this session (one this node accepted) to the worker with key
    /// `target`, which the client reaches at `addrs` (or through its
    /// relays, when empty). `link` opens worker streams to the target.
    ///
    /// Returns when the target committed (the session lives there now;
    /// streams served here are forwarded through the target until they end
    /// or the forward deadline), or with [`Error::Handoff`] when the handoff
    /// failed before the commit: then the session goes on here exactly as
    /// before.
    pub async fn handoff_to(
        &self,
        link: &dyn HandoffLink,
        target: PublicKey,
        addrs: Vec<SocketAddr>,
        opts: HandoffOptions,
    ) -> Result<HandoffReport, Error> {
        let started = Instant::now();
        let shared = &self.shared;
        let (id, client, floor) = {
            let st = shared.lock();
            if st.core.role() != pool_core::Role::Responder {
                return Err(fail(
                    "prepare",
                    "invalid",
                    "only sessions this node accepted can be handed off",
                ));
            }
            if st.core.handoff_offered().is_some() || st.core.is_frozen() {
                return Err(fail(
                    "prepare",
                    "pending",
                    "a handoff of this session is under way",
                ));
            }
            if st.core.is_closed() {
                return Err(fail("prepare", "closed", "the session is closed"));
            }
            (st.core.id(), st.core.peer_key(), st.core.handoff_floor())
        };
        let hid = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
        let mut ctl = tokio::time::timeout(Duration::from_secs(5), link.open(LinkPurpose::Handoff))
            .await
            .map_err(|_| fail("prepare", "target_unreachable", "no worker link within 5 s"))?
            .map_err(|e| fail("prepare", "target_unreachable", e.to_string()))?;
        let mut prep = Vec::with_capacity(64);
        prep.extend_from_slice(&hid.to_be_bytes());
        prep.extend_from_slice(&id.0);
        prep.extend_from_slice(&client.0);
        prep.extend_from_slice(&floor.to_be_bytes());
        prep.extend_from_slice(&ms(opts.token_lifetime).to_be_bytes());
        prep.extend_from_slice(&ms(opts.forward_deadline).to_be_bytes());
        let lost = |e: std::io::Error| fail("prepare", "target_unreachable", e.to_string());
        write_msg(&mut ctl, PREPARE, &prep).await.map_err(lost)?;
        let (ty, body) = tokio::time::timeout(Duration::from_secs(5), read_msg(&mut ctl))
            .await
            .map_err(|_| fail("prepare", "target_unreachable", "the target did not answer"))?
            .map_err(lost)?;
        let token: [u8; 48] = match ty {
            PREPARED => body
                .as_slice()
                .try_into()
                .map_err(|_| fail("prepare", "target_refused", "malformed token"))?,
            REFUSED | ABORT => {
                let (code, reason) = parse_abort(&body);
                return Err(fail("prepare", label(&code), reason));
            }
            _ => return Err(fail("prepare", "target_refused", "unexpected message")),
        };
        {
            let mut st = shared.lock();
            st.declined = None;
            st.core
                .offer_handoff(
                    Instant::now(),
                    hid,
                    target,
                    floor,
                    opts.token_lifetime,
                    token,
                    &addrs,
                )
                .map_err(|e| fail("offer", offer_code(&e), e.to_string()))?;
        }
        shared.wake.notify_one();
        info!(session = %id, to = %target, handoff = hid, "handoff offered to the client");

        // Wait for the target to pull the state (the client arrived there).
        let deadline = tokio::time::Instant::now() + opts.token_lifetime + Duration::from_secs(2);
        let epoch = loop {
            let note = shared.handoff_note.notified();
            tokio::pin!(note);
            note.as_mut().enable();
            {
                let st = shared.lock();
                if let Some((d, code)) = st.declined {
                    if d == hid {
                        drop(st);
                        return Err(self
                            .abandon(&mut ctl, "offer", "client_declined", decline_text(code))
                            .await);
                    }
                }
                if st.core.is_closed() {
                    drop(st);
                    return Err(self
                        .abandon(&mut ctl, "offer", "closed", "the session closed")
                        .await);
                }
            }
            tokio::select! {
                m = read_msg(&mut ctl) => match m {
                    Ok((FREEZE, b)) if b.len() == 4 => break u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    Ok((ABORT, b)) => {
                        let (code, reason) = parse_abort(&b);
                        self.withdraw();
                        return Err(fail("offer", label(&code), reason));
                    }
                    Ok(_) => return Err(self.abandon(&mut ctl, "offer", "target_refused", "unexpected message").await),
                    Err(e) => {
                        self.withdraw();
                        return Err(fail("offer", "target_lost", e.to_string()));
                    }
                },
                _ = &mut note => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(self.abandon(&mut ctl, "offer", "token_expired", "the client did not reach the target in time").await);
                }
            }
        };
        debug!(session = %id, epoch, "the client reached the target; freezing");

        // Freeze; a resume half done here completes within a round trip.
        let mut tries = 0;
        let snap = loop {
            let r = shared.lock().core.freeze();
            match r {
                Ok(s) => break s,
                Err(HandoffError::Busy) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(self
                        .abandon(&mut ctl, "freeze", "pending", e.to_string())
                        .await);
                }
            }
        };
        let frozen_at = Instant::now();
        let state_bytes = snap.len();
        if let Err(e) = write_msg(&mut ctl, STATE, &snap).await {
            // Nothing of the state reached the target: safe to go on.
            self.unfreeze();
            return Err(fail("state", "target_lost", e.to_string()));
        }
        drop(snap);
        match read_msg(&mut ctl).await {
            Ok((COMMITTED, _)) => {}
            Ok((ABORT, b)) => {
                let (code, reason) = parse_abort(&b);
                self.unfreeze();
                return Err(fail("commit", label(&code), reason));
            }
            other => {
                // The target has the state and may have committed: this
                // side cannot tell, and guessing "no" could deliver bytes
                // twice. It stays frozen until the resume deadline, then
                // gives the session up (docs/handoff.md, §2).
                let why = match other {
                    Ok(_) => "unexpected message".to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(session = %id, "worker link lost after the state left ({why}); the session is given up here");
                let wait = shared.lock().core.config().get_resume_deadline();
                tokio::time::sleep(wait).await;
                self.fence_here(target, &HashMap::new());
                return Err(fail("commit", "target_lost", why));
            }
        }
        // Committed at the target. Re-home the streams served here onto
        // worker streams, then fence.
        let ids = shared.lock().core.stream_ids();
        let mut homes = HashMap::new();
        for sid in ids {
            match open_forward(link, &id, sid).await {
                Ok(s) => {
                    homes.insert(sid, Rehomed::new(s));
                }
                Err(e) => warn!(session = %id, stream = sid, "cannot forward the stream: {e}"),
            }
        }
        let forwarded = homes.len();
        self.fence_here(target, &homes);
        let frozen = frozen_at.elapsed();
        info!(session = %id, to = %target, frozen_ms = frozen.as_secs_f64() * 1e3, forwarded, "session handed off");
        Ok(HandoffReport {
            session: id,
            to: target,
            total: started.elapsed(),
            frozen,
            forwarded,
            state_bytes,
        })
    }

    fn withdraw(&self) {
        self.shared.lock().core.withdraw_handoff();
    }

    fn unfreeze(&self) {
        let mut st = self.shared.lock();
        st.core.unfreeze(Instant::now());
        process_events(&mut st, &self.shared);
        drop(st);
        self.shared.thaw.notify_waiters();
        self.shared.wake.notify_one();
    }

    async fn abandon(
        &self,
        ctl: &mut Stream,
        stage: &'static str,
        code: &'static str,
        reason: impl Into<String>,
    ) -> Error {
        let reason = reason.into();
        let _ = write_msg(ctl, ABORT, &abort_body(code, &reason)).await;
        {
            let mut st = self.shared.lock();
            if st.core.is_frozen() {
                st.core.unfreeze(Instant::now());
            }
            st.core.withdraw_handoff();
            process_events(&mut st, &self.shared);
        }
        self.shared.thaw.notify_waiters();
        self.shared.wake.notify_one();
        fail(stage, code, reason)
    }

    /// Fences the session here and installs the streams' new homes.
    fn fence_here(&self, target: PublicKey, homes: &HashMap<u64, Arc<Rehomed>>) {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.rehomed.clone_from(homes);
        let held = st.core.fence(target);
        session::invalidate_carrier(&mut st, shared);
        process_events(&mut st, shared);
        drop(st);
        for op in held {
            match op {
                HeldOp::Finish(sid) => {
                    if let Some(h) = homes.get(&sid) {
                        h.finish_now();
                    }
                }
                HeldOp::Reset(sid, code) => {
                    if let Some(h) = homes.get(&sid) {
                        h.inner.reset(code);
                    }
                }
                HeldOp::Stop(sid) => {
                    shared.lock().rehomed.remove(&sid);
                }
                _ => {}
            }
        }
        shared.thaw.notify_waiters();
        shared.wake.notify_one();
        shared.app.notify_waiters();
    }
}

fn offer_code(e: &HandoffError) -> &'static str {
    match e {
        HandoffError::Pending => "pending",
        HandoffError::Closed => "closed",
        _ => "invalid",
    }
}

fn decline_text(code: u8) -> String {
    match code {
        1 => "the client follows no handoffs".into(),
        2 => "the client does not allow the target's key".into(),
        3 => "the client could not reach the target".into(),
        4 => "the target refused the client".into(),
        5 => "the token expired before the client got there".into(),
        c => format!("the client declined (code {c})"),
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

async fn open_forward(link: &dyn HandoffLink, id: &SessionId, sid: u64) -> Result<Stream, Error> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), link.open(LinkPurpose::Forward))
        .await
        .map_err(|_| fail("commit", "target_lost", "no forward stream within 5 s"))??;
    let mut head = [0u8; 24];
    head[..16].copy_from_slice(&id.0);
    head[16..].copy_from_slice(&sid.to_be_bytes());
    s.write_all(&head).await?;
    Ok(s)
}

// ---- target ----

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
    pub async fn serve_handoff(&self, mut link: Stream, source: PublicKey) -> Result<(), Error> {
        let ctx = self.listen_ctx().clone();
        let (ty, body) = read_msg(&mut link).await?;
        if ty != PREPARE || body.len() != 4 + 16 + 32 + 4 + 4 + 4 {
            return Err(fail("prepare", "target_refused", "not a PREPARE"));
        }
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
        let result = pull_state(&mut link, arrival.epoch, &ctx, &me, &client, &source).await;
        let ok = result.is_ok();
        let _ = arrival.state.send(result.map_err(|e| e.to_string()));
        if !ok {
            cleanup();
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
        info!(session = %id, from = %source.short(), "handoff committed here");
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

// ---- client ----

/// How a dialled session follows its server's handoff offers.
#[derive(Clone)]
pub(crate) struct Follow {
    pub(crate) key: SecretKey,
    pub(crate) policy: HandoffPolicy,
    pub(crate) relays: Vec<String>,
    pub(crate) events: broadcast::Sender<EndpointEvent>,
}

/// Client: the server offered a handoff. Declines it if the policy says
/// so; otherwise follows it in a task of its own.
pub(crate) fn offered(st: &mut State, shared: &Shared, offer: HandoffOffer) {
    let Some(follow) = &shared.follow else {
        st.core.decline_handoff(DeclineCode::Policy);
        return;
    };
    let allowed = match &follow.policy {
        HandoffPolicy::Any => Ok(()),
        HandoffPolicy::Refuse => Err(DeclineCode::Policy),
        HandoffPolicy::Only(keys) if keys.contains(&offer.target) => Ok(()),
        HandoffPolicy::Only(_) => Err(DeclineCode::KeyNotAllowed),
    };
    if let Err(code) = allowed {
        info!(session = %shared.id, to = %offer.target, ?code, "handoff declined by policy");
        let _ = follow.events.send(EndpointEvent::HandoffDeclined {
            id: shared.id,
            to: offer.target,
            reason: format!("{code:?}"),
        });
        st.core.decline_handoff(code);
        return;
    }
    if offer.addrs.is_empty() && follow.relays.is_empty() {
        st.core.decline_handoff(DeclineCode::Unreachable);
        return;
    }
    let Some(me) = shared.me.upgrade() else {
        return;
    };
    let span = session::span(shared);
    tokio::spawn(follow_offer(me, follow.clone(), offer).instrument(span));
}

async fn follow_offer(shared: Arc<Shared>, follow: Follow, offer: HandoffOffer) {
    let dialer: Arc<dyn Dialer> = Arc::new(PathDialer::new(
        follow.key.clone(),
        offer.target,
        offer.addrs.first().map(|a| a.to_string()),
        follow.relays.clone(),
    ));
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut last = String::from("no attempt");
    let code = loop {
        if Instant::now() >= offer.expires {
            break DeclineCode::Unreachable;
        }
        match follow_once(&shared, &follow.key, dialer.as_ref(), offer.id).await {
            Ok(true) => {
                shared.set_dialer(dialer);
                info!(to = %offer.target, stall_ms = started.elapsed().as_secs_f64() * 1e3, "followed the handoff");
                return;
            }
            Ok(false) => return, // no longer offered (the session resumed, closed or declined)
            Err(Error::Handshake {
                source: HandshakeError::Refused { code: 11, reason },
                ..
            }) => {
                last = reason;
                break DeclineCode::Refused;
            }
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    };
    info!(to = %offer.target, ?code, "giving the handoff up: {last}");
    let mut st = shared.lock();
    if st.core.handoff_followed().is_some_and(|o| o.id == offer.id) {
        st.core.decline_handoff(code);
    }
    drop(st);
    shared.wake.notify_one();
}

/// One attempt: dial the target and resume there. `Ok(false)` when the
/// offer is no longer followed.
async fn follow_once(
    shared: &Arc<Shared>,
    key: &SecretKey,
    dialer: &dyn Dialer,
    hid: u32,
) -> Result<bool, Error> {
    let addr = dialer.describe();
    let mut carrier = tokio::time::timeout(Duration::from_secs(5), dialer.dial())
        .await
        .map_err(|_| Error::Timeout {
            addr: addr.clone(),
            secs: 5,
        })??;
    let _one = shared.resume_lock.lock().await;
    let mut msg = Vec::new();
    {
        let mut st = shared.lock();
        if !st.core.handoff_followed().is_some_and(|o| o.id == hid) {
            return Ok(false);
        }
        st.core
            .start_handoff_resume(key, &mut rand_core::OsRng, &mut msg)
            .map_err(|source| Error::Handshake {
                addr: addr.clone(),
                source,
            })?;
    }
    let answer = async {
        carrier.write_all(&msg).await?;
        read_record(&mut carrier, &addr, Duration::from_secs(8)).await
    }
    .await;
    let mut st = shared.lock();
    let res = answer.and_then(|record| {
        st.core
            .finish_resume(Instant::now(), &record)
            .map_err(|source| Error::Handshake {
                addr: addr.clone(),
                source,
            })
    });
    match res {
        Ok(()) => {
            session::invalidate_carrier(&mut st, shared);
            process_events(&mut st, shared);
            drop(st);
            session::attach(shared, carrier);
            Ok(true)
        }
        Err(e) => {
            st.core.cancel_resume();
            Err(e)
        }
    }
}
