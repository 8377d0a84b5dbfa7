//! Receiving: records in, frames dispatched, flow-control credit.

use super::*;

// ---- receiving ----
impl Session {
    /// Feeds bytes read from the carrier. Consumes whole records from the
    /// front of `buf` (decrypting in place) and returns how many bytes it
    /// consumed; the caller keeps the rest for the next call. Once the
    /// carrier is down or the session closed, everything counts as consumed.
    ///
    /// Bytes that do not authenticate (a forged, replayed, truncated or
    /// garbled record, a handshake record) may come from anyone on the
    /// path: they cost the carrier ([`Event::CarrierDead`]), never the
    /// session. A protocol violation inside an authentic record closes the
    /// session with a reason (see [`Event::Closed`]).
    pub fn handle_carrier_data(&mut self, now: Instant, buf: &mut [u8]) -> usize {
        let mut used = 0;
        // Frozen for a handoff: nothing is read (the bytes wait in the
        // runtime's buffer, unacknowledged), so an abort loses nothing.
        while !self.is_closed() && self.carrier_up && !self.frozen {
            match wire::peek_record(&buf[used..]) {
                Ok(None) => break,
                Ok(Some((RecordType::Data, len))) => {
                    let rec = &mut buf[used..used + len];
                    used += len;
                    match self.open_record(rec) {
                        Some(n) => {
                            self.count_record(now, n);
                            let plain = &rec[RECORD_HEADER_LEN + DATA_PREFIX_LEN..][..n];
                            if let Err(reason) = self.handle_plaintext(now, plain) {
                                self.fail(reason);
                            }
                        }
                        None => self.reject_carrier(now),
                    }
                }
                Ok(Some(_)) | Err(_) => self.reject_carrier(now),
            }
        }
        if self.is_closed() || !self.carrier_up {
            return buf.len();
        }
        if used > 0 {
            // A record may have confirmed the epoch a waiting rekey needs.
            self.maybe_start_rekey(now);
        }
        used
    }

    /// Authenticates a data record in place with the current receive key,
    /// or the next epoch's (the peer switched after our KEY_UPDATE_ACK);
    /// returns the plaintext length.
    fn open_record(&mut self, rec: &mut [u8]) -> Option<usize> {
        let (epoch, counter) = epoch::record_nonce(rec);
        let (aad, body) = rec.split_at_mut(RECORD_HEADER_LEN + DATA_PREFIX_LEN);
        if let Some(rx) = self.rx.as_mut().filter(|k| k.epoch == epoch) {
            if counter != rx.counter {
                return None;
            }
            let n = rx.open(counter, aad, body)?;
            rx.counter += 1;
            return Some(n);
        }
        let next = self.rx_next.as_mut().filter(|k| k.epoch == epoch)?;
        if counter != next.counter {
            return None;
        }
        let n = next.open(counter, aad, body)?;
        next.counter += 1;
        self.rx = self.rx_next.take();
        Some(n)
    }

    /// Bookkeeping for a record that authenticated.
    pub(super) fn count_record(&mut self, now: Instant, plain_len: usize) {
        self.stats.records_received += 1;
        self.stats.bytes_received +=
            (RECORD_HEADER_LEN + DATA_PREFIX_LEN + plain_len + TAG_LEN) as u64;
        self.last_recv = now;
        if let Some(rx) = &self.rx {
            self.rx_confirmed = self.rx_confirmed.max(rx.epoch);
            if self.unconfirmed_move.is_some_and(|(_, e)| rx.epoch >= e) {
                // The target's record in the new epoch: it committed.
                self.unconfirmed_move = None;
            }
        }
    }

    pub(super) fn fail(&mut self, reason: CloseReason) {
        let code = match &reason {
            CloseReason::AuthFailed => CloseCode::Auth,
            CloseReason::Protocol(m)
                if m.contains("flow control") || m.contains("stream limit") =>
            {
                CloseCode::FlowControl
            }
            _ => CloseCode::Protocol,
        };
        let text = reason.to_string();
        self.pending_close = Some((code, text, true));
        // Closed now for the application; the CLOSE frame goes out with the
        // next poll_transmit if the carrier can still carry it.
        self.state = State::Closed(reason.clone());
        self.events.push_back(Event::Closed(reason));
        self.carrier_up_after_fail();
    }

    pub(super) fn carrier_up_after_fail(&mut self) {
        // Allow exactly one more record (the CLOSE) to be sealed.
        if self.tx.is_none() {
            self.pending_close = None;
        }
    }

    /// The frames of an authenticated record.
    pub(super) fn handle_plaintext(
        &mut self,
        now: Instant,
        plain: &[u8],
    ) -> Result<(), CloseReason> {
        let mut r = Reader::new(plain);
        let mut seq = r.u64().map_err(|e| CloseReason::Protocol(e.to_string()))?;
        if seq > self.recv_next {
            // Records carry the sequence number of their first sequenced
            // frame: a higher one means frames were skipped (a peer that
            // resumed from past what we hold), whatever the record carries.
            return Err(CloseReason::Protocol(format!(
                "sequence gap: record starts at {seq}, expected {}",
                self.recv_next
            )));
        }
        let mut delivered_bytes = 0usize;
        while !r.is_empty() {
            let frame = decode_frame(&mut r).map_err(|e| CloseReason::Protocol(e.to_string()))?;
            if frame.is_sequenced() {
                if seq < self.recv_next {
                    seq += 1;
                    self.stats.duplicates_dropped += 1;
                    continue;
                }
                if seq > self.recv_next {
                    return Err(CloseReason::Protocol(format!(
                        "sequence gap: got {seq}, expected {}",
                        self.recv_next
                    )));
                }
                seq += 1;
                self.recv_next += 1;
                self.stats.frames_received += 1;
                delivered_bytes += frame.encoded_len();
            }
            self.handle_frame(now, frame)?;
            if self.is_closed() {
                return Ok(());
            }
        }
        if delivered_bytes > 0 {
            self.last_data_at = now;
            self.unacked_bytes += delivered_bytes;
            if self.ack_due.is_none() {
                self.ack_due = Some(now + self.config.ack_delay);
            }
        }
        if self.awaiting_since.is_none() && self.owed_answer() {
            self.awaiting_since = Some(now);
        }
        Ok(())
    }

    pub(super) fn handle_frame(
        &mut self,
        now: Instant,
        frame: Frame<'_>,
    ) -> Result<(), CloseReason> {
        match frame {
            Frame::Ack { next } => {
                if next > self.send.sent_hw {
                    return Err(CloseReason::Protocol(format!("ack of unsent frame {next}")));
                }
                if self.send.ack(next) > 0 {
                    // Progress: the probe timer starts again from here.
                    self.awaiting_since = None;
                    self.flush_resets();
                    self.wake_blocked();
                }
            }
            Frame::Ping { stamp } => {
                if self.pongs.len() < 16 {
                    self.pongs.push_back(stamp);
                }
            }
            Frame::Pong { stamp } => {
                if self.ping_outstanding {
                    self.awaiting_since = None;
                }
                self.ping_outstanding = false;
                self.rtt_sample(now, stamp);
            }
            Frame::Paths { addrs } => {
                self.events
                    .push_back(Event::PeerPaths(wire::decode_addrs(addrs)));
            }
            Frame::Handoff {
                id,
                target,
                floor,
                expires_ms,
                token,
                addrs,
            } => self.on_handoff_offer(now, id, target, floor, expires_ms, token, addrs),
            Frame::HandoffDecline { id, code } => self.on_handoff_decline(id, code),
            Frame::KeyUpdate { epoch, msg } => self.handle_key_update(now, epoch, msg)?,
            Frame::KeyUpdateAck { epoch, msg } => self.handle_key_update_ack(now, epoch, msg)?,
            Frame::Stream { id, fin, data } => self.on_stream_data(id, fin, data)?,
            Frame::ResetStream { id, code } => {
                if let Some(st) = self.peer_stream(id)? {
                    if st.reset.is_none() {
                        st.reset = Some(code);
                        let unread = st.recv_buf.len() as u64;
                        st.recv_buf = VecDeque::new();
                        self.recv_consumed += unread;
                        self.events.push_back(Event::StreamReadable(id));
                        self.events.push_back(Event::StreamWritable(id));
                        self.maybe_grant_session();
                    }
                }
            }
            Frame::MaxData { max } => {
                if max > self.send_max_data {
                    self.send_max_data = max;
                    self.wake_blocked();
                }
            }
            Frame::MaxStreamData { id, max } => {
                if let Some(st) = self.streams.get_mut(&id) {
                    if max > st.send_max {
                        st.send_max = max;
                        self.wake_blocked();
                    }
                }
            }
            Frame::MaxStreams { max } => {
                if max > self.peer_max_streams {
                    self.peer_max_streams = max;
                    if self.stream_limit_blocked {
                        self.stream_limit_blocked = false;
                        self.events.push_back(Event::StreamsAvailable);
                    }
                }
            }
            Frame::Close { code, reason } => {
                let reason = String::from_utf8_lossy(reason).into_owned();
                self.finish_close(CloseReason::Peer {
                    code: CloseCode::from_u64(code),
                    reason,
                });
            }
        }
        Ok(())
    }

    pub(super) fn rtt_sample(&mut self, now: Instant, stamp: u64) {
        let sent = self.start + Duration::from_micros(stamp);
        if sent > now {
            return;
        }
        let sample = now - sent;
        let s = &mut self.stats;
        s.rtt = Some(match s.rtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
        s.min_rtt = Some(s.min_rtt.map_or(sample, |m| m.min(sample)));
        if let Some(prev) = self.last_rtt_sample {
            let d = sample.abs_diff(prev);
            let j = s.jitter;
            s.jitter = if d > j {
                j + (d - j) / 16
            } else {
                j - (j - d) / 16
            };
        }
        self.last_rtt_sample = Some(sample);
    }

    pub(super) fn is_local_stream(&self, id: u64) -> bool {
        let local_bit = if self.role == Role::Initiator { 0 } else { 1 };
        id & 1 == local_bit
    }

    /// The stream a peer frame refers to: `Some` if live, `None` if it was
    /// closed (the frame is then ignored); creates peer streams on first use.
    pub(super) fn peer_stream(&mut self, id: u64) -> Result<Option<&mut StreamState>, CloseReason> {
        if !self.streams.contains_key(&id) {
            let index = id >> 1;
            if self.is_local_stream(id) {
                if index >= self.next_local_index {
                    return Err(CloseReason::Protocol(format!(
                        "frame for stream {id} that this side never opened"
                    )));
                }
                return Ok(None);
            }
            if index < self.next_peer_index {
                return Ok(None);
            }
            if index >= self.local_max_streams {
                return Err(CloseReason::Protocol(format!(
                    "stream limit exceeded: stream {id}, limit {}",
                    self.local_max_streams
                )));
            }
            for i in self.next_peer_index..=index {
                let sid = i * 2 + (id & 1);
                self.streams.insert(sid, self.new_stream_state());
                self.stats.streams_opened += 1;
                self.events.push_back(Event::StreamOpened(sid));
            }
            self.next_peer_index = index + 1;
        }
        Ok(self.streams.get_mut(&id))
    }

    pub(super) fn new_stream_state(&self) -> StreamState {
        StreamState {
            send_max: self.peer_params.stream_window,
            recv_max: self.config.stream_window,
            ..StreamState::default()
        }
    }

    pub(super) fn on_stream_data(
        &mut self,
        id: u64,
        fin: bool,
        data: &[u8],
    ) -> Result<(), CloseReason> {
        let len = data.len() as u64;
        if self.recv_data + len > self.recv_max_data {
            return Err(CloseReason::Protocol(
                "session flow control window exceeded".into(),
            ));
        }
        self.recv_data += len;
        self.stats.stream_bytes_received += len;
        let Some(st) = self.peer_stream(id)? else {
            self.recv_consumed += len;
            self.maybe_grant_session();
            return Ok(());
        };
        if st.reset.is_some() || st.fin_received {
            if st.fin_received && len > 0 {
                return Err(CloseReason::Protocol(format!(
                    "data after FIN on stream {id}"
                )));
            }
            self.recv_consumed += len;
            self.maybe_grant_session();
            return Ok(());
        }
        if st.recv_total + len > st.recv_max {
            return Err(CloseReason::Protocol(format!(
                "stream flow control window exceeded on stream {id}"
            )));
        }
        st.recv_total += len;
        st.fin_received |= fin;
        let discarding = st.discarding;
        if discarding {
            st.recv_consumed += len;
        } else {
            st.recv_buf.extend(data.iter());
        }
        let done = st.recv_done() && st.send_done();
        if discarding {
            self.recv_consumed += len;
            self.maybe_grant_session();
            self.maybe_grant_stream(id);
            if done {
                self.forget(id);
            }
        } else if len > 0 || fin {
            self.events.push_back(Event::StreamReadable(id));
        }
        Ok(())
    }

    /// Gives back the memory of buffers a burst left behind. Called on the
    /// keepalive tick, never on the data path (shrinking there and growing
    /// again on the next write would cost more than the copy itself).
    pub(super) fn shrink_idle_buffers(&mut self) {
        self.send.shrink_if_empty(64 << 10);
        for st in self.streams.values_mut() {
            if st.recv_buf.is_empty() && st.recv_buf.capacity() > (16 << 10) {
                st.recv_buf.shrink_to(0);
            }
        }
    }

    pub(super) fn maybe_grant_session(&mut self) {
        let w = self.config.session_window;
        if self.recv_max_data - self.recv_consumed < w / 2 {
            self.recv_max_data = self.recv_consumed + w;
            self.max_data_queued = true;
        }
    }

    pub(super) fn maybe_grant_stream(&mut self, id: u64) {
        let w = self.config.stream_window;
        if let Some(st) = self.streams.get_mut(&id) {
            if !st.fin_received && st.recv_max - st.recv_consumed < w / 2 {
                st.recv_max = st.recv_consumed + w;
                if !st.max_update_queued {
                    st.max_update_queued = true;
                    self.max_stream_data_queue.push_back(id);
                }
            }
        }
    }

    pub(super) fn wake_blocked(&mut self) {
        for id in self.blocked.drain(..) {
            self.events.push_back(Event::StreamWritable(id));
        }
    }

    pub(super) fn forget(&mut self, id: u64) {
        if self.streams.get(&id).is_some_and(|s| s.reset_unsent) {
            // Kept (and its slot taken) until its RESET_STREAM is queued.
            return;
        }
        // A forgotten stream waits for nothing: no stale id stays in the
        // blocked list (it would grow with every stream reset while blocked).
        self.blocked.retain(|&b| b != id);
        if self.streams.remove(&id).is_some() && !self.is_local_stream(id) {
            self.peer_streams_closed += 1;
            self.local_max_streams += 1;
            self.max_streams_queued = true;
        }
    }

    pub(super) fn finish_close(&mut self, reason: CloseReason) {
        if !self.is_closed() {
            self.state = State::Closed(reason.clone());
            self.events.push_back(Event::Closed(reason));
        }
    }
}
