//! The stream preamble: the few bytes at the start of every application
//! stream a peer opens, naming the service it wants at the far end.
//!
//! A node's stream router (and any server built on `pool-net`, such as a
//! gRPC server) reads it before anything else, so one session can carry
//! streams for many services. The `tcp2pool` bridge also puts the original
//! TCP client's address in it, for PROXY protocol v2 at the target.

use std::net::{Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;

use crate::RecvStream;

const PREAMBLE_VERSION: u8 = 1;

/// What the opening end tells the accepting end about a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// The original client's address (a `tcp2pool` bridge's TCP client),
    /// or the unspecified address when there is none.
    pub source: SocketAddr,
    /// The address the client connected to (the `tcp2pool` listener), or
    /// the unspecified address.
    pub destination: SocketAddr,
    /// Which service at the far end; empty for the default.
    pub service: String,
}

/// The 18-byte address form shared with the relay protocol (IPv4 mapped
/// into IPv6, then the port).
fn get_addr(b: &[u8]) -> SocketAddr {
    let mut a = [0u8; 18];
    a.copy_from_slice(&b[..18]);
    pool_core::relay::get_addr(&a)
}

impl Preamble {
    /// A preamble for a stream that a program opens itself (no TCP client
    /// behind it): both addresses unspecified.
    pub fn for_service(service: &str) -> Preamble {
        let none = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        Preamble {
            source: none,
            destination: none,
            service: service.to_string(),
        }
    }

    /// `version u8, source (16 + 2), destination (16 + 2), name len u8, name`.
    /// A name longer than 255 bytes is cut at 255.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.service.len());
        out.push(PREAMBLE_VERSION);
        pool_core::relay::put_addr(&mut out, &self.source);
        pool_core::relay::put_addr(&mut out, &self.destination);
        let name = &self.service.as_bytes()[..self.service.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out
    }

    /// Reads a preamble from the start of a stream.
    pub async fn read(r: &mut RecvStream) -> std::io::Result<Preamble> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut head = [0u8; 38];
        r.read_exact(&mut head).await?;
        if head[0] != PREAMBLE_VERSION {
            return Err(bad("unknown stream preamble version"));
        }
        let source = get_addr(&head[1..19]);
        let destination = get_addr(&head[19..37]);
        let mut name = vec![0u8; usize::from(head[37])];
        r.read_exact(&mut name).await?;
        let service = String::from_utf8(name).map_err(|_| bad("service name is not UTF-8"))?;
        Ok(Preamble {
            source,
            destination,
            service,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_addresses_round_trip() {
        for (s, d) in [
            ("10.1.2.3:4567", "127.0.0.1:8080"),
            ("[fd00::1]:443", "[::1]:9253"),
        ] {
            let p = Preamble {
                source: s.parse().unwrap(),
                destination: d.parse().unwrap(),
                service: "web".into(),
            };
            let b = p.encode();
            assert_eq!(get_addr(&b[1..19]), p.source);
            assert_eq!(get_addr(&b[19..37]), p.destination);
            assert_eq!(b[37] as usize, 3);
        }
    }

    #[test]
    fn long_names_are_cut_not_wrapped() {
        let p = Preamble::for_service(&"x".repeat(300));
        let b = p.encode();
        assert_eq!(b[37], 255);
        assert_eq!(b.len(), 38 + 255);
    }
}
