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

    /// Server: the first record on a new carrier.
    fn server_first(&mut self, cid: usize) -> R {
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
        let mut rec = rec;
        if honest && !self.planted && rec.len() > 8 {
            match self.opts.plant {
                Some(Plant::UnmarkedTamper) => {
                    self.planted = true;
                    // Inside the session id (after the 4-byte header).
                    rec[6] ^= 0x10;
                }
                Some(Plant::StaleResume) if self.open(node) => {
                    self.planted = true;
                    let mut out = Vec::new();
                    if let Some(s) = self.nodes[node].session.as_mut() {
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
        let matches = match (resume_session_id(&rec), self.nodes[node].session.as_ref()) {
            (Ok(id), Some(s)) => s.id() == id,
            _ => false,
        };
        if !matches {
            if honest {
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
        let both_open = self.open(CLIENT) && self.open(node);
        let mut out = Vec::new();
        let Some(s) = self.nodes[node].session.as_mut() else {
            return Ok(());
        };
        match adapter::server_answer(s, self.now, &rec, &mut self.crng, &mut out) {
            Ok(ans) => {
                self.log(format!(
                    "{} answers RESUME on c{cid} ({ans:?}){}",
                    self.nodes[node].name,
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
                self.after_input(node)?;
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
                if honest && both_open && replayed.is_none() {
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
                self.after_input(node)?;
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
    fn refuse(&mut self, cid: usize, e: &HandshakeError, cause: Option<String>) -> R {
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
    fn switch_server(&mut self, node: usize, cid: usize) -> R {
        self.carriers[cid].sstate = SState::Primary;
        let old = self.nodes[node].primary.replace(cid);
        if let Some(o) = old.filter(|&o| o != cid) {
            self.carriers[o].sstate = SState::Done;
            self.kill(o, [true, false])?;
        }
        Ok(())
    }

    /// Server: the first record on a prepared carrier commits the resume.
    fn server_confirm(&mut self, cid: usize) -> R {
        let node = self.carriers[cid].server;
        let (mut rec, _tainted) = match self.take_record(cid, 0) {
            Err(_) => return self.kill(cid, [true, false]),
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
        };
        let Some(s) = self.nodes[node].session.as_mut() else {
            return Ok(());
        };
        match adapter::server_confirm(s, self.now, &mut rec) {
            Ok(c) => {
                self.log(format!(
                    "{} confirms the resume on c{cid}",
                    self.nodes[node].name
                ));
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
                self.after_input(node)?;
                self.kill(cid, [true, false])
            }
        }
    }

    /// Client: the answer to its RESUME.
    fn client_answer(&mut self, cid: usize) -> R {
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
                self.log(format!(
                    "client: resume on c{cid} failed: {e}{}",
                    if tainted { " [attacker's answer]" } else { "" }
                ));
                self.last_resume_error = Some(e.to_string());
                if !tainted && both_open {
                    return Err(Violation::new(
                        Kind::Resume,
                        format!(
                            "the server's untampered answer to the client's RESUME failed: {e}{}",
                            self.taint_note()
                        ),
                    ));
                }
                self.abandon(cid)
            }
        }
    }

    /// Client gives up the resume on `cid` and closes it.
    fn abandon(&mut self, cid: usize) -> R {
        if self.nodes[CLIENT].resuming == Some(cid) {
            self.nodes[CLIENT].resuming = None;
            if let Some(s) = self.nodes[CLIENT].session.as_mut() {
                adapter::client_abandon(s);
            }
        }
        self.carriers[cid].cstate = CState::Gone;
        self.kill(cid, [false, true])
    }

    /// The client opens a new carrier and starts a resume on it.
    fn reconnect(&mut self, why: &str) -> R {
        if !self.open(CLIENT) {
            return Ok(());
        }
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
        let mut out = Vec::new();
        let Some(s) = self.nodes[CLIENT].session.as_mut() else {
            return Ok(());
        };
        match adapter::client_start(s, &mut self.crng, &mut out) {
            Ok(()) => {
                let srv = self.srv;
                let cid = self.new_carrier(CLIENT, srv, false);
                self.carriers[cid].pipes[0].inflight = out.clone();
                self.nodes[CLIENT].resuming = Some(cid);
                self.captured_resumes.push(out);
                let old = self.nodes[CLIENT].primary;
                self.log(format!(
                    "client starts a resume on new carrier c{cid} ({why}; old carrier {old:?})"
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

    /// How much of a pipe gets through before a cut: nothing, all, or any
    /// byte offset (usually mid-record).
    fn prefix_len(&mut self, cid: usize, dir: Dir) -> usize {
        let len = self.carriers[cid].pipes[dir].inflight.len();
        match self.rng.below(4) {
            0 => 0,
            1 => len,
            _ => self.rng.range(0, len as u64) as usize,
        }
    }

    /// Moves the clock to `target`, running every timer on the way.
    fn advance_to(&mut self, target: Instant) -> R {
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
            for n in [CLIENT, self.srv] {
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

    fn stuck_detail(&self, t: Instant) -> String {
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

    fn fire_timers(&mut self) -> R {
        for n in [CLIENT, self.srv] {
            if let Some(s) = self.nodes[n].session.as_mut() {
                s.handle_timeout(self.now);
            }
            self.after_input(n)?;
        }
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
    fn flush(&mut self) -> R {
        for c in self.carriers.iter_mut().filter(|c| c.alive) {
            for p in &mut c.pipes {
                p.held = false;
                p.until = None;
            }
        }
        self.pump()
    }

    fn check_bounds(&mut self) -> R {
        for n in [CLIENT, self.srv] {
            let Some(s) = self.nodes[n].session.as_ref() else {
                continue;
            };
            if s.is_closed() {
                continue;
            }
            let name = self.nodes[n].name;
            // Every queue the peer can make grow, against its bound.
            let z = s.debug_sizes();
            let peer_cap = self.lim.max_streams as usize;
            for (what, size, bound) in [
                (
                    "replay buffer bytes",
                    z.replay_bytes,
                    self.lim.replay_buffer,
                ),
                (
                    "receive buffer bytes",
                    z.recv_buffered,
                    self.lim.session_window as usize,
                ),
                ("peer-opened streams", z.peer_streams, peer_cap),
                ("pongs owed", z.pongs, 16),
                (
                    "stream credit updates",
                    z.max_stream_data_queue,
                    peer_cap + z.local_streams,
                ),
                ("blocked writers", z.blocked, peer_cap + z.local_streams),
                (
                    "resets waiting",
                    z.pending_resets,
                    peer_cap + z.local_streams,
                ),
            ] {
                if size > bound {
                    return Err(Violation::new(
                        Kind::Bound,
                        format!("{name}: {size} {what}, bound {bound} ({z:?})"),
                    ));
                }
            }
            let pending = s.pending_bytes();
            if pending > self.lim.replay_buffer {
                return Err(Violation::new(
                    Kind::Bound,
                    format!(
                        "{name}: {pending} bytes pending in the replay buffer, bound {}",
                        self.lim.replay_buffer
                    ),
                ));
            }
            let mut total = 0u64;
            for id in self.book.streams.keys() {
                let r = s.stream_readable_bytes(*id) as u64;
                if r > self.lim.stream_window {
                    return Err(Violation::new(
                        Kind::Bound,
                        format!(
                            "{name}: stream {id} buffers {r} unread bytes, stream window {}",
                            self.lim.stream_window
                        ),
                    ));
                }
                total += r;
            }
            if total > self.lim.session_window {
                return Err(Violation::new(
                    Kind::Bound,
                    format!(
                        "{name}: {total} unread bytes buffered, session window {}",
                        self.lim.session_window
                    ),
                ));
            }
            // Streams the peer opened are bounded by max_streams; the rest
            // are this side's own.
            let active = s.stats().streams_active;
            let own = self.book.local_held(Self::dir_of(n));
            if active > self.lim.max_streams + own {
                return Err(Violation::new(
                    Kind::Bound,
                    format!(
                        "{name}: {active} streams held, bound max_streams {} + {own} of its own",
                        self.lim.max_streams
                    ),
                ));
            }
        }
        for (cid, c) in self.carriers.iter().enumerate() {
            for (d, p) in c.pipes.iter().enumerate() {
                if c.alive && p.rx.len() > MAX_RECORD_LEN {
                    return Err(Violation::new(
                        Kind::Bound,
                        format!(
                            "carrier c{cid} {}: {} bytes delivered but not consumed",
                            dir_name(d),
                            p.rx.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    // ---- application ----

    fn side(&mut self) -> usize {
        if self.rng.chance(1, 2) {
            CLIENT
        } else {
            self.srv
        }
    }

    fn pick_stream(&mut self) -> Option<u64> {
        let live: Vec<u64> = self
            .book
            .streams
            .iter()
            .filter(|(_, s)| !s.reset)
            .map(|(id, _)| *id)
            .collect();
        if live.is_empty() {
            None
        } else {
            Some(live[self.rng.index(live.len())])
        }
    }

    fn app_op(&mut self) -> R {
        let side = self.side();
        if !self.open(side) {
            return Ok(());
        }
        let op = self.rng.below(100);
        let stream = self.pick_stream();
        let (Some(id), false) = (stream, op < 8 || stream.is_none()) else {
            return self.op_open(side);
        };
        match op {
            8..=44 => self.op_write(side, id),
            45..=84 => {
                let max = self.rng.pick(&[64, 4096, 65536]);
                self.op_read(side, id, max)
            }
            85..=91 => self.op_finish(side, id),
            92..=95 => self.op_reset(side, id),
            _ => self.op_stop(side, id),
        }
    }

    fn session_mut(&mut self, node: usize) -> &mut Session {
        match self.nodes[node].session.as_mut() {
            Some(s) => s,
            None => unreachable!("node {node} has no session"),
        }
    }

    fn op_open(&mut self, side: usize) -> R {
        let name = self.nodes[side].name;
        match self.session_mut(side).open_stream() {
            Ok(id) => {
                let slow = [self.rng.chance(1, 5), self.rng.chance(1, 5)];
                let st = self.book.opened(id);
                st.known[Self::dir_of(side)] = true;
                st.dirs[0].slow = slow[0];
                st.dirs[1].slow = slow[1];
                self.log(format!("{name} opens stream {id} (slow readers {slow:?})"));
            }
            Err(e) => self.log(format!("{name} open_stream: {e}")),
        }
        self.after_input(side)
    }

    fn stream_err(&mut self, who: &str, id: u64, e: StreamError) -> R {
        if let StreamError::Reset(_) = e {
            self.book.on_reset_seen(id)?;
        }
        self.log(format!("{who} stream {id}: {e}"));
        Ok(())
    }

    fn op_write(&mut self, side: usize, id: u64) -> R {
        let dir = Self::dir_of(side);
        let d = &self.book.streams[&id].dirs[dir];
        if d.fin_written {
            return Ok(());
        }
        let off = d.written;
        let max = self.rng.pick(&[100, 2000, 20000]);
        let len = self.rng.range(1, max) as usize;
        let mut data = std::mem::take(&mut self.scratch);
        fill_pattern(id, dir, off, &mut data[..len]);
        let r = self.session_mut(side).stream_write(id, &data[..len]);
        self.scratch = data;
        let name = self.nodes[side].name;
        match r {
            Ok(n) => {
                self.book.wrote(id, dir, n);
                self.log(format!(
                    "{name} writes {n}/{len} bytes on stream {id} at {off}"
                ));
            }
            Err(e) => self.stream_err(&format!("{name} write"), id, e)?,
        }
        self.after_input(side)
    }

    /// One read; returns whether it made progress.
    fn op_read_once(&mut self, side: usize, id: u64, max: usize) -> Result<bool, Violation> {
        let dir = 1 - Self::dir_of(side);
        let mut out = std::mem::take(&mut self.scratch);
        let r = self.session_mut(side).stream_read(id, &mut out[..max]);
        let name = self.nodes[side].name;
        let res = match r {
            Ok(ReadResult::Data(n)) => {
                if self.opts.plant == Some(Plant::CorruptDelivery) && !self.planted && n > 0 {
                    self.planted = true;
                    out[n / 2] ^= 0x20;
                }
                let off = self.book.streams.get(&id).map_or(0, |s| s.dirs[dir].read);
                let r = self.book.on_read(id, dir, &out[..n]);
                self.stats.bytes_read += n as u64;
                if !self.healing || r.is_err() {
                    self.log(format!("{name} reads {n} bytes on stream {id} at {off}"));
                }
                r.map(|()| n > 0)
            }
            Ok(ReadResult::Fin) => {
                let fresh = !self
                    .book
                    .streams
                    .get(&id)
                    .is_some_and(|s| s.dirs[dir].fin_read);
                if fresh {
                    self.log(format!("{name} reads FIN on stream {id}"));
                }
                self.book.on_fin(id, dir).map(|()| fresh)
            }
            Ok(ReadResult::Blocked) => Ok(false),
            Err(StreamError::Unknown(_)) | Err(StreamError::SessionClosed(_)) => Ok(false),
            Err(e) => self
                .stream_err(&format!("{name} read"), id, e)
                .map(|()| false),
        };
        self.scratch = out;
        let res = res?;
        self.after_input(side)?;
        Ok(res)
    }

    fn op_read(&mut self, side: usize, id: u64, max: usize) -> R {
        let dir = 1 - Self::dir_of(side);
        let d = &self.book.streams[&id].dirs[dir];
        if d.stopped || d.fin_read || (d.slow && !self.rng.chance(1, 10)) {
            return Ok(());
        }
        self.op_read_once(side, id, max).map(|_| ())
    }

    fn op_finish(&mut self, side: usize, id: u64) -> R {
        let dir = Self::dir_of(side);
        if self.book.streams[&id].dirs[dir].fin_written {
            return Ok(());
        }
        let name = self.nodes[side].name;
        match self.session_mut(side).stream_finish(id) {
            Ok(()) => {
                self.book.opened(id).dirs[dir].fin_written = true;
                self.log(format!("{name} finishes stream {id}"));
            }
            Err(e) => self.stream_err(&format!("{name} finish"), id, e)?,
        }
        self.after_input(side)
    }

    fn op_reset(&mut self, side: usize, id: u64) -> R {
        let name = self.nodes[side].name;
        let code = self.rng.below(100);
        match self.session_mut(side).stream_reset(id, code) {
            Ok(()) => {
                let st = self.book.opened(id);
                st.reset = true;
                st.reset_by[Self::dir_of(side)] = true;
                self.log(format!("{name} resets stream {id} (code {code})"));
            }
            Err(e) => self.stream_err(&format!("{name} reset"), id, e)?,
        }
        self.after_input(side)
    }

    fn op_stop(&mut self, side: usize, id: u64) -> R {
        let name = self.nodes[side].name;
        let wdir = Self::dir_of(side);
        if !self.book.streams[&id].known[wdir] {
            // Not opened on this side yet: stream_stop would do nothing.
            return Ok(());
        }
        let s = self.session_mut(side);
        let _ = s.stream_stop(id);
        // stream_stop also finishes our sending side if it can: ask again
        // (idempotent) to learn whether it did.
        let fin = match s.stream_finish(id) {
            Ok(()) => true,
            Err(StreamError::Unknown(_)) => !self.book.streams[&id].reset,
            Err(_) => false,
        };
        let st = self.book.opened(id);
        st.dirs[1 - wdir].stopped = true;
        if fin {
            st.dirs[wdir].fin_written = true;
        }
        self.log(format!(
            "{name} stops reading stream {id} (own side finished: {fin})"
        ));
        self.after_input(side)
    }

    // ---- network ----

    fn live_carriers(&self, with_data: bool) -> Vec<usize> {
        (0..self.carriers.len())
            .filter(|&c| {
                let c = &self.carriers[c];
                c.alive
                    && !c.attacker
                    && (!with_data || c.pipes.iter().any(|p| !p.inflight.is_empty()))
            })
            .collect()
    }

    fn net_op(&mut self) -> R {
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

    fn time_op(&mut self) -> R {
        let target = self.pick_time();
        let d = target.saturating_duration_since(self.now);
        self.log(format!("time +{:.3}ms", ms(d)));
        self.advance_to(target)
    }

    fn pick_time(&mut self) -> Instant {
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

    fn carrier_op(&mut self) -> R {
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

    fn rekey_op(&mut self) -> R {
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
                && self.open(self.srv);
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

    fn snapshot_op(&mut self) -> R {
        let side = self.side();
        if !self.open(side) {
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

    fn attack_op(&mut self) -> R {
        if self.healing {
            return Ok(());
        }
        let on: Vec<Attack> = Attack::EVERY[..7]
            .iter()
            .copied()
            .filter(|a| self.attacks.has(*a))
            .collect();
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
            _ => self.junk(),
        }
    }

    fn tamper(&mut self, a: Attack) -> R {
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

    fn replay_record(&mut self) -> R {
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

    fn forge_refuse(&mut self) -> R {
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

    fn junk(&mut self) -> R {
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
    fn attacker_carrier(&mut self, to: usize, bytes: Vec<u8>, what: String) -> R {
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

    fn healthy(&self) -> bool {
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

    fn read_all(&mut self) -> R {
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
    fn heal(&mut self) -> R {
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
                if let Some(next) = [CLIENT, self.srv]
                    .iter()
                    .filter_map(|&n| self.nodes[n].session.as_ref()?.poll_timeout())
                    .min()
                {
                    t = t.max(next);
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
