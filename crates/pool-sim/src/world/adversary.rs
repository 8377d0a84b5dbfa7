//! The on-path adversary: tampering, replays, forged refusals, junk carriers.

use super::*;

impl World {
    pub(super) fn attack_op(&mut self) -> R {
        if self.healing {
            return Ok(());
        }
        let on: Vec<Attack> = Attack::EVERY[..Attack::ON_PATH]
            .iter()
            .copied()
            .filter(|a| self.attacks.has(*a) && (*a != Attack::ReplayHandoff || self.handoffs_on))
            .collect();
        if on.is_empty() {
            return Ok(());
        }
        let a = on[self.rng.index(on.len())];
        match a {
            Attack::Flip | Attack::Truncate | Attack::Garbage => self.tamper(a),
            Attack::ReplayRecord => self.replay_record(),
            Attack::ReplayResume => {
                if self.captured_resumes.is_empty() {
                    return Ok(());
                }
                let i = self.rng.index(self.captured_resumes.len());
                let rec = self.captured_resumes[i].clone();
                let to = if self.rng.chance(4, 5) {
                    self.srv
                } else {
                    SERVER2
                };
                self.attacker_carrier(to, rec, format!("replayed RESUME #{i}"))
            }
            Attack::ForgeRefuse => self.forge_refuse(),
            Attack::ReplayHandoff => self.replay_handoff(),
            _ => self.junk(),
        }
    }

    pub(super) fn tamper(&mut self, a: Attack) -> R {
        let cs = if a == Attack::Garbage {
            self.live_carriers(false)
        } else {
            self.live_carriers(true)
        };
        if cs.is_empty() {
            return Ok(());
        }
        let cid = cs[self.rng.index(cs.len())];
        let mut dir = self.rng.index(2);
        if a != Attack::Garbage && self.carriers[cid].pipes[dir].inflight.is_empty() {
            dir = 1 - dir;
        }
        let len = self.carriers[cid].pipes[dir].inflight.len();
        let step = self.step;
        let what = match a {
            Attack::Flip => {
                let i = self.rng.index(len);
                let bit = 1u8 << self.rng.below(8);
                let p = &mut self.carriers[cid].pipes[dir];
                p.inflight[i] ^= bit;
                let w = format!(
                    "bit flip at byte {i}/{len} of c{cid} {} (step {step})",
                    dir_name(dir)
                );
                p.mark(i, i + 1, w.clone());
                w
            }
            Attack::Truncate => {
                let i = self.rng.index(len);
                let n = self.rng.range(1, (len - i).min(64) as u64) as usize;
                let p = &mut self.carriers[cid].pipes[dir];
                p.inflight.drain(i..i + n);
                if let Some((x, y)) = p.taint {
                    let shift = |v: usize| if v > i + n { v - n } else { v.min(i) };
                    p.taint = Some((shift(x), shift(y)));
                }
                let w = format!(
                    "{n} bytes cut out at {i}/{len} of c{cid} {} (step {step})",
                    dir_name(dir)
                );
                p.mark(i, i + 1, w.clone());
                w
            }
            _ => {
                let i = if self.rng.chance(1, 2) {
                    len
                } else {
                    self.rng.range(0, len as u64) as usize
                };
                let n = self.rng.range(1, 64) as usize;
                let mut junk = vec![0u8; n];
                self.rng.fill(&mut junk);
                if self.rng.chance(1, 2) {
                    // Looks like a record header.
                    junk[0] = self.rng.pick(&[0x10, 0x03, 0x05, 0x01]);
                }
                let p = &mut self.carriers[cid].pipes[dir];
                p.inflight.splice(i..i, junk);
                if let Some((x, y)) = p.taint {
                    let shift = |v: usize| if v >= i { v + n } else { v };
                    p.taint = Some((shift(x), shift(y)));
                }
                let w = format!(
                    "{n} garbage bytes at {i}/{len} of c{cid} {} (step {step})",
                    dir_name(dir)
                );
                p.mark(i, i + n, w.clone());
                w
            }
        };
        self.stats.attacks += 1;
        self.log(format!("ATTACK {what}"));
        Ok(())
    }

    pub(super) fn replay_record(&mut self) -> R {
        if self.captured_records.is_empty() {
            return Ok(());
        }
        let cs: Vec<usize> = self
            .live_carriers(false)
            .into_iter()
            .filter(|&c| {
                let c = &self.carriers[c];
                c.cstate == CState::Primary || c.sstate == SState::Primary
            })
            .collect();
        if cs.is_empty() {
            return Ok(());
        }
        let cid = cs[self.rng.index(cs.len())];
        let dir = self.rng.index(2);
        let i = self.rng.index(self.captured_records.len());
        let rec = self.captured_records[i].clone();
        let (e, c) = record_nonce(&rec).unwrap_or_default();
        let step = self.step;
        let p = &mut self.carriers[cid].pipes[dir];
        let at = p.inflight.len();
        p.inflight.extend_from_slice(&rec);
        let w = format!(
            "replayed data record (epoch {e}, counter {c}) on c{cid} {} (step {step})",
            dir_name(dir)
        );
        p.mark(at, at + rec.len(), w.clone());
        self.stats.attacks += 1;
        self.log(format!("ATTACK {w}"));
        Ok(())
    }

    pub(super) fn forge_refuse(&mut self) -> R {
        let Some(cid) = self.nodes[CLIENT].resuming else {
            return Ok(());
        };
        let c = &self.carriers[cid];
        if !c.alive || !c.pipes[1].rx.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        write_refusal(&HandshakeError::UnknownSession, &mut out);
        let step = self.step;
        let p = &mut self.carriers[cid].pipes[1];
        let n = out.len();
        p.inflight.splice(0..0, out);
        if let Some((x, y)) = p.taint {
            p.taint = Some((x + n, y + n));
        }
        let w = format!("forged REFUSE ahead of the answer on c{cid} (step {step})");
        p.mark(0, n, w.clone());
        self.stats.attacks += 1;
        self.log(format!("ATTACK {w}"));
        Ok(())
    }

    pub(super) fn junk(&mut self) -> R {
        let to = if self.rng.chance(1, 2) {
            self.srv
        } else {
            SERVER2
        };
        let id = self.nodes[CLIENT]
            .session
            .as_ref()
            .map(|s| s.id().0)
            .unwrap_or_default();
        let (bytes, what) = match self.rng.below(4) {
            0 => {
                let mut b = vec![0u8; self.rng.range(1, 200) as usize];
                self.rng.fill(&mut b);
                (b, "random bytes")
            }
            1 if !self.captured_resumes.is_empty() => {
                let i = self.rng.index(self.captured_resumes.len());
                let mut b = self.captured_resumes[i].clone();
                let j = self.rng.range(4, b.len() as u64 - 1) as usize;
                b[j] ^= 1 << self.rng.below(8);
                (b, "bit-flipped copy of a RESUME")
            }
            2 => {
                let mut body = vec![0u8; self.rng.range(20, 120) as usize];
                self.rng.fill(&mut body);
                body[..16].copy_from_slice(&id);
                let mut b = Vec::new();
                pool_core::wire::push_record(&mut b, RecordType::Resume, &[&body]);
                (b, "RESUME with the live session id and a random body")
            }
            _ => {
                let mut body = vec![0u8; self.rng.range(2, 200) as usize];
                self.rng.fill(&mut body);
                let mut b = Vec::new();
                pool_core::wire::push_record(&mut b, RecordType::Hello, &[&body]);
                (b, "random HELLO")
            }
        };
        self.attacker_carrier(to, bytes, what.to_string())
    }

    /// The attacker opens a carrier to `to` and sends `bytes`.
    pub(super) fn attacker_carrier(&mut self, to: usize, bytes: Vec<u8>, what: String) -> R {
        let cid = self.new_carrier(ATTACKER, to, true);
        let step = self.step;
        let w = format!(
            "{what} on attacker carrier c{cid} to {} (step {step})",
            self.nodes[to].name
        );
        let p = &mut self.carriers[cid].pipes[0];
        p.inflight = bytes;
        let n = p.inflight.len();
        p.mark(0, n, w.clone());
        self.stats.attacks += 1;
        self.log(format!("ATTACK {w}"));
        self.deliver(cid, 0, usize::MAX)?;
        if self.carriers[cid].alive && self.carriers[cid].sstate != SState::Primary {
            self.kill(cid, [false, false])?;
        }
        Ok(())
    }

    // ---- healing ----
}
