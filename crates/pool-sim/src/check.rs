//! The invariant checker, kept apart from the world so that it can be fed
//! planted violations in tests (a checker that cannot fail proves nothing).
//!
//! - [`StreamBook`]: every byte a stream reader gets is the next byte its
//!   writer wrote (a deterministic pattern per stream, direction and
//!   offset, so nothing is stored); FIN only after every written byte and
//!   only if written; a reset seen only if someone reset; and, at the end,
//!   liveness.
//! - [`NonceBook`]: no (key, nonce) pair sealed twice; see its docs for
//!   exactly what is compared.

use std::collections::BTreeMap;
use std::fmt;

/// Which invariant a violation broke (for counting by class).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A reader got bytes that are not the writer's next bytes, or a FIN or
    /// reset it should not have.
    Delivery,
    /// A (key, nonce) pair was sealed twice, or counters skipped.
    Nonce,
    /// A buffer a peer can fill went over its configured bound.
    Bound,
    /// A session closed for an undocumented reason, with no attacker bytes
    /// involved.
    Close,
    /// A session closed after attacker bytes reached it (unauthenticated
    /// input must cost a carrier, never a session).
    AttackerClose,
    /// An honest resume (no attacker bytes in it) failed while both sides
    /// were open.
    Resume,
    /// After healing, not everything written was delivered, or the session
    /// is not open with a carrier.
    Liveness,
    /// A snapshot did not restore, or did not round-trip.
    Snapshot,
    /// Timers did not advance (`poll_timeout` stuck in the past) or the
    /// network did not go quiet.
    Livelock,
    /// The core panicked.
    Panic,
    /// One owner: more than one of the servers (and a target's import)
    /// held the session neither frozen nor fenced, or a frozen source
    /// wrote a record.
    Owner,
    /// A fenced server wrote a record of the session, or answered a
    /// resume of it.
    Fence,
    /// Make-before-break: a handoff that did not commit left the session
    /// unusable at the source, or an honest step of a handoff failed.
    Handoff,
    /// Token single use: two commits for one token, a commit on attacker
    /// bytes, a replayed RESUME_HANDOFF answered, or the client's valid
    /// token refused.
    Token,
}

impl Kind {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Delivery => "delivery",
            Kind::Nonce => "nonce",
            Kind::Bound => "bound",
            Kind::Close => "close",
            Kind::AttackerClose => "attacker-close",
            Kind::Resume => "resume",
            Kind::Liveness => "liveness",
            Kind::Snapshot => "snapshot",
            Kind::Livelock => "livelock",
            Kind::Panic => "panic",
            Kind::Owner => "owner",
            Kind::Fence => "fence",
            Kind::Handoff => "handoff",
            Kind::Token => "token",
        }
    }
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub kind: Kind,
    /// What exactly.
    pub detail: String,
}

impl Violation {
    /// A violation of `kind`.
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Violation {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.detail)
    }
}

/// Direction of a stream or record: 0 client→server (session initiator to
/// responder), 1 server→client.
pub type Dir = usize;

/// Name of a direction for messages.
pub fn dir_name(d: Dir) -> &'static str {
    if d == 0 {
        "c->s"
    } else {
        "s->c"
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn salt(stream: u64, dir: Dir) -> u64 {
    mix(stream.wrapping_mul(2).wrapping_add(dir as u64) ^ 0x504F_4F4C)
}

/// Fills `out` with the pattern of `stream`/`dir` from byte `offset`: each
/// 8-byte word is a hash of its index, so a byte duplicated, dropped or
/// moved is caught.
pub fn fill_pattern(stream: u64, dir: Dir, offset: u64, out: &mut [u8]) {
    let s = salt(stream, dir);
    let mut off = offset;
    let mut i = 0;
    while i < out.len() {
        let word = mix((off / 8) ^ s).to_le_bytes();
        let start = (off % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        off += n as u64;
    }
}

/// Index of the first byte of `data` that differs from the pattern at
/// `offset`, if any.
pub fn pattern_mismatch(stream: u64, dir: Dir, offset: u64, data: &[u8]) -> Option<usize> {
    let mut buf = [0u8; 512];
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(buf.len());
        fill_pattern(stream, dir, offset + done as u64, &mut buf[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != data[done + i]) {
            return Some(done + i);
        }
        done += n;
    }
    None
}

/// One direction of one stream, as the simulator's applications saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirState {
    /// Bytes the writer's `stream_write` accepted.
    pub written: u64,
    /// The writer's FIN was accepted.
    pub fin_written: bool,
    /// Bytes the reader got.
    pub read: u64,
    /// The reader got the FIN.
    pub fin_read: bool,
    /// The reader stopped reading (`stream_stop`): no liveness owed.
    pub stopped: bool,
    /// Reads on this direction are rare until healing (fills windows).
    pub slow: bool,
}

/// A stream: both directions, and whether either side reset it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Index 0 client→server, 1 server→client.
    pub dirs: [DirState; 2],
    /// Reset by either side: nothing more is owed either way.
    pub reset: bool,
    /// Whether each side (0 client, 1 server) has learned of the stream.
    pub known: [bool; 2],
    /// Which side called `stream_reset`.
    pub reset_by: [bool; 2],
}

/// Every stream of the session, by id.
#[derive(Clone, Debug, Default)]
pub struct StreamBook {
    /// The streams, in id order.
    pub streams: BTreeMap<u64, StreamState>,
}

impl StreamBook {
    /// A stream was opened (by either side).
    pub fn opened(&mut self, id: u64) -> &mut StreamState {
        self.streams.entry(id).or_default()
    }

    /// The writer of `dir` had `n` more bytes accepted.
    pub fn wrote(&mut self, id: u64, dir: Dir, n: usize) {
        self.opened(id).dirs[dir].written += n as u64;
    }

    /// Checks and counts bytes a reader got.
    pub fn on_read(&mut self, id: u64, dir: Dir, data: &[u8]) -> Result<(), Violation> {
        let st = self.streams.get_mut(&id).ok_or_else(|| {
            Violation::new(
                Kind::Delivery,
                format!(
                    "{} bytes read on stream {id} that no one opened",
                    data.len()
                ),
            )
        })?;
        let d = &mut st.dirs[dir];
        if d.fin_read {
            return Err(Violation::new(
                Kind::Delivery,
                format!("stream {id} {}: data after FIN", dir_name(dir)),
            ));
        }
        let end = d.read + data.len() as u64;
        if end > d.written {
            return Err(Violation::new(
                Kind::Delivery,
                format!(
                    "stream {id} {}: read up to byte {end} but only {} were written",
                    dir_name(dir),
                    d.written
                ),
            ));
        }
        if let Some(i) = pattern_mismatch(id, dir, d.read, data) {
            return Err(Violation::new(
                Kind::Delivery,
                format!(
                    "stream {id} {}: byte {} is not the byte written there (read {} bytes from offset {})",
                    dir_name(dir),
                    d.read + i as u64,
                    data.len(),
                    d.read
                ),
            ));
        }
        d.read = end;
        Ok(())
    }

    /// Checks a FIN a reader got.
    pub fn on_fin(&mut self, id: u64, dir: Dir) -> Result<(), Violation> {
        let Some(st) = self.streams.get_mut(&id) else {
            return Err(Violation::new(
                Kind::Delivery,
                format!("FIN on stream {id} that no one opened"),
            ));
        };
        let d = &mut st.dirs[dir];
        if d.fin_read {
            return Ok(());
        }
        if !d.fin_written || d.read != d.written {
            return Err(Violation::new(
                Kind::Delivery,
                format!(
                    "stream {id} {}: FIN after {} bytes, but the writer wrote {} and {}",
                    dir_name(dir),
                    d.read,
                    d.written,
                    if d.fin_written {
                        "finished"
                    } else {
                        "never finished"
                    }
                ),
            ));
        }
        d.fin_read = true;
        Ok(())
    }

    /// Checks a reset a side reported (a read or write got `Reset`).
    pub fn on_reset_seen(&self, id: u64) -> Result<(), Violation> {
        if self.streams.get(&id).is_some_and(|s| s.reset) {
            Ok(())
        } else {
            Err(Violation::new(
                Kind::Delivery,
                format!("stream {id} reported reset, but neither side reset it"),
            ))
        }
    }

    /// Streams that `side` opened and may still hold: all it opened except
    /// those it reset and those finished both ways from its view (the core
    /// forgets those at once).
    pub fn local_held(&self, side: Dir) -> u64 {
        self.streams
            .iter()
            .filter(|(id, st)| {
                (**id & 1) as usize == side
                    && st.known[side]
                    && !st.reset_by[side]
                    && !(st.dirs[side].fin_written && st.dirs[1 - side].fin_read)
            })
            .count() as u64
    }

    /// Whether every byte and FIN owed has arrived.
    pub fn satisfied(&self) -> bool {
        self.first_unsatisfied().is_none()
    }

    /// The first stream direction still owed bytes or a FIN.
    pub fn first_unsatisfied(&self) -> Option<(u64, Dir, &DirState)> {
        for (id, st) in &self.streams {
            if st.reset {
                continue;
            }
            for (dir, d) in st.dirs.iter().enumerate() {
                if d.stopped {
                    continue;
                }
                if d.read < d.written || (d.fin_written && !d.fin_read) {
                    return Some((*id, dir, d));
                }
            }
        }
        None
    }

    /// Liveness: everything written (and not reset or stopped) was read.
    pub fn check_liveness(&self) -> Result<(), Violation> {
        match self.first_unsatisfied() {
            None => Ok(()),
            Some((id, dir, d)) => Err(Violation::new(
                Kind::Liveness,
                format!(
                    "stream {id} {}: {} of {} bytes delivered{}",
                    dir_name(dir),
                    d.read,
                    d.written,
                    if d.fin_written && !d.fin_read {
                        ", FIN written but not delivered"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Run {
    /// Next counter expected in this run.
    next: u64,
    /// Keys for this (direction, epoch) were installed again since the run
    /// began (a fresh handshake: different keys).
    reinstalled: bool,
    /// Runs seen for this (direction, epoch).
    runs: u32,
}

/// The nonce check.
///
/// Every data record (type 0x10) is observed as its sealer's
/// `poll_transmit` wrote it, before the attacker or the network touch it.
/// The AEAD nonce is (epoch, counter) from header bytes 4..8 and 8..16;
/// the key is the epoch's key for that direction. So the check is keyed on
/// (direction, epoch, counter), where direction is the *logical* sealer
/// (the session's initiator side or responder side, whichever process or
/// snapshot currently runs it): the two directions of an epoch have
/// distinct keys, and a restored session or a session handed to another
/// server seals under the same keys as its predecessor would.
///
/// Within one (direction, epoch) counters must run 0, 1, 2, ... with no
/// repeat and no gap. A second run starting again at 0 is allowed only if
/// the sealing side reported a new installation of that epoch
/// ([`NonceBook::installed`], from `Event::Rekeyed(epoch)`) after the
/// previous run began: every installation comes from a fresh Noise
/// handshake with fresh ephemerals, so the keys differ and the nonce space
/// is new. (The current core never installs one epoch number twice on one
/// side, so this allowance never triggers today; it exists because an
/// abandoned proposal may make a fixed core reuse an epoch number.)
#[derive(Clone, Debug, Default)]
pub struct NonceBook {
    runs: BTreeMap<(Dir, u32), Run>,
    /// Records checked.
    pub records: u64,
}

impl NonceBook {
    /// The sealer of `dir` installed keys for `epoch`.
    pub fn installed(&mut self, dir: Dir, epoch: u32) {
        if let Some(r) = self.runs.get_mut(&(dir, epoch)) {
            if r.next > 0 {
                r.reinstalled = true;
            }
        }
    }

    /// A data record the sealer of `dir` produced.
    pub fn sealed(&mut self, dir: Dir, epoch: u32, counter: u64) -> Result<(), Violation> {
        self.records += 1;
        let r = self.runs.entry((dir, epoch)).or_default();
        if counter == r.next {
            if counter == 0 {
                r.runs += 1;
            }
            r.next += 1;
            return Ok(());
        }
        if counter == 0 && r.reinstalled {
            r.reinstalled = false;
            r.runs += 1;
            r.next = 1;
            return Ok(());
        }
        if counter < r.next {
            return Err(Violation::new(
                Kind::Nonce,
                format!(
                    "{} sealed (epoch {epoch}, counter {counter}) twice under the same key (counter was at {})",
                    dir_name(dir),
                    r.next
                ),
            ));
        }
        Err(Violation::new(
            Kind::Nonce,
            format!(
                "{} sealed epoch {epoch} counter {counter}, expected {} (a gap: a record sealed unseen?)",
                dir_name(dir),
                r.next
            ),
        ))
    }

    /// Runs of one epoch that started again under re-installed keys.
    pub fn reinstalls(&self) -> u32 {
        self.runs.values().map(|r| r.runs.saturating_sub(1)).sum()
    }
}

/// Parses (epoch, counter) from a data record header.
pub fn record_nonce(rec: &[u8]) -> Option<(u32, u64)> {
    if rec.len() < 16 || rec[0] != 0x10 {
        return None;
    }
    let epoch = u32::from_be_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&rec[8..16]);
    Some((epoch, u64::from_be_bytes(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_consistent() {
        let mut a = vec![0u8; 1000];
        fill_pattern(4, 1, 13, &mut a);
        let mut b = vec![0u8; 500];
        fill_pattern(4, 1, 13 + 500, &mut b);
        assert_eq!(&a[500..], &b[..]);
        assert_eq!(pattern_mismatch(4, 1, 13, &a), None);
        assert!(pattern_mismatch(4, 0, 13, &a).is_some());
    }
}
