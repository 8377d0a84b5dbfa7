//! Sequenced frames not yet acknowledged: the replay buffer, which is also
//! the send queue.

use std::collections::VecDeque;

/// Sequenced frames not yet acknowledged: the replay buffer, which is also
/// the send queue. Frames are stored encoded, back to back, in one ring.
#[derive(Debug)]
pub(super) struct SendQueue {
    pub(super) bytes: VecDeque<u8>,
    pub(super) lens: VecDeque<u32>,
    /// Sequence number of `lens[0]`.
    pub(super) base_seq: u64,
    /// Index in `lens` of the next frame to put on the carrier.
    pub(super) tx_index: usize,
    /// Byte offset of that frame.
    pub(super) tx_offset: usize,
    /// One past the highest sequence number ever put on a carrier.
    pub(super) sent_hw: u64,
    pub(super) cap: usize,
}

impl SendQueue {
    pub(super) fn new(cap: usize) -> Self {
        SendQueue {
            bytes: VecDeque::new(),
            lens: VecDeque::new(),
            base_seq: 0,
            tx_index: 0,
            tx_offset: 0,
            sent_hw: 0,
            cap,
        }
    }
    pub(super) fn next_seq(&self) -> u64 {
        self.base_seq + self.lens.len() as u64
    }
    pub(super) fn tx_next(&self) -> u64 {
        self.base_seq + self.tx_index as u64
    }
    pub(super) fn space(&self) -> usize {
        self.cap.saturating_sub(self.bytes.len())
    }
    pub(super) fn push(&mut self, parts: &[&[u8]]) {
        let mut len = 0;
        for p in parts {
            self.bytes.extend(p.iter());
            len += p.len();
        }
        self.lens.push_back(len as u32);
    }
    /// Drops frames below `next`; returns bytes freed.
    pub(super) fn ack(&mut self, next: u64) -> usize {
        let mut freed = 0;
        while self.base_seq < next {
            let Some(len) = self.lens.pop_front() else {
                break;
            };
            let len = len as usize;
            self.bytes.drain(..len);
            freed += len;
            self.base_seq += 1;
            if self.tx_index > 0 {
                self.tx_index -= 1;
                self.tx_offset -= len;
            }
        }
        freed
    }
    /// Puts the transmit position back to the first unacknowledged frame
    /// (after a resume); returns how many frames will be sent again.
    pub(super) fn rewind(&mut self) -> u64 {
        // Counted from the high-water mark, not `tx_index`: a restored
        // session starts with `tx_index` at 0 but has sent up to `sent_hw`.
        let again = self
            .sent_hw
            .saturating_sub(self.base_seq)
            .min(self.lens.len() as u64);
        self.tx_index = 0;
        self.tx_offset = 0;
        again
    }
    pub(super) fn copy_out(&self, start: usize, out: &mut [u8]) {
        let (a, b) = self.bytes.as_slices();
        let mut done = 0;
        if start < a.len() {
            let n = (a.len() - start).min(out.len());
            out[..n].copy_from_slice(&a[start..start + n]);
            done = n;
        }
        if done < out.len() {
            let s = start + done - a.len();
            let n = out.len() - done;
            out[done..].copy_from_slice(&b[s..s + n]);
        }
    }
}
