//! The live handoff in the core, on the virtual clock, with three parties:
//! the client (key 1), the source server (key 2) and the target (key 3).
//! The source offers, freezes and fences; the target restores, rebinds and
//! answers with `KKpsk0`; the client's first record in the new epoch is
//! the commit point. Every byte arrives exactly once.
mod util;

use std::time::{Duration, Instant};

use pool_core::handoff::Imports;
use pool_core::listener::handoff_resume_fields;
use pool_core::wire::DeclineCode;
use pool_core::{
    CloseReason, Event, HandoffError, HandshakeError, HeldOp, PublicKey, ReadResult, Session,
    StreamError,
};
use util::{key, Pair};

const LIFETIME: Duration = Duration::from_secs(10);
const NOW_MS: u64 = 1_800_000_000_000;

fn target_key() -> PublicKey {
    key(3).public_key()
}

/// The target's table with a token minted for the pair's session.
fn prepare(p: &Pair, imports: &mut Imports) -> [u8; 48] {
    imports
        .prepare(
            NOW_MS,
            p.b.id(),
            7,
            &target_key(),
            key(2).public_key(),
            key(1).public_key(),
            p.b.handoff_floor(),
            LIFETIME,
            &mut pool_core::SeededRng::from_u64(42),
        )
        .expect("prepare")
}

/// The source offers; the client sees the offer.
fn offer(p: &mut Pair, token: [u8; 48]) {
    let floor = p.b.handoff_floor();
    p.b.offer_handoff(
        p.now,
        7,
        target_key(),
        floor,
        LIFETIME,
        token,
        &["127.0.0.1:9000".parse().unwrap()],
    )
    .expect("offer");
    p.drive();
    assert!(
        p.a_events.iter().any(
            |e| matches!(e, Event::HandoffOffered(o) if o.id == 7 && o.target == target_key())
        ),
        "the client sees the offer: {:?}",
        p.a_events
    );
}

/// Everything from the client's RESUME_HANDOFF to the commit. Returns the
/// target's session, switched to the new carrier.
fn move_to_target(p: &mut Pair, imports: &mut Imports) -> Session {
    let mut msg = Vec::new();
    p.a.start_handoff_resume(&key(1), &mut p.rng, &mut msg)
        .expect("resume at target");
    // The target checks the token (one MAC) before anything else.
    let (id, epoch, token) = handoff_resume_fields(&msg).expect("fields");
    assert_eq!(id, p.b.id());
    imports
        .check(
            NOW_MS + 1,
            &id,
            &target_key(),
            &key(1).public_key(),
            &token,
            epoch,
        )
        .expect("token good");
    // It pulls the state from the source, which freezes.
    let snap = p.b.freeze().expect("freeze");
    let mut t = Session::restore(p.now, p.b.config().clone(), &snap).expect("restore");
    t.rebind_local(target_key());
    let mut reply = Vec::new();
    t.answer_handoff(p.now, &msg, &key(3), &mut p.rng, &mut reply)
        .expect("answer");
    // The old carrier's bytes in flight are lost with it.
    p.ab.clear();
    p.ba.clear();
    p.a.finish_resume(p.now, &reply)
        .expect("client takes the answer");
    assert_eq!(p.a.peer_key(), target_key());
    assert_eq!(p.a.origin_key(), Some(key(2).public_key()));
    let mut buf = vec![0u8; pool_core::MAX_RECORD_LEN];
    let n = p.a.poll_transmit(p.now, &mut buf).expect("first record");
    let mut rec = buf[..n].to_vec();
    t.confirm_resume(p.now, &mut rec).expect("commit");
    imports.spend(&id);
    t
}

#[test]
fn handoff_mid_transfer_moves_every_byte_once() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let mut moved = false;
    let results = util::transfer(&mut p, 3, 12 << 20, |p, got| {
        if moved || got < 4 << 20 {
            return;
        }
        if !p.hold_ab {
            // A round of the client's records will be in flight (and lost
            // with the old carrier) when the session moves.
            p.hold_ab = true;
            return;
        }
        moved = true;
        let token = prepare(p, &mut imports);
        offer(p, token);
        let t = move_to_target(p, &mut imports);
        let held = p.b.fence(target_key());
        assert!(held.is_empty());
        assert_eq!(
            p.b.close_reason(),
            Some(&CloseReason::HandedOff { to: target_key() })
        );
        p.b = t;
        p.hold_ab = false;
    });
    assert!(moved);
    for (sent, got, n_sent, n_got) in &results {
        assert_eq!(n_sent, n_got, "every byte arrived once");
        assert_eq!(sent, got);
    }
    assert!(p
        .a_events
        .iter()
        .any(|e| matches!(e, Event::Moved { to, .. } if *to == target_key())));
    assert!(!p.a.is_closed() && !p.b.is_closed());
    assert!(
        p.a.stats().frames_resent > 0,
        "the lost round was sent again"
    );
}

#[test]
fn server_to_client_data_in_flight_moves_too() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let id = p.a.open_stream().unwrap();
    p.drive();
    // Server writes; half of it reaches the client before the move, the
    // rest is held in flight and lost with the carrier.
    let first = util::pattern(0, 100_000, 5);
    let second = util::pattern(100_000, 100_000, 5);
    assert_eq!(p.b.stream_write(id, &first).unwrap(), first.len());
    p.drive();
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    p.hold_ba = true;
    assert_eq!(p.b.stream_write(id, &second).unwrap(), second.len());
    p.drive();
    let t = move_to_target(&mut p, &mut imports);
    p.b.fence(target_key());
    p.b = t;
    p.hold_ba = false;
    p.drive();
    let (got, fin) = util::read_available(&mut p.a, id).unwrap();
    assert!(!fin);
    assert_eq!(got.len(), 200_000);
    assert_eq!(&got[..100_000], &first[..]);
    assert_eq!(&got[100_000..], &second[..]);
    // And the target goes on serving the stream.
    assert_eq!(p.b.stream_write(id, b"from the target").unwrap(), 15);
    p.drive();
    assert_eq!(
        util::read_available(&mut p.a, id).unwrap().0,
        b"from the target"
    );
}

#[test]
fn frozen_source_reads_sends_and_delivers_nothing_and_unfreezes_losslessly() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, b"before").unwrap();
    p.drive();
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let snap = p.b.freeze().expect("freeze");
    assert!(!snap.is_empty());
    assert!(p.b.is_frozen());
    assert_eq!(p.b.freeze().unwrap_err(), HandoffError::Pending);
    // The client keeps writing: the source neither reads nor acknowledges.
    p.a.stream_write(id, b" during").unwrap();
    p.drive();
    assert!(!p.ab.is_empty(), "the bytes wait, unread");
    assert_eq!(
        p.b.stream_read(id, &mut [0u8; 64]).unwrap(),
        ReadResult::Blocked
    );
    assert_eq!(p.b.stream_write(id, b"x"), Err(StreamError::Blocked));
    assert!(p.b.poll_timeout().is_none(), "no timers while frozen");
    // A resume at the frozen source is refused for now (code 10).
    let mut msg = Vec::new();
    p.a.cancel_resume();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    let mut out = Vec::new();
    let err =
        p.b.handle_resume(p.now, &msg, &mut p.rng, &mut out)
            .unwrap_err();
    assert_eq!(err, HandshakeError::HandoffPending);
    assert_eq!(err.refuse_code(), 10);
    p.a.cancel_resume();
    // A finish asked for while frozen is held, then done at unfreeze.
    p.b.stream_finish(id).unwrap();
    // The target gave up: the source goes on where it stopped.
    p.b.unfreeze(p.now);
    assert!(!p.b.is_frozen());
    assert!(p.b.handoff_offered().is_none());
    p.drive();
    let (got, _) = util::read_available(&mut p.b, id).unwrap();
    assert_eq!(got, b"before during");
    p.b.stream_write(id, b"x").unwrap_err(); // finished at unfreeze
    p.drive();
    let (_, fin) = util::read_available(&mut p.a, id).unwrap();
    assert!(fin, "the held FIN went out");
}

#[test]
fn a_declined_offer_reaches_the_source() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    assert!(p.a.handoff_followed().is_some());
    p.a.decline_handoff(DeclineCode::Unreachable);
    assert!(p.a.handoff_followed().is_none());
    p.drive();
    assert!(p.b_events.contains(&Event::HandoffDeclined {
        id: 7,
        code: DeclineCode::Unreachable as u8
    }));
}

#[test]
fn stream_operations_held_while_frozen_go_to_the_runtime_at_fence() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let id = p.a.open_stream().unwrap();
    p.drive();
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    p.b.freeze().unwrap();
    p.b.stream_finish(id).unwrap();
    p.b.stream_reset(id, 9).unwrap();
    let held = p.b.fence(target_key());
    assert_eq!(held, vec![HeldOp::Finish(id), HeldOp::Reset(id, 9)]);
    // Fenced: over for good, and it refuses any resume.
    assert!(p.b.is_closed());
    assert!(p.b.poll_transmit(p.now, &mut [0u8; 2048]).is_none());
    let mut msg = Vec::new();
    p.a.cancel_resume();
    p.a.start_resume(&mut p.rng, &mut msg).unwrap();
    let err =
        p.b.handle_resume(p.now, &msg, &mut p.rng, &mut Vec::new())
            .unwrap_err();
    assert_eq!(err, HandshakeError::Closed);
}

#[test]
fn only_the_target_key_can_answer_the_handoff_resume() {
    // The source holds the chaining secret too; KKpsk0 makes the answer
    // prove the target's static key, which the source does not have.
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let mut msg = Vec::new();
    p.a.start_handoff_resume(&key(1), &mut p.rng, &mut msg)
        .unwrap();
    let snap = p.b.freeze().unwrap();
    let mut fake = Session::restore(p.now, p.b.config().clone(), &snap).unwrap();
    // Answering as itself (key 2): the client expects key 3.
    let mut reply = Vec::new();
    let r = fake.answer_handoff(p.now, &msg, &key(2), &mut p.rng, &mut reply);
    assert_eq!(r.unwrap_err(), HandshakeError::Crypto);
    // A session bound to another key than the one it answers with refuses.
    let mut t = Session::restore(p.now, p.b.config().clone(), &snap).unwrap();
    assert_eq!(
        t.answer_handoff(p.now, &msg, &key(3), &mut p.rng, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::Crypto
    );
    // The client is unharmed: it still talks to the source.
    assert_eq!(p.a.peer_key(), key(2).public_key());
    p.a.cancel_resume();
    p.b.unfreeze(p.now);
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, b"still here").unwrap();
    p.drive();
    assert_eq!(util::read_available(&mut p.b, id).unwrap().0, b"still here");
}

#[test]
fn a_replayed_handoff_resume_is_refused_after_the_commit() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let mut msg = Vec::new();
    p.a.start_handoff_resume(&key(1), &mut p.rng, &mut msg)
        .unwrap();
    let (id, epoch, tok) = handoff_resume_fields(&msg).unwrap();
    let snap = p.b.freeze().unwrap();
    let mut t = Session::restore(p.now, p.b.config().clone(), &snap).unwrap();
    t.rebind_local(target_key());
    let mut reply = Vec::new();
    t.answer_handoff(p.now, &msg, &key(3), &mut p.rng, &mut reply)
        .unwrap();
    p.a.finish_resume(p.now, &reply).unwrap();
    imports.spend(&id);
    // The token is spent, and the session refuses the same epoch again.
    assert!(imports
        .check(
            NOW_MS,
            &id,
            &target_key(),
            &key(1).public_key(),
            &tok,
            epoch
        )
        .is_err());
    assert!(matches!(
        t.answer_handoff(p.now, &msg, &key(3), &mut p.rng, &mut Vec::new()),
        Err(HandshakeError::StaleResume { .. })
    ));
}

#[test]
fn offers_are_one_at_a_time_and_only_from_servers() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let floor = p.b.handoff_floor();
    assert_eq!(
        p.b.offer_handoff(p.now, 8, target_key(), floor, LIFETIME, token, &[]),
        Err(HandoffError::Pending)
    );
    assert_eq!(
        p.a.offer_handoff(p.now, 8, target_key(), floor, LIFETIME, token, &[]),
        Err(HandoffError::NotServer)
    );
    p.b.withdraw_handoff();
    assert!(matches!(
        p.b.offer_handoff(p.now, 9, key(1).public_key(), floor, LIFETIME, token, &[]),
        Err(HandoffError::Invalid(_))
    ));
    // No offer, no freeze.
    assert_eq!(p.b.freeze().unwrap_err(), HandoffError::NotPending);
    let _ = Instant::now();
}

#[test]
fn a_fenced_source_hands_out_nothing_of_the_moved_streams() {
    // Simulator finding 9: bytes buffered at the source at the freeze are
    // in the snapshot, so the target delivers them; the fenced source must
    // not hand them out too.
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, b"unread at the source").unwrap();
    p.drive();
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let mut t = move_to_target(&mut p, &mut imports);
    p.b.fence(target_key());
    assert!(matches!(
        p.b.stream_read(id, &mut [0u8; 64]),
        Err(StreamError::SessionClosed(_))
    ));
    assert_eq!(
        util::read_available(&mut t, id).unwrap().0,
        b"unread at the source"
    );
}

#[test]
fn an_unconfirmed_move_goes_back_to_the_source() {
    // Simulator finding 10: the client took the target's answer, but its
    // first record never arrived and the target gave the import up; the
    // source unfroze. The client goes back and nothing is lost.
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let id = p.a.open_stream().unwrap();
    p.a.stream_write(id, b"before ").unwrap();
    p.drive();
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let mut msg = Vec::new();
    p.a.start_handoff_resume(&key(1), &mut p.rng, &mut msg)
        .unwrap();
    let snap = p.b.freeze().unwrap();
    let mut t = Session::restore(p.now, p.b.config().clone(), &snap).unwrap();
    t.rebind_local(target_key());
    let mut reply = Vec::new();
    t.answer_handoff(p.now, &msg, &key(3), &mut p.rng, &mut reply)
        .unwrap();
    p.ab.clear();
    p.ba.clear();
    p.a.finish_resume(p.now, &reply).unwrap();
    assert!(p.a.move_unconfirmed());
    // The client writes more; its first record to the target is lost.
    p.a.stream_write(id, b"after").unwrap();
    let _ =
        p.a.poll_transmit(p.now, &mut vec![0u8; pool_core::MAX_RECORD_LEN]);
    p.a.carrier_lost(p.now);
    // The target gives up; the source thaws; the client goes back.
    drop(t);
    p.b.unfreeze(p.now);
    assert!(p.a.revert_handoff());
    assert_eq!(p.a.peer_key(), key(2).public_key());
    assert!(!p.a.revert_handoff(), "once");
    p.cut();
    p.resume().expect("resume at the source");
    p.drive();
    assert_eq!(
        util::read_available(&mut p.b, id).unwrap().0,
        b"before after"
    );
}

#[test]
fn a_confirmed_move_cannot_go_back() {
    let mut p = util::pair();
    let mut imports = Imports::new(&mut pool_core::SeededRng::from_u64(41));
    let token = prepare(&p, &mut imports);
    offer(&mut p, token);
    let t = move_to_target(&mut p, &mut imports);
    p.b.fence(target_key());
    p.b = t;
    p.drive();
    // A record of the target in the new epoch confirmed the commit.
    assert!(!p.a.move_unconfirmed());
    assert!(!p.a.revert_handoff());
    assert_eq!(p.a.peer_key(), target_key());
}
