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
