//! The registry's rules on a virtual clock.

use super::*;

fn key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn load(sessions: u32) -> Load {
    Load {
        sessions,
        ..Load::default()
    }
}

fn reg(workers: &[(u8, u32)]) -> (Registry, Instant) {
    let now = Instant::now();
    let mut r = Registry::new(Rules::default());
    for (n, s) in workers {
        r.register(
            now,
            key(*n),
            vec![format!("127.0.0.1:{}", 9000 + u16::from(*n))],
            BTreeSet::new(),
            load(*s),
            None,
            0,
        );
    }
    (r, now)
}

#[test]
fn least_sessions_counts_placements_not_yet_reported() {
    let (mut r, now) = reg(&[(1, 0), (2, 0), (3, 0)]);
    let mut per = BTreeMap::new();
    for i in 0..30u8 {
        let w = r.place(now, &key(100 + i)).unwrap();
        *per.entry(w.key).or_insert(0) += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![10, 10, 10]);
}

#[test]
fn placements_age_out_once_a_heartbeat_reports_them() {
    let (mut r, now) = reg(&[(1, 0), (2, 5)]);
    assert_eq!(r.place(now, &key(9)).unwrap().key, key(1));
    let later = now + Duration::from_millis(1500);
    r.heartbeat(later, &key(1), load(1), &[], &[]);
    assert_eq!(r.get(&key(1)).unwrap().weight(), 1);
}

#[test]
fn no_placement_on_draining_lost_or_disconnected_workers() {
    let (mut r, now) = reg(&[(1, 0), (2, 0), (3, 0)]);
    r.set_state(&key(1), WorkerState::Draining);
    r.disconnected(&key(2));
    assert_eq!(r.place(now, &key(9)).unwrap().key, key(3));
    r.set_state(&key(3), WorkerState::Lost);
    assert!(r.place(now, &key(9)).is_none());
}

#[test]
fn hash_placement_is_sticky() {
    let (mut r, now) = reg(&[(1, 0), (2, 0), (3, 0)]);
    r.rules.policy = Policy::Hash;
    let a = r.place(now, &key(42)).unwrap().key;
    for _ in 0..5 {
        assert_eq!(r.place(now, &key(42)).unwrap().key, a);
    }
}

#[test]
fn a_lease_expires_after_its_length_and_only_once() {
    let (mut r, now) = reg(&[(1, 3), (2, 3)]);
    r.heartbeat(now + Duration::from_secs(2), &key(2), load(3), &[], &[]);
    assert!(r.expire(now + Duration::from_millis(2999)).is_empty());
    assert_eq!(r.expire(now + Duration::from_millis(3001)), vec![key(1)]);
    assert!(r.expire(now + Duration::from_millis(3500)).is_empty());
    assert_eq!(r.get(&key(1)).unwrap().record.state, WorkerState::Lost);
    assert_eq!(r.get(&key(1)).unwrap().load.sessions, 0);
    // It comes back active when it registers again.
    let rec = r.register(
        now + Duration::from_secs(4),
        key(1),
        vec!["x:1".into()],
        BTreeSet::new(),
        load(0),
        None,
        0,
    );
    assert_eq!(rec.state, WorkerState::Active);
}

#[test]
fn restored_workers_get_one_lease_to_come_back() {
    let now = Instant::now();
    let mut r = Registry::new(Rules::default());
    r.restore(
        now,
        vec![WorkerRecord {
            key: key(1),
            addrs: vec!["a:1".into()],
            state: WorkerState::Draining,
            registered_ms: 5,
        }],
    );
    assert!(r.place(now, &key(9)).is_none(), "not connected yet");
    assert!(r.expire(now + Duration::from_secs(2)).is_empty());
    // Draining survives a director restart: the worker remembers it.
    let rec = r.register(
        now,
        key(1),
        vec!["a:1".into()],
        BTreeSet::new(),
        load(0),
        Some(WorkerState::Draining),
        0,
    );
    assert_eq!(rec.state, WorkerState::Draining);
    // A new run of the worker's process starts active.
    let rec = r.register(
        now,
        key(1),
        vec!["a:1".into()],
        BTreeSet::new(),
        load(0),
        None,
        0,
    );
    assert_eq!(rec.state, WorkerState::Active);
}

#[test]
fn drain_fills_the_emptiest_workers_first() {
    let (mut r, _now) = reg(&[(1, 10), (2, 2), (3, 6)]);
    r.set_state(&key(1), WorkerState::Draining);
    let moves = r.drain_moves();
    let got: BTreeMap<PublicKey, u32> = moves.iter().map(|m| (m.to, m.count)).collect();
    // 10 sessions onto 2 and 6: both end at 9.
    assert_eq!(got[&key(2)], 7);
    assert_eq!(got[&key(3)], 3);
    assert!(moves.iter().all(|m| m.from == key(1) && m.why == "drain"));
}

#[test]
fn a_drained_worker_is_marked_once_empty() {
    let (mut r, now) = reg(&[(1, 4), (2, 0)]);
    r.set_state(&key(1), WorkerState::Draining);
    assert_eq!(r.heartbeat(now, &key(1), load(1), &[], &[]), Some(None));
    assert_eq!(
        r.heartbeat(now, &key(1), load(0), &[], &[]),
        Some(Some(WorkerState::Drained))
    );
}

#[test]
fn rebalance_has_hysteresis_and_a_rate_limit() {
    let (mut r, now) = reg(&[(1, 100), (2, 100), (3, 0)]);
    let mut t = now;
    r.rebalance_moves(t); // starts the budget clock
    let mut moved = 0;
    let mut rounds = 0;
    loop {
        t += Duration::from_millis(100);
        let moves = r.rebalance_moves(t);
        if moves.is_empty() {
            break;
        }
        for m in moves {
            // The budget holds: 50/s, so at most 5 per 100 ms.
            assert!(m.count <= 5, "{m:?}");
            r.move_sent(&m.from, 1);
            r.move_done(&m.from, 1, Some(&m.to), m.count);
            moved += m.count;
        }
        rounds += 1;
        assert!(rounds < 1000, "never settled");
    }
    let s: Vec<u32> = [1, 2, 3]
        .iter()
        .map(|n| r.get(&key(*n)).unwrap().load.sessions)
        .collect();
    let mean = 200.0 / 3.0;
    assert!(s.iter().all(|x| f64::from(*x) <= mean * 1.1 + 1.0), "{s:?}");
    assert!(moved >= 55, "moved {moved}: {s:?}");
    // Balanced within the stop band: small skews do not start it again.
    assert!(!r.rebalancing());
    t += Duration::from_secs(5);
    assert!(r.rebalance_moves(t).is_empty());
}

#[test]
fn small_gaps_never_move() {
    let (mut r, now) = reg(&[(1, 2), (2, 1)]);
    r.rebalance_moves(now);
    assert!(r.rebalance_moves(now + Duration::from_secs(2)).is_empty());
}

#[test]
fn no_rebalance_while_a_move_is_answered() {
    let (mut r, now) = reg(&[(1, 40), (2, 0)]);
    r.rebalance_moves(now);
    let m = r.rebalance_moves(now + Duration::from_secs(1));
    assert_eq!(m.len(), 1);
    r.move_sent(&m[0].from, 7);
    assert!(r.rebalance_moves(now + Duration::from_secs(2)).is_empty());
}
