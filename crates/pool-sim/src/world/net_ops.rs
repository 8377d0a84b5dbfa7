//! The network's and the clock's operations: carriers cut, opened, delayed; time; rekeys; snapshots and restores.

use super::*;

impl World {
    /// How much of a pipe gets through before a cut: nothing, all, or any
    /// byte offset (usually mid-record).
    pub(super) fn prefix_len(&mut self, cid: usize, dir: Dir) -> usize {
        let len = self.carriers[cid].pipes[dir].inflight.len();
        match self.rng.below(4) {
            0 => 0,
            1 => len,
            _ => self.rng.range(0, len as u64) as usize,
        }
    }

    pub(super) fn live_carriers(&self, with_data: bool) -> Vec<usize> {
        (0..self.carriers.len())
            .filter(|&c| {
                let c = &self.carriers[c];
                c.alive
                    && !c.attacker
                    && (!with_data || c.pipes.iter().any(|p| !p.inflight.is_empty()))
            })
            .collect()
    }

    pub(super) fn net_op(&mut self) -> R {
        if self.rng.chance(2, 3) {
            return self.pump();
        }
        let cs = self.live_carriers(true);
        if cs.is_empty() {
            return Ok(());
        }
        let cid = cs[self.rng.index(cs.len())];
        let dir = self.rng.index(2);
        if !self.carriers[cid].pipes[dir].deliverable(self.now) || self.mbb_held(cid, dir) {
            return Ok(());
        }
        let len = self.carriers[cid].pipes[dir].inflight.len();
        let n = self.rng.range(1, len as u64) as usize;
        self.log(format!(
            "deliver {n}/{len} bytes on c{cid} {}",
            dir_name(dir)
        ));
        self.deliver(cid, dir, n)
    }

    pub(super) fn time_op(&mut self) -> R {
        let target = self.pick_time();
        let d = target.saturating_duration_since(self.now);
        self.log(format!("time +{:.3}ms", ms(d)));
        self.advance_to(target)
    }

    pub(super) fn pick_time(&mut self) -> Instant {
        let now = self.now;
        if self.rng.chance(1, 2) {
            let unit = self.rng.pick(&[1u64, 1_000, 10_000, 100_000, 1_000_000]);
            return now + Duration::from_micros(self.rng.range(1, unit));
        }
        let l = self.lim;
        let mut cands = vec![now + l.keepalive, now + l.dead_after, now + l.ack_delay];
        if let Some(p) = l.probe_timeout {
            cands.push(now + p);
        }
        for n in [CLIENT, self.srv] {
            if let Some(t) = self.nodes[n]
                .session
                .as_ref()
                .and_then(|s| s.poll_timeout())
            {
                cands.push(t);
            }
            cands.push(self.nodes[n].epoch_started + l.rekey_after);
            if let Some(d) = self.nodes[n].down_since {
                // Past the resume deadline ends the schedule: rarely.
                if self.rng.chance(1, 8) {
                    cands.push(d + l.resume_deadline);
                }
            }
        }
        let base = cands[self.rng.index(cands.len())];
        let t = match self.rng.below(5) {
            0 => base.checked_sub(Duration::from_millis(1)).unwrap_or(base),
            1 => base.checked_sub(Duration::from_micros(1)).unwrap_or(base),
            2 => base,
            3 => base + Duration::from_micros(1),
            _ => base + Duration::from_millis(1),
        };
        t.max(now + Duration::from_micros(1))
    }

    pub(super) fn carrier_op(&mut self) -> R {
        match self.rng.below(10) {
            0..=2 => {
                let cs = self.live_carriers(false);
                if cs.is_empty() {
                    return Ok(());
                }
                let cid = cs[self.rng.index(cs.len())];
                let mut p0 = self.prefix_len(cid, 0);
                if self.mbb_held(cid, 0) {
                    p0 = 0;
                }
                let notify = [self.rng.chance(7, 10), self.rng.chance(7, 10)];
                self.log(format!(
                    "cut c{cid}: {p0}/{} bytes c->s get through; notified client={} server={}",
                    self.carriers[cid].pipes[0].inflight.len(),
                    notify[0],
                    notify[1]
                ));
                self.deliver(cid, 0, p0)?;
                if self.carriers[cid].alive {
                    let p1 = self.prefix_len(cid, 1);
                    self.log(format!(
                        "cut c{cid}: {p1}/{} bytes s->c get through",
                        self.carriers[cid].pipes[1].inflight.len()
                    ));
                    self.deliver(cid, 1, p1)?;
                }
                self.kill(cid, notify)
            }
            3 | 4 => {
                let cs = self.live_carriers(false);
                if cs.is_empty() {
                    return Ok(());
                }
                let cid = cs[self.rng.index(cs.len())];
                let dir = self.rng.index(2);
                let p = &mut self.carriers[cid].pipes[dir];
                if self.rng.chance(1, 2) {
                    p.held = !p.held;
                    let held = p.held;
                    self.log(format!("c{cid} {} held={held}", dir_name(dir)));
                } else {
                    let d = Duration::from_millis(self.rng.pick(&[1, 50, 1000, 3000]));
                    p.until = Some(self.now + d);
                    self.log(format!("c{cid} {} delayed {d:?}", dir_name(dir)));
                }
                Ok(())
            }
            5 => {
                self.log("release all holds and delays");
                self.flush()
            }
            _ => self.reconnect("path move"),
        }
    }

    pub(super) fn rekey_op(&mut self) -> R {
        let side = self.side();
        if !self.open(side) {
            return Ok(());
        }
        let name = self.nodes[side].name;
        if self.green(Attack::RekeyRace) {
            let cp = self.nodes[CLIENT].primary;
            let ok = cp.is_some()
                && cp == self.nodes[self.srv].primary
                && cp.is_some_and(|c| self.carriers[c].alive)
                && self.nodes[CLIENT].resuming.is_none()
                && self.open(CLIENT)
                && self.open(self.srv)
                && self.ho.is_none();
            if !ok {
                return Ok(());
            }
            self.log(format!("{name} rekeys (atomic)"));
            let s = self.nodes[side].session.as_mut();
            if let Some(s) = s {
                s.force_rekey(&mut self.crng);
            }
            self.after_input(side)?;
            return self.flush();
        }
        self.log(format!("{name} rekeys"));
        if let Some(s) = self.nodes[side].session.as_mut() {
            s.force_rekey(&mut self.crng);
        }
        self.after_input(side)
    }

    pub(super) fn snapshot_op(&mut self) -> R {
        let side = self.side();
        if !self.open(side) || self.frozen(side) {
            return Ok(());
        }
        let name = self.nodes[side].name;
        let Some(s) = self.nodes[side].session.as_ref() else {
            return Ok(());
        };
        let snap = s.snapshot();
        let restored = Session::restore(self.now, self.config.clone(), &snap).map_err(|e| {
            Violation::new(
                Kind::Snapshot,
                format!("{name}: restore of its snapshot: {e}"),
            )
        })?;
        let again = restored.snapshot();
        if *again != *snap {
            let at = again
                .iter()
                .zip(snap.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(again.len().min(snap.len()));
            return Err(Violation::new(
                Kind::Snapshot,
                format!(
                    "{name}: the restored session's snapshot differs from the original at byte {at} ({} vs {} bytes)",
                    again.len(),
                    snap.len()
                ),
            ));
        }
        self.stats.restores += 1;
        self.log(format!(
            "{name} restarts from a snapshot ({} bytes); its carriers die",
            snap.len()
        ));
        // A restart: every carrier of the node dies, the peer may notice.
        let ends: Vec<usize> = (0..self.carriers.len())
            .filter(|&c| {
                let c = &self.carriers[c];
                c.alive && (c.client == side || c.server == side)
            })
            .collect();
        self.nodes[side].primary = None;
        self.nodes[side].resuming = None;
        for c in ends {
            let peer_notified = self.rng.chance(7, 10);
            let notify = if side == CLIENT {
                [false, peer_notified]
            } else {
                [peer_notified, false]
            };
            self.kill(c, notify)?;
        }
        let mut restored = restored;
        restored.provide_entropy(&mut self.crng);
        let n = &mut self.nodes[side];
        n.session = Some(restored);
        n.down_since = Some(self.now);
        n.epoch_started = self.now;
        self.after_input(side)
    }

    // ---- the attacker ----
}
