//! Every call that resumes a session, in one place.
//!
//! The simulator never calls `start_resume`, `finish_resume`,
//! `cancel_resume` or `handle_resume` anywhere else, so moving it to a new
//! resume API means changing these five functions (and nothing in
//! `world.rs`, which already handles both answers below).
//!
//! ## Today (the core in this tree)
//!
//! The responder *commits* on RESUME: `handle_resume` installs the new
//! epoch and the caller moves to the new carrier at once.
//! [`server_answer`] therefore returns [`ServerAnswer::Switched`], and
//! [`server_confirm`] is never called.
//!
//! ## After the fix (responder commits on the first valid record)
//!
//! `handle_resume` will only *prepare*: it writes RESUMED and keeps the old
//! carrier and epoch working; `Session::confirm_resume(now, &mut record)`,
//! called with the first whole record that arrives on the new carrier,
//! commits. The adapter must then:
//!
//! 1. [`server_answer`]: call `handle_resume` and return
//!    [`ServerAnswer::Prepared`]. The world keeps the old carrier as the
//!    server's carrier (its output keeps going there) and marks the new
//!    one prepared.
//! 2. [`server_confirm`]: call `s.confirm_resume(now, record)` and return
//!    `Ok(Confirmed { consumed })`, with `consumed = true` if
//!    `confirm_resume` also processed the record's frames (decrypted in
//!    place and delivered), `false` if it only verified it (the world then
//!    feeds the same record to `handle_carrier_data`). On `Ok` the world
//!    switches the server to the new carrier and closes the old one; on
//!    `Err` it drops the new carrier and the session stays where it was.
//!    It is called even if the old carrier was lost in between (the client
//!    closes the old carrier right after `finish_resume`, so the server
//!    usually sees `carrier_lost` before the first new record):
//!    `confirm_resume` must still commit then.
//! 3. [`client_start`] / [`client_finish`] / [`client_abandon`]: unchanged
//!    unless their signatures change.
//!
//! With fix (2) as well (a record failing authentication, or a forged
//! REFUSE, costs only the carrier), nothing changes here: the world already
//! treats `Event::CarrierDead` and a failed `client_finish` as the loss of
//! one carrier. Then run `pool-sim --attacks all` and switch
//! `tests/fixed_budget.rs` to `Attacks::ALL`.

use std::time::Instant;

use pool_core::{HandshakeError, Session};
use rand_core::RngCore;

/// What the server did with a RESUME that it accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerAnswer {
    /// The new epoch is installed; the new carrier is the session's carrier
    /// now (the protocol-v1 core, which committed on RESUME).
    // Not returned by the current core; the world still handles it.
    #[allow(dead_code)]
    Switched,
    /// RESUMED was written, nothing committed; commit with
    /// [`server_confirm`] on the first record from the new carrier (the
    /// current core).
    Prepared,
}

/// What [`server_confirm`] did with the record it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Confirmed {
    /// The record was processed (frames delivered); if false the world
    /// feeds it to `handle_carrier_data` after switching.
    pub(crate) consumed: bool,
}

/// Client: starts a resume on a new carrier; the RESUME record goes to `out`.
pub(crate) fn client_start(
    s: &mut Session,
    rng: &mut dyn RngCore,
    out: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    s.start_resume(rng, out)
}

/// Client: the first whole record from the new carrier (RESUMED or REFUSE).
pub(crate) fn client_finish(
    s: &mut Session,
    now: Instant,
    record: &[u8],
) -> Result<(), HandshakeError> {
    s.finish_resume(now, record)
}

/// Client: the new carrier failed before an answer; give up the attempt.
pub(crate) fn client_abandon(s: &mut Session) {
    s.cancel_resume();
}

/// Server: a RESUME that `resume_session_id` matched to `s`; RESUMED (or
/// nothing, on error) goes to `out`.
pub(crate) fn server_answer(
    s: &mut Session,
    now: Instant,
    record: &[u8],
    rng: &mut dyn RngCore,
    out: &mut Vec<u8>,
) -> Result<ServerAnswer, HandshakeError> {
    s.handle_resume(now, record, rng, out)?;
    Ok(ServerAnswer::Prepared)
}

/// Server: the first record on a carrier whose RESUME was answered with
/// [`ServerAnswer::Prepared`]. Not reachable with the current core.
pub(crate) fn server_confirm(
    s: &mut Session,
    now: Instant,
    record: &mut [u8],
) -> Result<Confirmed, HandshakeError> {
    s.confirm_resume(now, record)
        .map(|()| Confirmed { consumed: true })
}
