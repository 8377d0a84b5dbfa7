//! The target's side of the handoff: the token check on RESUME_HANDOFF, the
//! pull's answer, the commit, giving up; and the one-owner check.

use super::*;

impl World {
    /// STATE at the target: restore, rebind, answer the RESUME_HANDOFF.
    pub(in crate::world) fn on_state(&mut self, snap: &[u8]) -> R {
        let Some(h) = self.ho.as_ref().filter(|h| h.stage == Stage::Pulling) else {
            return Ok(());
        };
        let to = h.to;
        let Some((cid, rec, att)) = h.pull.clone() else {
            return Ok(());
        };
        let mut t = Session::restore(self.now, self.config.clone(), snap).map_err(|e| {
            Violation::new(
                Kind::Snapshot,
                format!(
                    "{}: restore of the source's snapshot: {e}",
                    self.nodes[to].name
                ),
            )
        })?;
        t.rebind_local(self.pubs[to]);
        t.provide_entropy(&mut self.crng);
        let mut out = Vec::new();
        let key = self.secrets[to].clone();
        match t.answer_handoff(self.now, &rec, &key, &mut self.crng, &mut out) {
            Ok(()) => {
                let lifetime = self.lifetime;
                let now = self.now;
                if let Some(h) = self.ho.as_mut() {
                    h.stage = Stage::Answered;
                    h.target_deadline = now + lifetime;
                }
                let n = &mut self.nodes[IMPORT];
                n.session = Some(t);
                n.primary = None;
                n.down_since = Some(now);
                n.epoch_started = now;
                n.tainted = None;
                n.closed = false;
                n.fenced = false;
                let alive = self.carriers[cid].alive;
                self.log(format!(
                    "{} restores, rebinds and answers RESUME_HANDOFF on c{cid}{}{}",
                    self.nodes[to].name,
                    if att { " [attacker's]" } else { "" },
                    if alive { "" } else { " (the carrier is gone)" }
                ));
                if alive {
                    let c = &mut self.carriers[cid];
                    c.pipes[1].inflight.extend_from_slice(&out);
                    c.import = true;
                    c.sstate = SState::Prepared;
                }
                self.after_input(IMPORT)?;
                if self.opts.plant == Some(Plant::UnfreezeEarly) && !self.planted {
                    self.planted = true;
                    let from = self.ho.as_ref().map_or(self.srv, |h| h.from);
                    if let Some(s) = self.nodes[from].session.as_mut() {
                        s.unfreeze(now);
                    }
                }
                if self.green(Attack::AbandonResume)
                    && !att
                    && self.carriers[cid].alive
                    && self.carriers[cid].cstate == CState::Resuming
                {
                    self.deliver(cid, 1, usize::MAX)?;
                }
                Ok(())
            }
            Err(e) => {
                self.log(format!(
                    "{} cannot answer RESUME_HANDOFF on c{cid}: {e}",
                    self.nodes[to].name
                ));
                if !att && self.open(CLIENT) && self.nodes[CLIENT].resuming == Some(cid) {
                    return Err(Violation::new(
                        Kind::Handoff,
                        format!(
                            "the target could not answer the client's untampered RESUME_HANDOFF with the state it pulled: {e}"
                        ),
                    ));
                }
                self.target_gives_up("the state did not restore")
            }
        }
    }

    /// The target gives the handoff up: it drops the import, spends the
    /// token and tells the source (which may then unfreeze).
    pub(in crate::world) fn target_gives_up(&mut self, why: &'static str) -> R {
        let Some(h) = self.ho.as_mut() else {
            return Ok(());
        };
        let (to, from, stage, pull, left) = (h.to, h.from, h.stage, h.pull.take(), h.state_left);
        let alive = h.link_alive;
        h.stage = Stage::Dropped;
        self.log(format!(
            "{} gives {} up: {why}",
            self.nodes[to].name,
            self.hname()
        ));
        if let Some(sid) = self.nodes[CLIENT].session.as_ref().map(Session::id) {
            if let Some(i) = self.imports[to].as_mut() {
                i.spend(&sid);
            }
        }
        self.nodes[IMPORT].session = None;
        for c in 0..self.carriers.len() {
            if self.carriers[c].import && self.carriers[c].alive {
                self.carriers[c].import = false;
                self.carriers[c].sstate = SState::Done;
                self.kill(c, [true, false])?;
            }
        }
        if let Some((cid, _, att)) =
            pull.filter(|p| stage == Stage::Pulling && self.carriers[p.0].alive)
        {
            let cause = att.then(|| "refusal of an attacker's RESUME_HANDOFF".to_string());
            self.carriers[cid].excused = Some("the target could not pull the state");
            self.refuse(cid, &HandshakeError::HandoffPending, cause)?;
        }
        if alive {
            self.send(from, Msg::Abort(why));
        }
        let moved = self.nodes[CLIENT]
            .session
            .as_ref()
            .is_some_and(|s| s.peer_key() == self.pubs[to]);
        if left && !alive && self.frozen(from) {
            self.lost_by_design();
            return Ok(());
        }
        if moved && self.open(CLIENT) && stage == Stage::Answered {
            // The client took the target's answer but its commit never
            // arrived: it goes back to the source when the target refuses
            // its next resume (`Session::revert_handoff`), and the healing
            // phase's liveness check holds it to that.
            self.log(format!(
                "{} gave the answered import up ({why}); the client will go back to {} when refused",
                self.nodes[to].name, self.nodes[from].name
            ));
        }
        Ok(())
    }

    pub(in crate::world) fn lost_by_design(&mut self) {
        self.log(
            "session LOST by design: the worker link died after the state left and the target never committed; the source stays frozen until its resume deadline, then fences (docs/handoff.md §8)",
        );
        self.stats.handoff_lost = true;
        self.expired = true;
    }

    /// Target: the first record of a new carrier is a RESUME_HANDOFF.
    pub(in crate::world) fn target_first(
        &mut self,
        cid: usize,
        rec: Vec<u8>,
        tainted: bool,
        attacker: bool,
        honest: bool,
    ) -> R {
        let node = self.carriers[cid].server;
        let name = self.nodes[node].name;
        let cause = (tainted || attacker).then(|| {
            format!(
                "refusal of a tampered RESUME_HANDOFF ({})",
                self.carriers[cid].pipes[0].taint_what
            )
        });
        let (sid, epoch, token) = match handoff_resume_fields(&rec) {
            Ok(f) => f,
            Err(e) => {
                self.log(format!("{name} refuses RESUME_HANDOFF on c{cid}: {e}"));
                if honest {
                    return Err(Violation::new(
                        Kind::Handoff,
                        format!("the client's untampered RESUME_HANDOFF does not parse: {e}"),
                    ));
                }
                return self.refuse(cid, &e, cause);
            }
        };
        let now_ms = self.now_ms();
        let (tpub, cpub) = (self.pubs[node], self.pubs[CLIENT]);
        let checked = match self.imports[node].as_ref() {
            Some(i) => i
                .check(now_ms, &sid, &tpub, &cpub, &token, epoch)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => Err("not a server".into()),
        };
        let current = self.ho.as_ref().is_some_and(|h| {
            h.to == node && h.token == token && h.stage == Stage::Offered && h.link_alive
        });
        if let Err(e) = checked {
            self.log(format!(
                "{name} refuses RESUME_HANDOFF on c{cid} (token: {e}){}",
                if cause.is_some() { " [attacker's]" } else { "" }
            ));
            if honest && current && now_ms < T0_MS + (self.ho_deadline_ms()) {
                return Err(Violation::new(
                    Kind::Token,
                    format!("{name} refused the client's current, unexpired token: {e}"),
                ));
            }
            self.defense_in_depth(node, &rec)?;
            self.carriers[cid].excused = Some(TOKEN_REFUSED);
            return self.refuse(cid, &HandshakeError::HandoffToken(e), cause);
        }
        if !current {
            // A valid token, but the import is pulled already (by an
            // earlier attempt, or an attacker's copy of this one).
            self.log(format!(
                "{name} refuses RESUME_HANDOFF on c{cid}: the handoff is under way already{}",
                if cause.is_some() { " [attacker's]" } else { "" }
            ));
            self.carriers[cid].excused = Some("the import is pulled already");
            return self.refuse(cid, &HandshakeError::HandoffPending, cause);
        }
        if honest && self.ho.as_ref().is_some_and(|h| h.id % 8 == 5) {
            // The director refuses the target's claim (fencing: its lease
            // lapsed, or another worker owns the session), one handoff in
            // eight: the target refuses the client before any state moves
            // and gives the handoff up; the client goes back to the source.
            self.log(format!(
                "{name}'s claim of the session is refused by its director: fenced"
            ));
            self.stats.handoffs_fenced += 1;
            self.carriers[cid].excused = Some("fenced: the target's claim was refused");
            self.refuse(
                cid,
                &HandshakeError::HandoffToken("fenced: the claim was refused".into()),
                cause,
            )?;
            return self.target_gives_up("fenced");
        }
        let from = self.ho.as_ref().map_or(self.srv, |h| h.from);
        if let Some(h) = self.ho.as_mut() {
            h.stage = Stage::Pulling;
            h.pull = Some((cid, rec, tainted || attacker));
        }
        self.carriers[cid].sstate = SState::Pulled;
        self.log(format!(
            "{name} accepts the token of RESUME_HANDOFF on c{cid} (epoch {epoch}){}; pulls the state",
            if cause.is_some() { " [attacker's]" } else { "" }
        ));
        self.send(from, Msg::Freeze);
        if self.green(Attack::AbandonResume) && honest {
            // The answer reaches the client at once: the pull runs now.
            if let Some(h) = self.ho.as_mut() {
                h.link_held = false;
                let now = self.now;
                for m in h.link.iter_mut() {
                    m.2 = now;
                }
            }
            while self.link_pump()? {}
        }
        Ok(())
    }

    pub(in crate::world) fn ho_deadline_ms(&self) -> u64 {
        self.ho
            .as_ref()
            .map_or(0, |h| (h.target_deadline - self.t0).as_millis() as u64)
    }

    /// A RESUME_HANDOFF whose handoff committed here, refused by its
    /// token, must be refused by the session itself too.
    pub(in crate::world) fn defense_in_depth(&mut self, node: usize, rec: &[u8]) -> R {
        if node != self.srv
            || !self.open(node)
            || self.frozen(node)
            || !self
                .committed_records
                .iter()
                .any(|(n, r)| *n == node && r == rec)
        {
            return Ok(());
        }
        let key = self.secrets[node].clone();
        let mut out = Vec::new();
        let now = self.now;
        let Some(s) = self.nodes[node].session.as_mut() else {
            return Ok(());
        };
        match s.answer_handoff(now, rec, &key, &mut self.crng, &mut out) {
            Ok(()) => Err(Violation::new(
                Kind::Token,
                format!(
                    "{} answered a replayed RESUME_HANDOFF of a handoff that committed there",
                    self.nodes[node].name
                ),
            )),
            Err(e) => {
                self.log(format!("  (the session itself refuses it too: {e})"));
                Ok(())
            }
        }
    }

    /// The import confirmed the client's first record on `cid`: the commit.
    pub(in crate::world) fn commit(&mut self, cid: usize, tainted: bool) -> R {
        let Some(h) = self.ho.as_mut() else {
            return Ok(());
        };
        let (from, to, token) = (h.from, h.to, h.token);
        let rec = h.pull.as_ref().map(|p| p.1.clone()).unwrap_or_default();
        h.stage = Stage::Committed;
        let c = &self.carriers[cid];
        // A carrier the attacker opened must never commit (it has no key
        // of the new epoch). The client's own carrier may be marked
        // tainted by an attack that changed nothing in the end (bytes put
        // in and cut out again, seed 6090296): the record still
        // authenticated under the new epoch's keys, which only the client
        // holds, so that commit is genuine.
        let _ = tainted;
        if c.attacker {
            return Err(Violation::new(
                Kind::Token,
                format!(
                    "a handoff committed on attacker bytes (c{cid}: {})",
                    c.pipes[0].taint_what
                ),
            ));
        }
        if self.committed_tokens.contains(&token) {
            return Err(Violation::new(
                Kind::Token,
                format!("a second commit for the token of {}", self.hname()),
            ));
        }
        self.committed_tokens.push(token);
        self.committed_records.push((to, rec));
        let sid = self.nodes[IMPORT].session.as_ref().map(Session::id);
        if let (Some(sid), Some(i)) = (sid, self.imports[to].as_mut()) {
            i.spend(&sid);
        }
        let imp = std::mem::replace(
            &mut self.nodes[IMPORT],
            Node {
                name: "import",
                session: None,
                acceptor: None,
                primary: None,
                resuming: None,
                down_since: None,
                epoch_started: self.now,
                tainted: None,
                closed: false,
                fenced: false,
            },
        );
        let n = &mut self.nodes[to];
        n.session = imp.session;
        n.primary = None;
        n.down_since = imp.down_since;
        n.epoch_started = imp.epoch_started;
        n.tainted = imp.tainted;
        n.closed = false;
        n.fenced = false;
        for c in &mut self.carriers {
            c.import = false;
        }
        self.srv = to;
        self.stats.handoffs_committed += 1;
        self.log(format!(
            "COMMIT of {}: {} owns the session now",
            self.hname(),
            self.nodes[to].name
        ));
        let alive = self.ho.as_ref().is_some_and(|h| h.link_alive);
        if alive {
            self.send(from, Msg::Committed);
        }
        self.check_owner()
    }

    /// One owner: at most one of the servers and the import holds the
    /// session neither frozen nor fenced.
    pub(in crate::world) fn check_owner(&self) -> R {
        let holders: Vec<&str> = [SERVER1, SERVER2, IMPORT]
            .into_iter()
            .filter(|&n| self.open(n) && !self.frozen(n))
            .map(|n| self.nodes[n].name)
            .collect();
        if holders.len() > 1 {
            return Err(Violation::new(
                Kind::Owner,
                format!(
                    "{} hold the session at once, neither frozen nor fenced ({})",
                    holders.join(" and "),
                    self.hname()
                ),
            ));
        }
        Ok(())
    }

    /// Attack `replay-handoff`: a RESUME_HANDOFF seen earlier, to either
    /// server.
    pub(in crate::world) fn replay_handoff(&mut self) -> R {
        if self.captured_handoffs.is_empty() {
            return Ok(());
        }
        let i = self.rng.index(self.captured_handoffs.len());
        let rec = self.captured_handoffs[i].clone();
        let to = if self.rng.chance(1, 2) {
            SERVER1
        } else {
            SERVER2
        };
        self.attacker_carrier(to, rec, format!("replayed RESUME_HANDOFF #{i}"))
    }
}
