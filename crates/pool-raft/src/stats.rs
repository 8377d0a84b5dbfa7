//! Latency recording for the network layer's RPCs and for client writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which Raft RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcKind {
    /// AppendEntries (replication and heartbeats).
    Append = 0,
    /// RequestVote.
    Vote = 1,
    /// InstallSnapshot (one chunk).
    Snapshot = 2,
}

#[derive(Default)]
struct Kind {
    /// Microseconds from sending a request to having its answer, for each
    /// RPC answered, and for each RPC openraft gave up on (its own timeout
    /// dropped the call: the time until then is a lower bound).
    lat_us: Vec<u32>,
    answered: u64,
    errors: u64,
    abandoned: u64,
}

/// The client side's record of every RPC, shared by the three nodes'
/// network layers.
#[derive(Default)]
pub struct RpcStats {
    kinds: Mutex<[Kind; 3]>,
}

/// Counters and latency of one RPC kind (or all).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RpcSummary {
    /// RPCs that got an answer.
    pub answered: u64,
    /// RPCs that failed (carrier cut under them, no session, bad answer).
    pub errors: u64,
    /// RPCs that openraft abandoned at its own timeout (heartbeat interval
    /// for AppendEntries, election timeout for votes).
    pub abandoned: u64,
    /// Latency over answered and abandoned RPCs.
    pub latency: Latency,
}

impl RpcStats {
    /// Starts timing one RPC; [`RpcTimer::done`] records it, and dropping
    /// the timer without that counts it as abandoned.
    pub fn start(self: &Arc<Self>, kind: RpcKind) -> RpcTimer {
        RpcTimer {
            stats: self.clone(),
            kind,
            start: Instant::now(),
            done: false,
        }
    }

    /// Forgets everything recorded so far (after warm-up).
    pub fn reset(&self) {
        *self.lock() = Default::default();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Kind; 3]> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The summary of one kind, or of all kinds with `None`.
    pub fn summary(&self, kind: Option<RpcKind>) -> RpcSummary {
        let kinds = self.lock();
        let mut s = RpcSummary::default();
        let mut lat = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            if kind.is_some_and(|want| want as usize != i) {
                continue;
            }
            s.answered += k.answered;
            s.errors += k.errors;
            s.abandoned += k.abandoned;
            lat.extend_from_slice(&k.lat_us);
        }
        s.latency = Latency::of_micros(lat);
        s
    }
}

/// One RPC being timed ([`RpcStats::start`]).
pub struct RpcTimer {
    stats: Arc<RpcStats>,
    kind: RpcKind,
    start: Instant,
    done: bool,
}

impl RpcTimer {
    /// Records the RPC: `answered` if a response arrived, else an error.
    pub fn done(mut self, answered: bool) {
        self.done = true;
        let us = micros(self.start.elapsed());
        let mut kinds = self.stats.lock();
        let k = &mut kinds[self.kind as usize];
        if answered {
            k.answered += 1;
            k.lat_us.push(us);
        } else {
            k.errors += 1;
        }
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let us = micros(self.start.elapsed());
        let mut kinds = self.stats.lock();
        let k = &mut kinds[self.kind as usize];
        k.abandoned += 1;
        k.lat_us.push(us);
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// How many samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of `us` (microseconds), nearest-rank.
    pub fn of_micros(mut us: Vec<u32>) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let at = |p: f64| {
            let rank = ((p / 100.0) * us.len() as f64).ceil() as usize;
            f64::from(us[rank.clamp(1, us.len()) - 1]) / 1000.0
        };
        Latency {
            count: us.len() as u64,
            p50_ms: at(50.0),
            p95_ms: at(95.0),
            p99_ms: at(99.0),
            max_ms: at(100.0),
        }
    }

    /// The percentiles of `ds`.
    pub fn of(ds: &[Duration]) -> Latency {
        Latency::of_micros(ds.iter().map(|d| micros(*d)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::of_micros((1..=1000).collect());
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_ms, 0.5);
        assert_eq!(l.p99_ms, 0.99);
        assert_eq!(l.max_ms, 1.0);
        assert_eq!(Latency::of_micros(vec![]).count, 0);
    }

    #[test]
    fn dropped_timer_counts_as_abandoned() {
        let s = Arc::new(RpcStats::default());
        s.start(RpcKind::Append).done(true);
        s.start(RpcKind::Vote).done(false);
        drop(s.start(RpcKind::Append));
        let a = s.summary(Some(RpcKind::Append));
        assert_eq!((a.answered, a.errors, a.abandoned), (1, 0, 1));
        assert_eq!(a.latency.count, 2);
        let all = s.summary(None);
        assert_eq!((all.answered, all.errors, all.abandoned), (1, 1, 1));
    }
}
