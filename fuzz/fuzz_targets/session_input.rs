//! An established session's `handle_carrier_data` on arbitrary bytes: as
//! raw carrier bytes (stopped by the AEAD), and as the plaintext of records
//! sealed by a peer that holds the keys (reaching every frame handler).
//! Then the session is driven on: transmit, events, reads, timers.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pool_core::{Config, Event, SeededRng, Session, MAX_RECORD_LEN};

#[path = "../../crates/pool-core/tests/util/mod.rs"]
mod util;

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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let t = template();
    let mut now = t.now;
    let mut b = Session::restore(now, Config::default(), &t.b).expect("restore");
    let mut f = util::forge::Forger::take_over(&t.a, &mut b, now, &mut SeededRng::from_u64(5));
    drive(&mut b, now);
    if mode & 1 == 0 {
        // Raw carrier bytes, fed in pieces.
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
        let n = rec.len();
        assert_eq!(b.handle_carrier_data(now, &mut rec), n);
        drive(&mut b, now);
        now += Duration::from_millis(u64::from(mode) * 40);
        b.handle_timeout(now);
    }
    let snap = b.snapshot();
    let _ = Session::restore(now, b.config().clone(), &snap).expect("own snapshot restores");
});
