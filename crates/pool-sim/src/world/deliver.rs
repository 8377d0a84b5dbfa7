//! Moving bytes on carriers: delivery, the pump until quiet, whole records out of a receive buffer, and what each end does with them.

use super::*;

impl World {
    /// Delivers up to `n` in-flight bytes of one pipe and lets the receiver
    /// handle them.
    pub(super) fn deliver(&mut self, cid: usize, dir: Dir, n: usize) -> R {
        if self.frozen_reader(cid, dir) {
            return Ok(());
        }
        let p = &mut self.carriers[cid].pipes[dir];
        let n = n.min(p.inflight.len());
        if n == 0 {
            return Ok(());
        }
        if let Some((a, b)) = p.taint {
            if a < n {
                p.rx_taint = true;
            }
            p.taint = (b > n).then(|| (a.saturating_sub(n), b - n));
        }
        p.rx.extend(p.inflight.drain(..n));
        self.stats.bytes_moved += n as u64;
        self.process_rx(cid, dir)
    }

    /// Delivers everything deliverable until nothing moves.
    pub(super) fn pump(&mut self) -> R {
        for _ in 0..PUMP_LIMIT {
            let mut moved = false;
            for cid in 0..self.carriers.len() {
                for dir in 0..2 {
                    if self.carriers[cid].alive
                        && self.carriers[cid].pipes[dir].deliverable(self.now)
                        && !self.mbb_held(cid, dir)
                    {
                        self.deliver(cid, dir, usize::MAX)?;
                        moved = true;
                    }
                }
            }
            moved |= self.link_pump()?;
            if !moved {
                return Ok(());
            }
        }
        let what = self.still_moving();
        Err(Violation::new(
            Kind::Livelock,
            format!("the network did not go quiet after {PUMP_LIMIT} rounds: {what}"),
        ))
    }

    /// For a livelock report: what moves in a few more rounds (carrier,
    /// direction, record types and lengths) and each session's counters.
    pub(super) fn still_moving(&mut self) -> String {
        let mut moves = Vec::new();
        for _ in 0..3 {
            for cid in 0..self.carriers.len() {
                for dir in 0..2 {
                    let c = &self.carriers[cid];
                    if !c.alive || !c.pipes[dir].deliverable(self.now) || self.mbb_held(cid, dir) {
                        continue;
                    }
                    let mut recs = Vec::new();
                    let mut b = &c.pipes[dir].inflight[..];
                    while let Ok(Some((ty, len))) = pool_core::peek_record(b) {
                        recs.push(format!("{ty:?}/{len}"));
                        b = &b[len..];
                    }
                    moves.push(format!(
                        "c{cid} {} [{}{}]",
                        dir_name(dir),
                        recs.join(" "),
                        if b.is_empty() { "" } else { " +partial" }
                    ));
                    if self.deliver(cid, dir, usize::MAX).is_err() {
                        break;
                    }
                }
            }
        }
        let mut who = Vec::new();
        for n in [CLIENT, self.srv] {
            if let Some(s) = self.nodes[n].session.as_ref() {
                let st = s.stats();
                who.push(format!(
                    "{}: epoch {} records sent {} received {} frames sent {} received {} resent {} dup {} pending {} {:?}",
                    self.nodes[n].name,
                    st.epoch,
                    st.records_sent,
                    st.records_received,
                    st.frames_sent,
                    st.frames_received,
                    st.frames_resent,
                    st.duplicates_dropped,
                    s.pending_bytes(),
                    s.debug_sizes()
                ));
            }
        }
        format!("moving: {}; {}", moves.join(", "), who.join("; "))
    }

    /// With `mbb-race` off, the client's old carrier carries nothing to the
    /// server while a resume is under way: no acknowledgement overtakes
    /// the RESUME.
    pub(super) fn mbb_held(&self, cid: usize, dir: Dir) -> bool {
        (dir == 0
            && self.green(Attack::MbbRace)
            && self.nodes[CLIENT].resuming.is_some()
            && self.nodes[CLIENT].primary == Some(cid))
            || self.frozen_reader(cid, dir)
    }

    /// A frozen session reads nothing: the runtime stops reading its
    /// carrier, so the bytes wait in flight (never acknowledged).
    pub(super) fn frozen_reader(&self, cid: usize, dir: Dir) -> bool {
        let c = &self.carriers[cid];
        dir == 0
            && c.server != ATTACKER
            && self.nodes[c.server].primary == Some(cid)
            && self.frozen(c.server)
    }

    /// Takes the next whole record from a pipe's receive buffer.
    pub(super) fn take_record(
        &mut self,
        cid: usize,
        dir: Dir,
    ) -> Result<Option<(Vec<u8>, bool)>, pool_core::WireError> {
        let p = &mut self.carriers[cid].pipes[dir];
        match pool_core::peek_record(&p.rx)? {
            None => Ok(None),
            Some((_, len)) => {
                let rec: Vec<u8> = p.rx.drain(..len).collect();
                let tainted = p.rx_taint;
                if p.rx.is_empty() {
                    p.rx_taint = false;
                }
                Ok(Some((rec, tainted)))
            }
        }
    }

    pub(super) fn process_rx(&mut self, cid: usize, dir: Dir) -> R {
        loop {
            let c = &self.carriers[cid];
            if !c.alive || c.pipes[dir].rx.is_empty() {
                return Ok(());
            }
            let before = c.pipes[dir].rx.len();
            if dir == 0 {
                match c.sstate {
                    SState::Unbound => self.server_first(cid)?,
                    SState::Prepared => self.server_confirm(cid)?,
                    SState::Pulled => return Ok(()),
                    SState::Primary => self.feed(cid, 0, c.server)?,
                    SState::Done => self.carriers[cid].pipes[0].rx.clear(),
                }
            } else if c.attacker {
                self.carriers[cid].pipes[1].rx.clear();
            } else {
                match c.cstate {
                    CState::Resuming => self.client_answer(cid)?,
                    CState::Primary => self.feed(cid, 1, c.client)?,
                    CState::Gone => self.carriers[cid].pipes[1].rx.clear(),
                }
            }
            let c = &self.carriers[cid];
            if !c.alive || c.pipes[dir].rx.len() == before {
                return Ok(());
            }
        }
    }

    /// Records on a session's own carrier.
    pub(super) fn feed(&mut self, cid: usize, dir: Dir, node: usize) -> R {
        if self.nodes[node].primary != Some(cid) || !self.open(node) {
            self.carriers[cid].pipes[dir].rx.clear();
            return Ok(());
        }
        let mut rx = std::mem::take(&mut self.carriers[cid].pipes[dir].rx);
        let tainted = self.carriers[cid].pipes[dir].rx_taint;
        let used = match self.nodes[node].session.as_mut() {
            Some(s) => s.handle_carrier_data(self.now, &mut rx),
            None => 0,
        };
        rx.drain(..used.min(rx.len()));
        if tainted && used > 0 && self.nodes[node].tainted.is_none() {
            let what = self.carriers[cid].pipes[dir].taint_what.clone();
            self.nodes[node].tainted = Some(format!("{what} (reached it at step {})", self.step));
        }
        let p = &mut self.carriers[cid].pipes[dir];
        if rx.is_empty() {
            p.rx_taint = false;
        }
        let left = rx.len();
        p.rx = rx;
        self.after_input(node)?;
        if left >= MAX_RECORD_LEN && self.open(node) && self.nodes[node].primary == Some(cid) {
            return Err(Violation::new(
                Kind::Bound,
                format!(
                    "{} left {left} unconsumed bytes on carrier c{cid}: a driver would buffer more than one record",
                    self.nodes[node].name
                ),
            ));
        }
        Ok(())
    }
}
