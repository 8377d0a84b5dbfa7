//! PATHS frames and the 18-byte address form (`pool_core::relay::get_addr`,
//! shared by PATHS, the relay protocol and the bridge preamble).
//!
//! Input: `mode` then the body.
//!
//! - Always: every 18 bytes of the body read as an address write back to
//!   the same bytes, and the body behind a PATHS type byte decodes either
//!   to an error or to a PATHS frame of whole addresses within the limit.
//! - Mode bit 0: that frame is sealed by a peer holding the keys
//!   (`tests/util/forge.rs`); the session reports exactly the decoded
//!   addresses, or closes on a frame that does not decode.
//! - Mode bit 1: the body's addresses are a session's local paths; its
//!   peer (a real session) reports the same addresses, at most
//!   `MAX_PATHS`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use pool_core::relay::{get_addr, put_addr};
use pool_core::wire::{self, Frame, MAX_PATHS};
use pool_core::{Config, Event, SeededRng, Session, MAX_RECORD_LEN};

use crate::util;

struct Template {
    a: Vec<u8>,
    b: Vec<u8>,
    now: std::time::Instant,
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

fn paths_type() -> u8 {
    let mut b = Vec::new();
    Frame::Paths { addrs: &[] }.encode_to_vec(&mut b);
    b[0]
}

fn addrs_of(bytes: &[u8]) -> Vec<SocketAddr> {
    bytes
        .chunks_exact(18)
        .map(|c| get_addr(c.try_into().expect("18 bytes")))
        .collect()
}

fn peer_paths(s: &mut Session) -> Vec<Vec<SocketAddr>> {
    let mut seen = Vec::new();
    while let Some(e) = s.poll_event() {
        if let Event::PeerPaths(list) = e {
            seen.push(list);
        }
    }
    seen
}

pub(crate) fn run(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    for c in body.chunks_exact(18) {
        let a = get_addr(c.try_into().expect("18 bytes"));
        let mut back = Vec::new();
        put_addr(&mut back, &a);
        assert_eq!(back, c, "{a} does not write back to its bytes");
    }

    let mut frame = vec![paths_type()];
    frame.extend_from_slice(body);
    let decoded = match wire::decode(&frame) {
        Ok((Frame::Paths { addrs }, used)) => {
            assert!(addrs.len() % 18 == 0 && addrs.len() <= MAX_PATHS * 18);
            // The length varint need not be minimal.
            assert!(used >= Frame::Paths { addrs }.encoded_len() && used <= frame.len());
            Some((addrs_of(addrs), used))
        }
        Ok((other, _)) => panic!("a PATHS type byte decoded as {other:?}"),
        Err(_) => None,
    };

    if mode & 1 != 0 {
        let t = template();
        let mut b = Session::restore(t.now, Config::default(), &t.b).expect("restore");
        let mut f =
            util::forge::Forger::take_over(&t.a, &mut b, t.now, &mut SeededRng::from_u64(5));
        let mut buf = vec![0u8; MAX_RECORD_LEN];
        while b.poll_transmit(t.now, &mut buf).is_some() {}
        let _ = peer_paths(&mut b);
        // One frame: the decoded one, or the bytes that did not decode.
        let mut pt = f.seq.to_be_bytes().to_vec();
        pt.extend_from_slice(&frame[..decoded.as_ref().map_or(frame.len(), |d| d.1)]);
        let mut rec = f.seal_raw(&pt);
        let n = rec.len();
        assert_eq!(b.handle_carrier_data(t.now, &mut rec), n);
        let seen = peer_paths(&mut b);
        match &decoded {
            Some((list, _)) => {
                assert!(!b.is_closed(), "a valid PATHS frame closed the session");
                assert_eq!(seen, vec![list.clone()]);
            }
            None => assert!(
                b.is_closed(),
                "a PATHS frame that does not decode was taken"
            ),
        }
    }

    if mode & 2 != 0 {
        let t = template();
        let a = Session::restore(t.now, Config::default(), &t.a).expect("restore a");
        let b = Session::restore(t.now, Config::default(), &t.b).expect("restore b");
        let mut p = util::Pair::from_sessions(a, b, t.now, SeededRng::from_u64(6));
        let list = addrs_of(body);
        p.a.set_local_paths(&list);
        p.resume().expect("resume");
        p.drive();
        let seen: Vec<_> = p
            .b_events
            .iter()
            .filter_map(|e| match e {
                Event::PeerPaths(l) => Some(l.clone()),
                _ => None,
            })
            .collect();
        let want: Vec<_> = list.iter().copied().take(MAX_PATHS).collect();
        if want.is_empty() {
            assert!(seen.is_empty(), "no local paths, yet a PATHS frame");
        } else {
            assert_eq!(seen, vec![want]);
        }
    }
}
