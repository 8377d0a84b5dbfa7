//! The simulated world: three nodes (a client and two servers), carriers
//! between them as pairs of byte pipes, a virtual clock, the adversary, and
//! the schedule that draws one step at a time from the seed.
//!
//! Today only the client↔server-1 session exists; server 2 has an
//! acceptor and gets junk, and `srv` names the node that runs the server
//! side so a later handoff can move it.

use std::time::{Duration, Instant};

use pool_core::{
    resume_session_id, write_refusal, Acceptor, CipherSuite, CloseReason, Config, Event,
    HandshakeError, Initiator, ReadResult, RecordType, SecretKey, SeededRng, Session, StreamError,
    MAX_RECORD_LEN,
};

use crate::adapter::{self, ServerAnswer};
use crate::attacks::{Attack, Attacks};
use crate::check::{
    dir_name, fill_pattern, record_nonce, Dir, Kind, NonceBook, StreamBook, Violation,
};
use crate::prng::Prng;
use crate::trace::Trace;
use crate::{Options, Plant, RunStats};

mod adversary;
mod app_ops;
mod bounds;
mod handshake;
mod heal;
mod net_ops;
mod steps;

type R<T = ()> = Result<T, Violation>;

/// The client node.
pub(crate) const CLIENT: usize = 0;
/// The server that accepts the session.
pub(crate) const SERVER1: usize = 1;
/// The second server (target of a later handoff; gets junk today).
pub(crate) const SERVER2: usize = 2;
/// A carrier end that is the attacker, not a node.
const ATTACKER: usize = usize::MAX;

const T0_UNIX: u64 = 1_800_000_000_000_000_000;
const PUMP_LIMIT: usize = 20_000;

/// The client's view of one carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CState {
    /// RESUME sent, waiting for the answer.
    Resuming,
    /// The session's carrier.
    Primary,
    /// Given up.
    Gone,
}

/// The server's view of one carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SState {
    /// Nothing read yet: the first record must be a RESUME.
    Unbound,
    /// RESUME answered, waiting for the first record to confirm.
    Prepared,
    /// The session's carrier.
    Primary,
    /// Refused or dropped: input is ignored.
    Done,
}

#[derive(Default)]
struct Pipe {
    /// Sent, not yet delivered.
    inflight: Vec<u8>,
    /// Delivered, not yet consumed by the receiver (at most a partial record).
    rx: Vec<u8>,
    /// No delivery while set.
    held: bool,
    /// No delivery before this time.
    until: Option<Instant>,
    /// In-flight indices `[a, b)` that may hold attacker bytes.
    taint: Option<(usize, usize)>,
    /// What the attacker last did here.
    taint_what: String,
    /// `rx` holds attacker bytes.
    rx_taint: bool,
}

impl Pipe {
    fn deliverable(&self, now: Instant) -> bool {
        !self.held && self.until.is_none_or(|u| u <= now) && !self.inflight.is_empty()
    }

    fn mark(&mut self, a: usize, b: usize, what: String) {
        self.taint = Some(match self.taint {
            Some((x, y)) => (x.min(a), y.max(b)),
            None => (a, b),
        });
        self.taint_what = what;
    }
}

struct Carrier {
    client: usize,
    server: usize,
    alive: bool,
    attacker: bool,
    /// 0: client→server, 1: server→client.
    pipes: [Pipe; 2],
    cstate: CState,
    sstate: SState,
}

struct Node {
    name: &'static str,
    session: Option<Session>,
    acceptor: Option<Acceptor>,
    /// The carrier the node's session uses.
    primary: Option<usize>,
    /// Client: the carrier of the resume under way.
    resuming: Option<usize>,
    /// Since when the session has had no carrier.
    down_since: Option<Instant>,
    /// When the session's current epoch began (from `Event::Rekeyed`).
    epoch_started: Instant,
    /// The first attacker bytes that reached this node's session.
    tainted: Option<String>,
    /// `Event::Closed` seen.
    closed: bool,
}

/// Limits of the schedule's configuration (the same on every node).
#[derive(Clone, Copy, Debug)]
struct Limits {
    stream_window: u64,
    session_window: u64,
    max_streams: u64,
    replay_buffer: usize,
    ack_delay: Duration,
    keepalive: Duration,
    dead_after: Duration,
    probe_timeout: Option<Duration>,
    resume_deadline: Duration,
    rekey_after: Duration,
}

pub(crate) struct World {
    attacks: Attacks,
    opts: Options,
    rng: Prng,
    crng: SeededRng,
    t0: Instant,
    now: Instant,
    config: Config,
    lim: Limits,
    nodes: Vec<Node>,
    /// The node running the session's server side.
    srv: usize,
    carriers: Vec<Carrier>,
    book: StreamBook,
    nonces: NonceBook,
    pub(crate) trace: Trace,
    step: usize,
    healing: bool,
    /// A session closed at its resume deadline after a real outage: the
    /// schedule ends and owes no liveness.
    expired: bool,
    captured_records: Vec<Vec<u8>>,
    captured_resumes: Vec<Vec<u8>>,
    /// RESUME records a server's session answered when the attacker
    /// delivered them (a replayed copy, possibly of one still in flight),
    /// with the server node and what the attacker did. The single-use rule
    /// then refuses the genuine copy as stale: one lost attempt.
    answered_replays: Vec<(usize, Vec<u8>, String)>,
    records_seen: u64,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    planted: bool,
    last_resume_error: Option<String>,
    pub(crate) stats: RunStats,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl World {
    pub(crate) fn new(seed: u64, opts: &Options) -> World {
        let mut rng = Prng::new(seed);
        let mut seed32 = [0u8; 32];
        rng.fill(&mut seed32);
        let crng = SeededRng::new(seed32);
        let race = opts.attacks.has(Attack::RekeyRace);
        let lim = Limits {
            stream_window: rng.pick(&[4 << 10, 16 << 10, 64 << 10]),
            session_window: rng.pick(&[16 << 10, 64 << 10, 256 << 10]),
            max_streams: rng.pick(&[2, 4, 16]),
            replay_buffer: rng.pick(&[4 << 10, 32 << 10, 256 << 10]),
            ack_delay: Duration::from_millis(rng.pick(&[1, 10])),
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
            probe_timeout: rng.pick(&[Some(Duration::from_secs(2)), None]),
            resume_deadline: Duration::from_secs(rng.pick(&[10, 60])),
            rekey_after: Duration::from_secs(if race {
                rng.pick(&[3, 30, 120])
            } else {
                rng.pick(&[30, 120])
            }),
        };
        let mut config = Config::default();
        config
            .stream_window(lim.stream_window)
            .session_window(lim.session_window)
            .max_streams(lim.max_streams)
            .replay_buffer(lim.replay_buffer)
            .ack_every(rng.pick(&[1 << 10, 16 << 10]))
            .ack_delay(lim.ack_delay)
            .keepalive(lim.keepalive)
            .dead_after(lim.dead_after)
            .probe_timeout(lim.probe_timeout)
            .resume_deadline(lim.resume_deadline)
            .rekey_after(lim.rekey_after)
            .rekey_after_records(if race && rng.chance(1, 3) {
                rng.pick(&[16, 200])
            } else {
                1 << 40
            })
            .handshake_rate(None)
            .ciphers(&[rng.pick(&[CipherSuite::ChaCha20Poly1305, CipherSuite::Aes256Gcm])]);
        let t0 = Instant::now();
        let node = |name| Node {
            name,
            session: None,
            acceptor: None,
            primary: None,
            resuming: None,
            down_since: None,
            epoch_started: t0,
            tainted: None,
            closed: false,
        };
        World {
            attacks: opts.attacks,
            opts: opts.clone(),
            rng,
            crng,
            t0,
            now: t0,
            config,
            lim,
            nodes: vec![node("client"), node("server1"), node("server2")],
            srv: SERVER1,
            carriers: Vec::new(),
            book: StreamBook::default(),
            nonces: NonceBook::default(),
            trace: Trace::new(opts.verbose || opts.keep_trace),
            step: 0,
            healing: false,
            expired: false,
            captured_records: Vec::new(),
            captured_resumes: Vec::new(),
            answered_replays: Vec::new(),
            records_seen: 0,
            buf: vec![0u8; MAX_RECORD_LEN],
            scratch: vec![0u8; 64 << 10],
            planted: false,
            last_resume_error: None,
            stats: RunStats::default(),
        }
    }

    fn log(&mut self, msg: impl AsRef<str>) {
        let t = ms(self.now - self.t0);
        self.trace
            .push(format!("{:>4} {:>11.3}ms {}", self.step, t, msg.as_ref()));
    }

    fn key(&mut self) -> SecretKey {
        let mut b = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut self.crng, &mut b);
        SecretKey::from_bytes(b)
    }

    fn green(&self, a: Attack) -> bool {
        !self.attacks.has(a)
    }

    fn dir_of(node: usize) -> Dir {
        if node == CLIENT {
            0
        } else {
            1
        }
    }

    fn open(&self, node: usize) -> bool {
        self.nodes[node]
            .session
            .as_ref()
            .is_some_and(|s| !s.is_closed())
    }

    fn taint_note(&self) -> String {
        let mut parts = Vec::new();
        for n in [CLIENT, self.srv] {
            if let Some(t) = &self.nodes[n].tainted {
                parts.push(format!("{} tainted by {t}", self.nodes[n].name));
            }
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" [{}]", parts.join("; "))
        }
    }

    // ---- setup ----

    fn setup(&mut self) -> R {
        let ck = self.key();
        let s1 = self.key();
        let s2 = self.key();
        let client_pub = ck.public_key();
        let mut a1 = Acceptor::new(&self.config, s1, None);
        let a2 = Acceptor::new(&self.config, s2, None);
        let mut hello = Vec::new();
        let init = Initiator::start(
            &self.config,
            &ck,
            a1.public_key(),
            None,
            T0_UNIX,
            &mut self.crng,
            &mut hello,
        )
        .map_err(|e| Violation::new(Kind::Resume, format!("handshake start: {e}")))?;
        let mut welcome = Vec::new();
        let server = a1
            .accept(
                self.now,
                T0_UNIX,
                b"client",
                &hello,
                &mut |k| *k == client_pub,
                &mut self.crng,
                &mut welcome,
            )
            .map_err(|e| Violation::new(Kind::Resume, format!("handshake accept: {e}")))?;
        let mut client = init
            .finish(self.now, &welcome)
            .map_err(|e| Violation::new(Kind::Resume, format!("handshake finish: {e}")))?;
        let mut server = server;
        client.provide_entropy(&mut self.crng);
        server.provide_entropy(&mut self.crng);
        let id = client.id();
        self.nodes[CLIENT].session = Some(client);
        self.nodes[SERVER1].session = Some(server);
        self.nodes[SERVER1].acceptor = Some(a1);
        self.nodes[SERVER2].acceptor = Some(a2);
        let cid = self.new_carrier(CLIENT, SERVER1, false);
        self.carriers[cid].cstate = CState::Primary;
        self.carriers[cid].sstate = SState::Primary;
        self.nodes[CLIENT].primary = Some(cid);
        self.nodes[SERVER1].primary = Some(cid);
        let l = self.lim;
        self.log(format!(
            "session {id} up on c{cid}; attacks={} stream_window={} session_window={} max_streams={} replay_buffer={} probe={:?} resume_deadline={:?} rekey_after={:?}",
            self.attacks, l.stream_window, l.session_window, l.max_streams, l.replay_buffer,
            l.probe_timeout, l.resume_deadline, l.rekey_after
        ));
        self.after_input(CLIENT)?;
        self.after_input(SERVER1)?;
        Ok(())
    }

    fn new_carrier(&mut self, client: usize, server: usize, attacker: bool) -> usize {
        self.carriers.push(Carrier {
            client,
            server,
            alive: true,
            attacker,
            pipes: [Pipe::default(), Pipe::default()],
            cstate: if attacker {
                CState::Gone
            } else {
                CState::Resuming
            },
            sstate: SState::Unbound,
        });
        self.carriers.len() - 1
    }

    // ---- the schedule ----

    pub(crate) fn run(&mut self) -> R {
        self.setup()?;
        for step in 1..=self.opts.steps {
            self.step = step;
            self.one_step()?;
            self.check_bounds()?;
            if self.expired {
                self.log("schedule ends: a session expired after a real outage (no liveness owed)");
                self.stats.expired = true;
                return Ok(());
            }
        }
        self.step = self.opts.steps + 1;
        self.heal()?;
        if self.expired {
            self.stats.expired = true;
        }
        self.stats.records = self.nonces.records;
        self.stats.reinstalled_epochs = self.nonces.reinstalls();
        Ok(())
    }

    fn one_step(&mut self) -> R {
        // A client without a carrier reconnects soon.
        if self.nodes[CLIENT].resuming.is_none()
            && self.nodes[CLIENT].primary.is_none()
            && self.open(CLIENT)
            && self.rng.chance(1, 3)
        {
            return self.reconnect("no carrier");
        }
        let on_path = self.attacks.any_on_path();
        match self.rng.below(1000) {
            0..=399 => self.app_op(),
            400..=549 => self.net_op(),
            550..=689 => self.time_op(),
            690..=789 => self.carrier_op(),
            790..=839 => self.rekey_op(),
            840..=859 => self.snapshot_op(),
            _ if on_path => self.attack_op(),
            _ => self.pump(),
        }
    }

    // ---- driving sessions ----

    /// The drain rule: after any input to `node`'s session, send what it
    /// wrote to its carrier and handle its events.
    fn after_input(&mut self, node: usize) -> R {
        let dir = Self::dir_of(node);
        let mut buf = std::mem::take(&mut self.buf);
        let mut events = Vec::new();
        let res = (|| -> R {
            let target = self.nodes[node].primary.filter(|&c| self.carriers[c].alive);
            let Some(s) = self.nodes[node].session.as_mut() else {
                return Ok(());
            };
            while let Some(n) = s.poll_transmit(self.now, &mut buf) {
                let rec = &buf[..n];
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

    fn on_closed(&mut self, node: usize, reason: CloseReason) -> R {
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
    fn drop_primary(&mut self, node: usize) -> R {
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
    fn kill(&mut self, cid: usize, notify: [bool; 2]) -> R {
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

    /// Delivers up to `n` in-flight bytes of one pipe and lets the receiver
    /// handle them.
    fn deliver(&mut self, cid: usize, dir: Dir, n: usize) -> R {
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
    fn pump(&mut self) -> R {
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
    fn still_moving(&mut self) -> String {
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
    fn mbb_held(&self, cid: usize, dir: Dir) -> bool {
        dir == 0
            && self.green(Attack::MbbRace)
            && self.nodes[CLIENT].resuming.is_some()
            && self.nodes[CLIENT].primary == Some(cid)
    }

    /// Takes the next whole record from a pipe's receive buffer.
    fn take_record(
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

    fn process_rx(&mut self, cid: usize, dir: Dir) -> R {
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
    fn feed(&mut self, cid: usize, dir: Dir, node: usize) -> R {
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
