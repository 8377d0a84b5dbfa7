//! The live handoff in the simulator: handoffs commit, abort and go back
//! and forth; the checker catches two owners; and the two known core
//! findings (`docs/simulator.md`, 9 and 10) still fail when not lenient.
//! When the core fixes one, its test here fails: flip it, and drop
//! `lenient_handoff` from `tests/fixed_budget.rs`.

use pool_sim::{run_schedule, Attacks, Kind, Options, Plant};

fn strict() -> Options {
    Options {
        attacks: Attacks::ALL,
        ..Options::default()
    }
}

fn lenient() -> Options {
    Options {
        lenient_handoff: true,
        ..strict()
    }
}

#[test]
fn handoffs_commit_abort_and_go_back_and_forth() {
    let (mut committed, mut aborted, mut twice) = (0, 0, 0);
    for seed in 1..150 {
        let o = run_schedule(seed, &lenient());
        assert!(o.violation.is_none(), "seed {seed}: {:?}", o.violation);
        committed += o.stats.handoffs_committed;
        aborted += o.stats.handoffs_aborted;
        twice += u64::from(o.stats.handoffs_committed >= 2);
    }
    assert!(
        committed > 10 && aborted > 10,
        "{committed} committed, {aborted} aborted"
    );
    assert!(twice > 0, "some schedule hands the session S1 -> S2 -> S1");
}

/// Finding 9: after `fence()`, `stream_read` still returns what the
/// source had buffered at the freeze; the target restored those bytes
/// from the snapshot and delivers them too.
#[test]
fn known_core_bug_fenced_source_delivers_moved_bytes_seed_30() {
    let v = run_schedule(30, &strict())
        .violation
        .expect("still a core bug");
    assert_eq!(v.kind, Kind::Delivery, "{v}");
    let o = run_schedule(30, &lenient());
    assert!(o.violation.is_none(), "{:?}", o.violation);
    assert!(o.stats.fenced_reads > 0);
}

/// Finding 10: the client took the target's RESUMED, its commit never
/// arrived within the token's lifetime, the target gave the import up and
/// the source unfroze; the client only dials the target now.
#[test]
fn known_gap_client_stranded_at_target_seed_1370() {
    let v = run_schedule(1370, &strict())
        .violation
        .expect("still a gap");
    assert_eq!(v.kind, Kind::Handoff, "{v}");
    assert!(v.detail.contains("stranded"), "{v}");
    let o = run_schedule(1370, &lenient());
    assert!(o.violation.is_none(), "{:?}", o.violation);
    assert!(o.stats.stranded);
}

#[test]
fn checker_catches_a_source_unfrozen_while_the_target_may_commit() {
    let seed = (1..300)
        .find(|&s| {
            let o = run_schedule(s, &lenient());
            o.violation.is_none() && o.stats.handoffs_committed > 0
        })
        .expect("a schedule that commits a handoff");
    let planted = Options {
        plant: Some(Plant::UnfreezeEarly),
        ..lenient()
    };
    let v = run_schedule(seed, &planted)
        .violation
        .expect("two owners are caught");
    assert_eq!(v.kind, Kind::Owner, "{v}");
}
