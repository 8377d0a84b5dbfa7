//! Carriers, key epochs, resume and rekey.

use super::*;

// ---- carriers, epochs, resume and rekey ----
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
        if matches!(self.state, State::Closing) {
            let (code, reason, _) =
                self.pending_close
                    .take()
                    .unwrap_or((CloseCode::Normal, String::new(), false));
            self.finish_close(CloseReason::Local { code, reason });
        }
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

    pub(super) fn install_epoch(
        &mut self,
        now: Instant,
        epoch: u32,
        agreed: &Agreed,
        starter: bool,
    ) -> Result<(), HandshakeError> {
        let (tx, rx) = if starter {
            (agreed.initiator_to_responder, agreed.responder_to_initiator)
        } else {
            (agreed.responder_to_initiator, agreed.initiator_to_responder)
        };
        self.tx = Some(DirectionKey::new(self.suite, tx, epoch).ok_or(HandshakeError::Crypto)?);
        self.rx = Some(DirectionKey::new(self.suite, rx, epoch).ok_or(HandshakeError::Crypto)?);
        self.rx_next = None;
        self.chain = next_chain(&self.chain, agreed);
        self.committed_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        self.epoch_started = now;
        Ok(())
    }

    /// Initiator: starts a resume on a new carrier and writes the RESUME
    /// record into `out`. The current carrier, if any, stays usable until
    /// [`Session::finish_resume`] (make-before-break).
    pub fn start_resume(
        &mut self,
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        let epoch = self.next_epoch().ok_or(HandshakeError::Closed)?;
        let mut msg = [0u8; 256];
        let (hs, n) = EpochHandshake::start(
            &self.chain,
            &self.id,
            epoch,
            &self.recv_next.to_be_bytes(),
            rng,
            &mut msg,
        )?;
        self.max_epoch = epoch;
        self.resume = Some(PendingEpoch { hs, epoch });
        wire::push_record(
            out,
            RecordType::Resume,
            &[&self.id.0, &epoch.to_be_bytes(), &msg[..n]],
        );
        Ok(())
    }

    /// Initiator: completes the resume with the peer's RESUMED (or REFUSE)
    /// record. The new carrier is then the session's carrier: the caller
    /// must stop reading the old one.
    pub fn finish_resume(&mut self, now: Instant, record: &[u8]) -> Result<(), HandshakeError> {
        let (ty, body) = split_record(record)?;
        if ty == RecordType::Refuse {
            let code = body.first().copied().unwrap_or(0);
            let reason = String::from_utf8_lossy(body.get(1..).unwrap_or(&[])).into_owned();
            return Err(HandshakeError::Refused { code, reason });
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
        self.attach(now, pending.epoch, &agreed, true, peer_next)
    }

    /// Responder: handles a RESUME record that [`crate::resume_session_id`]
    /// matched to this session, and writes RESUMED into `out`. The caller
    /// then replaces the old carrier with the one the RESUME came on.
    pub fn handle_resume(
        &mut self,
        now: Instant,
        record: &[u8],
        rng: &mut dyn RngCore,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.is_closed() {
            return Err(HandshakeError::Closed);
        }
        let (ty, body) = split_record(record)?;
        if ty != RecordType::Resume {
            return Err(HandshakeError::Unexpected("not a RESUME"));
        }
        let mut r = Reader::new(body);
        let id: [u8; 16] = r.array()?;
        if id != self.id.0 {
            return Err(HandshakeError::UnknownSession);
        }
        let epoch = r.u32()?;
        if epoch <= self.committed_epoch {
            return Err(HandshakeError::StaleResume {
                got: epoch,
                current: self.committed_epoch,
            });
        }
        let mut payload = [0u8; 64];
        let mut msg = [0u8; 256];
        let (agreed, p, n) = EpochHandshake::answer(
            &self.chain,
            &self.id,
            epoch,
            r.remaining(),
            &mut payload,
            &self.recv_next.to_be_bytes(),
            rng,
            &mut msg,
        )?;
        let peer_next = read_u64(&payload[..p])?;
        wire::push_record(out, RecordType::Resumed, &[&msg[..n]]);
        self.attach(now, epoch, &agreed, false, peer_next)
    }

    pub(super) fn attach(
        &mut self,
        now: Instant,
        epoch: u32,
        agreed: &Agreed,
        starter: bool,
        peer_next: u64,
    ) -> Result<(), HandshakeError> {
        if peer_next < self.send.base_seq || peer_next > self.send.next_seq() {
            return Err(HandshakeError::Unexpected(
                "resume position outside the replay buffer",
            ));
        }
        self.rekey = None;
        self.out_key_update = None;
        self.out_key_ack = None;
        self.install_epoch(now, epoch, agreed, starter)?;
        self.send.ack(peer_next);
        let again = self.send.rewind();
        self.stats.frames_resent += again;
        self.stats.resumes += 1;
        self.carrier_up = true;
        self.lost_at = None;
        self.last_recv = now;
        self.awaiting_since = None;
        self.ping_outstanding = false;
        self.paths_queued = !self.local_paths.is_empty();
        self.next_ping = now;
        self.ping_due = true;
        // Tell the peer where we are at once: this is also the commit point.
        self.ack_sent = 0;
        self.ack_due = Some(now);
        self.requeue_limits();
        self.wake_blocked();
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
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

    /// When the current carrier counts as broken if nothing arrives.
    pub(super) fn probe_deadline(&self) -> Option<Instant> {
        let t = self.config.probe_timeout?;
        let since = self.awaiting_since?;
        let t = t.max(self.stats.rtt.unwrap_or_default() * 4);
        Some(since.max(self.last_recv) + t)
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
        let mut enc = Vec::with_capacity(addrs.len().min(wire::MAX_PATHS) * 18);
        for a in addrs.iter().take(wire::MAX_PATHS) {
            crate::relay::put_addr(&mut enc, a);
        }
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
        if self.rekey.is_some()
            || self.resume.is_some()
            || self.out_key_ack.is_some()
            || !self.carrier_up
        {
            return;
        }
        let records = self.tx.as_ref().map_or(0, |k| k.counter);
        if now < self.epoch_started + self.config.rekey_after
            && records < self.config.rekey_after_records
        {
            return;
        }
        self.start_rekey();
    }

    /// Starts a new key epoch on the current carrier now (normally done on
    /// time and volume by itself).
    pub fn force_rekey(&mut self, rng: &mut dyn RngCore) {
        self.provide_entropy(rng);
        self.start_rekey();
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

    pub(super) fn start_rekey(&mut self) {
        // Not while an epoch change is under way: a proposal sent before our
        // answer to the peer's (KEY_UPDATE_ACK) or during a resume would cross
        // it, and the peer would drop its own rekey and then refuse our ack.
        if self.rekey.is_some()
            || self.out_key_ack.is_some()
            || self.resume.is_some()
            || !self.carrier_up
            || self.is_closed()
        {
            return;
        }
        let Some(epoch) = self.next_epoch() else {
            return;
        };
        let seed = self.derive_rekey_seed();
        let mut rng = crate::rng::SeededRng::new(seed);
        let mut msg = [0u8; 256];
        if let Ok((hs, n)) =
            EpochHandshake::start(&self.chain, &self.id, epoch, &[], &mut rng, &mut msg)
        {
            self.max_epoch = epoch;
            self.rekey = Some(PendingEpoch { hs, epoch });
            self.out_key_update = Some((epoch, msg[..n].to_vec()));
        }
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
        if self.rekey.is_some() {
            // Both sides started at once: the session initiator's wins.
            if self.role == Role::Initiator {
                return Ok(());
            }
            self.rekey = None;
            self.out_key_update = None;
        }
        if epoch <= self.committed_epoch {
            return Err(CloseReason::Protocol(format!(
                "key update to old epoch {epoch}"
            )));
        }
        let mut rng = crate::rng::SeededRng::new(self.derive_rekey_seed());
        let mut payload = [0u8; 16];
        let mut reply = [0u8; 256];
        let (agreed, _, n) = EpochHandshake::answer(
            &self.chain,
            &self.id,
            epoch,
            msg,
            &mut payload,
            &[],
            &mut rng,
            &mut reply,
        )
        .map_err(|_| CloseReason::AuthFailed)?;
        let tx = DirectionKey::new(self.suite, agreed.responder_to_initiator, epoch)
            .ok_or(CloseReason::AuthFailed)?;
        let rx = DirectionKey::new(self.suite, agreed.initiator_to_responder, epoch)
            .ok_or(CloseReason::AuthFailed)?;
        self.rx_next = Some(rx);
        self.chain = next_chain(&self.chain, &agreed);
        self.committed_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        self.epoch_started = now;
        self.stats.rekeys += 1;
        self.out_key_ack = Some((epoch, reply[..n].to_vec(), tx));
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }

    pub(super) fn handle_key_update_ack(
        &mut self,
        now: Instant,
        epoch: u32,
        msg: &[u8],
    ) -> Result<(), CloseReason> {
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
        self.install_epoch(now, epoch, &agreed, true)
            .map_err(|_| CloseReason::AuthFailed)?;
        self.stats.rekeys += 1;
        self.events.push_back(Event::Rekeyed(epoch));
        Ok(())
    }
}

fn read_u64(b: &[u8]) -> Result<u64, HandshakeError> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| HandshakeError::Malformed(WireError::Truncated))?;
    Ok(u64::from_be_bytes(arr))
}
