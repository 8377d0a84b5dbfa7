//! Driving a session the way a runtime does: the drain rule after every input, events, closes, carriers dropped and killed.

use super::*;

impl World {
    // ---- driving sessions ----

    /// The drain rule: after any input to `node`'s session, send what it
    /// wrote to its carrier and handle its events.
    pub(super) fn after_input(&mut self, node: usize) -> R {
        let dir = Self::dir_of(node);
        let mut buf = std::mem::take(&mut self.buf);
        let mut events = Vec::new();
        let res = (|| -> R {
            let target = self.nodes[node].primary.filter(|&c| self.carriers[c].alive);
            let fenced = self.nodes[node].fenced;
            let name = self.nodes[node].name;
            let Some(s) = self.nodes[node].session.as_mut() else {
                return Ok(());
            };
            let frozen = s.is_frozen();
            while let Some(n) = s.poll_transmit(self.now, &mut buf) {
                let rec = &buf[..n];
                if fenced || frozen {
                    return Err(Violation::new(
                        if fenced { Kind::Fence } else { Kind::Owner },
                        format!(
                            "{name}, {}, wrote a {}-byte record (type {:#04x}) of the session",
                            if fenced { "fenced" } else { "frozen" },
                            n,
                            rec[0]
                        ),
                    ));
                }
                if let Some((epoch, counter)) = record_nonce(rec) {
                    self.nonces.sealed(dir, epoch, counter)?;
                    self.records_seen += 1;
                    if self.opts.plant == Some(Plant::RepeatNonce) && self.records_seen == 20 {
                        self.planted = true;
                        self.nonces.sealed(dir, epoch, counter)?;
                    }
                    // Keep a sample of records for replay.
                    if self.captured_records.len() < 32 {
                        self.captured_records.push(rec.to_vec());
                    } else if self.rng.chance(1, 16) {
                        let i = self.rng.index(32);
                        self.captured_records[i] = rec.to_vec();
                    }
                }
                if let Some(c) = target {
                    let side = Self::dir_of(node);
                    self.carriers[c].pipes[side].inflight.extend_from_slice(rec);
                }
            }
            while let Some(e) = s.poll_event() {
                events.push(e);
            }
            Ok(())
        })();
        self.buf = buf;
        res?;
        for e in events {
            match e {
                Event::Rekeyed(epoch) => {
                    self.nonces.installed(dir, epoch);
                    self.nodes[node].epoch_started = self.now;
                    self.log(format!("{} epoch {epoch} installed", self.nodes[node].name));
                }
                Event::CarrierDead => {
                    let c = self.nodes[node].primary;
                    self.log(format!(
                        "{} declares its carrier {c:?} dead (timer)",
                        self.nodes[node].name
                    ));
                    self.drop_primary(node)?;
                }
                Event::Closed(reason) => self.on_closed(node, reason)?,
                Event::StreamOpened(id) => {
                    self.book.opened(id).known[dir] = true;
                }
                Event::HandoffOffered(o) => {
                    let to = self
                        .node_of_key(&o.target)
                        .map_or("?", |n| self.nodes[n].name);
                    self.log(format!(
                        "client is offered handoff #{} to {to} (expires in {:.3}ms)",
                        o.id,
                        ms(o.expires.saturating_duration_since(self.now))
                    ));
                }
                Event::Moved { from, to } => {
                    let name = |k| self.node_of_key(&k).map_or("?", |n| self.nodes[n].name);
                    self.log(format!("client moved: peer {} -> {}", name(from), name(to)));
                }
                Event::HandoffDeclined { id, code } => self.on_declined(node, id, code)?,
                _ => {}
            }
        }
        let Some(s) = self.nodes[node].session.as_ref() else {
            return Ok(());
        };
        let (up, closed) = (s.carrier_up(), s.is_closed());
        if !up && !closed && self.nodes[node].primary.is_some() {
            self.drop_primary(node)?;
        }
        let n = &mut self.nodes[node];
        if up {
            n.down_since = None;
        } else if n.down_since.is_none() {
            n.down_since = Some(self.now);
        }
        Ok(())
    }

    pub(super) fn on_closed(&mut self, node: usize, reason: CloseReason) -> R {
        if self.nodes[node].closed {
            return Ok(());
        }
        self.nodes[node].closed = true;
        let name = self.nodes[node].name;
        self.log(format!("{name} session closed: {reason}"));
        let other = if node == CLIENT { self.srv } else { CLIENT };
        match reason {
            CloseReason::ResumeDeadline { .. } => {
                let down = self.nodes[node]
                    .down_since
                    .map(|d| self.now - d)
                    .unwrap_or_default();
                if down >= self.lim.resume_deadline {
                    self.expired = true;
                    Ok(())
                } else {
                    Err(Violation::new(
                        Kind::Close,
                        format!(
                            "{name} closed by the resume deadline after only {:.3} s without a carrier (deadline {:?})",
                            down.as_secs_f64(),
                            self.lim.resume_deadline
                        ),
                    ))
                }
            }
            CloseReason::Peer { .. } if self.nodes[other].closed => Ok(()),
            CloseReason::HandedOff { .. } if self.nodes[node].fenced => Ok(()),
            r => {
                let tainted = self.nodes[node].tainted.is_some();
                let kind = if tainted {
                    Kind::AttackerClose
                } else {
                    Kind::Close
                };
                Err(Violation::new(
                    kind,
                    format!("{name} session closed: {r}{}", self.taint_note()),
                ))
            }
        }
    }

    /// `node` stops using its carrier and closes it (the other end notices).
    pub(super) fn drop_primary(&mut self, node: usize) -> R {
        if let Some(c) = self.nodes[node].primary.take() {
            let notify = if node == CLIENT {
                [false, true]
            } else {
                [true, false]
            };
            self.kill(c, notify)?;
        }
        Ok(())
    }

    /// A carrier dies; in-flight bytes are lost. Each end in `notify`
    /// learns of it now (EOF); the others find out by their timers.
    pub(super) fn kill(&mut self, cid: usize, notify: [bool; 2]) -> R {
        if !self.carriers[cid].alive {
            return Ok(());
        }
        let c = &mut self.carriers[cid];
        c.alive = false;
        for p in &mut c.pipes {
            p.inflight.clear();
            p.rx.clear();
            p.taint = None;
            p.rx_taint = false;
        }
        let (client, server) = (c.client, c.server);
        if notify[0] && client == CLIENT {
            if self.nodes[CLIENT].resuming == Some(cid) {
                self.nodes[CLIENT].resuming = None;
                self.carriers[cid].cstate = CState::Gone;
                if let Some(s) = self.nodes[CLIENT].session.as_mut() {
                    adapter::client_abandon(s);
                }
            }
            if self.nodes[CLIENT].primary == Some(cid) {
                self.nodes[CLIENT].primary = None;
                if let Some(s) = self.nodes[CLIENT].session.as_mut() {
                    s.carrier_lost(self.now);
                }
                self.after_input(CLIENT)?;
            }
        }
        if notify[1] && server != ATTACKER && self.nodes[server].primary == Some(cid) {
            self.nodes[server].primary = None;
            if let Some(s) = self.nodes[server].session.as_mut() {
                s.carrier_lost(self.now);
            }
            self.after_input(server)?;
        }
        Ok(())
    }
}
