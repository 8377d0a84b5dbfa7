//! The initiator's resumes: reconnecting with backoff after a carrier is
//! lost, going back to the source after an unconfirmed handoff, and the
//! one resume path that RESUME and RESUME_HANDOFF share.

use super::*;

/// Initiator: dial and resume with backoff until the core's resume
/// deadline closes the session.
pub(super) async fn reconnect(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        if shared.lock().core.is_closed() {
            break;
        }
        // Read each time: a handoff may have moved the session meanwhile.
        let Some(dialer) = shared.dialer() else {
            break;
        };
        match resume_once(&shared, dialer.as_ref()).await {
            Ok(()) => {
                info!(to = %dialer.describe(), "carrier resumed");
                break;
            }
            Err(Error::Handshake {
                source: HandshakeError::SessionGone | HandshakeError::Refused { .. },
                ..
            }) if go_back(&shared) => {
                // The target refused a session it answered but never saw
                // commit: it gave the import up, and the source thaws.
                info!("the handoff did not commit at the target; going back to the source");
                backoff = Duration::from_millis(10);
            }
            Err(Error::Handshake { source, .. })
                if matches!(source, HandshakeError::SessionGone | HandshakeError::Closed) =>
            {
                // Only a refusal the peer proved with its static key ends
                // the session here; any other (unauthenticated) refusal,
                // refused dial or silence costs an attempt, and the session
                // keeps trying until its resume deadline.
                warn!(error = %source, "peer no longer knows this session");
                let mut st = shared.lock();
                st.core
                    .close(Instant::now(), CloseCode::Protocol, "peer lost the session");
                // No carrier: the close completes at once.
                process_events(&mut st, &shared);
                break;
            }
            Err(e) => {
                debug!(error = %e, retry_in = ?backoff, "resume attempt failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    shared.lock().reconnecting = false;
    shared.wake.notify_one();
}

/// Client: after a handoff whose commit the target never confirmed, goes
/// back to the source (`Session::revert_handoff`). Whether it did.
fn go_back(shared: &Shared) -> bool {
    let mut st = shared.lock();
    if !st.core.move_unconfirmed() {
        return false;
    }
    let Some(d) = st.origin_dialer.take() else {
        return false;
    };
    if !st.core.revert_handoff() {
        return false;
    }
    process_events(&mut st, shared);
    drop(st);
    shared.set_dialer(d);
    true
}

async fn resume_once(shared: &Arc<Shared>, dialer: &dyn Dialer) -> Result<(), Error> {
    let addr = dialer.describe();
    let carrier = tokio::time::timeout(Duration::from_secs(5), dialer.dial())
        .await
        .map_err(|_| Error::Timeout {
            addr: addr.clone(),
            secs: 5,
        })??;
    resume_on(shared, carrier, &addr).await
}

/// Resumes the session on `carrier`. The current carrier, if any, keeps
/// working until the peer's answer (make-before-break); on failure it
/// simply stays.
pub(crate) async fn resume_on(
    shared: &Arc<Shared>,
    carrier: BoxedCarrier,
    addr: &str,
) -> Result<(), Error> {
    resume_with(
        shared,
        carrier,
        addr,
        Duration::from_secs(5),
        |core, msg| core.start_resume(&mut rand_core::OsRng, msg).map(|()| true),
    )
    .await
    .map(|_| ())
}

/// A resume on `carrier` whose first record `start` writes (a RESUME, or a
/// RESUME_HANDOFF); `start` returning `Ok(false)` calls it off. Returns
/// whether the session switched to `carrier`.
pub(crate) async fn resume_with(
    shared: &Arc<Shared>,
    mut carrier: BoxedCarrier,
    addr: &str,
    wait: Duration,
    start: impl FnOnce(&mut pool_core::Session, &mut Vec<u8>) -> Result<bool, HandshakeError>,
) -> Result<bool, Error> {
    let _one = shared.resume_lock.lock().await;
    let mut msg = Vec::new();
    let go = start(&mut shared.lock().core, &mut msg).map_err(|source| Error::Handshake {
        addr: addr.to_string(),
        source,
    })?;
    if !go {
        return Ok(false);
    }
    let answer = async {
        carrier.write_all(&msg).await?;
        crate::carrier::read_record(&mut carrier, addr, wait).await
    }
    .await;
    let mut st = shared.lock();
    let res = answer.and_then(|record| {
        st.core
            .finish_resume(Instant::now(), &record)
            .map_err(|source| Error::Handshake {
                addr: addr.to_string(),
                source,
            })
    });
    match res {
        Ok(()) => {
            // Retire the old carrier under the same lock: its reader must
            // not see the new epoch's keys.
            bump_generation(&mut st, shared);
            process_events(&mut st, shared);
            drop(st);
            attach(shared, carrier);
            Ok(true)
        }
        Err(e) => {
            st.core.cancel_resume();
            Err(e)
        }
    }
}
