//! `snapshot()` / `restore()`: a session's whole state as bytes, so that a
//! live session can be handed to another process or server.
//!
//! The snapshot holds the chaining secret: it is as sensitive as a private
//! key. Whoever moves it must encrypt it to the receiving server (a later
//! layer does). Epoch keys are *not* included: a restored session has no
//! carrier and continues with a resume, which starts a fresh epoch.

use std::collections::VecDeque;
use std::time::Instant;

use zeroize::Zeroizing;

use super::{Role, Session, SessionId};
use crate::config::Config;
use crate::crypto::CipherSuite;
use crate::error::WireError;
use crate::keys::PublicKey;
use crate::wire::Reader;

const MAGIC: &[u8; 8] = b"POOLSNP3";
/// The version before, without the handoff section; still restored.
const MAGIC_V2: &[u8; 8] = b"POOLSNP2";

/// A snapshot could not be restored.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Not a POOL session snapshot, or another version.
    #[error("not a POOL session snapshot")]
    Magic,
    /// Truncated or inconsistent.
    #[error("corrupt session snapshot: {0}")]
    Corrupt(#[from] WireError),
    /// A field has an impossible value.
    #[error("corrupt session snapshot: {0}")]
    Invalid(&'static str),
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

fn read_vec(r: &mut Reader<'_>) -> Result<Vec<u8>, WireError> {
    let n = r.u32()? as usize;
    Ok(r.bytes(n)?.to_vec())
}

impl Session {
    /// The session's state as bytes (see the module docs for what is in
    /// it). Take it between inputs; the session itself is unchanged.
    pub fn snapshot(&self) -> Zeroizing<Vec<u8>> {
        let mut w = W(Vec::with_capacity(256 + self.send.bytes_len()));
        w.0.extend_from_slice(MAGIC);
        w.u8(match self.role {
            Role::Initiator => 0,
            Role::Responder => 1,
        });
        w.0.extend_from_slice(&self.id.0);
        w.0.extend_from_slice(&self.local.0);
        w.0.extend_from_slice(&self.peer.0);
        w.u8(self.suite.bit());
        w.0.extend_from_slice(&*self.chain);
        w.u32(self.committed_epoch);
        w.u32(self.max_epoch);
        w.u32(self.rx_confirmed);
        w.u32(self.resume_floor);
        match &self.prev_chain {
            Some((e, c)) => {
                w.u8(1);
                w.u32(*e);
                w.0.extend_from_slice(&**c);
            }
            None => w.u8(0),
        }
        w.u64(self.peer_params.stream_window);
        w.u64(self.peer_params.session_window);
        w.u64(self.peer_params.max_streams);
        // Sequencing and the replay buffer.
        w.u64(self.recv_next);
        w.u64(self.send.base_seq);
        w.u64(self.send.sent_hw);
        w.u32(self.send.lens.len() as u32);
        let mut off = 0;
        for &len in &self.send.lens {
            let mut frame = vec![0u8; len as usize];
            self.send.copy_out(off, &mut frame);
            off += len as usize;
            w.bytes(&frame);
        }
        // Flow control.
        for v in [
            self.send_max_data,
            self.data_sent,
            self.recv_max_data,
            self.recv_data,
            self.recv_consumed,
            self.next_local_index,
            self.next_peer_index,
            self.peer_max_streams,
            self.local_max_streams,
            self.peer_streams_closed,
        ] {
            w.u64(v);
        }
        // Streams, in id order so snapshots are deterministic.
        let mut ids: Vec<_> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        w.u32(ids.len() as u32);
        for id in ids {
            let Some(st) = self.streams.get(&id) else {
                continue;
            };
            w.u64(id);
            let flags = u8::from(st.fin_queued)
                | u8::from(st.fin_received) << 1
                | u8::from(st.fin_read) << 2
                | u8::from(st.discarding) << 3
                | u8::from(st.reset.is_some()) << 4
                | u8::from(st.reset_unsent) << 5;
            w.u8(flags);
            for v in [
                st.send_max,
                st.sent,
                st.recv_total,
                st.recv_consumed,
                st.recv_max,
                st.reset.unwrap_or(0),
            ] {
                w.u64(v);
            }
            let (a, b) = st.recv_buf.as_slices();
            w.u32((a.len() + b.len()) as u32);
            w.0.extend_from_slice(a);
            w.0.extend_from_slice(b);
        }
        // Counters worth keeping across a handoff.
        let s = &self.stats;
        for v in [
            s.bytes_sent,
            s.bytes_received,
            s.records_sent,
            s.records_received,
            s.frames_sent,
            s.frames_received,
            s.stream_bytes_sent,
            s.stream_bytes_received,
            s.frames_resent,
            s.duplicates_dropped,
            s.rekeys,
            s.resumes,
            s.streams_opened,
        ] {
            w.u64(v);
        }
        // v3: the client's unconfirmed move and origin, so that a client
        // restored mid-handoff can still go back to the source.
        match self.unconfirmed_move {
            Some((from, epoch)) => {
                w.0.push(1);
                w.0.extend_from_slice(&from.0);
                w.u32(epoch);
            }
            None => w.0.push(0),
        }
        match self.origin {
            Some(k) => {
                w.0.push(1);
                w.0.extend_from_slice(&k.0);
            }
            None => w.0.push(0),
        }
        // FINs that wait for room in the replay buffer (of streams that
        // are still there: one reset meanwhile needs no FIN).
        let mut held: Vec<u64> = self
            .held_fins
            .iter()
            .copied()
            .filter(|id| self.streams.contains_key(id))
            .collect();
        held.sort_unstable();
        held.dedup();
        w.u32(held.len() as u32);
        for id in held {
            w.u64(id);
        }
        Zeroizing::new(w.0)
    }

    /// Rebuilds a session from [`Session::snapshot`] bytes. It has no
    /// carrier: an initiator continues with [`Session::start_resume`], a
    /// responder waits for the peer's RESUME. `config` is this node's.
    pub fn restore(now: Instant, config: Config, bytes: &[u8]) -> Result<Session, SnapshotError> {
        let mut r = Reader::new(bytes);
        let magic = r.bytes(8)?;
        let v3 = magic == MAGIC;
        if !v3 && magic != MAGIC_V2 {
            return Err(SnapshotError::Magic);
        }
        let role = match r.u8()? {
            0 => Role::Initiator,
            1 => Role::Responder,
            _ => return Err(SnapshotError::Invalid("role")),
        };
        let id = SessionId(r.array()?);
        let local = PublicKey(r.array()?);
        let peer = PublicKey(r.array()?);
        let suite = CipherSuite::from_bit(r.u8()?).ok_or(SnapshotError::Invalid("cipher"))?;
        let chain: [u8; 32] = r.array()?;
        let mut s = Session::blank(now, role, config, local, peer, id, suite);
        s.chain = Zeroizing::new(chain);
        s.committed_epoch = r.u32()?;
        s.max_epoch = r.u32()?;
        s.rx_confirmed = r.u32()?;
        s.resume_floor = r.u32()?;
        s.prev_chain = match r.u8()? {
            0 => None,
            1 => {
                let e = r.u32()?;
                Some((e, Zeroizing::new(r.array()?)))
            }
            _ => return Err(SnapshotError::Invalid("previous chain flag")),
        };
        s.peer_params.stream_window = r.u64()?;
        s.peer_params.session_window = r.u64()?;
        s.peer_params.max_streams = r.u64()?;
        s.recv_next = r.u64()?;
        s.send.base_seq = r.u64()?;
        s.send.sent_hw = r.u64()?;
        let frames = r.u32()?;
        for _ in 0..frames {
            let f = read_vec(&mut r)?;
            s.send.push(&[&f]);
        }
        s.send_max_data = r.u64()?;
        s.data_sent = r.u64()?;
        s.recv_max_data = r.u64()?;
        s.recv_data = r.u64()?;
        s.recv_consumed = r.u64()?;
        s.next_local_index = r.u64()?;
        s.next_peer_index = r.u64()?;
        s.peer_max_streams = r.u64()?;
        s.local_max_streams = r.u64()?;
        s.peer_streams_closed = r.u64()?;
        let n = r.u32()?;
        for _ in 0..n {
            let id = r.u64()?;
            let flags = r.u8()?;
            let mut st = s.new_stream_state();
            st.fin_queued = flags & 1 != 0;
            st.fin_received = flags & 2 != 0;
            st.fin_read = flags & 4 != 0;
            st.discarding = flags & 8 != 0;
            st.send_max = r.u64()?;
            st.sent = r.u64()?;
            st.recv_total = r.u64()?;
            st.recv_consumed = r.u64()?;
            st.recv_max = r.u64()?;
            let code = r.u64()?;
            st.reset = (flags & 16 != 0).then_some(code);
            st.reset_unsent = flags & 32 != 0;
            if st.reset_unsent {
                if st.reset.is_none() {
                    return Err(SnapshotError::Invalid("unsent reset without a code"));
                }
                s.pending_resets.push_back(id);
            }
            let len = r.u32()? as usize;
            st.recv_buf = VecDeque::from(r.bytes(len)?.to_vec());
            if s.streams.insert(id, st).is_some() {
                return Err(SnapshotError::Invalid("a stream listed twice"));
            }
        }
        let st = &mut s.stats;
        for v in [
            &mut st.bytes_sent,
            &mut st.bytes_received,
            &mut st.records_sent,
            &mut st.records_received,
            &mut st.frames_sent,
            &mut st.frames_received,
            &mut st.stream_bytes_sent,
            &mut st.stream_bytes_received,
            &mut st.frames_resent,
            &mut st.duplicates_dropped,
            &mut st.rekeys,
            &mut st.resumes,
            &mut st.streams_opened,
        ] {
            *v = r.u64()?;
        }
        if v3 {
            if r.u8()? == 1 {
                let from = PublicKey(r.array()?);
                s.unconfirmed_move = Some((from, r.u32()?));
            }
            if r.u8()? == 1 {
                s.origin = Some(PublicKey(r.array()?));
            }
            let n = r.u32()? as usize;
            if n > s.streams.len() {
                return Err(SnapshotError::Invalid("more held FINs than streams"));
            }
            for _ in 0..n {
                let id = r.u64()?;
                if !s.streams.contains_key(&id) {
                    return Err(SnapshotError::Invalid("held FIN of an unknown stream"));
                }
                s.held_fins.push(id);
            }
        }
        if !r.is_empty() {
            return Err(SnapshotError::Invalid("trailing bytes"));
        }
        s.validate()?;
        s.mark_detached(now);
        Ok(s)
    }

    /// Checks every invariant the rest of the session relies on, so that
    /// a corrupt or hostile snapshot is refused instead of underflowing a
    /// counter or indexing out of bounds later.
    fn validate(&self) -> Result<(), SnapshotError> {
        use SnapshotError::Invalid;
        let q = &self.send;
        if q.sent_hw > q.next_seq() || q.base_seq > q.sent_hw {
            return Err(Invalid("replay buffer positions"));
        }
        let mut off = 0usize;
        for &len in &q.lens {
            let mut frame = vec![0u8; len as usize];
            q.copy_out(off, &mut frame);
            off += len as usize;
            let mut fr = Reader::new(&frame);
            match crate::wire::decode_frame(&mut fr) {
                Ok(f) if f.is_sequenced() && fr.is_empty() => {}
                _ => return Err(Invalid("a frame in the replay buffer")),
            }
        }
        if self.committed_epoch > self.max_epoch
            || self.rx_confirmed > self.committed_epoch
            || self.resume_floor > self.max_epoch
        {
            return Err(Invalid("epoch numbers"));
        }
        if let Some((e, _)) = &self.prev_chain {
            if *e >= self.committed_epoch {
                return Err(Invalid("previous epoch"));
            }
        }
        if self.rx_confirmed != self.committed_epoch
            && self.prev_chain.as_ref().map(|(e, _)| *e) != Some(self.rx_confirmed)
        {
            return Err(Invalid("no chaining secret for the confirmed epoch"));
        }
        if self.data_sent > self.send_max_data
            || self.recv_consumed > self.recv_data
            || self.recv_data > self.recv_max_data
        {
            return Err(Invalid("session flow control"));
        }
        let (local_bit, peer_bit) = match self.role {
            Role::Initiator => (0, 1),
            Role::Responder => (1, 0),
        };
        if self.next_local_index > (1 << 61) || self.next_peer_index > (1 << 61) {
            return Err(Invalid("stream counts"));
        }
        for (&id, st) in &self.streams {
            let index = id >> 1;
            let ok = if id & 1 == local_bit {
                index < self.next_local_index
            } else {
                id & 1 == peer_bit && index < self.next_peer_index
            };
            if !ok {
                return Err(Invalid("a stream id never opened"));
            }
            let buffered = st.recv_buf.len() as u64;
            if st.sent > st.send_max
                || st.recv_consumed > st.recv_total
                || st.recv_total > st.recv_max
                || st.recv_consumed + buffered > st.recv_total
            {
                return Err(Invalid("stream flow control"));
            }
        }
        Ok(())
    }
}
