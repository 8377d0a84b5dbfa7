//! The client's side: follow a server's offer within the policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::wire::DeclineCode;
use pool_core::{HandoffOffer, HandshakeError, SecretKey};
use tokio::sync::broadcast;
use tracing::{info, Instrument};

use crate::carrier::Dialer;
use crate::config::HandoffPolicy;
use crate::error::Error;
use crate::listener::EndpointEvent;
use crate::paths::PathDialer;
use crate::session::{self, Shared, State};

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
                let left = shared.dialer();
                shared.lock().origin_dialer = left;
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
    let carrier = tokio::time::timeout(Duration::from_secs(5), dialer.dial())
        .await
        .map_err(|_| Error::Timeout {
            addr: addr.clone(),
            secs: 5,
        })??;
    session::resume_with(
        shared,
        carrier,
        &addr,
        Duration::from_secs(8),
        |core, msg| {
            if core.handoff_followed().is_none_or(|o| o.id != hid) {
                return Ok(false);
            }
            core.start_handoff_resume(key, &mut rand_core::OsRng, msg)
                .map(|()| true)
        },
    )
    .await
}
