//! The responder's side of a resume: `pool_core::resume_session_id` and
//! `Session::handle_resume` on a real session (restored from a snapshot
//! of an established pair, with data in flight both ways).
//!
//! The input is a list of operations, each a byte and its arguments:
//!
//! | op % 8 | arguments | what |
//! | --- | --- | --- |
//! | 0 | `len: u8`, bytes | the bytes as a RESUME record |
//! | 1 | | a genuine RESUME (the initiator's `start_resume`) |
//! | 2 | `pos: u8`, `xor: u8` | a genuine RESUME with one byte altered |
//! | 3 | `i: u8` | a RESUME accepted before, again |
//! | 4 | `delta: i8` | the initiator restored with its receive position moved |
//! | 5 | | the carrier is cut |
//! | 6 | `n: u8` | `n * 100 ms` pass (timers run, the pair is driven) |
//! | 7 | `n: u8` | both sides write `16 * n` bytes on their stream |
//!
//! Checked: a RESUME the responder accepts carries its id, brings its
//! carrier up on a later epoch and is answered with one whole RESUMED
//! record that the initiator completes; one it refuses changes nothing and
//! gets no answer written; an altered or replayed RESUME is refused, a
//! genuine one accepted (unless the initiator's position was moved); and
//! the stream bytes that arrive, across any number of cuts and resumes,
//! are exactly a prefix of those sent.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pool_core::{resume_session_id, wire, Config, HandshakeError, RecordType, SeededRng, Session};

use crate::util::{self, Pair};

/// Most operations per input (each genuine resume costs two epoch
/// handshakes).
const MAX_OPS: usize = 64;

/// The pattern salts of the two streams.
const SALT_A: u64 = 1;
const SALT_B: u64 = 2;

struct Template {
    a: Vec<u8>,
    b: Vec<u8>,
    now: Instant,
    /// a's stream to b, and b's to a.
    sa: u64,
    sb: u64,
    a_sent: usize,
    b_got: usize,
    b_sent: usize,
    a_got: usize,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let mut p = util::pair();
        p.drive();
        let sa = p.a.open_stream().expect("a opens a stream");
        let a_sent =
            p.a.stream_write(sa, &util::pattern(0, 1000, SALT_A))
                .expect("a writes");
        p.drive();
        let sb = p.b.open_stream().expect("b opens a stream");
        let b_got = util::read_available(&mut p.b, sa).expect("b reads").0.len();
        // b's frames stay in flight: its replay buffer holds them, so the
        // initiator's resume position has a range to be in or out of.
        p.hold_ba = true;
        let b_sent =
            p.b.stream_write(sb, &util::pattern(0, 3000, SALT_B))
                .expect("b writes");
        p.drive();
        Template {
            a: p.a.snapshot().to_vec(),
            b: p.b.snapshot().to_vec(),
            now: p.now,
            sa,
            sb,
            a_sent,
            b_got,
            b_sent,
            a_got: 0,
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Any,
    Accept,
    Refuse,
}

struct Run {
    p: Pair,
    rng: SeededRng,
    /// RESUME records the responder accepted.
    accepted: Vec<Vec<u8>>,
    /// The initiator's receive position was moved since its last resume.
    moved: bool,
    /// ... at any time: then stream bytes may be lost or repeated.
    ever_moved: bool,
    sa: u64,
    sb: u64,
    a_sent: usize,
    b_got: usize,
    b_sent: usize,
    a_got: usize,
}

fn byte(input: &mut &[u8]) -> Option<u8> {
    let (&b, rest) = input.split_first()?;
    *input = rest;
    Some(b)
}

fn bytes<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = input.split_at(n.min(input.len()));
    *input = rest;
    head
}

/// Fuzzing entry: tolerates the known core bug above.
pub(crate) fn run(data: &[u8]) {
    let t = template();
    let a = Session::restore(t.now, Config::default(), &t.a).expect("restore a");
    let b = Session::restore(t.now, Config::default(), &t.b).expect("restore b");
    let mut r = Run {
        p: Pair::from_sessions(a, b, t.now, SeededRng::from_u64(7)),
        rng: SeededRng::from_u64(8),
        accepted: Vec::new(),
        moved: false,
        ever_moved: false,
        sa: t.sa,
        sb: t.sb,
        a_sent: t.a_sent,
        b_got: t.b_got,
        b_sent: t.b_sent,
        a_got: t.a_got,
    };
    let mut input = data;
    for _ in 0..MAX_OPS {
        let Some(op) = byte(&mut input) else {
            break;
        };
        match op % 8 {
            0 => {
                let n = byte(&mut input).map_or(0, usize::from);
                let rec = bytes(&mut input, n).to_vec();
                r.offer(&rec, Expect::Any);
            }
            1 => r.genuine(None),
            2 => {
                let pos = byte(&mut input).unwrap_or(0);
                let xor = byte(&mut input).unwrap_or(0);
                r.genuine((xor != 0).then_some((pos, xor)));
            }
            3 => {
                let i = usize::from(byte(&mut input).unwrap_or(0));
                if !r.accepted.is_empty() {
                    let rec = r.accepted[i % r.accepted.len()].clone();
                    r.offer(&rec, Expect::Refuse);
                }
            }
            4 => {
                let delta = byte(&mut input).unwrap_or(0) as i8;
                r.move_position(delta);
            }
            5 => r.p.cut(),
            6 => {
                let n = byte(&mut input).unwrap_or(0);
                r.p.advance(Duration::from_millis(100) * u32::from(n));
            }
            _ => {
                let n = 16 * usize::from(byte(&mut input).unwrap_or(0));
                r.write(n);
            }
        }
        r.p.drive();
        r.read();
    }
    for s in [&r.p.a, &r.p.b] {
        let snap = s.snapshot();
        Session::restore(r.p.now, s.config().clone(), &snap).expect("own snapshot restores");
    }
}

impl Run {
    /// Hands `rec` to the responder as a RESUME on a new carrier; returns
    /// its RESUMED if it accepted.
    fn offer(&mut self, rec: &[u8], expect: Expect) -> Option<Vec<u8>> {
        let now = self.p.now;
        let b = &mut self.p.b;
        let id = resume_session_id(rec);
        let (stats, up, closed) = (b.stats(), b.carrier_up(), b.is_closed());
        let mut out = Vec::new();
        let res = b.handle_resume(now, rec, &mut self.rng, &mut out);
        match &res {
            Ok(()) => {
                assert_eq!(id, Ok(b.id()), "accepted a RESUME for another session");
                // Answered, not switched: nothing changes before the first
                // valid record of the new epoch (confirm_resume).
                assert_eq!(b.carrier_up(), up);
                assert_eq!(
                    wire::peek_record(&out),
                    Ok(Some((RecordType::Resumed, out.len()))),
                    "the answer is one whole RESUMED"
                );
                let after = b.stats();
                assert_eq!(after.resumes, stats.resumes);
                assert_eq!(
                    after.epoch, stats.epoch,
                    "no epoch change before the commit"
                );
                assert!(expect != Expect::Refuse, "accepted a RESUME it must refuse");
            }
            Err(e) => {
                if closed {
                    assert_eq!(*e, HandshakeError::Closed);
                } else if matches!(id, Ok(other) if other != b.id()) {
                    assert_eq!(*e, HandshakeError::UnknownSession);
                }
                assert_eq!(b.stats(), stats, "a refused RESUME changed the session");
                assert_eq!(b.carrier_up(), up);
                assert!(
                    out.is_empty(),
                    "handle_resume failed ({e}) but wrote {} bytes of answer",
                    out.len()
                );
                assert!(
                    expect != Expect::Accept,
                    "a genuine RESUME was refused: {e}"
                );
            }
        }
        res.ok().map(|()| out)
    }

    /// A RESUME from the initiator itself, maybe with one byte altered.
    fn genuine(&mut self, alter: Option<(u8, u8)>) {
        let mut rec = Vec::new();
        if let Err(e) = self.p.a.start_resume(&mut self.rng, &mut rec) {
            assert!(
                self.p.a.is_closed(),
                "start_resume failed on a live session: {e}"
            );
            return;
        }
        if let Some((pos, xor)) = alter {
            let i = usize::from(pos) % rec.len();
            rec[i] ^= xor;
            self.offer(&rec, Expect::Refuse);
            self.p.a.cancel_resume();
            return;
        }
        let expect = if self.p.b.is_closed() {
            Expect::Refuse
        } else if self.moved {
            Expect::Any
        } else {
            Expect::Accept
        };
        let Some(out) = self.offer(&rec, expect) else {
            self.p.a.cancel_resume();
            return;
        };
        // The new carrier replaces the old one: what was in flight is gone.
        self.p.ab.clear();
        self.p.ba.clear();
        self.p.hold_ab = false;
        self.p.hold_ba = false;
        let now = self.p.now;
        let before = self.p.b.stats();
        self.p
            .a
            .finish_resume(now, &out)
            .expect("the initiator completes a resume the responder accepted");
        // The initiator's first record on the new carrier commits it.
        match self.p.commit_resume() {
            Ok(()) => {
                let after = self.p.b.stats();
                assert!(self.p.b.carrier_up() || self.p.b.is_closed());
                assert_eq!(after.resumes, before.resumes + 1);
                assert!(
                    after.epoch > before.epoch,
                    "a resume moves to a later epoch"
                );
            }
            // A moved position is caught at the commit (a sequence gap).
            Err(e) => assert!(self.moved, "a genuine resume failed at its commit: {e}"),
        }
        self.accepted.push(rec);
        self.moved = false;
    }

    /// The initiator restored from its snapshot with `recv_next` moved by
    /// `delta` (an older or a forged snapshot).
    fn move_position(&mut self, delta: i8) {
        if delta == 0 {
            return;
        }
        let mut snap = self.p.a.snapshot().to_vec();
        // `POOLSNP3` layout (see forge.rs; v3 only appends the handoff section): recv_next is the u64 after the
        // previous-chain flag at 138 (and its 36 bytes, if present) and the
        // three peer limits.
        let off = if snap[138] == 1 { 139 + 36 } else { 139 } + 24;
        let at = off..off + 8;
        let next = u64::from_be_bytes(snap[at.clone()].try_into().expect("8 bytes"));
        let moved = next.wrapping_add_signed(i64::from(delta));
        snap[at].copy_from_slice(&moved.to_be_bytes());
        let cfg = self.p.a.config().clone();
        match Session::restore(self.p.now, cfg, &snap) {
            Ok(a) => {
                self.p.a = a;
                self.p.ab.clear();
                self.p.ba.clear();
                self.p.b.carrier_lost(self.p.now);
                self.moved = true;
                self.ever_moved = true;
            }
            Err(e) => panic!("a snapshot with another receive position does not restore: {e}"),
        }
    }

    fn write(&mut self, n: usize) {
        if let Ok(k) = self
            .p
            .a
            .stream_write(self.sa, &util::pattern(self.a_sent, n, SALT_A))
        {
            self.a_sent += k;
        }
        if let Ok(k) = self
            .p
            .b
            .stream_write(self.sb, &util::pattern(self.b_sent, n, SALT_B))
        {
            self.b_sent += k;
        }
    }

    /// Reads both streams; what arrived must be what was sent, in order.
    fn read(&mut self) {
        let check = !self.ever_moved;
        if let Ok((got, _)) = util::read_available(&mut self.p.b, self.sa) {
            if check {
                assert_eq!(got, util::pattern(self.b_got, got.len(), SALT_A), "a to b");
                assert!(self.b_got + got.len() <= self.a_sent);
            }
            self.b_got += got.len();
        }
        if let Ok((got, _)) = util::read_available(&mut self.p.a, self.sb) {
            if check {
                assert_eq!(got, util::pattern(self.a_got, got.len(), SALT_B), "b to a");
                assert!(self.a_got + got.len() <= self.b_sent);
            }
            self.a_got += got.len();
        }
    }
}
