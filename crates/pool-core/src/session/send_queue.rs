//! Sequenced frames not yet acknowledged: the replay buffer, which is also
//! the send queue.
//!
//! The frames are stored encoded, back to back, in one byte ring. A writer
//! can fill a frame's body in place ([`SendQueue::spare`] and
//! [`SendQueue::commit`]): a bridge reads from its socket straight into
//! the replay buffer, and the only copy left on the sending side is the
//! one into the record being sealed.

use std::collections::VecDeque;

/// The smallest ring the queue allocates.
const MIN_RING: usize = 4 << 10;

/// Sequenced frames not yet acknowledged: the replay buffer, which is also
/// the send queue.
#[derive(Debug)]
pub(super) struct SendQueue {
    /// The ring; its whole length is usable. Bytes `head..head + len`
    /// (wrapping) are the frames.
    ring: Vec<u8>,
    head: usize,
    len: usize,
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
            ring: Vec::new(),
            head: 0,
            len: 0,
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
    /// Bytes the queue may still take before it is full.
    pub(super) fn space(&self) -> usize {
        self.cap.saturating_sub(self.len)
    }
    /// Bytes of frames held.
    pub(super) fn bytes_len(&self) -> usize {
        self.len
    }
    /// Bytes of memory the ring holds.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.ring.len()
    }

    /// Index in the ring of logical position `pos` (0 = the first byte held).
    fn at(&self, pos: usize) -> usize {
        let i = self.head + pos;
        if i >= self.ring.len() {
            i - self.ring.len()
        } else {
            i
        }
    }

    /// Makes room for `extra` more bytes behind the ones held, growing the
    /// ring (and straightening it) when needed.
    fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.ring.len() {
            return;
        }
        let size = need.max(self.ring.len() * 2).max(MIN_RING);
        let mut ring = vec![0u8; size];
        self.copy_out(0, &mut ring[..self.len]);
        self.ring = ring;
        self.head = 0;
    }

    /// Writes `data` at logical position `pos`, which must be reserved.
    fn write_at(&mut self, pos: usize, data: &[u8]) {
        let i = self.at(pos);
        let first = data.len().min(self.ring.len() - i);
        self.ring[i..i + first].copy_from_slice(&data[..first]);
        self.ring[..data.len() - first].copy_from_slice(&data[first..]);
    }

    /// Appends one frame made of `parts`.
    pub(super) fn push(&mut self, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        self.reserve(total);
        let mut pos = self.len;
        for p in parts {
            self.write_at(pos, p);
            pos += p.len();
        }
        self.len += total;
        self.lens.push_back(total as u32);
    }

    /// Room for a frame of a `hdr`-byte header and up to `body` bytes:
    /// returns the contiguous part of the body's room (at least one byte,
    /// at most `body`; shorter only where the ring wraps). Fill a prefix of
    /// it, then [`SendQueue::commit`] the header and the body's length.
    pub(super) fn spare(&mut self, hdr: usize, body: usize) -> &mut [u8] {
        self.reserve(hdr + body);
        let i = self.at(self.len + hdr);
        let n = body.min(self.ring.len() - i);
        &mut self.ring[i..i + n]
    }

    /// Completes the frame whose body was filled in [`SendQueue::spare`]'s
    /// room: `header` goes in front of its first `body` bytes.
    pub(super) fn commit(&mut self, header: &[u8], body: usize) {
        self.write_at(self.len, header);
        let total = header.len() + body;
        self.len += total;
        self.lens.push_back(total as u32);
    }

    /// Drops frames below `next`; returns bytes freed.
    pub(super) fn ack(&mut self, next: u64) -> usize {
        let mut freed = 0;
        while self.base_seq < next {
            let Some(len) = self.lens.pop_front() else {
                break;
            };
            let len = len as usize;
            self.head = self.at(len);
            self.len -= len;
            freed += len;
            self.base_seq += 1;
            if self.tx_index > 0 {
                self.tx_index -= 1;
                self.tx_offset -= len;
            }
        }
        if self.len == 0 {
            self.head = 0;
        }
        freed
    }

    /// Gives the ring's memory back if it holds nothing and is large.
    pub(super) fn shrink_if_empty(&mut self, keep: usize) {
        if self.len == 0 && self.ring.len() > keep {
            self.ring = Vec::new();
            self.head = 0;
        }
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

    /// Copies the bytes at logical positions `start..start + out.len()`.
    pub(super) fn copy_out(&self, start: usize, out: &mut [u8]) {
        if out.is_empty() {
            return;
        }
        let i = self.at(start);
        let first = out.len().min(self.ring.len() - i);
        out[..first].copy_from_slice(&self.ring[i..i + first]);
        let rest = out.len() - first;
        out[first..].copy_from_slice(&self.ring[..rest]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(q: &SendQueue) -> Vec<Vec<u8>> {
        let mut off = 0;
        q.lens
            .iter()
            .map(|&l| {
                let mut f = vec![0u8; l as usize];
                q.copy_out(off, &mut f);
                off += l as usize;
                f
            })
            .collect()
    }

    #[test]
    fn frames_survive_wrapping_growth_and_acks() {
        let mut q = SendQueue::new(1 << 20);
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let mut seq = 0u64;
        let mut next_byte = 0u8;
        // Push and ack in a pattern that wraps the ring many times, with
        // both push and fill-in-place frames of sizes around the wrap.
        for round in 0..2000usize {
            let size = (round * 37) % 700 + 1;
            let body: Vec<u8> = (0..size)
                .map(|_| {
                    next_byte = next_byte.wrapping_add(1);
                    next_byte
                })
                .collect();
            if round % 2 == 0 {
                q.push(&[&[0xAA, 0xBB], &body]);
                let mut f = vec![0xAA, 0xBB];
                f.extend_from_slice(&body);
                model.push_back(f);
            } else {
                let room = q.spare(3, body.len());
                assert!(!room.is_empty() && room.len() <= body.len());
                let n = room.len();
                room.copy_from_slice(&body[..n]);
                q.commit(&[1, 2, 3], n);
                let mut f = vec![1, 2, 3];
                f.extend_from_slice(&body[..n]);
                model.push_back(f);
            }
            if round % 3 == 0 && model.len() > 4 {
                seq += 3;
                q.ack(seq);
                model.drain(..3);
            }
            assert_eq!(q.bytes_len(), model.iter().map(Vec::len).sum::<usize>());
        }
        assert_eq!(frames(&q), Vec::from(model));
        // The ring never had to grow far past what it held.
        assert!(q.capacity() <= 64 << 10, "ring grew to {}", q.capacity());
    }

    #[test]
    fn an_empty_queue_gives_its_memory_back() {
        let mut q = SendQueue::new(1 << 20);
        q.push(&[&[7u8; 100_000]]);
        assert!(q.capacity() >= 100_000);
        q.shrink_if_empty(64 << 10);
        assert!(q.capacity() >= 100_000, "not while it holds a frame");
        q.ack(1);
        q.shrink_if_empty(64 << 10);
        assert_eq!(q.capacity(), 0);
        q.push(&[&[1, 2, 3]]);
        assert_eq!(frames(&q), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn transmit_offsets_follow_acks() {
        let mut q = SendQueue::new(1 << 20);
        for i in 0..5u8 {
            q.push(&[&[i; 10]]);
        }
        q.tx_index = 3;
        q.tx_offset = 30;
        q.sent_hw = 3;
        assert_eq!(q.ack(2), 20);
        assert_eq!((q.tx_index, q.tx_offset, q.tx_next()), (1, 10, 3));
        let mut f = [0u8; 10];
        q.copy_out(q.tx_offset, &mut f);
        assert_eq!(f, [3; 10]);
        assert_eq!(q.rewind(), 1);
    }
}
