//! Socket helpers.

use tokio::net::TcpListener;

/// Binds a TCP listener the way every POOL listener binds
/// ([`pool_net::bind_tcp`]: `[::]:PORT` is dual-stack), as an `io::Error`
/// that keeps the kind (address in use, permission denied, ...).
pub async fn bind_tcp(addr: &str) -> std::io::Result<TcpListener> {
    pool_net::bind_tcp(addr).await.map_err(|e| match &e {
        pool_net::Error::Bind { source, .. } | pool_net::Error::Resolve { source, .. } => {
            std::io::Error::new(source.kind(), e.to_string())
        }
        _ => std::io::Error::other(e.to_string()),
    })
}
