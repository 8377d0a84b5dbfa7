//! # pool-sys: the OS calls POOL makes that need `unsafe`
//!
//! Every other crate of the workspace forbids `unsafe`. This one holds the
//! few system calls the standard library and `socket2` do not expose.

use std::os::fd::{AsFd, AsRawFd};

/// Counters from the kernel's `TCP_INFO` for one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u64,
    /// The kernel's smoothed RTT, in microseconds (`tcpi_rtt`).
    pub rtt_us: u32,
}

/// Reads `TCP_INFO` of a TCP socket; `None` if the call fails (not a TCP
/// socket, or not Linux).
#[cfg(target_os = "linux")]
pub fn tcp_info(sock: &impl AsFd) -> Option<TcpInfo> {
    // SAFETY: `tcp_info` is a plain C struct of integers, for which all
    // zero bytes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let fd = sock.as_fd().as_raw_fd();
    // SAFETY: `fd` is an open descriptor for the whole call (borrowed from
    // `sock`); `info` and `len` are valid, writable, and `len` is the size
    // of `info`, so the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast::<libc::c_void>(),
            &mut len,
        )
    };
    (rc == 0).then_some(TcpInfo {
        total_retrans: u64::from(info.tcpi_total_retrans),
        rtt_us: info.tcpi_rtt,
    })
}

/// Reads `TCP_INFO` of a TCP socket; always `None` off Linux.
#[cfg(not(target_os = "linux"))]
pub fn tcp_info(_sock: &impl AsFd) -> Option<TcpInfo> {
    None
}

/// The IP addresses of this host's interfaces that are up and running
/// (`getifaddrs`), loopback included; empty if the call fails.
#[cfg(target_os = "linux")]
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid place for the list pointer; on success the
    // list is ours until `freeifaddrs` below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list `getifaddrs` built,
        // not freed yet.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let want = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_uint;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & want != want {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points to a sockaddr whose
        // family field is valid to read.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: the family says this is a `sockaddr_in`.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this is a `sockaddr_in6`.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    // SAFETY: `head` came from a successful `getifaddrs` and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

/// The IP addresses of this host's interfaces; empty off Linux.
#[cfg(not(target_os = "linux"))]
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    Vec::new()
}

/// Registers a TCP socket with the tokio reactor as an
/// [`AsyncFd`](tokio::io::unix::AsyncFd), for code that drives its
/// readiness by hand (reading and writing with the socket's own calls, and
/// clearing readiness after a short read). The socket must be non-blocking
/// (as [`tokio::net::TcpStream::into_std`] leaves it). Must be called
/// within a tokio runtime.
pub fn async_tcp(
    sock: std::net::TcpStream,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::TcpStream>> {
    // SAFETY: a `std::net::TcpStream` owns its file descriptor: it stays
    // open, and `as_raw_fd` returns that same descriptor, until the stream
    // is dropped, which happens only when the `AsyncFd` that now owns it is
    // dropped (or gives it back with `into_inner`).
    unsafe { tokio::io::unix::AsyncFd::register(sock) }.map_err(std::io::Error::from)
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to
/// `want`, or to the hard limit if that is lower; never lowers it. Returns
/// the soft limit in force afterwards. A process that holds one socket per
/// session (a daemon with 10,000 sessions, or a test that dials them)
/// needs more than the usual default soft limit of 1,024.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // `rlim_t` is `u64` here, not on every target
pub fn raise_open_files_limit(want: u64) -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let target = (want as libc::rlim_t).min(lim.rlim_max);
    if target <= lim.rlim_cur {
        return Ok(lim.rlim_cur as u64);
    }
    lim.rlim_cur = target;
    // SAFETY: `lim` is a valid `rlimit`, read by the kernel only during
    // the call; a soft limit at or below the hard limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(target as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_connected_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let info = tcp_info(&c).expect("TCP_INFO on a connected TCP socket");
        assert_eq!(info.total_retrans, 0);
    }

    #[test]
    fn lists_loopback() {
        let a = local_addresses();
        assert!(a.iter().any(|ip| ip.is_loopback()), "{a:?}");
    }

    #[test]
    fn open_files_limit_never_drops() {
        let now = raise_open_files_limit(0).unwrap();
        assert!(now > 0);
        assert!(raise_open_files_limit(now + 1).unwrap() >= now);
    }

    #[test]
    fn refuses_a_non_tcp_descriptor() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(tcp_info(&f).is_none());
    }
}
