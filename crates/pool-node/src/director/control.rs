//! The director's control socket (`pool director workers`, `drain`,
//! `owners`, `status`: one JSON line each way, like `pool ctl`) and its
//! Prometheus metrics.

use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use pool_net::PublicKey;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Director;
use pool_director::store::WorkerState;

/// A director control command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum DirectorRequest {
    /// The workers: key, address, state, load, lease age.
    Workers,
    /// Hand every session of a worker to the others, then mark it drained.
    Drain {
        /// The worker's key, or a unique prefix of it.
        worker: String,
    },
    /// Who owns which session, as the store says.
    Owners,
    /// Counters.
    Status,
}

/// Sends `req` to the director's control socket at `path`.
///
/// # Errors
///
/// The socket could not be reached, or the director answered an error.
pub async fn request(path: &Path, req: &DirectorRequest) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the director's control socket {}: {e} (is `pool director --control {}` running?)",
            path.display(),
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    BufReader::new(s)
        .read_to_end(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out).map_err(|e| format!("bad answer: {e}"))?;
    match v.get("error").and_then(Value::as_str) {
        Some(e) => Err(e.to_string()),
        None => Ok(v),
    }
}

pub(crate) async fn serve(d: Arc<Director>, l: UnixListener) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(handle(d.clone(), s));
    }
}

async fn handle(d: Arc<Director>, s: UnixStream) {
    let (r, mut w) = s.into_split();
    let mut line = Vec::new();
    let mut r = BufReader::new(r).take(64 << 10);
    let read = r.read_until(b'\n', &mut line);
    let reply = match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Ok(Ok(_)) => match serde_json::from_slice::<DirectorRequest>(&line) {
            Ok(req) => execute(&d, req).await,
            Err(e) => {
                json!({"error": format!("not a director request ({e}); commands: workers, drain, owners, status")})
            }
        },
        _ => json!({"error": "no request within 10 s"}),
    };
    let mut text = reply.to_string();
    text.push('\n');
    let _ = w.write_all(text.as_bytes()).await;
}

async fn execute(d: &Director, req: DirectorRequest) -> Value {
    match req {
        DirectorRequest::Workers => {
            let rows = d.lock().rows(Instant::now());
            json!({"workers": rows, "store": d.store.describe()})
        }
        DirectorRequest::Drain { worker } => {
            let keys: Vec<PublicKey> = d
                .lock()
                .records()
                .into_iter()
                .map(|r| r.key)
                .filter(|k| k.to_string().starts_with(&worker))
                .collect();
            let key = match keys.as_slice() {
                [k] => *k,
                [] => {
                    return json!({"error": format!("no worker matches `{worker}` (see `pool director workers`)")})
                }
                _ => {
                    return json!({"error": format!("`{worker}` matches {} workers; give more of the key", keys.len())})
                }
            };
            match d.drain(&key, "operator").await {
                Ok(sessions) => {
                    json!({"ok": true, "worker": key.to_string(), "sessions": sessions})
                }
                Err(e) => json!({"error": e}),
            }
        }
        DirectorRequest::Owners => match d.store.owners().await {
            Ok(o) => json!({"owners": o}),
            Err(e) => json!({"error": e.to_string()}),
        },
        DirectorRequest::Status => d.status(),
    }
}

/// The director's metrics registry.
pub(crate) fn metrics_registry(d: Arc<Director>) -> prometheus_client::registry::Registry {
    let mut r = prometheus_client::registry::Registry::default();
    r.register_collector(Box::new(DirectorCollector(d)));
    r
}

struct DirectorCollector(Arc<Director>);

impl fmt::Debug for DirectorCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DirectorCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

impl Collector for DirectorCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let c = &self.0.counters;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "pool_director_registrations",
                "Worker registrations (and re-registrations).",
                g(&c.registrations),
            ),
            (
                "pool_director_leases_lost",
                "Workers declared lost when their lease expired.",
                g(&c.leases_lost),
            ),
            (
                "pool_director_placements",
                "Clients placed on a worker.",
                g(&c.placements),
            ),
            (
                "pool_director_placements_failed",
                "Clients that found no active worker.",
                g(&c.placements_failed),
            ),
            (
                "pool_director_drains",
                "Drains started (by command or a worker's SIGTERM).",
                g(&c.drains),
            ),
            (
                "pool_director_rebalance_orders",
                "Move orders given to even the load.",
                g(&c.rebalance_orders),
            ),
            (
                "pool_director_sessions_moved",
                "Sessions workers reported handed over on the director's orders.",
                g(&c.sessions_moved),
            ),
            (
                "pool_director_moves_failed",
                "Handoffs ordered by the director that failed (the session stayed).",
                g(&c.moves_failed),
            ),
            (
                "pool_director_claims",
                "Session claims by handoff targets.",
                g(&c.claims),
            ),
            (
                "pool_director_claims_refused",
                "Claims refused (lapsed lease or another owner).",
                g(&c.claims_refused),
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        let records = self.0.lock().records();
        let mut family = e.encode_descriptor(
            "pool_director_workers",
            "Workers known, by state.",
            None,
            MetricType::Gauge,
        )?;
        for state in [
            WorkerState::Active,
            WorkerState::Draining,
            WorkerState::Drained,
            WorkerState::Lost,
        ] {
            let n = records.iter().filter(|r| r.state == state).count();
            let label = state.to_string();
            ConstGauge::new(n as i64)
                .encode(family.encode_family(&[("state", label.as_str())])?)?;
        }
        Ok(())
    }
}
