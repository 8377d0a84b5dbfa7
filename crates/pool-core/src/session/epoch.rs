//! Carriers, key epochs, resume and rekey.
//!
//! The rules that keep both sides able to resume at every moment (see
//! docs/protocol.md, "Epochs"):
//!
//! - Each side keeps the chaining secret of its current epoch and of the
//!   one before, and knows the newest epoch in which the peer's records
//!   authenticated (`rx_confirmed`). A resume is based on that epoch, whose
//!   secret the peer surely holds, and names it (`base`).
//! - A rekey starts only once the current epoch is confirmed that way, so
//!   the two sides are never more than one epoch apart.
//! - While a resume of ours is under way we decline the peer's rekey.
//! - The responder answers a RESUME but keeps its carrier and epoch until
//!   the first valid record of the new epoch arrives on the new carrier
//!   (the commit point). Each RESUME is good once: its epoch must exceed
//!   every epoch a RESUME proposed before.

use super::*;

impl Session {
    /// The carrier is gone (EOF, error, or declared dead). Keys of the
    /// current epoch are dropped; the session waits for a resume until the
    /// resume deadline.
    pub fn carrier_lost(&mut self, now: Instant) {
        self.carrier_up = false;
        self.awaiting_since = None;
        self.ping_outstanding = false;
        self.tx = None;
        self.rx = None;
        self.rx_next = None;
        self.rekey = None;
        self.out_key_update = None;
        self.out_key_ack = None;
        self.lost_at.get_or_insert(now);
        self.stats.carriers_lost += 1;
        if matches!(self.state, State::Closing) {
            let (code, reason, _) =
                self.pending_close
                    .take()
                    .unwrap_or((CloseCode::Normal, String::new(), false));
            self.finish_close(CloseReason::Local { code, reason });
        }
    }

    /// Drops the carrier because of bytes that did not authenticate: they
    /// may come from anyone on the path, so they cost the carrier, never
    /// the session (the initiator resumes on a new one).
    pub(super) fn reject_carrier(&mut self, now: Instant) {
        self.stats.records_rejected += 1;
        self.carrier_lost(now);
        self.events.push_back(Event::CarrierDead);
    }

    /// A session without a carrier (restored from a snapshot).
    pub(super) fn mark_detached(&mut self, now: Instant) {
        self.carrier_up = false;
        self.tx = None;
        self.rx = None;
        self.lost_at = Some(now);
        self.send.tx_index = 0;
        self.send.tx_offset = 0;
    }

    /// The chaining secret of `epoch`, if we still hold it.
    fn chain_of(&self, epoch: u32) -> Option<&[u8; 32]> {
        if epoch == self.committed_epoch {
            return Some(&self.chain);
        }
        match &self.prev_chain {
            Some((e, c)) if *e == epoch => Some(c),
            _ => None,
        }
    }

    /// Moves to `epoch` with `chain`, keeping the secret of `prev` (the
    /// epoch the peer may still base a resume on).
    fn advance_chain(
        &mut self,
        prev: (u32, Zeroizing<[u8; 32]>),
        epoch: u32,
        chain: Zeroizing<[u8; 32]>,
    ) {
        self.prev_chain = Some(prev);
        self.chain = chain;
        self.committed_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
    }

    /// Initiator: starts a resume on a new carrier and writes the RESUME
    /// record into `out`. The current carrier, if any, stays usable until
    /// [`Session::finish_resume`] (make-before-break).
    pub fn start_resume(
        &mut self,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        self.start_resume_as(None, rng, out)
    }

    /// A RESUME, or with `handoff` a RESUME_HANDOFF to the target it names
    /// (`KKpsk0` with our static key, the token in the prologue).
    pub(super) fn start_resume_as(
        &mut self,
        handoff: Option<ResumeAt<'_>>,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        let base = self.rx_confirmed;
        let base_chain = Zeroizing::new(*self.chain_of(base).ok_or(HandshakeError::Crypto)?);
        let mut epoch = self.next_epoch().ok_or(HandshakeError::Closed)?;
        if let Some(h) = &handoff {
            epoch = epoch.max(h.floor);
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *secret);
        let refuse_key = crate::keys::SecretKey::from_bytes(*secret);
        let mut extra = resume_extra(base, &refuse_key.public_key()).to_vec();
        if let Some(h) = &handoff {
            extra.extend_from_slice(h.token);
        }
        let statics = handoff.as_ref().map(|h| (h.local, &h.target));
        let mut msg = [0u8; 256];
        let (hs, n) = EpochHandshake::start(
            &base_chain,
            &self.id,
            epoch,
            &extra,
            statics,
            &self.recv_next.to_be_bytes(),
            rng,
            &mut msg,
        )?;
        self.max_epoch = epoch;
        let ty = if handoff.is_some() {
            RecordType::ResumeHandoff
        } else {
            RecordType::Resume
        };
        self.resume = Some(PendingResume {
            hs,
            epoch,
            base,
            base_chain,
            refuse_key,
            target: handoff.map(|h| h.target),
        });
        wire::push_record(
            out,
            ty,
            &[&self.id.0, &epoch.to_be_bytes(), &extra, &msg[..n]],
        );
        Ok(())
    }

    /// Initiator: completes the resume with the peer's RESUMED (or REFUSE)
    /// record. The new carrier is then the session's carrier: the caller
    /// must stop reading the old one.
    ///
    /// A refusal is unauthenticated and leaves the session as it was
    /// ([`HandshakeError::Refused`]: try again later), except one that
    /// proves, with a key only the peer holds, that the peer no longer
    /// knows the session ([`HandshakeError::SessionGone`]: close it).
    pub fn finish_resume(&mut self, now: Instant, record: &[u8]) -> Result<(), HandshakeError> {
        let (ty, body) = split_record(record)?;
        if ty == RecordType::Refuse {
            let refusal = crate::handshake::Refusal::parse(body);
            if let Some(p) = &self.resume {
                let server = p.target.unwrap_or(self.peer);
                if refusal.proves_gone(&p.refuse_key, &server, &self.id, p.epoch) {
                    return Err(HandshakeError::SessionGone);
                }
            }
            return Err(refusal.into_error());
        }
        if ty != RecordType::Resumed {
            return Err(HandshakeError::Unexpected("not a RESUMED"));
        }
        let pending = self
            .resume
            .take()
            .ok_or(HandshakeError::Unexpected("no resume pending"))?;
        let mut payload = [0u8; 64];
        let (agreed, p) = pending.hs.finish(body, &mut payload)?;
        let peer_next = read_u64(&payload[..p])?;
        if peer_next > self.send.next_seq() {
            return Err(HandshakeError::Unexpected(
                "resume position beyond what this side sent",
            ));
        }
        let (tx, rx) = epoch_keys(self.suite, &agreed, pending.epoch, true)?;
        let chain = next_chain(&pending.base_chain, &agreed);
        if let Some(target) = pending.target {
            self.moved_to(target, pending.epoch);
        }
        self.attach(
            now,
            pending.epoch,
            (pending.base, pending.base_chain),
            chain,
            tx,
            rx,
            peer_next,
        );
        Ok(())
    }

    /// Responder: handles a RESUME record that [`crate::resume_session_id`]
    /// matched to this session, and writes RESUMED into `out`.
    ///
    /// Nothing changes yet: the current carrier, if any, goes on. The caller
    /// sends RESUMED on the new carrier and passes the first record that
    /// arrives there to [`Session::confirm_resume`], which switches.
    pub fn handle_resume(
        &mut self,
        now: Instant,
        record: &[u8],
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        let _ = now;
        if self.frozen {
            return Err(HandshakeError::HandoffPending);
        }
        self.answer_resume(record, None, rng, out)
    }

    /// Answers a RESUME, or with `local` (this node's static key) a
    /// RESUME_HANDOFF, whose `KKpsk0` proves that key to the client.
    pub(super) fn answer_resume(
        &mut self,
        record: &[u8],
        local: Option<&crate::keys::SecretKey>,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        let (ty, body) = split_record(record)?;
        let (want, extra_len) = match local {
            None => (RecordType::Resume, RESUME_EXTRA_LEN),
            Some(_) => (
                RecordType::ResumeHandoff,
                RESUME_EXTRA_LEN + wire::HANDOFF_TOKEN_LEN,
            ),
        };
        if ty != want {
            return Err(HandshakeError::Unexpected("not a RESUME"));
        }
        let mut r = Reader::new(body);
        let id: [u8; 16] = r.array()?;
        if id != self.id.0 {
            return Err(HandshakeError::UnknownSession);
        }
        let epoch = r.u32()?;
        let extra = r.bytes(extra_len)?;
        let floor = self.committed_epoch.max(self.resume_floor);
        if epoch <= floor {
            return Err(HandshakeError::StaleResume {
                got: epoch,
                current: floor,
            });
        }
        let base = u32::from_be_bytes([extra[0], extra[1], extra[2], extra[3]]);
        let base_chain = Zeroizing::new(*self.chain_of(base).ok_or(HandshakeError::Crypto)?);
        let peer = self.peer;
        let statics = local.map(|k| (k, &peer));
        let mut payload = [0u8; 64];
        let mut msg = [0u8; 256];
        let (agreed, p, n) = EpochHandshake::answer(
            &base_chain,
            &self.id,
            epoch,
            extra,
            statics,
            r.remaining(),
            &mut payload,
            &self.recv_next.to_be_bytes(),
            rng,
            &mut msg,
        )?;
        // The peer may have acknowledged more on the old carrier since it
        // wrote the RESUME; it never has more than we sent.
        let peer_next = read_u64(&payload[..p])?;
        if peer_next > self.send.next_seq() {
            return Err(HandshakeError::Unexpected(
                "resume position beyond what this side sent",
            ));
        }
        let (tx, rx) = epoch_keys(self.suite, &agreed, epoch, false)?;
        // Single use from here on, whether or not the carrier confirms it.
        self.resume_floor = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        self.attach_pending = Some(PendingAttach {
            epoch,
            base,
            chain: next_chain(&base_chain, &agreed),
            base_chain,
            tx,
            rx,
            peer_next,
        });
        wire::push_record(out, RecordType::Resumed, &[&msg[..n]]);
        Ok(())
    }

    /// Responder: the first record from the carrier a RESUME came on. If it
    /// authenticates under the resumed epoch's keys, the session switches
    /// to that carrier (the caller retires the old one) and the record is
    /// processed; otherwise the new carrier is refused and nothing changes.
    pub fn confirm_resume(
        &mut self,
        now: Instant,
        record: &mut [u8],
    ) -> Result<(), HandshakeError> {
        let Some(mut pending) = self.attach_pending.take() else {
            return Err(HandshakeError::Unexpected("no resume pending"));
        };
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        match wire::peek_record(record)? {
            Some((RecordType::Data, len)) if len == record.len() => {}
            _ => return Err(HandshakeError::Unexpected("not a data record")),
        }
        let (epoch, counter) = record_nonce(record);
        if epoch != pending.epoch || counter != 0 {
            return Err(HandshakeError::Crypto);
        }
        let (aad, body) = record.split_at_mut(RECORD_HEADER_LEN + DATA_PREFIX_LEN);
        let n = pending
            .rx
            .open(counter, aad, body)
            .ok_or(HandshakeError::Crypto)?;
        pending.rx.counter = 1;
        let plain = &body[..n];
        if plain.len() < 8 || read_u64(&plain[..8])? > self.recv_next {
            // The peer resends from past what we ever received: it dropped
            // frames we never had (this side was restored from a stale
            // snapshot). Resuming would lose them silently.
            let reason = "the peer resumed past data this side never received (stale state)";
            self.fail(CloseReason::Protocol(reason.into()));
            return Err(HandshakeError::Unexpected(reason));
        }
        // Committed: the old carrier (if any) is retired by the caller.
        let peer_next = pending.peer_next.max(self.send.base_seq);
        self.attach(
            now,
            pending.epoch,
            (pending.base, pending.base_chain),
            pending.chain,
            pending.tx,
            pending.rx,
            peer_next,
        );
        self.rx_confirmed = pending.epoch;
        self.count_record(now, n);
        if let Err(reason) = self.handle_plaintext(now, plain) {
            self.fail(reason);
        }
        Ok(())
    }

    /// Responder: the carrier a RESUME came on failed before its first
    /// record; the answered resume is forgotten (it cannot be used again).
    pub fn abandon_resume(&mut self) {
        self.attach_pending = None;
    }

    #[allow(clippy::too_many_arguments)]
    fn attach(
        &mut self,
        now: Instant,
        epoch: u32,
        base: (u32, Zeroizing<[u8; 32]>),
        chain: Zeroizing<[u8; 32]>,
        tx: DirectionKey,
        rx: DirectionKey,
        peer_next: u64,
    ) {
        self.rekey = None;
        self.out_key_update = None;
        self.out_key_ack = None;
        self.rx_next = None;
        self.tx = Some(tx);
        self.rx = Some(rx);
        // The peer surely holds the base epoch's secret (whether or not it
        // has committed this resume yet), and we keep only that and the new
        // one: a record of an epoch in between, confirmed while the resume
        // was under way, no longer counts (simulator seed 1063099).
        self.rx_confirmed = base.0;
        self.advance_chain(base, epoch, chain);
        self.epoch_started = now;
        // The peer acknowledged everything below `peer_next`; it may have
        // acknowledged more on the old carrier meanwhile.
        self.send.ack(peer_next);
        // Frames the peer holds were sent, even if this side's record says
        // otherwise: restored from a snapshot taken after they were queued
        // and before they went out, it never saw them leave. Without this
        // the high-water mark stays below the queue's base, which breaks
        // the replay buffer's invariants (and the next snapshot; found by
        // the `resume` fuzz target).
        self.send.sent_hw = self.send.sent_hw.max(self.send.base_seq);
        let again = self.send.rewind();
        self.stats.frames_resent += again;
        self.stats.resumes += 1;
        self.carrier_up = true;
        self.lost_at = None;
        self.last_recv = now;
        self.awaiting_since = None;
        self.ping_outstanding = false;
        self.paths_queued = !self.local_paths.is_empty();
        self.offer_queued = self.offer.is_some();
        self.next_ping = now;
        self.ping_due = true;
        // Tell the peer where we are at once: for the responder of the
        // resume this first record is the commit point.
        self.ack_forced = true;
        self.ack_due = Some(now);
        self.requeue_limits();
        self.flush_resets();
        self.wake_blocked();
        self.events.push_back(Event::Rekeyed(epoch));
    }

    /// Whether the peer owes us an ack (frames on the carrier not yet
    /// acknowledged) or a pong.
    pub(super) fn owed_answer(&self) -> bool {
        self.send.tx_index > 0 || self.ping_outstanding
    }

    /// When the next liveness ping is due while data moves (every half
    /// probe timeout, for one keepalive interval after the last data).
    pub(super) fn fast_ping_at(&self) -> Option<Instant> {
        let p = self.config.probe_timeout?;
        if self.ping_outstanding || self.ping_due {
            return None;
        }
        let at = self.last_ping_sent + p / 2;
        (at < self.last_data_at + self.config.keepalive).then_some(at)
    }

    /// When the current carrier counts as broken: the peer owes an answer
    /// (an ack of our frames or a pong) and none came for the probe time.
    /// Only an answer resets it, not any record: a peer that keeps pinging
    /// but never acknowledges is not a working carrier.
    pub(super) fn probe_deadline(&self) -> Option<Instant> {
        let t = self.config.probe_timeout?;
        let since = self.awaiting_since?;
        let t = t.max(self.stats.rtt.unwrap_or_default() * 4);
        Some(since + t)
    }

    /// Initiator: gives up a resume started with [`Session::start_resume`]
    /// whose carrier failed before an answer; the current carrier, if any,
    /// goes on as before.
    pub fn cancel_resume(&mut self) {
        self.resume = None;
    }

    /// Sets the addresses where this side accepts direct carriers; they go
    /// to the peer in a PATHS frame now and after every resume (at most
    /// [`wire::MAX_PATHS`]).
    pub fn set_local_paths(&mut self, addrs: &[std::net::SocketAddr]) {
        let enc = wire::encode_addrs(addrs);
        if enc != self.local_paths {
            self.local_paths = enc;
            self.paths_queued = !self.local_paths.is_empty();
        }
    }

    pub(super) fn requeue_limits(&mut self) {
        self.max_data_queued = true;
        self.max_streams_queued = true;
        self.max_stream_data_queue.clear();
        for (id, st) in self.streams.iter_mut() {
            if !st.recv_done() {
                st.max_update_queued = true;
                self.max_stream_data_queue.push_back(*id);
            }
        }
    }

    pub(super) fn maybe_start_rekey(&mut self, now: Instant) {
        let records = self.tx.as_ref().map_or(0, |k| k.counter);
        if !self.rekey_requested
            && now < self.epoch_started + self.config.rekey_after
            && records < self.config.rekey_after_records
        {
            return;
        }
        if self.rekey_not_before.is_some_and(|t| now < t) {
            return;
        }
        self.start_rekey();
    }

    /// When a time- or volume-triggered rekey is next due (for the timer).
    pub(super) fn rekey_due_at(&self) -> Instant {
        let t = self.epoch_started + self.config.rekey_after;
        match self.rekey_not_before {
            Some(nb) => t.max(nb),
            None => t,
        }
    }

    /// Starts a new key epoch on the current carrier (normally done on time
    /// and volume by itself): now, or as soon as the epoch change under way
    /// completes and the peer has shown it holds the current epoch.
    pub fn force_rekey(&mut self, rng: &mut dyn RngCore) {
        self.provide_entropy(rng);
        self.rekey_requested = true;
        self.start_rekey();
    }

    /// Whether a rekey may start now.
    pub(super) fn rekey_allowed(&self) -> bool {
        // Not while an epoch change is under way (a proposal crossing our
        // answer to the peer's, or a resume, would split the chains), and
        // not before the peer showed it holds the current epoch: then both
        // sides are at most one epoch apart, and each keeps two secrets.
        self.rekey.is_none()
            && self.out_key_ack.is_none()
            && self.resume.is_none()
            && self.attach_pending.is_none()
            && self.rx_next.is_none()
            && self.carrier_up
            && self.rx_confirmed == self.committed_epoch
            && self.offer.is_none()
            && self.moving.is_none()
            && !self.frozen
            && !self.is_closed()
    }

    fn start_rekey(&mut self) {
        if !self.rekey_allowed() {
            return;
        }
        let Some(epoch) = self.next_epoch() else {
            return;
        };
        let seed = self.derive_rekey_seed();
        let mut rng = crate::rng::SeededRng::new(seed);
        let mut msg = [0u8; 256];
        if let Ok((hs, n)) = EpochHandshake::start(
            &self.chain,
            &self.id,
            epoch,
            &[],
            None,
            &[],
            &mut rng,
            &mut msg,
        ) {
            self.max_epoch = epoch;
            self.rekey = Some(PendingEpoch { hs, epoch });
            self.out_key_update = Some((epoch, msg[..n].to_vec()));
            self.rekey_requested = false;
        }
    }

    /// The epoch after every one proposed so far. A peer can move the
    /// session to epoch `u32::MAX` (epochs may skip); after it there is
    /// none, and the session closes rather than wrap to a used epoch.
    pub(super) fn next_epoch(&mut self) -> Option<u32> {
        let next = self.max_epoch.checked_add(1);
        if next.is_none() {
            self.fail(CloseReason::Protocol("key epoch numbers exhausted".into()));
        }
        next
    }

    /// Entropy for a time- or volume-triggered rekey, which has no caller
    /// to pass a generator: the runtime refills it with
    /// [`Session::provide_entropy`]; failing that, it is derived from the
    /// chaining secret and counters (unique per epoch, still secret).
    pub(super) fn derive_rekey_seed(&self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        let ctr = self.tx.as_ref().map_or(0, |k| k.counter);
        crypto::hkdf(
            &*self.chain,
            &[
                &self.max_epoch.to_be_bytes(),
                &ctr.to_be_bytes(),
                &self.entropy,
            ],
            b"pool rekey seed",
            &mut seed,
        );
        seed
    }

    /// Gives the session fresh randomness for the ephemeral keys of future
    /// rekeys (the runtime calls this when it creates or resumes a session).
    pub fn provide_entropy(&mut self, rng: &mut dyn RngCore) {
        rng.fill_bytes(&mut self.entropy);
    }

    pub(super) fn handle_key_update(
        &mut self,
        now: Instant,
        epoch: u32,
        msg: &[u8],
    ) -> Result<(), CloseReason> {
        if epoch <= self.committed_epoch {
            return Err(CloseReason::Protocol(format!(
                "key update to old epoch {epoch}"
            )));
        }
        if self.out_key_ack.is_some() || self.rx_next.is_some() {
            return Err(CloseReason::Protocol(
                "key update before the previous one completed".into(),
            ));
        }
        // Epoch numbers the peer used are never proposed again by us.
        self.max_epoch = self.max_epoch.max(epoch);
        if self.resume.is_some() || self.offer.is_some() || self.moving.is_some() {
            // Our resume is based on the current epoch; answering would
            // move our chain under it (a handoff offered or followed is a
            // resume to come). The peer drops its rekey and tries again
            // later.
            self.out_key_ack = Some(KeyAck::Decline(epoch));
            return Ok(());
        }
        if self.rekey.is_some() {
            // Both sides started at once: the session initiator's wins.
            if self.role == Role::Initiator {
                return Ok(());
            }
            self.rekey = None;
            self.out_key_update = None;
        }
        let mut rng = crate::rng::SeededRng::new(self.derive_rekey_seed());
        let mut payload = [0u8; 16];
        let mut reply = [0u8; 256];
        let (agreed, _, n) = EpochHandshake::answer(
            &self.chain,
            &self.id,
            epoch,
            &[],
            None,
            msg,
            &mut payload,
            &[],
            &mut rng,
            &mut reply,
        )
        .map_err(|_| CloseReason::AuthFailed)?;
        let (tx, rx) =
            epoch_keys(self.suite, &agreed, epoch, false).map_err(|_| CloseReason::AuthFailed)?;
        self.rx_next = Some(rx);
        let chain = next_chain(&self.chain, &agreed);
        let prev = (self.committed_epoch, self.chain.clone());
        self.advance_chain(prev, epoch, chain);
        self.epoch_started = now;
        self.stats.rekeys += 1;
        self.out_key_ack = Some(KeyAck::Answer(epoch, reply[..n].to_vec(), Box::new(tx)));
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }

    pub(super) fn handle_key_update_ack(
        &mut self,
        now: Instant,
        epoch: u32,
        msg: &[u8],
    ) -> Result<(), CloseReason> {
        if msg.is_empty() {
            // Declined: drop our proposal (its epoch number stays used), and
            // give the peer's resume time to end before proposing again;
            // proposing at once would bounce between the two at round-trip
            // rate while the resume lasts.
            if self.rekey.as_ref().is_some_and(|p| p.epoch == epoch) {
                self.rekey = None;
                self.out_key_update = None;
                let wait = Duration::from_secs(1).max(self.stats.rtt.unwrap_or_default() * 4);
                self.rekey_not_before = Some(now + wait);
            }
            return Ok(());
        }
        let Some(pending) = self.rekey.take() else {
            return Err(CloseReason::Protocol("unexpected key update ack".into()));
        };
        if pending.epoch != epoch {
            return Err(CloseReason::Protocol(
                "key update ack for another epoch".into(),
            ));
        }
        let mut payload = [0u8; 16];
        let (agreed, _) = pending
            .hs
            .finish(msg, &mut payload)
            .map_err(|_| CloseReason::AuthFailed)?;
        let (tx, rx) =
            epoch_keys(self.suite, &agreed, epoch, true).map_err(|_| CloseReason::AuthFailed)?;
        self.tx = Some(tx);
        self.rx = Some(rx);
        self.rx_next = None;
        let chain = next_chain(&self.chain, &agreed);
        let prev = (self.committed_epoch, self.chain.clone());
        self.advance_chain(prev, epoch, chain);
        self.epoch_started = now;
        self.stats.rekeys += 1;
        // A record in the new epoch at once (a ping): it shows the peer we
        // hold the epoch, which its next rekey and resume base wait for.
        self.ping_due = true;
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }
}

/// What a RESUME carries besides the session id and epoch, bound into the
/// epoch handshake's prologue: the base epoch and the refusal key.
pub(crate) const RESUME_EXTRA_LEN: usize = 4 + 32;

/// A resume at a handoff's target.
pub(super) struct ResumeAt<'a> {
    /// Our static key (the `KKpsk0` handshake proves it).
    pub(super) local: &'a crate::keys::SecretKey,
    /// The target's static key, from the HANDOFF frame.
    pub(super) target: PublicKey,
    /// The migration token, shown to the target.
    pub(super) token: &'a [u8],
    /// The lowest epoch the target accepts.
    pub(super) floor: u32,
}

fn resume_extra(base: u32, refuse: &PublicKey) -> [u8; RESUME_EXTRA_LEN] {
    let mut x = [0u8; RESUME_EXTRA_LEN];
    x[..4].copy_from_slice(&base.to_be_bytes());
    x[4..].copy_from_slice(&refuse.0);
    x
}

/// The send and receive keys of an epoch, for the side that started the
/// epoch handshake (`starter`) or answered it.
fn epoch_keys(
    suite: CipherSuite,
    agreed: &Agreed,
    epoch: u32,
    starter: bool,
) -> Result<(DirectionKey, DirectionKey), HandshakeError> {
    let (tx, rx) = if starter {
        (
            &agreed.initiator_to_responder,
            &agreed.responder_to_initiator,
        )
    } else {
        (
            &agreed.responder_to_initiator,
            &agreed.initiator_to_responder,
        )
    };
    let tx = DirectionKey::new(suite, **tx, epoch).ok_or(HandshakeError::Crypto)?;
    let rx = DirectionKey::new(suite, **rx, epoch).ok_or(HandshakeError::Crypto)?;
    Ok((tx, rx))
}

/// The epoch and counter in a data record's header.
pub(super) fn record_nonce(rec: &[u8]) -> (u32, u64) {
    let epoch = u32::from_be_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&rec[8..16]);
    (epoch, u64::from_be_bytes(c))
}

pub(super) fn read_u64(b: &[u8]) -> Result<u64, HandshakeError> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| HandshakeError::Malformed(WireError::Truncated))?;
    Ok(u64::from_be_bytes(arr))
}
