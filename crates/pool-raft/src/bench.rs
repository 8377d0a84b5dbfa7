//! The benchmark: steady writes, periodic cuts, and what they do to RPC
//! latency, leader stability and correctness.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{Cluster, ClusterConfig, Error, Transport, View};
use crate::stats::{Latency, RpcKind, RpcSummary};
use crate::{NodeId, Request};

/// The decision rule: Raft over POOL goes ahead only if its RPC p99 is
/// under this...
pub const GOAL_P99_MS: f64 = 10.0;
/// ...and more than this share of heartbeat intervals are stable.
pub const GOAL_STABLE_PCT: f64 = 99.9;

/// Writes in flight at once, at most (the writer waits beyond it).
const MAX_IN_FLIGHT: usize = 10_000;
/// How long one write may take, retries included, before it counts as
/// failed.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// One run's settings.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The transport.
    pub transport: Transport,
    /// How long to write for.
    pub duration: Duration,
    /// Time between cuts; `None` for no cuts.
    pub cut_every: Option<Duration>,
    /// Client writes per second.
    pub writes_per_sec: u32,
    /// Raft heartbeat interval, ms; stability is sampled at it too.
    pub heartbeat_ms: u64,
}

/// Leader stability, sampled every heartbeat interval on all nodes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stability {
    /// Intervals sampled.
    pub intervals: u64,
    /// Intervals at whose end every node that names a leader names the
    /// same one, and leader and term are those of the previous sample.
    pub stable: u64,
    /// `stable / intervals`, in percent.
    pub stable_pct: f64,
    /// Elections: the highest term's increases, added up.
    pub elections: u64,
    /// Times the leader became another node.
    pub leader_changes: u64,
    /// Samples in which the nodes that name a leader disagree.
    pub disagreements: u64,
    /// Samples in which no node names a leader.
    pub leaderless: u64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The transport.
    pub transport: Transport,
    /// Seconds of writing.
    pub seconds: f64,
    /// Seconds between cuts (0: none).
    pub cut_every_s: f64,
    /// Target writes per second.
    pub writes_per_sec: u32,
    /// Raft heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Rounds of cuts.
    pub cuts: u64,
    /// Carriers (POOL) or connections (TCP) cut, all rounds.
    pub carriers_cut: u64,
    /// POOL: session resumes; TCP: connections dialled (warm-up included).
    pub reconnects: u64,
    /// Every RPC.
    pub rpc: RpcSummary,
    /// AppendEntries alone.
    pub append: RpcSummary,
    /// RequestVote alone.
    pub vote: RpcSummary,
    /// InstallSnapshot alone.
    pub snapshot: RpcSummary,
    /// Leader stability.
    pub stability: Stability,
    /// Writes started.
    pub writes_issued: u64,
    /// Writes committed and answered.
    pub writes_acked: u64,
    /// Writes that did not commit within their deadline.
    pub writes_failed: u64,
    /// Time from a write's start to its answer, retries included.
    pub write_latency: Latency,
    /// Whether the three state machines ended identical.
    pub identical: bool,
    /// How they differ, if they do.
    pub diverged: Option<String>,
    /// Acknowledged writes missing from the final state.
    pub acked_missing: u64,
    /// The last log index applied (on all nodes, when identical).
    pub last_applied_index: u64,
    /// Keys in the final state.
    pub keys: u64,
    /// Snapshots built, all nodes.
    pub snapshots_built: u64,
    /// Snapshots installed from a leader, all nodes.
    pub snapshots_installed: u64,
}

impl Report {
    /// The correctness check: identical state machines holding every
    /// acknowledged write.
    pub fn correct(&self) -> bool {
        self.identical && self.acked_missing == 0
    }

    /// Whether this run meets the decision rule's goals.
    pub fn meets_goals(&self) -> bool {
        self.rpc.latency.p99_ms < GOAL_P99_MS && self.stability.stable_pct > GOAL_STABLE_PCT
    }
}

fn key(i: u64) -> String {
    format!("k{i:08}")
}

/// Starts a cluster, writes and cuts for `opts.duration`, checks the
/// state machines, and reports.
pub async fn run(opts: &RunOptions) -> Result<Report, Error> {
    let config = ClusterConfig::new(opts.transport).heartbeat_ms(opts.heartbeat_ms);
    let cluster = Arc::new(Cluster::start(config).await?);
    let res = measure(&cluster, opts).await;
    cluster.shutdown().await;
    res
}

async fn measure(cluster: &Arc<Cluster>, opts: &RunOptions) -> Result<Report, Error> {
    cluster.wait_leader(Duration::from_secs(10)).await?;
    // Warm-up: sessions or connections up, a few entries committed.
    for i in 0..10 {
        let req = Request::Set {
            key: format!("warm{i}"),
            value: i.to_string(),
        };
        cluster.write(req, Duration::from_secs(10)).await?;
    }
    cluster.stats.reset();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let every = Duration::from_millis(opts.heartbeat_ms.max(1));
    let sampler = tokio::spawn(sample(cluster.clone(), every, stop_rx.clone()));
    let cutter = opts
        .cut_every
        .map(|e| tokio::spawn(cut(cluster.clone(), e, stop_rx.clone())));

    let (issued, writes) = write_for(cluster, opts).await;
    let mut latencies = Vec::new();
    let mut acked = Vec::new();
    let mut failed = 0;
    for w in writes {
        match w.await {
            Ok((i, Some(d))) => {
                acked.push(i);
                latencies.push(d);
            }
            _ => failed += 1,
        }
    }
    let _ = stop_tx.send(true);
    let stability = sampler.await.unwrap_or_default();
    let (cuts, carriers_cut) = match cutter {
        Some(c) => c.await.unwrap_or_default(),
        None => (0, 0),
    };

    let rpc = cluster.stats.summary(None);
    let append = cluster.stats.summary(Some(RpcKind::Append));
    let vote = cluster.stats.summary(Some(RpcKind::Vote));
    let snapshot = cluster.stats.summary(Some(RpcKind::Snapshot));
    let final_state = cluster.check_identical(Duration::from_secs(10)).await;
    let views = cluster.sm_views();
    let (identical, diverged, acked_missing, last_applied_index, keys) = match &final_state {
        Ok(v) => {
            let missing = acked
                .iter()
                .filter(|&&i| v.kv.get(&key(i)) != Some(&i.to_string()))
                .count() as u64;
            let last = v.last_applied.map(|l| l.index).unwrap_or(0);
            (true, None, missing, last, v.kv.len() as u64)
        }
        Err(e) => (false, Some(e.to_string()), 0, 0, 0),
    };
    Ok(Report {
        transport: opts.transport,
        seconds: opts.duration.as_secs_f64(),
        cut_every_s: opts.cut_every.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        writes_per_sec: opts.writes_per_sec,
        heartbeat_ms: opts.heartbeat_ms,
        cuts,
        carriers_cut,
        reconnects: cluster.reconnects(),
        rpc,
        append,
        vote,
        snapshot,
        stability,
        writes_issued: issued,
        writes_acked: acked.len() as u64,
        writes_failed: failed,
        write_latency: Latency::of(&latencies),
        identical,
        diverged,
        acked_missing,
        last_applied_index,
        keys,
        snapshots_built: views.iter().map(|v| v.snapshots_built).sum(),
        snapshots_installed: views.iter().map(|v| v.snapshots_installed).sum(),
    })
}

type WriteTask = tokio::task::JoinHandle<(u64, Option<Duration>)>;

/// Starts `writes_per_sec` writes a second for the run's duration, each its
/// own task (so a slow write does not hold back the next); returns how
/// many started and their tasks.
async fn write_for(cluster: &Arc<Cluster>, opts: &RunOptions) -> (u64, Vec<WriteTask>) {
    let gap = Duration::from_secs_f64(1.0 / f64::from(opts.writes_per_sec.max(1)));
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let end = Instant::now() + opts.duration;
    let mut tasks = Vec::new();
    let mut i = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let c = cluster.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let req = Request::Set {
                key: key(i),
                value: i.to_string(),
            };
            let ok = c.write(req, WRITE_DEADLINE).await.is_ok();
            drop(slot);
            (i, ok.then(|| start.elapsed()))
        }));
        i += 1;
    }
    (i, tasks)
}

/// One sample: the leader the nodes agree on (if they agree), and the
/// highest term.
fn summarise(views: &[View]) -> (Option<NodeId>, bool, u64) {
    let mut named = views.iter().filter_map(|v| v.leader);
    let first = named.next();
    let agree = named.all(|l| Some(l) == first);
    let term = views.iter().map(|v| v.term).max().unwrap_or(0);
    (first, agree, term)
}

async fn sample(
    cluster: Arc<Cluster>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Stability {
    let mut s = Stability::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut prev_leader, _, mut prev_term) = summarise(&cluster.views());
    let mut last_known = prev_leader;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let (leader, agree, term) = summarise(&cluster.views());
        s.intervals += 1;
        if !agree {
            s.disagreements += 1;
        }
        if leader.is_none() {
            s.leaderless += 1;
        }
        if agree && leader.is_some() && leader == prev_leader && term == prev_term {
            s.stable += 1;
        }
        s.elections += term.saturating_sub(prev_term);
        if leader.is_some() && last_known.is_some() && leader != last_known {
            s.leader_changes += 1;
        }
        if leader.is_some() {
            last_known = leader;
        }
        prev_leader = leader;
        prev_term = term;
    }
    if s.intervals > 0 {
        s.stable_pct = 100.0 * s.stable as f64 / s.intervals as f64;
    }
    s
}

async fn cut(
    cluster: Arc<Cluster>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, u64) {
    let (mut rounds, mut carriers) = (0, 0);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        rounds += 1;
        carriers += cluster.cut() as u64;
    }
    (rounds, carriers)
}

fn ms(l: &Latency) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} / {:.1}",
        l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
    )
}

/// One report as the table's rows: name and value.
fn rows(r: &Report) -> Vec<(&'static str, String)> {
    let w = &r.write_latency;
    let st = &r.stability;
    vec![
        ("transport", r.transport.to_string()),
        (
            "run",
            format!(
                "{:.0} s, cut every {:.0} s, {} writes/s",
                r.seconds, r.cut_every_s, r.writes_per_sec
            ),
        ),
        (
            "cuts (carriers cut)",
            format!("{} ({})", r.cuts, r.carriers_cut),
        ),
        ("resumes (pool) / dials (tcp)", r.reconnects.to_string()),
        ("RPCs answered", r.rpc.answered.to_string()),
        (
            "RPC errors / abandoned",
            format!("{} / {}", r.rpc.errors, r.rpc.abandoned),
        ),
        ("RPC ms p50/p95/p99/max", ms(&r.rpc.latency)),
        ("append ms p50/p95/p99/max", ms(&r.append.latency)),
        (
            "append answered / err / aband.",
            format!(
                "{} / {} / {}",
                r.append.answered, r.append.errors, r.append.abandoned
            ),
        ),
        ("vote RPCs", r.vote.latency.count.to_string()),
        ("heartbeat intervals", st.intervals.to_string()),
        ("stable intervals", format!("{:.3} %", st.stable_pct)),
        (
            "elections / leader changes",
            format!("{} / {}", st.elections, st.leader_changes),
        ),
        (
            "writes issued / acked / failed",
            format!(
                "{} / {} / {}",
                r.writes_issued, r.writes_acked, r.writes_failed
            ),
        ),
        (
            "write ms p50/p99/max",
            format!("{:.2} / {:.2} / {:.1}", w.p50_ms, w.p99_ms, w.max_ms),
        ),
        (
            "snapshots built / installed",
            format!("{} / {}", r.snapshots_built, r.snapshots_installed),
        ),
        (
            "state machines identical",
            match (&r.diverged, r.acked_missing) {
                (Some(d), _) => format!("NO: {d}"),
                (None, 0) => format!("yes (applied {}, {} keys)", r.last_applied_index, r.keys),
                (None, n) => format!("NO: {n} acknowledged writes missing"),
            },
        ),
        (
            "goals (p99 < 10 ms, > 99.9 %)",
            if r.meets_goals() { "met" } else { "not met" }.into(),
        ),
    ]
}

/// Prints reports side by side, one column each.
pub fn print_table(reports: &[Report]) {
    let columns: Vec<Vec<(&str, String)>> = reports.iter().map(rows).collect();
    let Some(first) = columns.first() else {
        return;
    };
    let w0 = first.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| c.iter().map(|(_, v)| v.len()).max().unwrap_or(0))
        .collect();
    for (row, (name, _)) in first.iter().enumerate() {
        let mut line = format!("{name:<w0$}");
        for (col, w) in columns.iter().zip(&widths) {
            line.push_str(&format!("  {:<w$}", col[row].1));
        }
        println!("{}", line.trim_end());
    }
}

/// The seed's decision rule, in words: Raft goes over POOL only if POOL's
/// RPC p99 is under 10 ms and more than 99.9 % of intervals are stable.
pub fn decision(pool: &Report) -> String {
    let p99 = pool.rpc.latency.p99_ms;
    let stable = pool.stability.stable_pct;
    let verdict = if pool.meets_goals() {
        "GO: Raft over POOL"
    } else {
        "NO GO: keep Raft off POOL"
    };
    format!(
        "{verdict} (POOL RPC p99 {p99:.2} ms, goal < {GOAL_P99_MS} ms; \
         stable intervals {stable:.3} %, goal > {GOAL_STABLE_PCT} %)"
    )
}
