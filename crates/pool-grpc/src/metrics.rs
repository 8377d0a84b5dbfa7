//! Per-transport client metrics: the seed's `TransportMetrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

/// Request latency and errors per transport and service, for a
/// [`DualChannel`](crate::DualChannel). Cloning shares the counters.
/// Register them in a Prometheus registry with [`TransportMetrics::register`].
#[derive(Clone)]
pub struct TransportMetrics {
    latency: Family<Labels, Histogram>,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    fallbacks: Family<Labels, Counter>,
}

impl Default for TransportMetrics {
    fn default() -> Self {
        TransportMetrics {
            latency: Family::new_with_constructor(|| {
                // 50 µs .. ~3.3 s, doubling.
                Histogram::new(std::iter::successors(Some(50e-6), |b| Some(b * 2.0)).take(17))
            }),
            requests: Family::default(),
            errors: Family::default(),
            fallbacks: Family::default(),
        }
    }
}

fn labels(transport: &str, service: &str) -> Labels {
    vec![
        ("transport", transport.to_string()),
        ("service", service.to_string()),
    ]
}

impl TransportMetrics {
    /// Adds the metrics to `registry`:
    /// `grpc_client_request_duration_seconds{transport,service}` (time to
    /// the response headers), `grpc_client_requests_total`,
    /// `grpc_client_errors_total` (transport errors and non-OK statuses
    /// in the headers) and `grpc_client_fallbacks_total{service}` (RPCs that
    /// preferred POOL and went over TCP).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "grpc_client_request_duration_seconds",
            "gRPC client request latency to the response headers, per transport",
            self.latency.clone(),
        );
        registry.register(
            "grpc_client_requests",
            "gRPC client requests, per transport",
            self.requests.clone(),
        );
        registry.register(
            "grpc_client_errors",
            "gRPC client requests that failed, per transport",
            self.errors.clone(),
        );
        registry.register(
            "grpc_client_fallbacks",
            "gRPC requests that preferred POOL and went over TCP",
            self.fallbacks.clone(),
        );
    }

    pub(crate) fn record(&self, transport: &str, service: &str, took: Duration, ok: bool) {
        let l = labels(transport, service);
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
        self.requests.get_or_create(&l).inc();
        if !ok {
            self.errors.get_or_create(&l).inc();
        }
    }

    pub(crate) fn fell_back(&self, service: &str) {
        self.fallbacks
            .get_or_create(&vec![("service", service.to_string())])
            .inc();
    }

    /// Requests sent over `transport` (`"tcp"` or `"pool"`) for `service`.
    pub fn requests(&self, transport: &str, service: &str) -> u64 {
        self.requests
            .get_or_create(&labels(transport, service))
            .get()
    }

    /// Failed requests over `transport` for `service`.
    pub fn errors(&self, transport: &str, service: &str) -> u64 {
        self.errors.get_or_create(&labels(transport, service)).get()
    }

    /// Requests for `service` that preferred POOL and went over TCP.
    pub fn fallbacks(&self, service: &str) -> u64 {
        self.fallbacks
            .get_or_create(&vec![("service", service.to_string())])
            .get()
    }
}
