//! Sending: records out of the replay buffer and control frames.

use super::*;

// ---- sending ----
impl Session {
    /// Writes the next record for the carrier into `buf` and returns its
    /// length, or `None` when there is nothing to send. `buf` should hold
    /// [`crate::MAX_RECORD_LEN`] bytes; a smaller one gets smaller records.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if !self.carrier_up || self.tx.is_none() || self.frozen {
            return None;
        }
        let cap = buf.len().min(MAX_RECORD_LEN);
        if cap < DATA_OVERHEAD + 64 {
            return None;
        }
        if self.is_closed() {
            // Closed by a peer's fault (see `fail`): one last record, the CLOSE.
            return self.transmit_final_close(buf);
        }
        let body_start = RECORD_HEADER_LEN + DATA_PREFIX_LEN;
        let end = cap - TAG_LEN;
        let mut p = body_start;
        buf[p..p + 8].copy_from_slice(&self.send.tx_next().to_be_bytes());
        p += 8;
        let first = p;

        let has_frames = self.send.tx_index < self.send.lens.len();
        let close_now = match &self.pending_close {
            Some((_, _, urgent)) => *urgent || !has_frames,
            None => false,
        };
        let other = has_frames
            || close_now
            || self.ping_due
            || !self.pongs.is_empty()
            || self.out_key_update.is_some()
            || self.out_key_ack.is_some()
            || self.max_data_queued
            || self.max_streams_queued
            || self.paths_queued
            || self.offer_queued
            || self.decline_queued.is_some()
            || !self.max_stream_data_queue.is_empty();
        let ack_wanted = self.recv_next > self.ack_sent || self.ack_forced;
        if !ack_wanted {
            // Acknowledged by a piggybacked ack already: no timer left.
            self.ack_due = None;
        }
        let ack_due =
            self.unacked_bytes >= self.config.ack_every || self.ack_due.is_some_and(|d| d <= now);
        if ack_wanted && (other || ack_due) {
            p += Frame::Ack {
                next: self.recv_next,
            }
            .encode(&mut buf[p..]);
            self.ack_sent = self.recv_next;
            self.ack_forced = false;
            self.unacked_bytes = 0;
            self.ack_due = None;
        }
        let put = |buf: &mut [u8], p: &mut usize, f: &Frame<'_>| -> bool {
            if *p + f.encoded_len() > end {
                return false;
            }
            *p += f.encode(&mut buf[*p..]);
            true
        };
        if close_now {
            if let Some((code, reason, _)) = &self.pending_close {
                let f = Frame::Close {
                    code: code.to_u64(),
                    reason: reason.as_bytes(),
                };
                put(buf, &mut p, &f);
            }
        }
        if self.ping_due {
            let stamp = now.saturating_duration_since(self.start).as_micros() as u64;
            if put(buf, &mut p, &Frame::Ping { stamp }) {
                self.ping_due = false;
                self.ping_outstanding = true;
                self.last_ping_sent = now;
            }
        }
        while let Some(&stamp) = self.pongs.front() {
            if !put(buf, &mut p, &Frame::Pong { stamp }) {
                break;
            }
            self.pongs.pop_front();
        }
        if let Some((epoch, msg)) = &self.out_key_update {
            if put(buf, &mut p, &Frame::KeyUpdate { epoch: *epoch, msg }) {
                self.out_key_update = None;
            }
        }
        let mut switch_tx = None;
        if let Some(ack) = &self.out_key_ack {
            let f = match ack {
                KeyAck::Answer(epoch, msg, _) => Frame::KeyUpdateAck { epoch: *epoch, msg },
                KeyAck::Decline(epoch) => Frame::KeyUpdateAck {
                    epoch: *epoch,
                    msg: &[],
                },
            };
            if put(buf, &mut p, &f) {
                if let Some(KeyAck::Answer(_, _, k)) = self.out_key_ack.take() {
                    switch_tx = Some(*k);
                }
            }
        }
        if self.max_data_queued
            && put(
                buf,
                &mut p,
                &Frame::MaxData {
                    max: self.recv_max_data,
                },
            )
        {
            self.max_data_queued = false;
        }
        if self.max_streams_queued
            && put(
                buf,
                &mut p,
                &Frame::MaxStreams {
                    max: self.local_max_streams,
                },
            )
        {
            self.max_streams_queued = false;
        }
        if self.paths_queued
            && put(
                buf,
                &mut p,
                &Frame::Paths {
                    addrs: &self.local_paths,
                },
            )
        {
            self.paths_queued = false;
        }
        if self.offer_queued {
            if let Some(o) = &self.offer {
                let f = o.frame(now);
                if put(buf, &mut p, &f) {
                    self.offer_queued = false;
                }
            } else {
                self.offer_queued = false;
            }
        }
        if let Some((id, code)) = self.decline_queued {
            if put(buf, &mut p, &Frame::HandoffDecline { id, code }) {
                self.decline_queued = None;
            }
        }
        while let Some(&id) = self.max_stream_data_queue.front() {
            if let Some(st) = self.streams.get_mut(&id) {
                if st.max_update_queued
                    && !st.recv_done()
                    && !put(
                        buf,
                        &mut p,
                        &Frame::MaxStreamData {
                            id,
                            max: st.recv_max,
                        },
                    )
                {
                    break;
                }
                st.max_update_queued = false;
            }
            self.max_stream_data_queue.pop_front();
        }
        // Sequenced frames from the replay buffer, as many as fit.
        let tx_index_before = self.send.tx_index;
        while self.send.tx_index < self.send.lens.len() {
            let len = self.send.lens[self.send.tx_index] as usize;
            if p + len > end {
                break;
            }
            self.send
                .copy_out(self.send.tx_offset, &mut buf[p..p + len]);
            p += len;
            self.send.tx_index += 1;
            self.send.tx_offset += len;
        }
        self.send.sent_hw = self.send.sent_hw.max(self.send.tx_next());
        if p == first {
            return None;
        }

        let total = self.seal_record(buf, p)?;
        if self.send.tx_index > tx_index_before {
            self.last_data_at = now;
        }
        if self.awaiting_since.is_none() && self.owed_answer() {
            self.awaiting_since = Some(now);
        }
        if let Some(k) = switch_tx {
            self.tx = Some(k);
        }
        if close_now {
            if let Some((code, reason, _)) = self.pending_close.take() {
                if !self.is_closed() {
                    self.finish_close(CloseReason::Local { code, reason });
                }
            }
        }
        Some(total)
    }

    /// Seals the plaintext in `buf[RECORD_HEADER_LEN + DATA_PREFIX_LEN..end]`
    /// into a data record under the current epoch; returns its length.
    pub(super) fn seal_record(&mut self, buf: &mut [u8], end: usize) -> Option<usize> {
        let body_start = RECORD_HEADER_LEN + DATA_PREFIX_LEN;
        let tx = self.tx.as_mut()?;
        let body_len = DATA_PREFIX_LEN + (end - body_start) + TAG_LEN;
        wire::write_record_header(buf, RecordType::Data, body_len);
        buf[4..8].copy_from_slice(&tx.epoch.to_be_bytes());
        buf[8..16].copy_from_slice(&tx.counter.to_be_bytes());
        let (head, rest) = buf.split_at_mut(body_start);
        let Some(tag) = tx.seal(head, &mut rest[..end - body_start]) else {
            // Out of nonces without a new epoch: never reuse one.
            self.finish_close(CloseReason::Protocol(
                "nonce space exhausted before a rekey".into(),
            ));
            return None;
        };
        buf[end..end + TAG_LEN].copy_from_slice(&tag);
        let total = end + TAG_LEN;
        self.stats.records_sent += 1;
        self.stats.bytes_sent += total as u64;
        Some(total)
    }

    /// The record carrying the CLOSE frame queued by `fail`, and nothing
    /// else: after a failure no other frame goes out.
    pub(super) fn transmit_final_close(&mut self, buf: &mut [u8]) -> Option<usize> {
        let (code, reason, _) = self.pending_close.take()?;
        let f = Frame::Close {
            code: code.to_u64(),
            reason: reason.as_bytes(),
        };
        let mut p = RECORD_HEADER_LEN + DATA_PREFIX_LEN;
        if p + 8 + f.encoded_len() + TAG_LEN > buf.len().min(MAX_RECORD_LEN) {
            return None;
        }
        buf[p..p + 8].copy_from_slice(&self.send.tx_next().to_be_bytes());
        p += 8;
        p += f.encode(&mut buf[p..]);
        self.seal_record(buf, p)
    }

    /// Bytes of sequenced frames waiting for the carrier.
    pub fn pending_bytes(&self) -> usize {
        self.send.bytes_len() - self.send.tx_offset
    }
}
