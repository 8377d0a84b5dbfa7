//! The bounds invariant: every queue and table a peer or the network can fill stays within its limit.

use super::*;

impl World {
    pub(super) fn check_bounds(&mut self) -> R {
        for n in [CLIENT, self.srv] {
            let Some(s) = self.nodes[n].session.as_ref() else {
                continue;
            };
            if s.is_closed() {
                continue;
            }
            let name = self.nodes[n].name;
            // Every queue the peer can make grow, against its bound.
            let z = s.debug_sizes();
            let peer_cap = self.lim.max_streams as usize;
            for (what, size, bound) in [
                (
                    "replay buffer bytes",
                    z.replay_bytes,
                    self.lim.replay_buffer,
                ),
                (
                    "receive buffer bytes",
                    z.recv_buffered,
                    self.lim.session_window as usize,
                ),
                ("peer-opened streams", z.peer_streams, peer_cap),
                ("pongs owed", z.pongs, 16),
                (
                    "stream credit updates",
                    z.max_stream_data_queue,
                    peer_cap + z.local_streams,
                ),
                ("blocked writers", z.blocked, peer_cap + z.local_streams),
                (
                    "resets waiting",
                    z.pending_resets,
                    peer_cap + z.local_streams,
                ),
            ] {
                if size > bound {
                    return Err(Violation::new(
                        Kind::Bound,
                        format!("{name}: {size} {what}, bound {bound} ({z:?})"),
                    ));
                }
            }
            let pending = s.pending_bytes();
            if pending > self.lim.replay_buffer {
                return Err(Violation::new(
                    Kind::Bound,
                    format!(
                        "{name}: {pending} bytes pending in the replay buffer, bound {}",
                        self.lim.replay_buffer
                    ),
                ));
            }
            let mut total = 0u64;
            for id in self.book.streams.keys() {
                let r = s.stream_readable_bytes(*id) as u64;
                if r > self.lim.stream_window {
                    return Err(Violation::new(
                        Kind::Bound,
                        format!(
                            "{name}: stream {id} buffers {r} unread bytes, stream window {}",
                            self.lim.stream_window
                        ),
                    ));
                }
                total += r;
            }
            if total > self.lim.session_window {
                return Err(Violation::new(
                    Kind::Bound,
                    format!(
                        "{name}: {total} unread bytes buffered, session window {}",
                        self.lim.session_window
                    ),
                ));
            }
            // Streams the peer opened are bounded by max_streams; the rest
            // are this side's own.
            let active = s.stats().streams_active;
            let own = self.book.local_held(Self::dir_of(n));
            // A frozen session holds its finishes, resets and stops (done
            // at unfreeze, or by the owner at the fence): its table, and the
            // owner's until the fence, lag the book.
            let held_ops = self.frozen(n) || self.fence_pending();
            // A stream stopped while frozen keeps its FIN, and its slot,
            // until the replay buffer has room for it (finding 13).
            let fins = s.debug_sizes().held_fins as u64;
            if !held_ops && active > self.lim.max_streams + own + fins {
                return Err(Violation::new(
                    Kind::Bound,
                    format!(
                        "{name}: {active} streams held, bound max_streams {} + {own} of its own",
                        self.lim.max_streams
                    ),
                ));
            }
        }
        for (cid, c) in self.carriers.iter().enumerate() {
            for (d, p) in c.pipes.iter().enumerate() {
                if c.alive && p.rx.len() > MAX_RECORD_LEN {
                    return Err(Violation::new(
                        Kind::Bound,
                        format!(
                            "carrier c{cid} {}: {} bytes delivered but not consumed",
                            dir_name(d),
                            p.rx.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    // ---- application ----
}
