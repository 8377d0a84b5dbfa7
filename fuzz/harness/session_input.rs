//! An established session's `handle_carrier_data` on arbitrary bytes: as
//! raw carrier bytes (stopped by the AEAD), and as the plaintext of records
//! sealed by a peer that holds the keys (reaching every frame handler).
//! Then the session is driven on: transmit, events, reads, timers.
//!
//! Input: `mode` then the body. Mode bit 0 clear: the body is raw carrier
//! bytes, fed in pieces of `1 + mode / 2` bytes. Bit 0 set: the body is
//! `[len: u16][plaintext]...`, each plaintext sealed as one record (with
//! bit 1, the expected sequence number is put in front), and the clock
//! moves `mode * 40 ms` after each record.
//!
//! The clock is part of the input, so the session's timers run: a record
//! that leaves a ping unanswered for the probe timeout (2 s) gets the
//! carrier declared dead (`Event::CarrierDead`). From then on the session
//! has no keys and consumes nothing until a resume; the carrier's bytes are
//! the runtime's to drop. The harness checks that and stops feeding.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pool_core::{Config, Event, SeededRng, Session, MAX_RECORD_LEN};

use crate::util;

fn drive(s: &mut Session, now: Instant) {
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    while s.poll_transmit(now, &mut buf).is_some() {}
    while let Some(e) = s.poll_event() {
        if let Event::StreamReadable(id) = e {
            let _ = util::read_available(s, id);
        }
    }
    let _ = s.stats();
}

/// Both sides' snapshots of one established session, made once: each
/// input restores the responder and resumes it (one epoch handshake
/// instead of a whole new session).
struct Template {
    a: Vec<u8>,
    b: Vec<u8>,
    now: Instant,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let mut p = util::pair();
        p.drive();
        Template {
            a: p.a.snapshot().to_vec(),
            b: p.b.snapshot().to_vec(),
            now: p.now,
        }
    })
}

/// A session whose carrier is gone takes everything that still comes on it
/// (the bytes of a dead carrier are discarded, whole records included) and
/// is not changed by them.
fn check_detached(s: &mut Session, now: Instant, pending: &mut [u8]) {
    assert!(!s.carrier_up());
    let mut dead = false;
    while let Some(e) = s.poll_event() {
        dead |= e == Event::CarrierDead;
    }
    assert!(dead, "the carrier went down without Event::CarrierDead");
    let before = s.stats();
    let n = pending.len();
    assert_eq!(s.handle_carrier_data(now, pending), n);
    assert_eq!(s.stats(), before);
    assert!(s.poll_event().is_none());
}

pub(crate) fn run(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let t = template();
    let mut now = t.now;
    let mut b = Session::restore(now, Config::default(), &t.b).expect("restore");
    let mut f = util::forge::Forger::take_over(&t.a, &mut b, now, &mut SeededRng::from_u64(5));
    drive(&mut b, now);
    if mode & 1 == 0 {
        // Raw carrier bytes, fed in pieces. The clock does not move; bytes
        // that do not authenticate drop the carrier (never the session),
        // after which everything fed is discarded.
        let chunk = 1 + usize::from(mode >> 1);
        let mut pending = Vec::new();
        for piece in body.chunks(chunk) {
            pending.extend_from_slice(piece);
            let used = b.handle_carrier_data(now, &mut pending);
            assert!(used <= pending.len());
            pending.drain(..used);
            drive(&mut b, now);
            if b.is_closed() {
                break;
            }
        }
        return;
    }
    // Authenticated plaintexts: [len: u16][bytes] ... each sealed as one
    // record; with mode bit 1 the expected sequence number is put in front.
    let mut rest = body;
    while rest.len() >= 2 && !b.is_closed() {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let pt = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let mut plain = Vec::with_capacity(8 + pt.len());
        if mode & 2 != 0 {
            plain.extend_from_slice(&f.seq.to_be_bytes());
        }
        plain.extend_from_slice(pt);
        let mut rec = f.seal_raw(&plain);
        if !b.carrier_up() {
            // Declared dead by the timers below: the runtime stops reading
            // this carrier (and the peer resumes on another one).
            check_detached(&mut b, now, &mut rec);
            break;
        }
        let n = rec.len();
        assert_eq!(b.handle_carrier_data(now, &mut rec), n);
        drive(&mut b, now);
        now += Duration::from_millis(u64::from(mode) * 40);
        b.handle_timeout(now);
    }
    // The timers go on to their end: a session left without a carrier
    // closes at the resume deadline.
    if !b.is_closed() && !b.carrier_up() {
        drive(&mut b, now);
        now += b.config().get_resume_deadline();
        b.handle_timeout(now);
        assert!(
            b.is_closed(),
            "no resume before the deadline closes the session"
        );
    }
    let snap = b.snapshot();
    let _ = Session::restore(now, b.config().clone(), &snap).expect("own snapshot restores");
}
