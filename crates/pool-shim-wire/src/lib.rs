//! # pool-shim-wire: what the shim and the daemon say to each other
//!
//! The start of every connection between `libpool_shim.so` (crate
//! `pool-shim`) and the local POOL daemon (`pool_node::shim`), in one
//! place for both sides. `docs/shim.md` specifies it.
//!
//! Over the daemon's Unix socket the shim sends the 28-byte [`Header`] and
//! a 16-byte one-time token it drew; the daemon answers with a
//! [`REPLY_LEN`]-byte [`Reply`]: `GO` (its loopback data port) or
//! `DENIED`. The shim connects the program's own TCP socket to the data
//! port and sends the token first; once the daemon has paired that
//! connection with the header it answers `CONNECTED` on the Unix socket,
//! naming the local port of the TCP connection that presented the token.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// `PSH2`: a shim connection, header version 2 (version 1 went over TCP
/// to a fixed loopback port and is gone).
pub const MAGIC: [u8; 4] = *b"PSH2";
/// Length of the header.
pub const HEADER_LEN: usize = 28;
/// Flag: the program's socket is blocking; answer with one status byte
/// once the destination is reached (or not), so `connect` can return what
/// the kernel would.
pub const FLAG_WANT_STATUS: u8 = 1;

/// Status byte: connected to the destination.
pub const STATUS_OK: u8 = 0;
/// Status byte: the destination (or its daemon) refused.
pub const STATUS_REFUSED: u8 = 1;
/// Status byte: the destination did not answer in time.
pub const STATUS_TIMED_OUT: u8 = 2;
/// Status byte: no way to the destination (no route, peer unreachable).
pub const STATUS_UNREACHABLE: u8 = 3;
/// Status byte: the destination's daemon does not expose that port.
pub const STATUS_NOT_EXPOSED: u8 = 4;

/// Length of what the shim sends on the Unix socket: header, then token.
pub const REQUEST_LEN: usize = HEADER_LEN + TOKEN_LEN;
/// Length of each reply on the Unix socket.
pub const REPLY_LEN: usize = 20;
/// Length of the token.
pub const TOKEN_LEN: usize = 16;
/// Reply: connect the program's socket to `127.0.0.1:port` and send the
/// token on it (the token field echoes the shim's).
pub const REPLY_GO: u8 = 1;
/// Reply: the TCP connection from `port` presented the token.
pub const REPLY_CONNECTED: u8 = 2;
/// Reply: this user may not use the daemon (`[shim] allow_users`).
pub const REPLY_DENIED: u8 = 3;

/// A reply from the daemon: `kind u8, reserved u8, port u16be, token[16]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// [`REPLY_GO`], [`REPLY_CONNECTED`] or [`REPLY_DENIED`].
    pub kind: u8,
    /// `GO`: the data port; `CONNECTED`: the program socket's local port.
    pub port: u16,
    /// The one-time token (zero in `DENIED`).
    pub token: [u8; TOKEN_LEN],
}

impl Reply {
    /// The 20 bytes.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0] = self.kind;
        b[2..4].copy_from_slice(&self.port.to_be_bytes());
        b[4..].copy_from_slice(&self.token);
        b
    }

    /// From 20 bytes.
    pub fn decode(b: &[u8; REPLY_LEN]) -> Reply {
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&b[4..]);
        Reply {
            kind: b[0],
            port: u16::from_be_bytes([b[2], b[3]]),
            token,
        }
    }
}

/// What the shim sends first: `magic[4] flags u8, reserved u8, port
/// u16be, address[16] (IPv4 as v4-mapped IPv6), pid u32be`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The address the program connected to.
    pub destination: SocketAddr,
    /// Flags ([`FLAG_WANT_STATUS`]).
    pub flags: u8,
    /// The program's process id (for logs and the journal).
    pub pid: u32,
}

impl Header {
    /// The 28 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = self.flags;
        h[6..8].copy_from_slice(&self.destination.port().to_be_bytes());
        let v6 = match self.destination.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        h[8..24].copy_from_slice(&v6.octets());
        h[24..28].copy_from_slice(&self.pid.to_be_bytes());
        h
    }

    /// From 28 bytes; `None` without the magic.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Option<Header> {
        if h[..4] != MAGIC {
            return None;
        }
        let port = u16::from_be_bytes([h[6], h[7]]);
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&h[8..24]);
        let ip = Ipv6Addr::from(ip);
        let ip = match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        };
        Some(Header {
            destination: SocketAddr::new(ip, port),
            flags: h[4],
            pid: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_test_vector() {
        let header = |destination: SocketAddr, flags, pid| Header {
            destination,
            flags,
            pid,
        };
        let h = header(
            "10.1.2.3:8080".parse().unwrap(),
            FLAG_WANT_STATUS,
            0x0102_0304,
        )
        .encode();
        let want: [u8; 28] = [
            b'P', b'S', b'H', b'2', 1, 0, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10,
            1, 2, 3, 1, 2, 3, 4,
        ];
        assert_eq!(h, want);
        assert_eq!(
            Header::decode(&h),
            Some(header("10.1.2.3:8080".parse().unwrap(), 1, 0x0102_0304))
        );
        let v6 = header("[fd00::7]:443".parse().unwrap(), 0, 9);
        assert_eq!(Header::decode(&v6.encode()), Some(v6));
        let mut bad = h;
        bad[3] = b'1';
        assert_eq!(Header::decode(&bad), None);
    }

    #[test]
    fn reply_test_vector() {
        let r = Reply {
            kind: REPLY_GO,
            port: 0x9c40,
            token: *b"0123456789abcdef",
        };
        let mut want = [0u8; REPLY_LEN];
        want[..4].copy_from_slice(&[1, 0, 0x9c, 0x40]);
        want[4..].copy_from_slice(b"0123456789abcdef");
        assert_eq!(r.encode(), want);
        assert_eq!(Reply::decode(&want), r);
    }
}
