//! The source's side: prepare, offer, freeze, send the state, fence.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::{HandoffError, HeldOp, PublicKey, SessionId};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::*;
use crate::session::{self, process_events, Session};
use crate::stream::Rehomed;

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
        // The manifest: streams that move, and the service that takes each.
        let moved: Vec<(u64, &String)> = opts
            .policies
            .iter()
            .filter(|(_, (p, _))| *p == StreamPolicy::Move)
            .map(|(id, (_, name))| (*id, name))
            .take(usize::from(u16::MAX))
            .collect();
        prep.extend_from_slice(&(moved.len() as u16).to_be_bytes());
        for (sid, name) in &moved {
            let name = &name.as_bytes()[..name.len().min(255)];
            prep.extend_from_slice(&sid.to_be_bytes());
            prep.push(name.len() as u8);
            prep.extend_from_slice(name);
        }
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
        // From here on a reader task takes the target's messages, so that
        // waiting for them can be cut short without losing half of one.
        let (mut rd, mut ctl) = ctl.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let m = read_msg(&mut rd).await;
                let stop = m.is_err();
                if tx.send(m).await.is_err() || stop {
                    return;
                }
            }
        });
        let closed = || Err(std::io::Error::other("the worker link closed"));
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
            let (declined, closed_now) = {
                let st = shared.lock();
                (
                    st.declined.filter(|(d, _)| *d == hid).map(|(_, c)| c),
                    st.core.is_closed(),
                )
            };
            if let Some(code) = declined {
                return Err(self
                    .abandon(&mut ctl, "offer", "client_declined", decline_text(code))
                    .await);
            }
            if closed_now {
                return Err(self
                    .abandon(&mut ctl, "offer", "closed", "the session closed")
                    .await);
            }
            tokio::select! {
                m = rx.recv() => match m.unwrap_or_else(closed) {
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

        // Streams whose service does not move are reset first, so the
        // resets travel in the state the target inherits.
        let resets: Vec<u64> = opts
            .policies
            .iter()
            .filter(|(_, (p, _))| *p == StreamPolicy::Reset)
            .map(|(id, _)| *id)
            .collect();
        {
            let mut st = shared.lock();
            for sid in &resets {
                let _ = st.core.stream_reset(*sid, RESET_HANDOFF);
            }
            process_events(&mut st, shared);
        }
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
        match rx.recv().await.unwrap_or_else(closed) {
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
        let staying = |sid: &u64| {
            opts.policies
                .get(sid)
                .is_none_or(|(p, _)| *p == StreamPolicy::Forward)
        };
        for sid in ids.into_iter().filter(staying) {
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
            moved: moved.len(),
            reset: resets.len(),
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
        ctl: &mut crate::stream::SendStream,
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
