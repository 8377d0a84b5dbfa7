//! Moving the virtual clock: advancing to a time, firing the nodes' timers, flushing what they queued.

use super::*;

impl World {
    /// Moves the clock to `target`, running every timer on the way.
    pub(super) fn advance_to(&mut self, target: Instant) -> R {
        let mut target = target;
        if self.green(Attack::RekeyRace) && self.nodes[CLIENT].resuming.is_some() {
            // No rekey may start while a resume is under way.
            let cap = [CLIENT, self.srv]
                .into_iter()
                .filter(|&n| {
                    self.nodes[n]
                        .session
                        .as_ref()
                        .is_some_and(|s| s.carrier_up())
                })
                .map(|n| self.nodes[n].epoch_started + self.lim.rekey_after)
                .min();
            if let Some(cap) = cap {
                if cap <= self.now + Duration::from_micros(1) {
                    return Ok(());
                }
                target = target.min(cap - Duration::from_micros(1));
            }
        }
        if target <= self.now {
            return Ok(());
        }
        let mut fired_now = 0;
        loop {
            let mut past: Option<Instant> = None;
            let mut next: Option<Instant> = None;
            for n in [CLIENT, self.srv, IMPORT] {
                if let Some(t) = self.nodes[n]
                    .session
                    .as_ref()
                    .and_then(|s| s.poll_timeout())
                {
                    if t <= self.now {
                        past = Some(t);
                    } else {
                        next = Some(next.map_or(t, |x| x.min(t)));
                    }
                }
            }
            for c in self.carriers.iter().filter(|c| c.alive) {
                for p in &c.pipes {
                    if let Some(u) = p.until.filter(|u| *u > self.now) {
                        next = Some(next.map_or(u, |x| x.min(u)));
                    }
                }
            }
            if let Some(u) = self.handoff_deadline().filter(|u| *u > self.now) {
                next = Some(next.map_or(u, |x| x.min(u)));
            }
            if let Some(t) = past {
                // Inputs at this instant may have armed a timer for it:
                // fire again, a few times, before calling it stuck.
                if fired_now < 3 {
                    self.fire_timers()?;
                    fired_now += 1;
                    continue;
                }
                // handle_timeout and the drain left a timer due: a runtime
                // would wake at once, again and again.
                let detail = self.stuck_detail(t);
                if !self.opts.lenient_timers {
                    return Err(Violation::new(Kind::Livelock, detail));
                }
                if self.stats.stuck_timers == 0 {
                    self.log(format!("lenient: ignoring stuck timer: {detail}"));
                }
                self.stats.stuck_timers += 1;
            }
            let Some(t) = next.filter(|t| *t <= target) else {
                break;
            };
            self.now = t;
            self.fire_timers()?;
            fired_now = 1;
        }
        self.now = target;
        self.fire_timers()
    }

    pub(super) fn stuck_detail(&self, t: Instant) -> String {
        let mut who = Vec::new();
        for n in [CLIENT, self.srv] {
            if let Some(s) = self.nodes[n].session.as_ref() {
                if s.poll_timeout() == Some(t) {
                    let st = s.stats();
                    who.push(format!(
                        "{} (carrier_up={}, epoch={}, pending={}, frames received={})",
                        self.nodes[n].name,
                        st.carrier_up,
                        st.epoch,
                        s.pending_bytes(),
                        st.frames_received
                    ));
                }
            }
        }
        format!(
            "poll_timeout of {} returns {:.3}ms (now {:.3}ms) even after handle_timeout and the drain",
            who.join(", "),
            ms(t - self.t0),
            ms(self.now - self.t0)
        )
    }

    pub(super) fn fire_timers(&mut self) -> R {
        for n in [CLIENT, self.srv, IMPORT] {
            if let Some(s) = self.nodes[n].session.as_mut() {
                s.handle_timeout(self.now);
            }
            self.after_input(n)?;
        }
        self.handoff_timers()?;
        if self.green(Attack::RekeyRace) {
            let due = [CLIENT, self.srv].into_iter().any(|n| {
                self.nodes[n]
                    .session
                    .as_ref()
                    .is_some_and(|s| s.carrier_up() && !s.is_closed())
                    && self.nodes[n].epoch_started + self.lim.rekey_after <= self.now
            });
            if due {
                // A timed rekey may have started: let it complete.
                self.flush()?;
            }
        }
        self.pump()
    }

    /// Releases every hold and delay and delivers everything.
    pub(super) fn flush(&mut self) -> R {
        for c in self.carriers.iter_mut().filter(|c| c.alive) {
            for p in &mut c.pipes {
                p.held = false;
                p.until = None;
            }
        }
        self.release_link();
        self.pump()
    }
}
