//! Sequenced frames not yet acknowledged: the replay buffer, which is also
//! the send queue.
//!
//! The frames are stored encoded, back to back, in one byte ring. A writer
//! can fill frames' bodies in place ([`SendQueue::fill_frames`]): a bridge
//! reads from its socket straight into the replay buffer with one
//! vectored read for many frames, and the only copy left on the sending
//! side is the one into the record being sealed.

use std::collections::VecDeque;
use std::io::IoSliceMut;

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

    /// Fills up to `total` bytes of stream data in place, as frames of a
    /// `hdr_len`-byte header and up to `chunk` bytes each: lays the frames
    /// out behind the held bytes, hands `fill` their bodies' rooms in order
    /// (as many slices as the frames and the ring's wrap make), then writes
    /// each frame's header (`header(body_len, out)`) in front of the bytes
    /// `fill` says it wrote and queues the frames. Returns the bytes
    /// queued and the frames made.
    pub(super) fn fill_frames(
        &mut self,
        hdr_len: usize,
        chunk: usize,
        total: usize,
        mut header: impl FnMut(usize, &mut [u8]),
        fill: impl FnOnce(&mut [IoSliceMut<'_>]) -> usize,
    ) -> (usize, usize) {
        if total == 0 {
            return (0, 0);
        }
        let frames = total.div_ceil(chunk);
        self.reserve(frames * hdr_len + total);
        let size = self.ring.len();
        let tail = self.at(self.len);
        let filled = {
            // The free space behind the held bytes, in order: the ring from
            // the tail to its end, then from its start (when it wraps).
            let (lo, hi) = self.ring.split_at_mut(tail);
            let free_lo = if self.head <= tail { self.head } else { 0 };
            let hi_len = if self.head <= tail {
                size - tail
            } else {
                self.head - tail
            };
            let mut regions: [&mut [u8]; 2] = [&mut hi[..hi_len], &mut lo[..free_lo]];
            let mut slices: Vec<IoSliceMut<'_>> = Vec::with_capacity(frames + 1);
            for j in 0..frames {
                carve(&mut regions, hdr_len, None);
                carve(
                    &mut regions,
                    chunk.min(total - j * chunk),
                    Some(&mut slices),
                );
            }
            fill(&mut slices).min(total)
        };
        let mut done = 0;
        let mut made = 0;
        let mut hdr = [0u8; 17];
        while done < filled {
            let body = chunk.min(filled - done);
            header(body, &mut hdr[..hdr_len]);
            self.write_at(self.len, &hdr[..hdr_len]);
            self.len += hdr_len + body;
            self.lens.push_back((hdr_len + body) as u32);
            done += body;
            made += 1;
        }
        (filled, made)
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

/// Takes the next `n` bytes of `regions` (in order, moving on to the next
/// region when one is used up), as slices pushed to `out` if given.
fn carve<'a>(regions: &mut [&'a mut [u8]; 2], n: usize, mut out: Option<&mut Vec<IoSliceMut<'a>>>) {
    let mut n = n;
    let mut which = 0;
    while n > 0 {
        while regions[which].is_empty() {
            which += 1;
        }
        let r = std::mem::take(&mut regions[which]);
        let k = n.min(r.len());
        let (piece, rest) = r.split_at_mut(k);
        regions[which] = rest;
        if let Some(out) = out.as_deref_mut() {
            out.push(IoSliceMut::new(piece));
        }
        n -= k;
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
                // In place, as frames of at most 100 bytes; the source
                // gives all but the last 5 bytes.
                let give = body.len().saturating_sub(5).max(1);
                let (n, made) = q.fill_frames(
                    3,
                    100,
                    body.len(),
                    |len, out| out.copy_from_slice(&[1, 2, len as u8]),
                    |slices| {
                        let mut n = 0;
                        for s in slices.iter_mut() {
                            let k = s.len().min(give - n);
                            s[..k].copy_from_slice(&body[n..n + k]);
                            n += k;
                        }
                        n
                    },
                );
                assert_eq!(n, give);
                assert_eq!(made, give.div_ceil(100));
                for piece in body[..give].chunks(100) {
                    let mut f = vec![1, 2, piece.len() as u8];
                    f.extend_from_slice(piece);
                    model.push_back(f);
                }
            }
            if round % 3 == 0 && model.len() > 12 {
                seq += 10;
                q.ack(seq);
                model.drain(..10);
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
