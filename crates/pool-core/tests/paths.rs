//! Path changes in the core: direct-path candidates travel in PATHS frames
//! (again after every resume), and a resume started while the old carrier
//! still works (make-before-break) loses and duplicates nothing.
mod util;

use std::net::SocketAddr;

use pool_core::Event;

fn peer_paths(events: &[Event]) -> Vec<Vec<SocketAddr>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::PeerPaths(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn candidates_reach_the_peer_and_are_sent_again_after_a_resume() {
    let mut p = util::pair();
    p.drive();
    let addrs: Vec<SocketAddr> = vec![
        "10.9.3.2:9253".parse().unwrap(),
        "[fd00::2]:9253".parse().unwrap(),
    ];
    p.b.set_local_paths(&addrs);
    p.drive();
    assert_eq!(peer_paths(&p.a_events), vec![addrs.clone()]);
    // Setting the same list again sends nothing new.
    p.b.set_local_paths(&addrs);
    p.drive();
    assert_eq!(peer_paths(&p.a_events).len(), 1);
    // After a resume the peer hears them again (it may have moved too).
    p.cut();
    p.resume().unwrap();
    p.drive();
    assert_eq!(peer_paths(&p.a_events), vec![addrs.clone(), addrs]);
    // More than MAX_PATHS are cut to MAX_PATHS.
    let many: Vec<SocketAddr> = (0..40)
        .map(|i| format!("10.0.0.{i}:1").parse().unwrap())
        .collect();
    p.b.set_local_paths(&many);
    p.drive();
    let last = peer_paths(&p.a_events).pop().unwrap();
    assert_eq!(last, many[..pool_core::wire::MAX_PATHS].to_vec());
}

#[test]
fn make_before_break_resume_mid_transfer_is_exact() {
    // The old carrier keeps carrying data between start_resume and the
    // answer; then everything in flight on it is lost (it is retired).
    let mut p = util::pair();
    p.drive();
    let mut switched = false;
    let r = util::transfer(&mut p, 3, 24 << 20, |p, got| {
        if !switched && got > 6 << 20 {
            switched = true;
            let mut msg = Vec::new();
            p.a.start_resume(&mut p.rng, &mut msg).unwrap();
            // Traffic goes on over the old carrier meanwhile.
            for _ in 0..3 {
                p.drive();
            }
            let mut reply = Vec::new();
            p.b.handle_resume(p.now, &msg, &mut p.rng, &mut reply)
                .unwrap();
            // The old carrier dies now: whatever a sent on it after this is
            // lost, as is what b sent that a had not read yet; b switches
            // on a's first record on the new one.
            p.ab.clear();
            p.ba.clear();
            p.a.finish_resume(p.now, &reply).unwrap();
            p.commit_resume().unwrap();
        }
    });
    assert!(switched);
    for (sent, got, n, recvd) in r {
        assert_eq!(sent, got);
        assert_eq!(n, recvd);
    }
    assert_eq!(p.a.stats().resumes, 1);
    assert!(p.a.carrier_up() && p.b.carrier_up());
}

#[test]
fn a_cancelled_resume_leaves_the_session_on_its_carrier() {
    let mut p = util::pair();
    p.drive();
    let mut msg = Vec::new();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    // The new carrier failed before an answer.
    p.a.cancel_resume();
    let r = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
    assert_eq!(r[0].0, r[0].1);
    // A later resume (and a rekey) still work.
    p.cut();
    p.resume().unwrap();
    p.a.force_rekey(&mut pool_core::SeededRng::from_u64(9));
    let r = util::transfer(&mut p, 1, 1 << 20, |_, _| {});
    assert_eq!(r[0].0, r[0].1);
    assert!(p.a.stats().rekeys >= 1);
}
