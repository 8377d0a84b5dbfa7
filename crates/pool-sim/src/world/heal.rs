//! The end of a schedule: the adversary stops, the network heals, and everything written must be delivered exactly once.

use super::*;

impl World {
    pub(super) fn healthy(&self) -> bool {
        let cp = self.nodes[CLIENT].primary;
        self.open(CLIENT)
            && self.open(self.srv)
            && cp.is_some()
            && cp == self.nodes[self.srv].primary
            && cp.is_some_and(|c| self.carriers[c].alive)
            && self.nodes[CLIENT].resuming.is_none()
            && [CLIENT, self.srv].iter().all(|&n| {
                self.nodes[n]
                    .session
                    .as_ref()
                    .is_some_and(|s| s.carrier_up())
            })
    }

    pub(super) fn read_all(&mut self) -> R {
        let ids: Vec<u64> = self.book.streams.keys().copied().collect();
        for id in ids {
            for dir in 0..2 {
                let reader = if dir == 0 { self.srv } else { CLIENT };
                for _ in 0..10_000 {
                    let st = &self.book.streams[&id];
                    let d = &st.dirs[dir];
                    if st.reset || d.stopped || d.fin_read || !self.open(reader) {
                        break;
                    }
                    if !self.op_read_once(reader, id, 64 << 10)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The adversary stops, carriers come back, everything written must
    /// arrive.
    pub(super) fn heal(&mut self) -> R {
        self.healing = true;
        self.log("HEAL: adversary off, holds released");
        self.flush()?;
        let tick = self.lim.ack_delay.max(Duration::from_millis(1)) * 2;
        for _ in 0..300 {
            if self.expired || !self.open(CLIENT) || !self.open(self.srv) {
                break;
            }
            let moved_before = self.stats.bytes_moved;
            if !self.healthy() {
                let alive: Vec<usize> = (0..self.carriers.len())
                    .filter(|&c| self.carriers[c].alive)
                    .collect();
                for c in alive {
                    self.kill(c, [true, true])?;
                }
                self.reconnect("heal")?;
                self.pump()?;
            }
            self.read_all()?;
            self.pump()?;
            if self.healthy() && self.book.satisfied() {
                break;
            }
            // Nothing moved: wait for the next timer, as a runtime would
            // (a carrier whose bytes were cut looks up until a keepalive
            // or the dead-after timer shows otherwise).
            let mut t = self.now + tick;
            if self.stats.bytes_moved == moved_before {
                if let Some(next) = [CLIENT, self.srv, IMPORT]
                    .iter()
                    .filter_map(|&n| self.nodes[n].session.as_ref()?.poll_timeout())
                    .chain(self.handoff_deadline())
                    .min()
                {
                    t = t.max(next);
                }
            }
            if self.frozen(self.client_peer()) {
                // The client is refused while its server is frozen: only
                // the handoff's end (a deadline) changes that.
                if let Some(d) = self.handoff_deadline() {
                    t = t.max(d);
                }
            }
            self.advance_to(t)?;
        }
        if self.expired {
            return Ok(());
        }
        for n in [CLIENT, self.srv] {
            if !self.open(n) {
                return Err(Violation::new(
                    Kind::Liveness,
                    format!(
                        "after healing the {} session is closed{}",
                        self.nodes[n].name,
                        self.taint_note()
                    ),
                ));
            }
        }
        if !self.healthy() {
            return Err(Violation::new(
                Kind::Liveness,
                format!(
                    "after healing the session has no working carrier (last resume error: {}){}",
                    self.last_resume_error.as_deref().unwrap_or("none"),
                    self.taint_note()
                ),
            ));
        }
        self.book.check_liveness().map_err(|mut v| {
            v.detail.push_str(&self.taint_note());
            v
        })?;
        self.check_bounds()?;
        self.log("HEAL: everything delivered, session open");
        Ok(())
    }
}
