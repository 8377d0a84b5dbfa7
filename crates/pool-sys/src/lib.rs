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
    fn refuses_a_non_tcp_descriptor() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(tcp_info(&f).is_none());
    }
}
