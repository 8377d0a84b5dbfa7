//! The simulated world: three nodes (a client and two servers), carriers
//! between them as pairs of byte pipes, a virtual clock, the adversary, and
//! the schedule that draws one step at a time from the seed.
//!
//! The session starts at server 1; in one schedule in three it is handed
//! between the servers (`handoff.rs`), and `srv` names the node that owns
//! its server side now. A restored import waiting for its commit at a
//! target lives in the pseudo-node [`IMPORT`].

use std::time::{Duration, Instant};

use pool_core::handoff::Imports;
use pool_core::{
    resume_session_id, write_refusal, Acceptor, CipherSuite, CloseReason, Config, Event,
    HandshakeError, Initiator, PublicKey, ReadResult, RecordType, SecretKey, SeededRng, Session,
    StreamError, MAX_RECORD_LEN,
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
mod deliver;
mod drive;
mod handoff;
mod handshake;
mod heal;
mod net_ops;
mod steps;

type R<T = ()> = Result<T, Violation>;

/// The client node.
pub(crate) const CLIENT: usize = 0;
/// The server that accepts the session.
pub(crate) const SERVER1: usize = 1;
/// The second server (the first handoff's target).
pub(crate) const SERVER2: usize = 2;
/// Not a node of its own: the session a handoff's target restored and
/// answered, waiting for its commit (the runtime keeps it detached, out
/// of the application's reach, until then).
pub(crate) const IMPORT: usize = 3;
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
    /// A RESUME_HANDOFF read; the target is pulling the state (nothing
    /// more is read until it answers).
    Pulled,
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
    /// Server end: bound to the [`IMPORT`] session (a resume it answered).
    import: bool,
    /// Client end: carries a RESUME_HANDOFF.
    handoff: bool,
    /// The server's refusal on this carrier is one the rules allow (the
    /// reason, for the client's side of the check).
    excused: Option<&'static str>,
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
    /// The session here was fenced (handed off for good).
    fenced: bool,
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
    /// Static keys of the client and the two servers.
    secrets: Vec<SecretKey>,
    pubs: Vec<PublicKey>,
    /// Each server's table of prepared imports (index by node).
    imports: Vec<Option<Imports>>,
    /// The handoff under way, if any.
    ho: Option<handoff::Handoff>,
    /// Draws of the handoff phase: a stream of its own, so schedules
    /// without handoffs are the ones they were before.
    hrng: Prng,
    /// This schedule hands the session over (one in three).
    handoffs_on: bool,
    /// Token lifetime of this schedule's handoffs.
    lifetime: Duration,
    handoff_seq: u32,
    /// Tokens of the handoffs that committed.
    committed_tokens: Vec<[u8; 48]>,
    /// RESUME_HANDOFF records the client wrote (for replays), and those
    /// that committed, with their target.
    captured_handoffs: Vec<Vec<u8>>,
    committed_records: Vec<(usize, Vec<u8>)>,
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
        let mut hrng = Prng::new(seed ^ 0x4841_4E44_4F46_4621);
        let handoffs_on = hrng.chance(1, 3);
        let lifetime = Duration::from_millis(hrng.pick(&[1_000, 3_000, 8_000]));
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
            fenced: false,
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
            nodes: vec![
                node("client"),
                node("server1"),
                node("server2"),
                node("import"),
            ],
            srv: SERVER1,
            carriers: Vec::new(),
            book: StreamBook::default(),
            nonces: NonceBook::default(),
            trace: Trace::new(opts.verbose || opts.keep_trace),
            secrets: Vec::new(),
            pubs: Vec::new(),
            imports: Vec::new(),
            ho: None,
            hrng,
            handoffs_on,
            lifetime,
            handoff_seq: 0,
            committed_tokens: Vec::new(),
            captured_handoffs: Vec::new(),
            committed_records: Vec::new(),
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
        self.secrets = vec![ck.clone(), s1.clone(), s2.clone()];
        self.pubs = self.secrets.iter().map(SecretKey::public_key).collect();
        self.imports = vec![
            None,
            Some(Imports::new(&mut self.crng)),
            Some(Imports::new(&mut self.crng)),
        ];
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
            import: false,
            handoff: false,
            excused: None,
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
            self.check_owner()?;
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
        if self.handoffs_on {
            // The client's runtime dials the target soon after an offer.
            let offered = self.nodes[CLIENT]
                .session
                .as_ref()
                .is_some_and(|s| s.handoff_followed().is_some());
            if offered && self.nodes[CLIENT].resuming.is_none() && self.hrng.chance(1, 4) {
                return self.client_arrives();
            }
            if self.hrng.chance(1, 6) {
                return self.handoff_op();
            }
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
}
