//! TCP and POOL side by side, chosen per service.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tonic::body::Body;
use tonic::transport::Channel;
use tower_service::Service;

use crate::metrics::TransportMetrics;

/// How long POOL is left alone after it could not be reached, before an
/// RPC that prefers it tries it again.
const RETRY_POOL_AFTER: Duration = Duration::from_secs(2);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which transports a service runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plain TCP only.
    Tcp,
    /// POOL only.
    Pool,
    /// Both: a server listens on both; a client sends the services in
    /// `prefer_pool` over POOL and the others over TCP.
    Dual,
}

/// One transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// POOL.
    Pool,
}

impl Transport {
    /// `"tcp"` or `"pool"`, as in the metrics' labels.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Pool => "pool",
        }
    }
}

/// The `[transport]` section of a service's config (TOML or any serde
/// format):
///
/// ```toml
/// mode = "dual"                    # "tcp" | "pool" | "dual"
/// prefer_pool = ["health", "status"]
/// fallback_to_tcp = true           # the default
/// ```
///
/// A `prefer_pool` entry names a gRPC service by its full name
/// (`grpc.health.v1.Health`) or its last part (`health`), in any case;
/// `"*"` names every service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// Which transports.
    pub mode: Mode,
    /// In `dual` mode, the services that go over POOL.
    #[serde(default)]
    pub prefer_pool: Vec<String>,
    /// In `dual` mode, whether an RPC that prefers POOL goes over TCP when
    /// the peer has no POOL listener (or it cannot be reached).
    #[serde(default = "yes")]
    pub fallback_to_tcp: bool,
}

fn yes() -> bool {
    true
}

impl TransportConfig {
    /// The transport an RPC for `service` (its full gRPC name) should use.
    pub fn preferred(&self, service: &str) -> Transport {
        match self.mode {
            Mode::Tcp => Transport::Tcp,
            Mode::Pool => Transport::Pool,
            Mode::Dual => {
                let last = service.rsplit('.').next().unwrap_or(service);
                let hit = self.prefer_pool.iter().any(|p| {
                    p == "*" || p.eq_ignore_ascii_case(service) || p.eq_ignore_ascii_case(last)
                });
                if hit {
                    Transport::Pool
                } else {
                    Transport::Tcp
                }
            }
        }
    }
}

/// A client channel that sends each RPC over TCP or POOL by its service, as
/// a [`TransportConfig`] says, and records [`TransportMetrics`]. Use it
/// wherever a `Channel` goes: `KvClient::new(dual)`.
///
/// When an RPC that prefers POOL fails to reach the peer (no POOL listener,
/// the node unreachable) and `fallback_to_tcp` is set, that RPC fails as it
/// would over a broken TCP connection, and the following ones go over TCP
/// (counted in `grpc_client_fallbacks_total`) for two seconds before POOL
/// is tried again. [`DualChannel::connect`] checks POOL up front, so a peer
/// with no POOL listener costs no failed RPC.
#[derive(Clone)]
pub struct DualChannel {
    inner: Arc<Inner>,
}

struct Inner {
    config: TransportConfig,
    tcp: Option<Channel>,
    pool: Option<Channel>,
    pool_down_until: Mutex<Option<Instant>>,
    metrics: TransportMetrics,
}

impl DualChannel {
    /// A dual channel over the given channels; each transport the config
    /// can choose must have one (`tcp` is also needed for fallback).
    pub fn new(
        config: TransportConfig,
        tcp: Option<Channel>,
        pool: Option<Channel>,
        metrics: TransportMetrics,
    ) -> Result<DualChannel, String> {
        let needs_tcp = config.mode != Mode::Pool;
        let needs_pool = config.mode != Mode::Tcp;
        if needs_tcp && tcp.is_none() {
            return Err(format!(
                "transport mode {:?} needs a TCP address",
                config.mode
            ));
        }
        if needs_pool && pool.is_none() {
            return Err(format!(
                "transport mode {:?} needs a POOL address and peer key",
                config.mode
            ));
        }
        Ok(DualChannel {
            inner: Arc::new(Inner {
                config,
                tcp,
                pool,
                pool_down_until: Mutex::new(None),
                metrics,
            }),
        })
    }

    /// Builds the channels itself: TCP to `tcp_uri` (lazily), POOL through
    /// `pool` (connected now; when that fails and fallback is on, POOL is
    /// marked down and RPCs start on TCP).
    pub async fn connect(
        config: TransportConfig,
        tcp_uri: Option<&str>,
        pool: Option<&crate::PoolConnector>,
        metrics: TransportMetrics,
    ) -> Result<DualChannel, BoxError> {
        let tcp = match tcp_uri {
            Some(u) => Some(tonic::transport::Endpoint::from_shared(u.to_string())?.connect_lazy()),
            None => None,
        };
        let mut down = false;
        let pool_channel = match pool {
            Some(c) if config.mode != Mode::Tcp => match c.channel().await {
                Ok(ch) => Some(ch),
                Err(e) if config.mode == Mode::Dual && config.fallback_to_tcp && tcp.is_some() => {
                    tracing::warn!("POOL unreachable, starting on TCP: {e}");
                    down = true;
                    Some(c.channel_lazy())
                }
                Err(e) => return Err(e.into()),
            },
            Some(c) => Some(c.channel_lazy()),
            None => None,
        };
        let d = DualChannel::new(config, tcp, pool_channel, metrics)?;
        if down {
            d.mark_pool_down();
        }
        Ok(d)
    }

    /// The metrics this channel records.
    pub fn metrics(&self) -> &TransportMetrics {
        &self.inner.metrics
    }

    /// The transport the next RPC for `service` goes over.
    pub fn transport_for(&self, service: &str) -> Transport {
        let want = self.inner.config.preferred(service);
        if want == Transport::Pool && self.pool_is_down() {
            return Transport::Tcp;
        }
        want
    }

    fn pool_is_down(&self) -> bool {
        if !(self.inner.config.mode == Mode::Dual && self.inner.config.fallback_to_tcp) {
            return false;
        }
        let mut g = self
            .inner
            .pool_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *g {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *g = None;
                false
            }
            None => false,
        }
    }

    fn mark_pool_down(&self) {
        *self
            .inner
            .pool_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + RETRY_POOL_AFTER);
    }
}

/// `/package.Service/Method` → `package.Service`.
fn service_of(path: &str) -> &str {
    let p = path.strip_prefix('/').unwrap_or(path);
    p.split('/').next().unwrap_or(p)
}

/// Whether a response's headers carry a non-OK `grpc-status` (a
/// trailers-only error response).
fn is_error(resp: &http::Response<Body>) -> bool {
    resp.headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() != b"0")
}

impl Service<http::Request<Body>> for DualChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the chosen channel's, awaited in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let service = service_of(req.uri().path()).to_string();
            let wanted = this.inner.config.preferred(&service);
            let transport = this.transport_for(&service);
            if wanted == Transport::Pool && transport == Transport::Tcp {
                this.inner.metrics.fell_back(&service);
            }
            let channel = match transport {
                Transport::Tcp => this.inner.tcp.clone(),
                Transport::Pool => this.inner.pool.clone(),
            }
            .ok_or("no channel for the chosen transport")?;
            let start = Instant::now();
            let r = ready_call(channel, req).await;
            let ok = matches!(&r, Ok(resp) if !is_error(resp));
            this.inner
                .metrics
                .record(transport.name(), &service, start.elapsed(), ok);
            if r.is_err() && transport == Transport::Pool {
                this.mark_pool_down();
            }
            Ok(r?)
        })
    }
}

async fn ready_call(
    mut channel: Channel,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, tonic::transport::Error> {
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
    channel.call(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode, prefer: &[&str]) -> TransportConfig {
        TransportConfig {
            mode,
            prefer_pool: prefer.iter().map(|s| s.to_string()).collect(),
            fallback_to_tcp: true,
        }
    }

    #[test]
    fn services_are_matched_by_full_name_or_last_part() {
        let c = cfg(Mode::Dual, &["health", "pool.kv.v1.Kv"]);
        assert_eq!(c.preferred("grpc.health.v1.Health"), Transport::Pool);
        assert_eq!(c.preferred("pool.kv.v1.Kv"), Transport::Pool);
        assert_eq!(c.preferred("other.Kv"), Transport::Tcp);
        assert_eq!(
            c.preferred("grpc.reflection.v1.ServerReflection"),
            Transport::Tcp
        );
        assert_eq!(cfg(Mode::Dual, &["*"]).preferred("x.Y"), Transport::Pool);
        assert_eq!(cfg(Mode::Tcp, &["*"]).preferred("x.Y"), Transport::Tcp);
        assert_eq!(cfg(Mode::Pool, &[]).preferred("x.Y"), Transport::Pool);
    }

    #[test]
    fn config_parses_the_seed_shape() {
        let c: TransportConfig =
            toml::from_str("mode = \"dual\"\nprefer_pool = [\"health\", \"status\"]\n").unwrap();
        assert_eq!(c.mode, Mode::Dual);
        assert!(c.fallback_to_tcp);
        assert!(toml::from_str::<TransportConfig>("mode = \"iroh\"").is_err());
        assert!(toml::from_str::<TransportConfig>("mode = \"tcp\"\nprefer = []").is_err());
    }

    #[test]
    fn paths_name_their_service() {
        assert_eq!(service_of("/pool.kv.v1.Kv/Put"), "pool.kv.v1.Kv");
        assert_eq!(
            service_of("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health"
        );
    }
}
