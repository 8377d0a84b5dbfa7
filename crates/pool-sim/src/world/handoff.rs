//! The live server handoff (docs/handoff.md §5), driven through the
//! public API the way `pool_net::handoff` drives it: the target prepares a
//! token, the source offers it; the client arrives at the target with a
//! RESUME_HANDOFF; the target checks the token and pulls the state over
//! the worker link (FREEZE → the source freezes → STATE → restore,
//! rebind, answer); the client's first record on that carrier (or a later
//! resume at the target) commits; COMMITTED fences the source. Any stage
//! may fail, and the source unfreezes only when no commit can happen.
//!
//! The worker link is an in-memory pipe of messages that can be held,
//! delayed or cut at any stage.

use std::collections::VecDeque;

use pool_core::listener::handoff_resume_fields;
use pool_core::wire::DeclineCode;
use pool_core::HeldOp;

use super::*;

mod target;

/// The excuse of a token refusal (the client then declines the offer).
pub(super) const TOKEN_REFUSED: &str = "the target refused the token";
const T0_MS: u64 = 1_800_000_000_000;

/// The target's view of the handoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// Token minted, offer out; waiting for the client.
    Offered,
    /// A valid RESUME_HANDOFF came; FREEZE sent, waiting for STATE.
    Pulling,
    /// Restored and answered; waiting for the commit.
    Answered,
    /// Committed here.
    Committed,
    /// Given up here (the token is spent).
    Dropped,
}

/// A message on the worker link.
#[derive(Debug)]
pub(super) enum Msg {
    Freeze,
    State(Vec<u8>),
    Committed,
    Abort(&'static str),
}

impl Msg {
    fn name(&self) -> &'static str {
        match self {
            Msg::Freeze => "FREEZE",
            Msg::State(_) => "STATE",
            Msg::Committed => "COMMITTED",
            Msg::Abort(_) => "ABORT",
        }
    }
}

pub(super) struct Handoff {
    id: u32,
    from: usize,
    pub(super) to: usize,
    token: [u8; 48],
    pub(super) stage: Stage,
    /// The source is done with it (withdrawn, unfrozen or fenced).
    source_done: bool,
    /// Messages in flight: destination, message, not before.
    link: VecDeque<(usize, Msg, Instant)>,
    link_alive: bool,
    link_held: bool,
    /// The source sent STATE: from then on only the target knows whether a
    /// commit can happen.
    state_left: bool,
    frozen_at: Option<Instant>,
    /// The RESUME_HANDOFF being pulled: carrier, record, attacker's.
    pull: Option<(usize, Vec<u8>, bool)>,
    /// The target gives up then (prepared + lifetime; answered + lifetime).
    target_deadline: Instant,
    /// Link lost after STATE left: the source fences at this time.
    source_fence_at: Option<Instant>,
    freeze_tries: u32,
    /// Cut the link right after the next freeze, before STATE leaves.
    cut_at_freeze: bool,
}

impl World {
    fn now_ms(&self) -> u64 {
        T0_MS + (self.now - self.t0).as_millis() as u64
    }

    pub(super) fn node_of_key(&self, k: &PublicKey) -> Option<usize> {
        self.pubs.iter().position(|p| p == k)
    }

    /// The node the client's runtime dials: its session's peer.
    pub(super) fn client_peer(&self) -> usize {
        self.nodes[CLIENT]
            .session
            .as_ref()
            .and_then(|s| self.node_of_key(&s.peer_key()))
            .filter(|&n| n == SERVER1 || n == SERVER2)
            .unwrap_or(self.srv)
    }

    pub(super) fn frozen(&self, node: usize) -> bool {
        self.nodes[node]
            .session
            .as_ref()
            .is_some_and(|s| s.is_frozen() && !s.is_closed())
    }

    /// Whether `node` holds an answered import (a resume goes to it).
    pub(super) fn import_at(&self, node: usize) -> bool {
        self.ho
            .as_ref()
            .is_some_and(|h| h.to == node && h.stage == Stage::Answered)
            && self.nodes[IMPORT].session.is_some()
    }

    /// A commit happened and the source is not fenced yet (its held
    /// stream operations are still to be done at the owner).
    pub(super) fn fence_pending(&self) -> bool {
        self.ho
            .as_ref()
            .is_some_and(|h| h.stage == Stage::Committed && !h.source_done)
    }

    fn hname(&self) -> String {
        match &self.ho {
            Some(h) => format!(
                "handoff #{} {}->{}",
                h.id, self.nodes[h.from].name, self.nodes[h.to].name
            ),
            None => "handoff".into(),
        }
    }

    pub(super) fn handoff_op(&mut self) -> R {
        if self.healing {
            return Ok(());
        }
        match self.hrng.below(100) {
            0..=29 => self.begin_handoff(),
            30..=54 => self.client_arrives(),
            55..=79 => self.link_op(),
            80..=89 => self.expire_token(),
            90..=94 => {
                if let Some(h) = self.ho.as_mut().filter(|h| !h.state_left) {
                    h.cut_at_freeze = true;
                    self.log("WORKER the link will die right after the next freeze");
                }
                Ok(())
            }
            _ => {
                let followed = self.nodes[CLIENT]
                    .session
                    .as_ref()
                    .is_some_and(|s| s.handoff_followed().is_some());
                if followed && self.nodes[CLIENT].resuming.is_none() {
                    self.log("client declines the handoff offered (policy)");
                    if let Some(s) = self.nodes[CLIENT].session.as_mut() {
                        s.decline_handoff(DeclineCode::Policy);
                    }
                    self.after_input(CLIENT)?;
                }
                Ok(())
            }
        }
    }

    /// BeginHandoff: the target prepares (mints the token), the source
    /// offers it to the client.
    fn begin_handoff(&mut self) -> R {
        let from = self.srv;
        let to = if from == SERVER1 { SERVER2 } else { SERVER1 };
        let free = self.nodes[to]
            .session
            .as_ref()
            .is_none_or(|s| s.is_closed());
        if self.ho.is_some()
            || !free
            || !self.open(CLIENT)
            || !self.open(from)
            || self.frozen(from)
            || self.nodes[IMPORT].session.is_some()
        {
            return Ok(());
        }
        if self.green(Attack::RekeyRace) && self.rekey_soon() {
            return Ok(());
        }
        let Some(s) = self.nodes[from].session.as_ref() else {
            return Ok(());
        };
        if s.handoff_offered().is_some() {
            return Ok(());
        }
        let (sid, floor) = (s.id(), s.handoff_floor());
        self.handoff_seq += 1;
        let id = self.handoff_seq;
        let now_ms = self.now_ms();
        let (tpub, spub, cpub) = (self.pubs[to], self.pubs[from], self.pubs[CLIENT]);
        let lifetime = self.lifetime;
        let Some(imports) = self.imports[to].as_mut() else {
            return Ok(());
        };
        let token = match imports.prepare(
            now_ms,
            sid,
            id,
            &tpub,
            spub,
            cpub,
            floor,
            lifetime,
            &mut self.crng,
        ) {
            Ok(t) => t,
            Err(e) => {
                self.log(format!(
                    "{} refuses to prepare handoff #{id}: {e}",
                    self.nodes[to].name
                ));
                return Ok(());
            }
        };
        let now = self.now;
        let r = self
            .session_mut(from)
            .offer_handoff(now, id, tpub, floor, lifetime, token, &[]);
        if let Err(e) = r {
            if let Some(i) = self.imports[to].as_mut() {
                i.spend(&sid);
            }
            self.log(format!(
                "{} cannot offer handoff #{id}: {e}",
                self.nodes[from].name
            ));
            return Ok(());
        }
        self.ho = Some(Handoff {
            id,
            from,
            to,
            token,
            stage: Stage::Offered,
            source_done: false,
            link: VecDeque::new(),
            link_alive: true,
            link_held: false,
            state_left: false,
            frozen_at: None,
            pull: None,
            target_deadline: now + lifetime,
            source_fence_at: None,
            freeze_tries: 0,
            cut_at_freeze: false,
        });
        self.stats.handoffs_offered += 1;
        self.log(format!(
            "HANDOFF BEGIN #{id} {} -> {}: {} prepared (floor {floor}, lifetime {lifetime:?}), {} offers",
            self.nodes[from].name, self.nodes[to].name, self.nodes[to].name, self.nodes[from].name
        ));
        self.after_input(from)
    }

    /// A rekey is due (green `rekey-race`: no handoff may overlap one).
    fn rekey_soon(&self) -> bool {
        [CLIENT, self.srv].iter().any(|&n| {
            self.nodes[n].epoch_started + self.lim.rekey_after
                <= self.now + self.lifetime + Duration::from_secs(3)
        })
    }

    /// ClientArrives: the client dials the target of the offer it follows
    /// and sends RESUME_HANDOFF (also while its old carrier works, while
    /// another resume is under way).
    pub(super) fn client_arrives(&mut self) -> R {
        if !self.open(CLIENT) {
            return Ok(());
        }
        let Some(offer) = self.nodes[CLIENT]
            .session
            .as_ref()
            .and_then(|s| s.handoff_followed().cloned())
        else {
            return Ok(());
        };
        if self.now >= offer.expires {
            self.log(format!(
                "client gives up handoff #{}: its token expired",
                offer.id
            ));
            self.session_mut(CLIENT)
                .decline_handoff(DeclineCode::Expired);
            return self.after_input(CLIENT);
        }
        let Some(to) = self.node_of_key(&offer.target) else {
            return Ok(());
        };
        self.abandon_attempt()?;
        let mut out = Vec::new();
        let ck = self.secrets[CLIENT].clone();
        let Some(s) = self.nodes[CLIENT].session.as_mut() else {
            return Ok(());
        };
        match s.start_handoff_resume(&ck, &mut self.crng, &mut out) {
            Ok(()) => {
                let cid = self.new_carrier(CLIENT, to, false);
                self.carriers[cid].handoff = true;
                self.carriers[cid].pipes[0].inflight = out.clone();
                self.nodes[CLIENT].resuming = Some(cid);
                if self.captured_handoffs.len() < 16 {
                    self.captured_handoffs.push(out);
                }
                self.log(format!(
                    "client ARRIVES at {} for handoff #{}: RESUME_HANDOFF on new carrier c{cid}",
                    self.nodes[to].name, offer.id
                ));
                self.after_input(CLIENT)
            }
            Err(e) => Err(Violation::new(
                Kind::Handoff,
                format!("start_handoff_resume failed on an open session with an offer: {e}"),
            )),
        }
    }

    /// The worker link: deliver, hold, delay or cut.
    fn link_op(&mut self) -> R {
        let pick = self.hrng.below(10);
        let now = self.now;
        let Some(h) = self.ho.as_mut().filter(|h| h.link_alive) else {
            return Ok(());
        };
        match pick {
            0..=2 => {
                h.link_held = !h.link_held;
                let held = h.link_held;
                self.log(format!("WORKER link held={held}"));
                Ok(())
            }
            3..=5 => {
                let d = Duration::from_millis(self.hrng.pick(&[1, 50, 1000, 3000]));
                for m in h.link.iter_mut() {
                    m.2 = m.2.max(now) + d;
                }
                self.log(format!("WORKER link delayed {d:?}"));
                Ok(())
            }
            6..=7 => {
                h.link_held = false;
                self.log("WORKER link released");
                self.pump()
            }
            _ => self.link_cut(),
        }
    }

    /// ExpireToken: a time jump past the handoff's next deadline.
    fn expire_token(&mut self) -> R {
        let Some(t) = self.handoff_deadline() else {
            return Ok(());
        };
        let t = t.max(self.now) + Duration::from_millis(1);
        self.log(format!(
            "time +{:.3}ms (past the {} deadline)",
            ms(t - self.now),
            self.hname()
        ));
        self.advance_to(t)
    }

    /// The next handoff timer or link delivery time after now.
    pub(super) fn handoff_deadline(&self) -> Option<Instant> {
        let offer = self.nodes[CLIENT]
            .session
            .as_ref()
            .filter(|s| !s.is_closed())
            .and_then(|s| s.handoff_followed())
            .map(|o| o.expires);
        let Some(h) = self.ho.as_ref() else {
            return offer;
        };
        let mut t: Vec<Instant> = offer.into_iter().collect();
        if matches!(h.stage, Stage::Offered | Stage::Answered) {
            t.push(h.target_deadline);
        }
        if let Some(f) = h.source_fence_at {
            t.push(f);
        }
        if h.link_alive && !h.link_held {
            if let Some(m) = h.link.front() {
                t.push(m.2);
            }
        }
        t.into_iter().min()
    }

    /// Handoff timers due now: the target's give-up, the source's fence
    /// in limbo.
    pub(super) fn handoff_timers(&mut self) -> R {
        let expired = self.nodes[CLIENT]
            .session
            .as_ref()
            .filter(|s| !s.is_closed())
            .and_then(|s| s.handoff_followed())
            .is_some_and(|o| self.now >= o.expires);
        if expired
            && self.nodes[CLIENT]
                .resuming
                .is_none_or(|c| !self.carriers[c].handoff)
        {
            // The client's runtime gives an offer up at its expiry.
            self.log("client declines the handoff: its token expired");
            self.session_mut(CLIENT)
                .decline_handoff(DeclineCode::Expired);
            self.after_input(CLIENT)?;
        }
        let Some(h) = self.ho.as_ref() else {
            return Ok(());
        };
        let now = self.now;
        if matches!(h.stage, Stage::Offered | Stage::Answered) && now >= h.target_deadline {
            let why = if h.stage == Stage::Offered {
                "token expired: the client did not arrive"
            } else {
                "the client never committed"
            };
            self.target_gives_up(why)?;
        }
        let fence_due = self
            .ho
            .as_ref()
            .and_then(|h| h.source_fence_at)
            .is_some_and(|f| now >= f);
        if fence_due {
            self.log("the frozen source's resume deadline passed: it gives its side up");
            self.fence_source()?;
        }
        Ok(())
    }

    /// Delivers the link's next message if it may move; returns whether
    /// one did.
    pub(super) fn link_pump(&mut self) -> Result<bool, Violation> {
        let now = self.now;
        let Some(h) = self.ho.as_mut() else {
            return Ok(false);
        };
        if !h.link_alive || h.link_held || h.link.front().is_none_or(|m| m.2 > now) {
            return Ok(false);
        }
        let Some((dest, msg, _)) = h.link.pop_front() else {
            return Ok(false);
        };
        self.log(format!(
            "WORKER {} -> {}",
            msg.name(),
            self.nodes[dest].name
        ));
        match msg {
            Msg::Freeze => self.on_freeze()?,
            Msg::State(snap) => self.on_state(&snap)?,
            Msg::Committed => self.fence_source()?,
            Msg::Abort(why) => {
                if dest == self.ho.as_ref().map_or(usize::MAX, |h| h.to) {
                    if matches!(
                        self.ho.as_ref().map(|h| h.stage),
                        Some(Stage::Offered | Stage::Pulling)
                    ) {
                        self.target_gives_up(why)?;
                    }
                } else {
                    self.source_abort(why)?;
                }
            }
        }
        self.end_if_done();
        self.check_owner()?;
        Ok(true)
    }

    /// Releases the link's hold and delays (healing).
    pub(super) fn release_link(&mut self) {
        let now = self.now;
        if let Some(h) = self.ho.as_mut() {
            h.link_held = false;
            for m in h.link.iter_mut() {
                m.2 = m.2.min(now);
            }
        }
    }

    fn send(&mut self, dest: usize, msg: Msg) {
        let now = self.now;
        if let Some(h) = self.ho.as_mut().filter(|h| h.link_alive) {
            h.link.push_back((dest, msg, now));
        }
    }

    fn end_if_done(&mut self) {
        if self
            .ho
            .as_ref()
            .is_some_and(|h| h.source_done && matches!(h.stage, Stage::Committed | Stage::Dropped))
        {
            self.log(format!("{} over", self.hname()));
            self.ho = None;
        }
    }

    /// The worker link dies; each side does what the runtime does when it
    /// learns of it.
    fn link_cut(&mut self) -> R {
        let Some(h) = self.ho.as_mut() else {
            return Ok(());
        };
        h.link_alive = false;
        h.link.clear();
        let (from, stage, left, done) = (h.from, h.stage, h.state_left, h.source_done);
        self.log(format!(
            "WORKER LINK CUT ({}: target {stage:?}, state left the source: {left})",
            self.hname()
        ));
        if !done {
            if self.frozen(from) && left {
                // It cannot know whether the target commits: frozen until
                // its resume deadline, then it gives its side up.
                let at = self
                    .ho
                    .as_ref()
                    .and_then(|h| h.frozen_at)
                    .unwrap_or(self.now)
                    + self.lim.resume_deadline;
                if let Some(h) = self.ho.as_mut() {
                    h.source_fence_at = Some(at);
                }
                self.log("  the source stays frozen: only the target knows whether a commit comes");
            } else {
                self.source_abort("target_lost")?;
            }
        }
        if matches!(stage, Stage::Offered | Stage::Pulling) {
            self.target_gives_up("the worker link died")?;
        }
        self.end_if_done();
        Ok(())
    }

    /// FREEZE at the source: freeze and send STATE.
    fn on_freeze(&mut self) -> R {
        let Some(h) = self.ho.as_ref() else {
            return Ok(());
        };
        let (from, to) = (h.from, h.to);
        if !self.open(from) {
            self.send(to, Msg::Abort("closed"));
            return self.source_abort("the session closed");
        }
        match self.session_mut(from).freeze() {
            Ok(snap) => {
                let cut = self.ho.as_ref().is_some_and(|h| h.cut_at_freeze);
                if let Some(h) = self.ho.as_mut() {
                    h.frozen_at = Some(self.now);
                }
                self.log(format!(
                    "{} FREEZES ({} byte snapshot)",
                    self.nodes[from].name,
                    snap.len()
                ));
                if cut {
                    self.after_input(from)?;
                    return self.link_cut();
                }
                if let Some(h) = self.ho.as_mut() {
                    h.state_left = true;
                }
                self.send(to, Msg::State(snap.to_vec()));
                self.after_input(from)
            }
            Err(pool_core::HandoffError::Busy) => {
                let tries = self.ho.as_ref().map_or(0, |h| h.freeze_tries);
                if tries >= 100 {
                    self.log("the source stays busy: it abandons the handoff");
                    self.send(to, Msg::Abort("pending"));
                    return self.source_abort("busy");
                }
                self.log(format!(
                    "{} cannot freeze yet (a resume is half done); again in 10 ms",
                    self.nodes[from].name
                ));
                let at = self.now + Duration::from_millis(10);
                if let Some(h) = self.ho.as_mut() {
                    h.freeze_tries += 1;
                    h.link.push_front((from, Msg::Freeze, at));
                }
                Ok(())
            }
            Err(e) => {
                self.log(format!("{} cannot freeze: {e}", self.nodes[from].name));
                self.send(to, Msg::Abort("pending"));
                self.source_abort("cannot freeze")
            }
        }
    }

    /// ABORT (or a link failure before STATE left) at the source: it goes
    /// on where it stopped. Make-before-break is checked here.
    fn source_abort(&mut self, why: &str) -> R {
        let Some(h) = self.ho.as_mut() else {
            return Ok(());
        };
        if h.source_done {
            return Ok(());
        }
        h.source_done = true;
        let from = h.from;
        let now = self.now;
        let frozen = self.frozen(from);
        if let Some(s) = self.nodes[from].session.as_mut() {
            if frozen {
                s.unfreeze(now);
            } else {
                s.withdraw_handoff();
            }
        }
        self.stats.handoffs_aborted += 1;
        self.log(format!(
            "{} {} ({}: {why})",
            self.nodes[from].name,
            if frozen {
                "UNFREEZES"
            } else {
                "withdraws the offer"
            },
            self.hname()
        ));
        // (A session that reached its resume deadline in a real outage
        // ends the schedule anyway.)
        if !self.expired && (self.srv != from || !self.open(from) || self.frozen(from)) {
            return Err(Violation::new(
                Kind::Handoff,
                format!(
                    "make-before-break: {} did not commit, but the session is not usable at the source {} (owner {}, open {}, frozen {})",
                    self.hname(),
                    self.nodes[from].name,
                    self.nodes[self.srv].name,
                    self.open(from),
                    self.frozen(from)
                ),
            ));
        }
        self.after_input(from)
    }

    /// The client declined: the source abandons an offer not yet pulled.
    pub(super) fn on_declined(&mut self, node: usize, id: u32, code: u8) -> R {
        self.log(format!(
            "{} learns the client declined handoff #{id} (code {code})",
            self.nodes[node].name
        ));
        let Some(h) = self.ho.as_ref() else {
            return Ok(());
        };
        if h.id != id || h.from != node || h.source_done || self.frozen(node) {
            return Ok(());
        }
        let to = h.to;
        self.send(to, Msg::Abort("client_declined"));
        self.source_abort("client_declined")
    }

    /// COMMITTED at the source (or its resume deadline in limbo): fence,
    /// close its carrier, and do the held stream operations where the
    /// streams live now.
    fn fence_source(&mut self) -> R {
        let Some(h) = self.ho.as_mut() else {
            return Ok(());
        };
        if h.source_done {
            return Ok(());
        }
        h.source_done = true;
        let (from, to, committed) = (h.from, h.to, h.stage == Stage::Committed);
        let tpub = self.pubs[to];
        let held = self.session_mut(from).fence(tpub);
        self.nodes[from].fenced = true;
        self.log(format!(
            "{} is FENCED ({}; {} held stream operations)",
            self.nodes[from].name,
            self.hname(),
            held.len()
        ));
        if let Some(c) = self.nodes[from].primary.take() {
            self.carriers[c].sstate = SState::Done;
            self.kill(c, [true, false])?;
        }
        self.after_input(from)?;
        if !committed {
            // Limbo without a commit: nothing holds the session now.
            self.lost_by_design();
            return Ok(());
        }
        let home = self.srv;
        for op in held {
            let Some(s) = self.nodes[home].session.as_mut() else {
                break;
            };
            let r = match &op {
                HeldOp::Finish(id) => s.stream_finish(*id),
                HeldOp::Reset(id, code) => s.stream_reset(*id, *code),
                HeldOp::Stop(id) => s.stream_stop(*id),
                _ => Ok(()),
            };
            self.log(format!(
                "  {} does the held {op:?}: {r:?}",
                self.nodes[home].name
            ));
        }
        self.after_input(home)?;
        self.end_if_done();
        Ok(())
    }
}
