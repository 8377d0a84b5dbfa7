//! The simulator in the default `cargo test`: a fixed budget of schedules,
//! exact replay of a seed, and proof that the checker catches planted
//! violations (a checker that cannot fail proves nothing).
//!
//! The budget runs every attack class except `rekey-race` (an open core
//! livelock, see [`budget_options`]), with strict timers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use pool_sim::check::{NonceBook, StreamBook};
use pool_sim::{run_schedule, Attacks, Kind, Options, Outcome, Plant};

/// Schedules in the budget: 20,000 in release (about 100 s on two busy
/// cores, well under 3 minutes); debug builds run the crypto unoptimised,
/// so they run a smaller share.
fn budget() -> u64 {
    if cfg!(debug_assertions) {
        400
    } else {
        20_000
    }
}

/// Every class but `rekey-race`, which still finds a core livelock (a
/// KEY_UPDATE declined during a resume is proposed again at once; see
/// `docs/simulator.md`, finding 6, and [`known_core_livelock_seed_16`]).
/// Switch to `Attacks::ALL` once the core is fixed.
///
/// Strict on the handoff too: its two findings (`docs/simulator.md`, 9 and
/// 10) are fixed (`tests/handoff_findings.rs`).
fn budget_options() -> Options {
    Options {
        attacks: Attacks::ALL,
        lenient_timers: false,
        lenient_handoff: false,
        ..Options::default()
    }
}

/// Simulator finding 6 (`pool-sim --seed 16`), fixed in the core: a
/// declined rekey is no longer proposed again at once.
#[test]
fn known_core_livelock_seed_16() {
    let opts = Options {
        attacks: Attacks::ALL,
        ..Options::default()
    };
    let o = run_schedule(16, &opts);
    assert!(o.violation.is_none(), "{}", describe(&o, &opts));
}

fn describe(o: &Outcome, opts: &Options) -> String {
    format!(
        "schedule seed={} failed: {}\n{}replay: pool-sim --seed {} --steps {} --attacks {}{}",
        o.seed,
        o.violation
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        o.trace.render_tail(),
        o.seed,
        opts.steps,
        opts.attacks,
        if opts.lenient_timers {
            " --lenient-timers"
        } else {
            ""
        }
    )
}

#[test]
fn fixed_budget_of_schedules_finds_no_violation() {
    let opts = budget_options();
    let total = budget();
    let next = AtomicU64::new(0);
    let failure: Mutex<Option<Outcome>> = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let o = run_schedule(1 + i, &opts);
                if o.violation.is_some() {
                    let mut f = failure.lock().unwrap();
                    if f.as_ref().is_none_or(|g| g.seed > o.seed) {
                        *f = Some(o);
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{total} schedules in {secs:.1} s ({:.0}/s)",
        total as f64 / secs
    );
    if let Some(o) = failure.into_inner().unwrap() {
        panic!("{}", describe(&o, &opts));
    }
}

#[test]
fn a_seed_replays_to_the_identical_trace() {
    for attacks in [Attacks::TODAY, Attacks::ALL] {
        let opts = Options {
            attacks,
            keep_trace: true,
            lenient_timers: true,
            ..Options::default()
        };
        for seed in [1, 2, 3, 99, 12_345] {
            let a = run_schedule(seed, &opts);
            let b = run_schedule(seed, &opts);
            assert!(a.trace.len() > 1, "seed {seed}: a real schedule ran");
            assert_eq!(a.trace.lines(), b.trace.lines(), "seed {seed}");
            assert_eq!(a.trace.fingerprint(), b.trace.fingerprint());
            assert_eq!(a.violation, b.violation);
            assert_eq!(a.stats, b.stats);
        }
    }
    // Different seeds give different schedules.
    let opts = budget_options();
    assert_ne!(
        run_schedule(1, &opts).trace.fingerprint(),
        run_schedule(2, &opts).trace.fingerprint()
    );
}

/// The first seed whose clean run reads stream bytes and passes.
fn seed_with_reads(opts: &Options) -> u64 {
    (1..200)
        .find(|&s| {
            let o = run_schedule(s, opts);
            o.violation.is_none() && o.stats.bytes_read > 0 && o.stats.records > 20
        })
        .expect("a schedule that reads data")
}

#[test]
fn checker_catches_a_planted_corrupt_delivery() {
    let clean = budget_options();
    let seed = seed_with_reads(&clean);
    let planted = Options {
        plant: Some(Plant::CorruptDelivery),
        ..clean
    };
    let o = run_schedule(seed, &planted);
    let v = o.violation.expect("the corrupted byte is caught");
    assert_eq!(v.kind, Kind::Delivery, "{v}");
    assert!(v.detail.contains("is not the byte written"), "{v}");
}

#[test]
fn checker_catches_a_planted_nonce_reuse() {
    let clean = budget_options();
    let seed = seed_with_reads(&clean);
    let planted = Options {
        plant: Some(Plant::RepeatNonce),
        ..clean
    };
    let v = run_schedule(seed, &planted)
        .violation
        .expect("the repeated nonce is caught");
    assert_eq!(v.kind, Kind::Nonce, "{v}");
}

/// The first seed whose clean run completes a resume and passes.
fn seed_with_resume(opts: &Options) -> u64 {
    (1..400)
        .find(|&s| {
            let o = run_schedule(s, opts);
            o.violation.is_none() && o.stats.resumes > 0
        })
        .expect("a schedule that resumes")
}

#[test]
fn checker_flags_a_stale_refusal_without_an_attacker_copy() {
    // Stale refusals of an untampered RESUME are excused only when the
    // attacker delivered the same bytes first; a copy the world itself
    // slipped in (no attacker cause) must still be reported.
    let clean = budget_options();
    let seed = seed_with_resume(&clean);
    let planted = Options {
        plant: Some(Plant::StaleResume),
        ..clean
    };
    let v = run_schedule(seed, &planted)
        .violation
        .expect("the unexplained stale refusal is caught");
    assert_eq!(v.kind, Kind::Resume, "{v}");
    assert!(v.detail.contains("stale"), "{v}");
}

#[test]
fn checker_flags_a_refusal_of_an_unmarked_tampered_resume() {
    // A refusal counts as the attacker's only if attacker bytes caused it:
    // tampering the checker did not see is the client's resume failing.
    let clean = budget_options();
    let seed = seed_with_resume(&clean);
    let planted = Options {
        plant: Some(Plant::UnmarkedTamper),
        ..clean
    };
    let v = run_schedule(seed, &planted)
        .violation
        .expect("the unmarked tampering is caught");
    assert_eq!(v.kind, Kind::Resume, "{v}");
    assert!(v.detail.contains("does not know"), "{v}");
}

#[test]
fn checker_rejects_bad_deliveries_fed_directly() {
    let mut book = StreamBook::default();
    book.opened(4);
    book.wrote(4, 0, 100);
    let mut data = vec![0u8; 100];
    pool_sim::check::fill_pattern(4, 0, 0, &mut data);
    // A correct prefix passes.
    book.on_read(4, 0, &data[..40]).unwrap();
    // The same bytes again (a duplicate delivery) do not.
    assert_eq!(
        book.on_read(4, 0, &data[..10]).unwrap_err().kind,
        Kind::Delivery
    );
    // One flipped byte does not.
    let mut bad = data[40..60].to_vec();
    bad[7] ^= 1;
    assert_eq!(book.on_read(4, 0, &bad).unwrap_err().kind, Kind::Delivery);
    // More than was written does not.
    let mut more = vec![0u8; 80];
    pool_sim::check::fill_pattern(4, 0, 40, &mut more);
    assert_eq!(book.on_read(4, 0, &more).unwrap_err().kind, Kind::Delivery);
    // A FIN before the end, or never written, does not.
    assert_eq!(book.on_fin(4, 0).unwrap_err().kind, Kind::Delivery);
    // A reset no one made does not.
    assert!(book.on_reset_seen(4).is_err());
    // Liveness: 60 bytes still owed.
    assert_eq!(book.check_liveness().unwrap_err().kind, Kind::Liveness);
    book.on_read(4, 0, &data[40..]).unwrap();
    book.check_liveness().unwrap();

    let mut n = NonceBook::default();
    n.sealed(0, 3, 0).unwrap();
    n.sealed(0, 3, 1).unwrap();
    n.sealed(1, 3, 0).unwrap(); // the other direction has its own key
    assert_eq!(n.sealed(0, 3, 1).unwrap_err().kind, Kind::Nonce);
    assert_eq!(n.sealed(0, 3, 0).unwrap_err().kind, Kind::Nonce);
    assert_eq!(n.sealed(0, 3, 5).unwrap_err().kind, Kind::Nonce);
    // A new installation of epoch 3 (fresh keys) may start over.
    n.installed(0, 3);
    n.sealed(0, 3, 0).unwrap();
    assert_eq!(n.reinstalls(), 1);
}
