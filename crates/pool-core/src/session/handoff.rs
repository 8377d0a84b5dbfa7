//! The live handoff (docs/handoff.md): a session moves from this server
//! (the source) to another (the target) while the client keeps its streams.
//!
//! - **Source**: [`Session::offer_handoff`] sends the client a HANDOFF
//!   frame with the target's key and token; when the client arrives at the
//!   target, the target pulls the state: [`Session::freeze`] stops the
//!   session where it stands (nothing is read, sent or delivered from then
//!   on) and returns its snapshot. Then either [`Session::fence`] (the
//!   target committed: this side is done for good) or
//!   [`Session::unfreeze`] (the handoff failed before the commit: the
//!   session goes on exactly where it stopped).
//! - **Client**: an offer arrives as [`Event::HandoffOffered`]; the runtime
//!   dials the target and writes [`Session::start_handoff_resume`] (a
//!   RESUME_HANDOFF: `KKpsk0`, which proves the target's static key), or
//!   refuses with [`Session::decline_handoff`]. [`Session::finish_resume`]
//!   takes the target's RESUMED; from then on the peer is the target
//!   ([`Event::Moved`]).
//! - **Target**: restores the snapshot ([`Session::restore`]), rebinds it
//!   to its own key ([`Session::rebind_local`]) and answers with
//!   [`Session::answer_handoff`]; the client's first record in the new
//!   epoch ([`Session::confirm_resume`]) is the commit point.

use std::net::SocketAddr;

use super::epoch::ResumeAt;
use super::*;
use crate::keys::SecretKey;
use crate::wire::{DeclineCode, HANDOFF_TOKEN_LEN};

/// Why a handoff step cannot be taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// A handoff of this session is under way already.
    #[error("a handoff of this session is under way already")]
    Pending,
    /// No handoff is under way (freeze without an offer, for one).
    #[error("no handoff of this session is under way")]
    NotPending,
    /// A resume is half done (answered, not yet confirmed): try again in a
    /// moment.
    #[error("the session is in the middle of a resume; try again")]
    Busy,
    /// Only the side that accepted a session hands it off.
    #[error("only the server side of a session can hand it off")]
    NotServer,
    /// The session is over.
    #[error("the session is closed")]
    Closed,
    /// The target is this node or the peer itself.
    #[error("invalid handoff target: {0}")]
    Invalid(&'static str),
}

/// A handoff offered to this client ([`Event::HandoffOffered`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandoffOffer {
    /// The source's id of the handoff.
    pub id: u32,
    /// The target's static key.
    pub target: PublicKey,
    /// Where the target accepts carriers; empty: through relays, by key.
    pub addrs: Vec<SocketAddr>,
    /// When the token expires.
    pub expires: Instant,
}

/// The source's offer, as the HANDOFF frame carries it.
pub(super) struct SourceOffer {
    id: u32,
    target: [u8; 32],
    floor: u32,
    expires: Instant,
    token: [u8; HANDOFF_TOKEN_LEN],
    addrs: Vec<u8>,
}

impl SourceOffer {
    pub(super) fn frame(&self, now: Instant) -> Frame<'_> {
        let left = self.expires.saturating_duration_since(now).as_millis();
        Frame::Handoff {
            id: self.id,
            target: self.target,
            floor: self.floor,
            expires_ms: u32::try_from(left).unwrap_or(u32::MAX),
            token: &self.token,
            addrs: &self.addrs,
        }
    }
}

/// The client's handoff in progress.
pub(super) struct ClientMove {
    offer: HandoffOffer,
    floor: u32,
    token: [u8; HANDOFF_TOKEN_LEN],
}

/// A stream operation the application asked for while the session was
/// frozen. At unfreeze the session does it; at fence the runtime does it
/// on the stream's new home ([`Session::fence`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeldOp {
    /// `stream_finish(id)`.
    Finish(u64),
    /// `stream_reset(id, code)`.
    Reset(u64, u64),
    /// `stream_stop(id)`.
    Stop(u64),
    /// `close(code, reason)` of the whole session.
    Close(CloseCode, String),
}

pub(super) type Deferred = HeldOp;

impl Session {
    // ---- source ----

    /// Source: offers the client a move to `target` with the token the
    /// target minted for it; the HANDOFF frame goes out now and again
    /// after every resume, until [`Session::freeze`] or
    /// [`Session::withdraw_handoff`]. No rekey starts while it stands.
    #[allow(clippy::too_many_arguments)]
    pub fn offer_handoff(
        &mut self,
        now: Instant,
        id: u32,
        target: PublicKey,
        floor: u32,
        lifetime: Duration,
        token: [u8; HANDOFF_TOKEN_LEN],
        addrs: &[SocketAddr],
    ) -> Result<(), HandoffError> {
        if self.is_closed() {
            return Err(HandoffError::Closed);
        }
        if self.role != Role::Responder {
            return Err(HandoffError::NotServer);
        }
        if self.offer.is_some() || self.frozen {
            return Err(HandoffError::Pending);
        }
        if target == self.local || target == self.peer {
            return Err(HandoffError::Invalid(
                "the target is this node or the client",
            ));
        }
        let enc = wire::encode_addrs(addrs);
        self.offer = Some(SourceOffer {
            id,
            target: target.0,
            floor,
            expires: now + lifetime,
            token,
            addrs: enc,
        });
        self.offer_queued = true;
        Ok(())
    }

    /// Source: the lowest epoch a resume at a target may propose (every
    /// epoch this side ever used or answered is below it).
    pub fn handoff_floor(&self) -> u32 {
        self.max_epoch.saturating_add(1)
    }

    /// Source: the id of the handoff offered, if one stands.
    pub fn handoff_offered(&self) -> Option<u32> {
        self.offer.as_ref().map(|o| o.id)
    }

    /// Source: drops the offer (the handoff failed before any freeze).
    pub fn withdraw_handoff(&mut self) {
        self.offer = None;
        self.offer_queued = false;
    }

    /// Source: stops the session where it stands and returns its state for
    /// the target. From now on nothing is read from the carrier, sent, or
    /// delivered to or taken from the streams; stream operations wait, or
    /// are held ([`HeldOp`]). Refused while a resume is half done
    /// ([`HandoffError::Busy`]: it completes or fails within a round trip).
    pub fn freeze(&mut self) -> Result<Zeroizing<Vec<u8>>, HandoffError> {
        if self.is_closed() {
            return Err(HandoffError::Closed);
        }
        if self.offer.is_none() {
            return Err(HandoffError::NotPending);
        }
        if self.frozen {
            return Err(HandoffError::Pending);
        }
        // A FIN held from an earlier freeze that still waits for room in
        // the replay buffer is in no snapshot yet: it would be lost.
        if self.attach_pending.is_some() || !self.held_fins.is_empty() {
            return Err(HandoffError::Busy);
        }
        self.frozen = true;
        self.offer_queued = false;
        Ok(self.snapshot())
    }

    /// Whether the session is frozen for a handoff.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Source: the handoff failed before the commit; the session goes on
    /// exactly where [`Session::freeze`] stopped it (nothing was read,
    /// acknowledged, sent or delivered meanwhile), and does what the
    /// application asked for while it was frozen.
    pub fn unfreeze(&mut self, now: Instant) {
        if !self.frozen {
            return;
        }
        self.frozen = false;
        self.withdraw_handoff();
        for op in std::mem::take(&mut self.deferred) {
            match op {
                HeldOp::Finish(id) => {
                    if matches!(self.stream_finish(id), Err(StreamError::Blocked)) {
                        self.held_fins.push(id);
                    }
                }
                HeldOp::Reset(id, code) => {
                    let _ = self.stream_reset(id, code);
                }
                HeldOp::Stop(id) => {
                    let _ = self.stream_stop(id);
                    // The stop's FIN, held while frozen, must not be lost
                    // to a full replay buffer now.
                    if self
                        .streams
                        .get(&id)
                        .is_some_and(|st| !st.fin_queued && st.reset.is_none())
                        && !self.held_fins.contains(&id)
                    {
                        self.held_fins.push(id);
                    }
                }
                HeldOp::Close(code, reason) => self.close(now, code, &reason),
            }
        }
        let readable: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.recv_buf.is_empty() || s.fin_received || s.reset.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in readable {
            self.events.push_back(Event::StreamReadable(id));
        }
        self.wake_blocked();
        self.events.push_back(Event::StreamsAvailable);
        // Tell the peer where we are at once (it may have waited).
        self.ack_forced = true;
        self.ack_due = Some(now);
    }

    /// Source: the target committed: this side of the session is over for
    /// good. Its secrets are wiped and it closes with
    /// [`CloseReason::HandedOff`] (no CLOSE frame: the session lives on at
    /// `to`). Returns the stream operations held while frozen, for the
    /// runtime to do where the streams live now.
    pub fn fence(&mut self, to: PublicKey) -> Vec<HeldOp> {
        self.frozen = false;
        self.withdraw_handoff();
        *self.chain = [0u8; 32];
        self.prev_chain = None;
        self.tx = None;
        self.rx = None;
        self.rx_next = None;
        self.rekey = None;
        self.attach_pending = None;
        self.out_key_update = None;
        self.out_key_ack = None;
        self.carrier_up = false;
        // The streams belong to the target now, buffered bytes included
        // (they were in the snapshot): nothing of them may be read here.
        self.streams.clear();
        self.pending_resets.clear();
        self.blocked.clear();
        self.max_stream_data_queue.clear();
        self.held_fins.clear();
        let held = std::mem::take(&mut self.deferred);
        self.finish_close(CloseReason::HandedOff { to });
        held
    }

    /// A stream's offsets: bytes the application read from it, and bytes
    /// it wrote to it (a moved stream's service continues from there).
    pub fn stream_offsets(&self, id: u64) -> Option<(u64, u64)> {
        self.streams.get(&id).map(|s| (s.recv_consumed, s.sent))
    }

    /// The streams the session holds now (open in at least one direction).
    pub fn stream_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    pub(super) fn on_handoff_decline(&mut self, id: u32, code: u8) {
        if self.offer.as_ref().is_some_and(|o| o.id == id) {
            self.events.push_back(Event::HandoffDeclined { id, code });
        }
    }

    // ---- client ----

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_handoff_offer(
        &mut self,
        now: Instant,
        id: u32,
        target: [u8; 32],
        floor: u32,
        expires_ms: u32,
        token: &[u8],
        addrs: &[u8],
    ) {
        if self.role != Role::Initiator {
            // Only servers offer handoffs.
            return;
        }
        if self.moving.is_some() {
            // The same offer again after a resume, or a second one while
            // one is followed: one at a time.
            return;
        }
        let target = PublicKey(target);
        if target == self.peer || target == self.local {
            self.decline_queued = Some((id, DeclineCode::KeyNotAllowed as u8));
            return;
        }
        let Ok(token) = <[u8; HANDOFF_TOKEN_LEN]>::try_from(token) else {
            return;
        };
        let addrs = wire::decode_addrs(addrs);
        let offer = HandoffOffer {
            id,
            target,
            addrs,
            expires: now + Duration::from_millis(u64::from(expires_ms)),
        };
        self.events.push_back(Event::HandoffOffered(offer.clone()));
        self.moving = Some(ClientMove {
            offer,
            floor,
            token,
        });
    }

    /// Client: the handoff being followed, if any.
    pub fn handoff_followed(&self) -> Option<&HandoffOffer> {
        self.moving.as_ref().map(|m| &m.offer)
    }

    /// Client: refuses (or gives up) the handoff offered, telling the
    /// source why; the session stays where it is.
    pub fn decline_handoff(&mut self, code: DeclineCode) {
        if let Some(m) = self.moving.take() {
            self.decline_queued = Some((m.offer.id, code as u8));
        }
    }

    /// Client: writes the RESUME_HANDOFF for the target of the handoff
    /// offered, into `out`, for a new carrier to the target. `local` is
    /// this node's static key (the target authenticates both). Finish it
    /// with [`Session::finish_resume`]; the current carrier stays in use
    /// until then, and on failure ([`Session::cancel_resume`]) nothing
    /// changes.
    pub fn start_handoff_resume(
        &mut self,
        local: &SecretKey,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        let Some(m) = &self.moving else {
            return Err(HandshakeError::Unexpected("no handoff offered"));
        };
        if local.public_key() != self.local {
            return Err(HandshakeError::Crypto);
        }
        let token = m.token;
        let at = ResumeAt {
            local,
            target: m.offer.target,
            token: &token,
            floor: m.floor,
        };
        self.start_resume_as(Some(at), rng, out)
    }

    /// Client: the target answered; it is the peer from now on.
    pub(super) fn moved_to(&mut self, target: PublicKey, epoch: u32) {
        let from = self.peer;
        self.origin.get_or_insert(from);
        self.peer = target;
        self.moving = None;
        self.unconfirmed_move = Some((from, epoch));
        self.events.push_back(Event::Moved { from, to: target });
    }

    /// Client: whether the session moved to a target from which no record
    /// has authenticated yet (the commit may not have happened there).
    pub fn move_unconfirmed(&self) -> bool {
        self.unconfirmed_move.is_some()
    }

    /// Client: goes back to the server the session left, when the move is
    /// unconfirmed and the target refuses the session (it gave the import
    /// up: no commit happened, and the source unfreezes). The peer is the
    /// source again; resume there. Returns whether it went back.
    ///
    /// Safe whatever the truth: if the target did commit, the source is
    /// fenced and refuses the resume (the session is lost, never
    /// duplicated); if it did not, the source holds the session.
    pub fn revert_handoff(&mut self) -> bool {
        let Some((from, _)) = self.unconfirmed_move.take() else {
            return false;
        };
        let to = self.peer;
        self.peer = from;
        if self.origin == Some(from) {
            self.origin = None;
        }
        self.events.push_back(Event::Moved { from: to, to: from });
        true
    }

    // ---- target ----

    /// Target: a session restored from the source's snapshot carries the
    /// source's key as its own; this makes it ours.
    pub fn rebind_local(&mut self, local: PublicKey) {
        self.local = local;
    }

    /// Target: answers the client's RESUME_HANDOFF (whose token the caller
    /// checked, [`crate::handoff::Imports::check`]) with RESUMED into
    /// `out`, proving `local`, this node's static key. As with
    /// [`Session::handle_resume`], nothing switches until the client's
    /// first record in the new epoch ([`Session::confirm_resume`]): the
    /// commit point.
    pub fn answer_handoff(
        &mut self,
        now: Instant,
        record: &[u8],
        local: &SecretKey,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        let _ = now;
        if local.public_key() != self.local {
            return Err(HandshakeError::Crypto);
        }
        self.answer_resume(record, Some(local), rng, out)
    }
}
