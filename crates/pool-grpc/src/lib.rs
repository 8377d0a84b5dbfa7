//! # pool-grpc: unmodified tonic over POOL
//!
//! The real tonic on both sides, with POOL underneath:
//!
//! - **Server**: [`PoolIncoming`] is a stream of POOL connections for
//!   tonic's `Server::serve_with_incoming`. Each connection is one POOL
//!   stream carrying one HTTP/2 connection; its [`PoolConnectInfo`] (the
//!   peer's authenticated key, the session, the path) is in every request's
//!   extensions, so a handler or an interceptor ([`AllowKeys`]) can
//!   authorize by key. The same `Router` can be served on TCP and on POOL at
//!   once ([`serve`]).
//! - **Client**: [`PoolConnector`] plugs into
//!   `tonic::transport::Endpoint::connect_with_connector`, so applications
//!   keep tonic's `Channel` (deadlines, interceptors, reconnect, balancing).
//! - **Dual transport per service**: [`DualChannel`] sends each RPC over TCP
//!   or POOL by its service name ([`TransportConfig`]: `mode`,
//!   `prefer_pool`, fallback to TCP), and records [`TransportMetrics`].
//!
//! ```no_run
//! # async fn demo(router: tonic::transport::server::Router) -> Result<(), Box<dyn std::error::Error>> {
//! use pool_net::{Endpoint, EndpointConfig, SecretKey, Trust};
//! // Server: the same routes on TCP and on POOL.
//! let key = SecretKey::from_bytes([7; 32]);
//! let pool = Endpoint::bind("[::]:9253", EndpointConfig::new(key).trust(Trust::new())).await?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! tokio::spawn(pool_grpc::serve(router, Some(tcp), Some(pool)));
//!
//! // Client: tonic's Channel over a POOL stream.
//! let me = Endpoint::client(EndpointConfig::new(SecretKey::from_bytes([8; 32])));
//! let server_key = "P5bAqjXQu0wIY0_-Ke6TM8gbp9M_XeY1z4Cm8hN6nVg".parse()?;
//! let channel = pool_grpc::PoolConnector::new(me, "[::1]:9253", server_key)
//!     .channel()
//!     .await?;
//! # let _ = channel; Ok(()) }
//! ```
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod auth;
mod client;
mod dual;
mod metrics;
mod server;

pub use auth::{peer_key, AllowKeys};
pub use client::PoolConnector;
pub use dual::{DualChannel, Mode, Transport, TransportConfig};
pub use metrics::TransportMetrics;
pub use server::{serve, PoolConn, PoolConnectInfo, PoolIncoming, DEFAULT_SERVICE};
