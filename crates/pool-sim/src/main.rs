//! `pool-sim`: runs seeded schedules of the hostile-network simulator.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use pool_sim::{run_schedule, Attacks, Options, Outcome};

const USAGE: &str = "\
usage: pool-sim [--schedules N] [--seed S] [--steps K] [--attacks LIST]
                [--threads T] [--keep-going] [--lenient-timers] [--lenient-handoff]
                [--verbose]

  --schedules N   schedules to run (default 1000, or 1 with --seed)
  --seed S        first seed (default 1); schedule i uses seed S+i
  --steps K       steps per schedule before healing (default 200)
  --attacks LIST  comma-separated classes, `all` (default), `none`, `today`;
                  `-name` removes one. Classes: flip, truncate, garbage,
                  replay-record, replay-resume, forge-refuse, junk-carrier,
                  replay-handoff, rekey-race, abandon-resume, mbb-race
  --threads T     worker threads (default: 2 or fewer cores)
  --keep-going    report every failing seed, not only the first
  --lenient-timers  skip a timer that stays due after handle_timeout
                  (a known core bug) instead of failing
  --lenient-handoff  do not fail on the known handoff findings: bytes a
                  fenced server still returns are not counted as delivered;
                  a client stranded at a target ends the schedule
  --verbose       print every event of every schedule run

stdout is deterministic (the same arguments give the same output);
timing goes to stderr.";

struct Args {
    schedules: u64,
    seed: u64,
    opts: Options,
    threads: usize,
    keep_going: bool,
}

fn parse() -> Result<Args, String> {
    let mut schedules = None;
    let mut seed = None;
    let mut opts = Options::default();
    let mut threads = std::thread::available_parallelism()
        .map(|n| n.get().min(2))
        .unwrap_or(1);
    let mut keep_going = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--schedules" => {
                schedules = Some(
                    val("--schedules")?
                        .parse()
                        .map_err(|e| format!("--schedules: {e}"))?,
                )
            }
            "--seed" => seed = Some(val("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--steps" => {
                opts.steps = val("--steps")?
                    .parse()
                    .map_err(|e| format!("--steps: {e}"))?
            }
            "--attacks" => opts.attacks = Attacks::parse(&val("--attacks")?)?,
            "--threads" => {
                threads = val("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
            "--keep-going" => keep_going = true,
            "--lenient-timers" => opts.lenient_timers = true,
            "--lenient-handoff" => opts.lenient_handoff = true,
            "--verbose" => opts.verbose = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Args {
        schedules: schedules.unwrap_or(if seed.is_some() { 1 } else { 1000 }),
        seed: seed.unwrap_or(1),
        opts,
        threads: threads.max(1),
        keep_going,
    })
}

fn report(o: &Outcome, a: &Args) {
    let Some(v) = &o.violation else { return };
    println!("VIOLATION in schedule seed={}: {v}", o.seed);
    println!("last events:");
    print!("{}", o.trace.render_tail());
    println!(
        "replay: pool-sim --seed {} --steps {} --attacks {}{}{}",
        o.seed,
        a.opts.steps,
        a.opts.attacks,
        if a.opts.lenient_timers {
            " --lenient-timers"
        } else {
            ""
        },
        if a.opts.lenient_handoff {
            " --lenient-handoff"
        } else {
            ""
        }
    );
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("pool-sim: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    println!(
        "pool-sim: seeds {}..{} steps={} attacks={}{}{}",
        args.seed,
        args.seed + args.schedules,
        args.opts.steps,
        args.opts.attacks,
        if args.opts.lenient_timers {
            " lenient-timers"
        } else {
            ""
        },
        if args.opts.lenient_handoff {
            " lenient-handoff"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    // Lowest failing index so far: workers skip schedules above it unless
    // --keep-going, so the first failure reported is the same every run.
    let stop_at = AtomicUsize::new(usize::MAX);
    let failures: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let verbose_out: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    // Handoffs offered, committed, aborted; sessions lost by design;
    // fenced bytes skipped; clients stranded; claims refused (for stderr).
    let ho: [AtomicU64; 7] = Default::default();
    let total = args.schedules as usize;
    std::thread::scope(|s| {
        for _ in 0..args.threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || (!args.keep_going && i > stop_at.load(Ordering::Relaxed)) {
                    return;
                }
                let seed = args.seed.wrapping_add(i as u64);
                let o = run_schedule(seed, &args.opts);
                for (c, v) in ho.iter().zip([
                    o.stats.handoffs_offered,
                    o.stats.handoffs_committed,
                    o.stats.handoffs_aborted,
                    u64::from(o.stats.handoff_lost),
                    o.stats.fenced_reads,
                    u64::from(o.stats.stranded),
                    o.stats.handoffs_fenced,
                ]) {
                    c.fetch_add(v, Ordering::Relaxed);
                }
                if args.opts.verbose {
                    let text = o.trace.lines().join("\n");
                    if let Ok(mut v) = verbose_out.lock() {
                        v.push((seed, text));
                    }
                }
                if o.violation.is_some() {
                    stop_at.fetch_min(i, Ordering::Relaxed);
                    if let Ok(mut f) = failures.lock() {
                        f.push(o);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let mut failures = failures.into_inner().unwrap_or_default();
    failures.sort_by_key(|o| o.seed);
    if !args.keep_going {
        failures.truncate(1);
    }
    let done = if args.keep_going || failures.is_empty() {
        total as u64
    } else {
        failures[0].seed - args.seed + 1
    };
    if args.opts.verbose {
        let mut v = verbose_out.into_inner().unwrap_or_default();
        v.sort_by_key(|(s, _)| *s);
        for (seed, text) in v.iter().filter(|(s, _)| *s < args.seed + done) {
            println!("== schedule seed={seed}\n{text}");
        }
    }
    if args.keep_going {
        let mut by_kind = std::collections::BTreeMap::new();
        for o in &failures {
            if let Some(v) = &o.violation {
                *by_kind.entry(v.kind.name()).or_insert(0u64) += 1;
                println!("FAIL seed={} {v}", o.seed);
            }
        }
        for (k, n) in by_kind {
            println!("  {n} x {k}");
        }
    } else if let Some(o) = failures.first() {
        report(o, &args);
    }
    println!(
        "{done} schedules, {} failed",
        if args.keep_going {
            failures.len()
        } else {
            usize::from(!failures.is_empty())
        }
    );
    eprintln!(
        "pool-sim: {done} schedules in {:.2} s: {:.0} schedules/s ({} threads)",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64().max(1e-9),
        args.threads
    );
    let [offered, committed, aborted, lost, fenced, stranded, claims_refused] =
        ho.map(AtomicU64::into_inner);
    eprintln!(
        "pool-sim: handoffs: {offered} offered, {committed} committed, {aborted} aborted ({claims_refused} by a refused claim); {lost} sessions lost by design; lenient: {fenced} fenced bytes skipped, {stranded} clients stranded"
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
