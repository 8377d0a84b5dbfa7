//! Socket helpers.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds a TCP listener; `[::]:PORT` is dual-stack (takes IPv4 too).
pub async fn bind_tcp(addr: &str) -> std::io::Result<TcpListener> {
    let sa: SocketAddr = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("`{addr}` resolves to no address"),
        )
    })?;
    let domain = if sa.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if sa.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&sa.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}
