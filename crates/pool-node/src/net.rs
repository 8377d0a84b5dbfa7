//! Socket helpers, shared by the node and the relay server (`pool-relay`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::warn;

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

/// The next connection on `listener`, or `None` once `stop` turns true
/// (or its sender is gone). Accept errors (EMFILE and friends) are logged
/// and retried after a short pause instead of spinning. The relay's
/// listener loop; the node's listeners use the same loop in `bridge`.
pub async fn accept_next(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stopped(stop) => return None,
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The unit that per-address caps and aggregates count in: an IPv4
/// address, or the /64 of an IPv6 address (one host or site usually holds
/// a whole /64, so counting single IPv6 addresses would cap nothing).
/// IPv4-mapped IPv6 addresses count as IPv4.
#[must_use]
pub fn address_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// A lingering close: reads and discards what the peer still sends (at
/// most 64 KiB, for at most `linger`) after our answer went out. Closing
/// with unread input makes the kernel send a reset, which can destroy the
/// answer still in flight.
pub async fn drain_before_close<S: AsyncRead + Unpin>(stream: &mut S, linger: Duration) {
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(linger, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_buckets_are_ipv4_addresses_and_ipv6_slash_64s() {
        let b = |s: &str| address_bucket(s.parse().unwrap());
        assert_eq!(b("192.0.2.7"), b("192.0.2.7"));
        assert_ne!(b("192.0.2.7"), b("192.0.2.8"));
        assert_eq!(b("2001:db8:1:2::1"), b("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(b("2001:db8:1:2::1").to_string(), "2001:db8:1:2::");
        assert_ne!(b("2001:db8:1:2::1"), b("2001:db8:1:3::1"));
        assert_eq!(b("::ffff:192.0.2.7"), b("192.0.2.7"));
    }
}
