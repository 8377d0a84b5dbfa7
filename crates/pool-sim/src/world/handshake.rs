//! The server's and the client's side of handshakes and resumes on a carrier: what each node does with a carrier's first records, refusals, confirmations, abandoned resumes and reconnects.

use super::*;

impl World {
    /// Server: the first record on a new carrier.
    pub(super) fn server_first(&mut self, cid: usize) -> R {
        let node = self.carriers[cid].server;
        let (rec, tainted) = match self.take_record(cid, 0) {
            Err(e) => {
                self.log(format!("{} drops c{cid}: {e}", self.nodes[node].name));
                self.carriers[cid].sstate = SState::Done;
                return self.kill(cid, [true, false]);
            }
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
        };
        let attacker = self.carriers[cid].attacker;
        let honest = !tainted && !attacker && self.nodes[CLIENT].resuming == Some(cid);
        if rec.first() == Some(&(RecordType::ResumeHandoff as u8)) {
            return self.target_first(cid, rec, tainted, attacker, honest);
        }
        // A resume for the import a handoff's target answered goes to it
        // (a later resume may still commit it).
        let sn = if self.import_at(node) { IMPORT } else { node };
        let mut rec = rec;
        if honest && !self.planted && rec.len() > 8 {
            match self.opts.plant {
                Some(Plant::UnmarkedTamper) => {
                    self.planted = true;
                    // Inside the session id (after the 4-byte header).
                    rec[6] ^= 0x10;
                }
                Some(Plant::StaleResume) if self.open(sn) => {
                    self.planted = true;
                    let mut out = Vec::new();
                    if let Some(s) = self.nodes[sn].session.as_mut() {
                        let _ = adapter::server_answer(s, self.now, &rec, &mut self.crng, &mut out);
                    }
                }
                _ => {}
            }
        }
        // What the attacker did to this record, for a refusal answering it.
        let cause = (tainted || attacker).then(|| self.carriers[cid].pipes[0].taint_what.clone());
        if rec[0] != RecordType::Resume as u8 {
            if honest {
                return Err(Violation::new(
                    Kind::Resume,
                    format!(
                        "the client's untampered first record on c{cid} is not a RESUME (type {:#04x})",
                        rec[0]
                    ),
                ));
            }
            return self.refuse(cid, &HandshakeError::Unexpected("not a RESUME"), cause);
        }
        let matches = match (resume_session_id(&rec), self.nodes[sn].session.as_ref()) {
            (Ok(id), Some(s)) => s.id() == id,
            _ => false,
        };
        if !matches {
            // A client whose move was never confirmed may dial a target that
            // gave the import up: the refusal sends it back to the source.
            let unconfirmed = self.nodes[CLIENT]
                .session
                .as_ref()
                .is_some_and(Session::move_unconfirmed);
            if honest && !self.stats.stranded && !unconfirmed {
                return Err(Violation::new(
                    Kind::Resume,
                    format!(
                        "{} does not know the client's session",
                        self.nodes[node].name
                    ),
                ));
            }
            return self.refuse(cid, &HandshakeError::UnknownSession, cause);
        }
        if tainted && self.nodes[node].tainted.is_none() {
            let what = self.carriers[cid].pipes[0].taint_what.clone();
            self.nodes[node].tainted = Some(format!("{what} (reached it at step {})", self.step));
        }
        let both_open = self.open(CLIENT) && self.open(sn);
        let frozen = self.frozen(sn);
        let mut out = Vec::new();
        let Some(s) = self.nodes[sn].session.as_mut() else {
            return Ok(());
        };
        match adapter::server_answer(s, self.now, &rec, &mut self.crng, &mut out) {
            Ok(ans) => {
                if self.nodes[sn].fenced {
                    return Err(Violation::new(
                        Kind::Fence,
                        format!(
                            "{}, fenced, answered a RESUME on c{cid}",
                            self.nodes[node].name
                        ),
                    ));
                }
                self.carriers[cid].import = sn == IMPORT;
                self.log(format!(
                    "{}{} answers RESUME on c{cid} ({ans:?}){}",
                    self.nodes[node].name,
                    if sn == IMPORT { " (its import)" } else { "" },
                    if tainted || attacker {
                        " [attacker's]"
                    } else {
                        ""
                    }
                ));
                self.carriers[cid].pipes[1].inflight.extend_from_slice(&out);
                if let Some(what) = cause.clone() {
                    self.answered_replays.push((node, rec.clone(), what));
                }
                match ans {
                    ServerAnswer::Switched => self.switch_server(node, cid)?,
                    ServerAnswer::Prepared => self.carriers[cid].sstate = SState::Prepared,
                }
                self.after_input(sn)?;
                if self.green(Attack::AbandonResume)
                    && !attacker
                    && self.carriers[cid].alive
                    && self.carriers[cid].cstate == CState::Resuming
                {
                    // The answer reaches the client at once: no resume is
                    // abandoned after the server committed to it.
                    self.deliver(cid, 1, usize::MAX)?;
                }
                Ok(())
            }
            Err(e) => {
                self.log(format!(
                    "{} refuses RESUME on c{cid}: {e}{}",
                    self.nodes[node].name,
                    if tainted || attacker {
                        " [attacker's]"
                    } else {
                        ""
                    }
                ));
                // The one refusal an untampered RESUME may get: the
                // attacker delivered a copy of these very bytes first and
                // the server answered it, so the single-use rule makes this
                // copy stale (the attacker cannot confirm its copy; the
                // client loses one attempt and retries with a new epoch).
                let replayed = match e {
                    HandshakeError::StaleResume { .. } if honest => self
                        .answered_replays
                        .iter()
                        .find(|(n, r, _)| *n == node && *r == rec)
                        .map(|(_, _, w)| {
                            format!("refusal of a RESUME whose copy ({w}) was answered first")
                        }),
                    _ => None,
                };
                // A frozen source refuses every resume for now (code 10):
                // the client tries again (docs/handoff.md §2).
                let pending = frozen && e == HandshakeError::HandoffPending;
                if pending {
                    self.carriers[cid].excused = Some("the session is frozen for a handoff");
                }
                if honest && both_open && replayed.is_none() && !pending {
                    return Err(Violation::new(
                        Kind::Resume,
                        format!(
                            "{} refused the client's current RESUME (untampered): {e}{}",
                            self.nodes[node].name,
                            self.taint_note()
                        ),
                    ));
                }
                if let Some(w) = &replayed {
                    self.stats.replayed_resumes_refused += 1;
                    self.log(format!("  ({w})"));
                }
                self.after_input(sn)?;
                let cause = cause
                    .map(|w| format!("refusal of a tampered RESUME ({w})"))
                    .or(replayed);
                self.refuse(cid, &e, cause)
            }
        }
    }

    /// Writes a REFUSE on `cid`. `cause` says what the attacker did if the
    /// refusal answers attacker bytes (then the refusal counts as attacker
    /// bytes too: the client's untampered resume did not fail).
    pub(super) fn refuse(&mut self, cid: usize, e: &HandshakeError, cause: Option<String>) -> R {
        let mut out = Vec::new();
        write_refusal(e, &mut out);
        let c = &mut self.carriers[cid];
        c.sstate = SState::Done;
        let start = c.pipes[1].inflight.len();
        c.pipes[1].inflight.extend_from_slice(&out);
        if let Some(w) = cause {
            let end = c.pipes[1].inflight.len();
            c.pipes[1].mark(start, end, w);
        }
        if c.attacker {
            return self.kill(cid, [false, false]);
        }
        Ok(())
    }

    /// The server moves its session to carrier `cid` and closes the old one.
    pub(super) fn switch_server(&mut self, node: usize, cid: usize) -> R {
        self.carriers[cid].sstate = SState::Primary;
        let old = self.nodes[node].primary.replace(cid);
        if let Some(o) = old.filter(|&o| o != cid) {
            self.carriers[o].sstate = SState::Done;
            self.kill(o, [true, false])?;
        }
        Ok(())
    }

    /// Server: the first record on a prepared carrier commits the resume.
    pub(super) fn server_confirm(&mut self, cid: usize) -> R {
        let node = self.carriers[cid].server;
        let (mut rec, tainted) = match self.take_record(cid, 0) {
            Err(_) => return self.kill(cid, [true, false]),
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
        };
        let imp = self.carriers[cid].import;
        let sn = if imp { IMPORT } else { node };
        let Some(s) = self.nodes[sn].session.as_mut() else {
            return self.kill(cid, [true, false]);
        };
        match adapter::server_confirm(s, self.now, &mut rec) {
            Ok(c) => {
                self.log(format!(
                    "{} confirms the resume on c{cid}{}",
                    self.nodes[node].name,
                    if imp {
                        " (its import: the commit point)"
                    } else {
                        ""
                    }
                ));
                if imp {
                    self.commit(cid, tainted)?;
                }
                self.switch_server(node, cid)?;
                if !c.consumed {
                    let p = &mut self.carriers[cid].pipes[0];
                    rec.extend_from_slice(&p.rx);
                    p.rx = rec;
                }
                self.after_input(node)
            }
            Err(e) => {
                self.log(format!(
                    "{} does not confirm on c{cid}: {e}",
                    self.nodes[node].name
                ));
                self.after_input(sn)?;
                self.kill(cid, [true, false])
            }
        }
    }

    /// Client: the answer to its RESUME.
    pub(super) fn client_answer(&mut self, cid: usize) -> R {
        let (rec, tainted) = match self.take_record(cid, 1) {
            Err(e) => {
                self.log(format!("client drops c{cid}: {e}"));
                return self.abandon(cid);
            }
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
        };
        if self.nodes[CLIENT].resuming != Some(cid) {
            self.carriers[cid].cstate = CState::Gone;
            return self.kill(cid, [false, true]);
        }
        if tainted && self.nodes[CLIENT].tainted.is_none() {
            let what = self.carriers[cid].pipes[1].taint_what.clone();
            self.nodes[CLIENT].tainted = Some(format!("{what} (reached it at step {})", self.step));
        }
        let both_open = self.open(CLIENT) && self.open(self.srv);
        let excused = self.carriers[cid].excused;
        let Some(s) = self.nodes[CLIENT].session.as_mut() else {
            return Ok(());
        };
        match adapter::client_finish(s, self.now, &rec) {
            Ok(()) => {
                self.stats.resumes += 1;
                self.nodes[CLIENT].resuming = None;
                self.carriers[cid].cstate = CState::Primary;
                let old = self.nodes[CLIENT].primary.replace(cid);
                self.log(format!("client resumed on c{cid}"));
                if let Some(o) = old.filter(|&o| o != cid) {
                    self.carriers[o].cstate = CState::Gone;
                    self.kill(o, [false, true])?;
                }
                self.after_input(CLIENT)
            }
            Err(e) => {
                // The runtime's rule: a move the target never confirmed,
                // refused by the target (it gave the import up), goes back
                // to the source (`Session::revert_handoff`).
                let refused_by_target = matches!(
                    e,
                    HandshakeError::SessionGone | HandshakeError::Refused { .. }
                );
                if !tainted
                    && refused_by_target
                    && self.nodes[CLIENT]
                        .session
                        .as_mut()
                        .is_some_and(|s| s.move_unconfirmed() && s.revert_handoff())
                {
                    self.log(format!(
                        "client: resume on c{cid} refused ({e}); the move was never confirmed: back to the source"
                    ));
                    self.stats.reverted += 1;
                    return self.abandon(cid);
                }
                self.log(format!(
                    "client: resume on c{cid} failed: {e}{}",
                    if tainted { " [attacker's answer]" } else { "" }
                ));
                self.last_resume_error = Some(e.to_string());
                if let Some(why) = excused {
                    self.log(format!("  (allowed: {why})"));
                    if why == handoff::TOKEN_REFUSED {
                        // The runtime declines an offer whose token failed.
                        if let Some(s) = self.nodes[CLIENT].session.as_mut() {
                            s.decline_handoff(pool_core::wire::DeclineCode::Refused);
                        }
                        self.log("client declines the handoff (the target refused its token)");
                    }
                } else if !tainted && both_open && !self.stats.stranded {
                    return Err(Violation::new(
                        if self.carriers[cid].handoff {
                            Kind::Handoff
                        } else {
                            Kind::Resume
                        },
                        format!(
                            "the server's untampered answer to the client's {} failed: {e}{}",
                            if self.carriers[cid].handoff {
                                "RESUME_HANDOFF"
                            } else {
                                "RESUME"
                            },
                            self.taint_note()
                        ),
                    ));
                }
                self.abandon(cid)
            }
        }
    }

    /// Client gives up the resume on `cid` and closes it.
    pub(super) fn abandon(&mut self, cid: usize) -> R {
        if self.nodes[CLIENT].resuming == Some(cid) {
            self.nodes[CLIENT].resuming = None;
            if let Some(s) = self.nodes[CLIENT].session.as_mut() {
                adapter::client_abandon(s);
            }
        }
        self.carriers[cid].cstate = CState::Gone;
        self.kill(cid, [false, true])
    }

    /// The client gives up the resume under way, if any (a new attempt
    /// replaces it).
    pub(super) fn abandon_attempt(&mut self) -> R {
        if let Some(old) = self.nodes[CLIENT].resuming {
            if self.green(Attack::AbandonResume) {
                // Nothing of the old attempt reaches the server.
                self.log(format!("client abandons the resume on c{old}"));
                self.abandon(old)?;
            } else {
                let n = self.prefix_len(old, 0);
                self.log(format!(
                    "client abandons the resume on c{old} ({n} bytes still get through)"
                ));
                self.deliver(old, 0, n)?;
                self.abandon(old)?;
            }
        }
        Ok(())
    }

    /// The client opens a new carrier and starts a resume on it.
    pub(super) fn reconnect(&mut self, why: &str) -> R {
        if !self.open(CLIENT) {
            return Ok(());
        }
        self.abandon_attempt()?;
        let mut out = Vec::new();
        let Some(s) = self.nodes[CLIENT].session.as_mut() else {
            return Ok(());
        };
        match adapter::client_start(s, &mut self.crng, &mut out) {
            Ok(()) => {
                // The runtime dials the session's peer: the target once the
                // client moved.
                let srv = self.client_peer();
                let cid = self.new_carrier(CLIENT, srv, false);
                self.carriers[cid].pipes[0].inflight = out.clone();
                self.nodes[CLIENT].resuming = Some(cid);
                self.captured_resumes.push(out);
                let old = self.nodes[CLIENT].primary;
                self.log(format!(
                    "client starts a resume on new carrier c{cid} to {} ({why}; old carrier {old:?})",
                    self.nodes[srv].name
                ));
                if let Some(o) = old.filter(|&o| self.carriers[o].alive) {
                    if self.green(Attack::MbbRace) {
                        self.log(format!("c{o} c->s held until the resume ends"));
                    }
                }
                self.after_input(CLIENT)
            }
            Err(e) => {
                self.log(format!("client cannot start a resume: {e}"));
                if self.open(CLIENT) {
                    return Err(Violation::new(
                        Kind::Resume,
                        format!("start_resume failed on an open session: {e}"),
                    ));
                }
                Ok(())
            }
        }
    }
}
