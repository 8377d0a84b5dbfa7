//! Streams: the application's side (open, write, finish, reset, stop,
//! read) and close.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::time::Instant;

use super::*;

#[derive(Debug, Default)]
pub(super) struct StreamState {
    // Sending side.
    pub(super) send_max: u64,
    pub(super) sent: u64,
    pub(super) fin_queued: bool,
    // Receiving side.
    pub(super) recv_buf: VecDeque<u8>,
    pub(super) recv_total: u64,
    pub(super) recv_consumed: u64,
    pub(super) recv_max: u64,
    pub(super) fin_received: bool,
    pub(super) fin_read: bool,
    /// The application no longer reads: incoming data is dropped and credited.
    pub(super) discarding: bool,
    pub(super) reset: Option<u64>,
    /// Reset here, and the RESET_STREAM frame not yet queued.
    pub(super) reset_unsent: bool,
    pub(super) max_update_queued: bool,
}

impl StreamState {
    pub(super) fn recv_done(&self) -> bool {
        self.reset.is_some() || self.fin_read || (self.discarding && self.fin_received)
    }
    pub(super) fn send_done(&self) -> bool {
        self.reset.is_some() || self.fin_queued
    }
}

// ---- the application's side: streams and close ----
impl Session {
    pub(super) fn check_open(&self) -> Result<(), StreamError> {
        match &self.state {
            State::Closed(r) => Err(StreamError::SessionClosed(r.clone())),
            State::Closing => Err(StreamError::SessionClosed(CloseReason::Local {
                code: CloseCode::Normal,
                reason: "closing".into(),
            })),
            State::Open => Ok(()),
        }
    }

    /// Opens a stream. The peer learns of it at once (an empty STREAM
    /// frame), so protocols where the server speaks first work.
    pub fn open_stream(&mut self) -> Result<u64, StreamError> {
        self.check_open()?;
        if self.frozen {
            return Err(StreamError::Blocked);
        }
        if self.next_local_index >= self.peer_max_streams {
            self.stream_limit_blocked = true;
            return Err(StreamError::Limit);
        }
        let hdr_space = 17;
        if self.send.space() < hdr_space {
            return Err(StreamError::Blocked);
        }
        let bit = if self.role == Role::Initiator { 0 } else { 1 };
        let id = self.next_local_index * 2 + bit;
        self.next_local_index += 1;
        let st = self.new_stream_state();
        self.streams.insert(id, st);
        self.stats.streams_opened += 1;
        self.push_stream_frame(id, false, &[]);
        Ok(id)
    }

    pub(super) fn push_stream_frame(&mut self, id: u64, fin: bool, data: &[u8]) {
        let mut hdr = [0u8; 17];
        let n = wire::stream_header(id, fin, data.len(), &mut hdr);
        self.send.push(&[&hdr[..n], data]);
        self.stats.frames_sent += 1;
    }

    /// What a write on stream `id` may send now (stream and session credit),
    /// or why it may not write at all.
    fn write_credit(&mut self, id: u64) -> Result<u64, StreamError> {
        self.check_open()?;
        if self.frozen {
            // Waits for unfreeze (nothing moves) or for the runtime to
            // re-home the stream after the handoff.
            if !self.blocked.contains(&id) {
                self.blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        let st = self.streams.get(&id).ok_or(StreamError::Unknown(id))?;
        if let Some(code) = st.reset {
            return Err(StreamError::Reset(code));
        }
        if st.fin_queued {
            return Err(StreamError::Finished);
        }
        Ok((st.send_max - st.sent).min(self.send_max_data - self.data_sent))
    }

    /// Writes as much of `data` as flow control and the replay buffer
    /// allow; returns the count, or [`StreamError::Blocked`] if none
    /// (then wait for [`Event::StreamWritable`]).
    pub fn stream_write(&mut self, id: u64, data: &[u8]) -> Result<usize, StreamError> {
        let credit = self.write_credit(id)?;
        let mut written = 0usize;
        let mut left = (data.len() as u64).min(credit) as usize;
        while left > 0 {
            let space = self.send.space();
            if space <= 17 {
                break;
            }
            let n = left.min(MAX_STREAM_CHUNK).min(space - 17);
            self.push_stream_frame(id, false, &data[written..written + n]);
            written += n;
            left -= n;
        }
        if written == 0 && !data.is_empty() {
            if !self.blocked.contains(&id) {
                self.blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        if let Some(st) = self.streams.get_mut(&id) {
            st.sent += written as u64;
        }
        self.data_sent += written as u64;
        self.stats.stream_bytes_sent += written as u64;
        Ok(written)
    }

    /// Like [`Session::stream_write`], without a copy: `fill` gets room in
    /// the replay buffer for up to `max` bytes (as slices, in order: the
    /// bodies of the frames they will make), writes the stream's next
    /// bytes into them and returns how many it wrote; a bridge passes them
    /// to one vectored read of its socket. Returns the bytes written, which
    /// may be 0 when `fill` wrote nothing, or [`StreamError::Blocked`]
    /// without calling `fill` when there is no room or credit (then wait
    /// for [`Event::StreamWritable`]).
    pub fn stream_write_with(
        &mut self,
        id: u64,
        max: usize,
        fill: impl FnOnce(&mut [IoSliceMut<'_>]) -> usize,
    ) -> Result<usize, StreamError> {
        let credit = self.write_credit(id)?;
        let mut hdr = [0u8; 17];
        let hdr_len = wire::stream_header_fixed(id, 0, &mut hdr);
        // Keep the headroom `stream_write` keeps (a RESET_STREAM or FIN
        // frame still fits behind a full write): without it a full buffer
        // could hold reset streams past the peer's stream limit.
        let avail = self.send.space().saturating_sub(17);
        let per = MAX_STREAM_CHUNK + hdr_len;
        let fits = avail / per * MAX_STREAM_CHUNK + (avail % per).saturating_sub(hdr_len);
        let total = (max as u64).min(credit).min(fits as u64) as usize;
        if total == 0 {
            if max > 0 && !self.blocked.contains(&id) {
                self.blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        let (written, frames) = self.send.fill_frames(
            hdr_len,
            MAX_STREAM_CHUNK,
            total,
            |len, out| {
                let mut h = [0u8; 17];
                wire::stream_header_fixed(id, len, &mut h);
                out.copy_from_slice(&h[..out.len()]);
            },
            fill,
        );
        self.stats.frames_sent += frames as u64;
        if let Some(st) = self.streams.get_mut(&id) {
            st.sent += written as u64;
        }
        self.data_sent += written as u64;
        self.stats.stream_bytes_sent += written as u64;
        Ok(written)
    }

    /// Ends the sending side (FIN). Reading goes on until the peer's FIN.
    pub fn stream_finish(&mut self, id: u64) -> Result<(), StreamError> {
        self.check_open()?;
        if self.frozen {
            self.deferred.push(Deferred::Finish(id));
            return Ok(());
        }
        let st = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if let Some(code) = st.reset {
            return Err(StreamError::Reset(code));
        }
        if st.fin_queued {
            return Ok(());
        }
        if self.send.space() < 17 {
            if !self.blocked.contains(&id) {
                self.blocked.push(id);
            }
            return Err(StreamError::Blocked);
        }
        st.fin_queued = true;
        let done = st.recv_done();
        self.push_stream_frame(id, true, &[]);
        if done {
            self.forget(id);
        }
        Ok(())
    }

    /// Aborts the stream in both directions; the peer sees `code`.
    pub fn stream_reset(&mut self, id: u64, code: u64) -> Result<(), StreamError> {
        self.check_open()?;
        if self.frozen {
            self.deferred.push(Deferred::Reset(id, code));
            return Ok(());
        }
        let st = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if st.reset.is_some() {
            return Ok(());
        }
        st.reset = Some(code);
        st.reset_unsent = true;
        let unread = st.recv_buf.len() as u64;
        st.recv_buf = VecDeque::new();
        self.recv_consumed += unread;
        self.pending_resets.push_back(id);
        self.flush_resets();
        self.maybe_grant_session();
        Ok(())
    }

    /// Queues the RESET_STREAM frames of streams reset locally, as far as
    /// the replay buffer has room (it is bounded like every queue a peer
    /// can make grow: a peer that opens streams we reset and acknowledges
    /// nothing only fills it). A stream is forgotten, and its slot given
    /// back to the peer, once its frame is queued.
    pub(super) fn flush_resets(&mut self) {
        self.flush_held_fins();
        while let Some(&id) = self.pending_resets.front() {
            let Some(code) = self
                .streams
                .get(&id)
                .filter(|s| s.reset_unsent)
                .and_then(|s| s.reset)
            else {
                self.pending_resets.pop_front();
                continue;
            };
            let f = Frame::ResetStream { id, code };
            let mut tmp = [0u8; 24];
            let n = f.encode(&mut tmp);
            if self.send.space() < n {
                break;
            }
            self.send.push(&[&tmp[..n]]);
            self.stats.frames_sent += 1;
            self.pending_resets.pop_front();
            if let Some(st) = self.streams.get_mut(&id) {
                st.reset_unsent = false;
            }
            self.forget(id);
        }
    }

    /// FINs held while the session was frozen that found no room when it
    /// thawed: sent as room frees up, never dropped.
    fn flush_held_fins(&mut self) {
        if self.held_fins.is_empty() || self.frozen {
            return;
        }
        for id in std::mem::take(&mut self.held_fins) {
            if matches!(self.stream_finish(id), Err(StreamError::Blocked)) {
                self.held_fins.push(id);
            }
        }
    }

    /// The application will not read this stream any more: data that
    /// arrives is dropped and credited, so the peer is never blocked.
    /// Also finishes the sending side if it is still open.
    pub fn stream_stop(&mut self, id: u64) -> Result<(), StreamError> {
        if self.frozen {
            self.deferred.push(Deferred::Stop(id));
            return Ok(());
        }
        let Some(st) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        st.discarding = true;
        let unread = st.recv_buf.len() as u64;
        st.recv_consumed += unread;
        st.recv_buf = VecDeque::new();
        self.recv_consumed += unread;
        let fin_queued = st.fin_queued || st.reset.is_some();
        self.maybe_grant_session();
        self.maybe_grant_stream(id);
        if !fin_queued && !self.is_closed() {
            let _ = self.stream_finish(id);
        }
        if self
            .streams
            .get(&id)
            .is_some_and(|st| st.recv_done() && st.send_done())
        {
            self.forget(id);
        }
        Ok(())
    }

    /// Reads into `out`.
    pub fn stream_read(&mut self, id: u64, out: &mut [u8]) -> Result<ReadResult, StreamError> {
        self.stream_read_with(id, |a, b| {
            let na = out.len().min(a.len());
            out[..na].copy_from_slice(&a[..na]);
            let nb = (out.len() - na).min(b.len());
            out[na..na + nb].copy_from_slice(&b[..nb]);
            na + nb
        })
    }

    /// Like [`Session::stream_read`], without a copy: `f` gets the bytes
    /// waiting on the stream, in order, as two slices (the second may be
    /// empty), and returns how many of them it consumed (at most their
    /// total length). Returns [`ReadResult::Data`] with that count, which
    /// may be 0 when `f` takes nothing; `f` is called only when there are
    /// bytes to read.
    pub fn stream_read_with(
        &mut self,
        id: u64,
        f: impl FnOnce(&[u8], &[u8]) -> usize,
    ) -> Result<ReadResult, StreamError> {
        if self.frozen {
            return Ok(ReadResult::Blocked);
        }
        let closed = self.close_reason().cloned();
        let Some(st) = self.streams.get_mut(&id) else {
            if let Some(r) = closed {
                return Err(StreamError::SessionClosed(r));
            }
            return Err(StreamError::Unknown(id));
        };
        if let Some(code) = st.reset {
            return Err(StreamError::Reset(code));
        }
        if st.recv_buf.is_empty() {
            if st.fin_received {
                st.fin_read = true;
                if st.send_done() {
                    self.forget(id);
                }
                return Ok(ReadResult::Fin);
            }
            if let Some(r) = closed {
                return Err(StreamError::SessionClosed(r));
            }
            return Ok(ReadResult::Blocked);
        }
        let (a, b) = st.recv_buf.as_slices();
        let n = f(a, b).min(st.recv_buf.len());
        if n == 0 {
            return Ok(ReadResult::Data(0));
        }
        st.recv_buf.drain(..n);
        st.recv_consumed += n as u64;
        self.recv_consumed += n as u64;
        self.maybe_grant_stream(id);
        self.maybe_grant_session();
        Ok(ReadResult::Data(n))
    }

    /// Bytes waiting to be read on a stream.
    pub fn stream_readable_bytes(&self, id: u64) -> usize {
        self.streams.get(&id).map_or(0, |s| s.recv_buf.len())
    }

    /// Closes the session: queued stream data is sent first, then a CLOSE
    /// frame with `code` and `reason`.
    pub fn close(&mut self, now: Instant, code: CloseCode, reason: &str) {
        let _ = now;
        if self.is_closed() || self.pending_close.is_some() {
            return;
        }
        if self.frozen {
            self.deferred
                .push(Deferred::Close(code, reason.to_string()));
            return;
        }
        if !self.carrier_up {
            self.finish_close(CloseReason::Local {
                code,
                reason: reason.to_string(),
            });
            return;
        }
        let mut reason = reason.to_string();
        crate::error::truncate_utf8(&mut reason, 512);
        self.pending_close = Some((code, reason, false));
        self.state = State::Closing;
    }
}
