//! The application's operations on streams, drawn from the schedule: open, write, read, finish, reset, stop.

use super::*;

impl World {
    pub(super) fn side(&mut self) -> usize {
        if self.rng.chance(1, 2) {
            CLIENT
        } else {
            self.srv
        }
    }

    pub(super) fn pick_stream(&mut self) -> Option<u64> {
        let live: Vec<u64> = self
            .book
            .streams
            .iter()
            .filter(|(_, s)| !s.reset)
            .map(|(id, _)| *id)
            .collect();
        if live.is_empty() {
            None
        } else {
            Some(live[self.rng.index(live.len())])
        }
    }

    /// Mostly the client or the owner; in a handoff schedule sometimes the
    /// other server, frozen or fenced (it must deliver nothing: a byte read
    /// there and again at the owner is a Delivery violation).
    pub(super) fn app_side(&mut self) -> usize {
        if self.handoffs_on && self.hrng.chance(1, 10) {
            let other = if self.srv == SERVER1 {
                SERVER2
            } else {
                SERVER1
            };
            if self.nodes[other].session.is_some() {
                return other;
            }
        }
        self.side()
    }

    pub(super) fn app_op(&mut self) -> R {
        let side = self.app_side();
        let owner = side == CLIENT || side == self.srv;
        if owner && !self.open(side) {
            return Ok(());
        }
        let mut op = self.rng.below(100);
        if !owner && !(8..=91).contains(&op) {
            // Only reads, writes and finishes at a server that is not the owner.
            op = 45;
        }
        let stream = self.pick_stream();
        let (Some(id), false) = (stream, op < 8 || stream.is_none()) else {
            return self.op_open(side);
        };
        if op > 84 && !self.book.streams[&id].known[Self::dir_of(side)] {
            // An application finishes, resets or stops only streams it has
            // seen (a frozen session would hold the call without knowing).
            return Ok(());
        }
        match op {
            8..=44 => self.op_write(side, id),
            45..=84 => {
                let max = self.rng.pick(&[64, 4096, 65536]);
                self.op_read(side, id, max)
            }
            85..=91 => self.op_finish(side, id),
            92..=95 => self.op_reset(side, id),
            _ => self.op_stop(side, id),
        }
    }

    pub(super) fn session_mut(&mut self, node: usize) -> &mut Session {
        match self.nodes[node].session.as_mut() {
            Some(s) => s,
            None => unreachable!("node {node} has no session"),
        }
    }

    pub(super) fn op_open(&mut self, side: usize) -> R {
        let name = self.nodes[side].name;
        match self.session_mut(side).open_stream() {
            Ok(id) => {
                let slow = [self.rng.chance(1, 5), self.rng.chance(1, 5)];
                let st = self.book.opened(id);
                st.known[Self::dir_of(side)] = true;
                st.dirs[0].slow = slow[0];
                st.dirs[1].slow = slow[1];
                self.log(format!("{name} opens stream {id} (slow readers {slow:?})"));
            }
            Err(e) => self.log(format!("{name} open_stream: {e}")),
        }
        self.after_input(side)
    }

    pub(super) fn stream_err(&mut self, who: &str, id: u64, e: StreamError) -> R {
        if let StreamError::Reset(_) = e {
            self.book.on_reset_seen(id)?;
        }
        self.log(format!("{who} stream {id}: {e}"));
        Ok(())
    }

    pub(super) fn op_write(&mut self, side: usize, id: u64) -> R {
        let dir = Self::dir_of(side);
        let d = &self.book.streams[&id].dirs[dir];
        if d.fin_written {
            return Ok(());
        }
        let off = d.written;
        let max = self.rng.pick(&[100, 2000, 20000]);
        let len = self.rng.range(1, max) as usize;
        let mut data = std::mem::take(&mut self.scratch);
        // Half the writes (odd lengths, so the schedule's random draws stay
        // as they were) fill the replay buffer in place, the way a bridge
        // reads its socket into it; the source then runs dry after `len`.
        let r = if len % 2 == 1 {
            self.session_mut(side).stream_write_with(id, len, |rooms| {
                let mut given = 0usize;
                for room in rooms.iter_mut() {
                    let n = room.len().min(len - given);
                    fill_pattern(id, dir, off + given as u64, &mut room[..n]);
                    given += n;
                }
                given
            })
        } else {
            fill_pattern(id, dir, off, &mut data[..len]);
            self.session_mut(side).stream_write(id, &data[..len])
        };
        self.scratch = data;
        let name = self.nodes[side].name;
        match r {
            Ok(n) => {
                self.book.wrote(id, dir, n);
                self.log(format!(
                    "{name} writes {n}/{len} bytes on stream {id} at {off}"
                ));
            }
            Err(e) => self.stream_err(&format!("{name} write"), id, e)?,
        }
        self.after_input(side)
    }

    /// One read; returns whether it made progress.
    pub(super) fn op_read_once(
        &mut self,
        side: usize,
        id: u64,
        max: usize,
    ) -> Result<bool, Violation> {
        let dir = 1 - Self::dir_of(side);
        let mut out = std::mem::take(&mut self.scratch);
        let r = self.session_mut(side).stream_read(id, &mut out[..max]);
        let name = self.nodes[side].name;
        let fenced = self.nodes[side].fenced;
        let res = match r {
            Ok(ReadResult::Data(n)) if fenced && n > 0 && self.opts.lenient_handoff => {
                // Finding 9: a fenced session still hands out what it had
                // buffered at the freeze (the target delivers it too).
                if self.stats.fenced_reads == 0 {
                    self.log(format!(
                        "lenient: {name}, fenced, returned {n} bytes on stream {id} (not counted as delivered)"
                    ));
                }
                self.stats.fenced_reads += n as u64;
                Ok(false)
            }
            Ok(ReadResult::Fin) if fenced && self.opts.lenient_handoff => Ok(false),
            Ok(ReadResult::Data(n)) => {
                if self.opts.plant == Some(Plant::CorruptDelivery) && !self.planted && n > 0 {
                    self.planted = true;
                    out[n / 2] ^= 0x20;
                }
                let off = self.book.streams.get(&id).map_or(0, |s| s.dirs[dir].read);
                let r = self.book.on_read(id, dir, &out[..n]);
                self.stats.bytes_read += n as u64;
                if !self.healing || r.is_err() {
                    self.log(format!("{name} reads {n} bytes on stream {id} at {off}"));
                }
                r.map(|()| n > 0)
            }
            Ok(ReadResult::Fin) => {
                let fresh = !self
                    .book
                    .streams
                    .get(&id)
                    .is_some_and(|s| s.dirs[dir].fin_read);
                if fresh {
                    self.log(format!("{name} reads FIN on stream {id}"));
                }
                self.book.on_fin(id, dir).map(|()| fresh)
            }
            Ok(ReadResult::Blocked) => Ok(false),
            Err(StreamError::Unknown(_)) | Err(StreamError::SessionClosed(_)) => Ok(false),
            Err(e) => self
                .stream_err(&format!("{name} read"), id, e)
                .map(|()| false),
        };
        self.scratch = out;
        let res = res?;
        self.after_input(side)?;
        Ok(res)
    }

    pub(super) fn op_read(&mut self, side: usize, id: u64, max: usize) -> R {
        let dir = 1 - Self::dir_of(side);
        let d = &self.book.streams[&id].dirs[dir];
        if d.stopped || d.fin_read || (d.slow && !self.rng.chance(1, 10)) {
            return Ok(());
        }
        self.op_read_once(side, id, max).map(|_| ())
    }

    pub(super) fn op_finish(&mut self, side: usize, id: u64) -> R {
        let dir = Self::dir_of(side);
        if self.book.streams[&id].dirs[dir].fin_written {
            return Ok(());
        }
        let name = self.nodes[side].name;
        match self.session_mut(side).stream_finish(id) {
            Ok(()) => {
                self.book.opened(id).dirs[dir].fin_written = true;
                self.log(format!("{name} finishes stream {id}"));
            }
            Err(e) => self.stream_err(&format!("{name} finish"), id, e)?,
        }
        self.after_input(side)
    }

    pub(super) fn op_reset(&mut self, side: usize, id: u64) -> R {
        let name = self.nodes[side].name;
        let code = self.rng.below(100);
        match self.session_mut(side).stream_reset(id, code) {
            Ok(()) => {
                let st = self.book.opened(id);
                st.reset = true;
                st.reset_by[Self::dir_of(side)] = true;
                self.log(format!("{name} resets stream {id} (code {code})"));
            }
            Err(e) => self.stream_err(&format!("{name} reset"), id, e)?,
        }
        self.after_input(side)
    }

    pub(super) fn op_stop(&mut self, side: usize, id: u64) -> R {
        let name = self.nodes[side].name;
        let wdir = Self::dir_of(side);
        if !self.book.streams[&id].known[wdir] {
            // Not opened on this side yet: stream_stop would do nothing.
            return Ok(());
        }
        let s = self.session_mut(side);
        let _ = s.stream_stop(id);
        // stream_stop also finishes our sending side if it can: ask again
        // (idempotent) to learn whether it did.
        let fin = match s.stream_finish(id) {
            Ok(()) => true,
            Err(StreamError::Unknown(_)) => !self.book.streams[&id].reset,
            Err(_) => false,
        };
        let st = self.book.opened(id);
        st.dirs[1 - wdir].stopped = true;
        if fin {
            st.dirs[wdir].fin_written = true;
        }
        self.log(format!(
            "{name} stops reading stream {id} (own side finished: {fin})"
        ));
        self.after_input(side)
    }

    // ---- network ----
}
