//! The relay's Prometheus collector, read from its counters on each
//! scrape.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::state::{Refusal, Shared};

/// The relay's metrics, read from its counters on each scrape.
pub(crate) struct RelayCollector {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayCollector").finish_non_exhaustive()
    }
}

pub(crate) fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstGauge::new(v as i64);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

pub(crate) fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = self.shared.stats();
        let e = &mut encoder;
        gauge(e, "pool_relay_nodes", "Nodes registered now.", s.nodes)?;
        gauge(
            e,
            "pool_relay_connections",
            "TCP connections open now (handshaking, control and circuits).",
            s.connections,
        )?;
        counter(
            e,
            "pool_relay_connections_accepted",
            "TCP connections accepted, including refused ones.",
            s.connections_accepted,
        )?;
        gauge(
            e,
            "pool_relay_pending",
            "CONNECTs waiting for the peer's ACCEPT now.",
            s.pending,
        )?;
        gauge(
            e,
            "pool_relay_circuits_open",
            "Circuits spliced now.",
            s.circuits,
        )?;
        counter(
            e,
            "pool_relay_circuits",
            "Circuits spliced since start.",
            s.circuits_total,
        )?;
        counter(
            e,
            "pool_relay_bytes",
            "Bytes forwarded through circuits, both directions.",
            s.bytes,
        )?;
        counter(
            e,
            "pool_relay_auth_failures",
            "Proofs of key ownership that failed.",
            s.auth_failures,
        )?;
        counter(
            e,
            "pool_relay_circuits_idle_closed",
            "Circuits closed because no byte crossed them for the idle timeout.",
            s.circuits_idle_closed,
        )?;
        gauge(
            e,
            "pool_relay_unauthenticated",
            "Connections open now that have not authenticated yet.",
            s.unauthenticated,
        )?;
        let mut family = e.encode_descriptor(
            "pool_relay_refused",
            "Connections refused, by reason.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let c = &self.shared.counters;
        for why in Refusal::ALL {
            let m = ConstCounter::new(c.refused[why as usize].load(Ordering::Relaxed));
            m.encode(family.encode_family(&[("reason", why.label())])?)?;
        }
        self.encode_peers(e)?;
        if let Some(j) = &self.shared.journal {
            let js = j.stats();
            counter(
                e,
                "pool_relay_journal_entries_written",
                "Change journal entries written.",
                js.written,
            )?;
            counter(
                e,
                "pool_relay_journal_entries_failed",
                "Change journal entries lost (queue full or the disk refused them).",
                js.dropped.saturating_add(js.failed),
            )?;
        }
        Ok(())
    }
}

impl RelayCollector {
    /// Per-peer-relay series (bounded by the enrolments), and per-node-key
    /// series when `metrics_per_node` is on.
    fn encode_peers(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        use prometheus_client::metrics::MetricType;
        let peers = self.shared.peers();
        let fam = |e: &mut DescriptorEncoder,
                   name: &str,
                   help: &str,
                   ty: MetricType,
                   rows: &[(Vec<(&str, String)>, u64)]|
         -> fmt::Result {
            let mut family = e.encode_descriptor(name, help, None, ty)?;
            for (labels, v) in rows {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if matches!(ty, MetricType::Counter) {
                    ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
                } else {
                    ConstGauge::new(*v as i64).encode(family.encode_family(&labels)?)?;
                }
            }
            Ok(())
        };
        let by_peer =
            |f: &dyn Fn(&crate::PeerStats) -> u64| -> Vec<(Vec<(&'static str, String)>, u64)> {
                peers
                    .iter()
                    .map(|p| (vec![("peer", p.key.to_string())], f(p)))
                    .collect()
            };
        let mut bytes = Vec::new();
        for p in &peers {
            bytes.push((
                vec![("peer", p.key.to_string()), ("direction", "in".to_string())],
                p.bytes_in,
            ));
            bytes.push((
                vec![
                    ("peer", p.key.to_string()),
                    ("direction", "out".to_string()),
                ],
                p.bytes_out,
            ));
        }
        fam(
            e,
            "pool_relay_peer_bytes",
            "Bytes through circuits via each peer relay (in: it sent us).",
            MetricType::Counter,
            &bytes,
        )?;
        fam(
            e,
            "pool_relay_peer_circuits",
            "Circuits via each peer relay since it was enrolled.",
            MetricType::Counter,
            &by_peer(&|p| p.circuits_total),
        )?;
        fam(
            e,
            "pool_relay_peer_circuits_open",
            "Circuits via each peer relay open now.",
            MetricType::Gauge,
            &by_peer(&|p| p.circuits_open),
        )?;
        fam(
            e,
            "pool_relay_peer_up",
            "Whether the peering link to each peer relay is up.",
            MetricType::Gauge,
            &by_peer(&|p| u64::from(p.up)),
        )?;
        fam(
            e,
            "pool_relay_peer_nodes",
            "Node keys each peer relay announces.",
            MetricType::Gauge,
            &by_peer(&|p| p.nodes),
        )?;
        fam(
            e,
            "pool_relay_peer_caps_hit",
            "Times each peer relay hit a cap (circuits, rate, keys).",
            MetricType::Counter,
            &by_peer(&|p| p.caps_hit),
        )?;
        if self.shared.cfg.metrics_per_node {
            let accounts = self.shared.peering.accounts();
            let mut bytes = Vec::new();
            let mut circuits = Vec::new();
            for a in &accounts {
                bytes.push((
                    vec![
                        ("key", a.key.to_string()),
                        ("direction", "sent".to_string()),
                    ],
                    a.sent,
                ));
                bytes.push((
                    vec![
                        ("key", a.key.to_string()),
                        ("direction", "received".to_string()),
                    ],
                    a.received,
                ));
                circuits.push((vec![("key", a.key.to_string())], a.circuits));
            }
            fam(
                e,
                "pool_relay_node_bytes",
                "Bytes each node key sent into or received from circuits here.",
                MetricType::Counter,
                &bytes,
            )?;
            fam(
                e,
                "pool_relay_node_circuits",
                "Circuits each node key was an end of.",
                MetricType::Counter,
                &circuits,
            )?;
        }
        Ok(())
    }
}
