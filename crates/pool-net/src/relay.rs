//! The node side of POOL-RELAY/1: carriers through a relay, and the
//! registration that makes a listener reachable by key alone.
//!
//! A relay carrier is a TCP connection to the relay that the relay splices
//! to a TCP connection from the peer; the session's sealed records pass
//! through unchanged. See `pool_core::relay` for the wire format.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pool_core::relay::{self, Intent, Msg, RouteHop};
use pool_core::{PublicKey, SecretKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::carrier::{tune, BoxedCarrier, Carrier, DialFuture, Dialer};
use crate::error::Error;

/// How long the relay handshake (HELLO to WELCOME) may take, the peer's
/// acceptance included.
pub(crate) const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

/// A carrier spliced through a relay.
pub struct RelayCarrier {
    sock: TcpStream,
    relay: SocketAddr,
    /// The relays past ours (peer relays), as the relay said in ROUTE.
    beyond: Vec<RouteHop>,
}

impl RelayCarrier {
    /// The relay's address.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }
}

impl AsyncRead for RelayCarrier {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_read(cx, buf)
    }
}

impl AsyncWrite for RelayCarrier {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }
}

impl Carrier for RelayCarrier {
    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.relay)
    }
    fn kind(&self) -> &'static str {
        "relay"
    }
    fn tcp_socket(&self) -> Option<std::os::fd::OwnedFd> {
        self.sock.tcp_socket()
    }
    fn relays(&self) -> Vec<String> {
        let mut v = vec![self.relay.to_string()];
        v.extend(
            self.beyond
                .iter()
                .map(|h| format!("{} ({})", h.addr, h.key.short())),
        );
        v
    }
}

/// Reads one relay message, exactly (nothing past it: for CONNECT and
/// ACCEPT the spliced bytes follow at once).
pub(crate) async fn read_msg<R: AsyncRead + Unpin>(
    sock: &mut R,
    relay: &str,
) -> Result<Msg, Error> {
    let bad = |message: String| Error::Relay {
        addr: relay.to_string(),
        code: 0,
        message,
    };
    let mut head = [0u8; 3];
    sock.read_exact(&mut head).await.map_err(|e| {
        bad(format!(
            "connection closed before an answer ({e}); is this a POOL relay?"
        ))
    })?;
    let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
    if len > relay::MAX_BODY {
        return Err(bad(format!("not a POOL relay (message of {len} bytes)")));
    }
    let mut buf = vec![0u8; 3 + len];
    buf[..3].copy_from_slice(&head);
    sock.read_exact(&mut buf[3..])
        .await
        .map_err(|e| bad(format!("connection closed mid-message: {e}")))?;
    match Msg::decode(&buf) {
        Ok(Some((m, _))) => Ok(m),
        Ok(None) => Err(bad("truncated message".into())),
        Err(e) => Err(bad(format!("{e}; is this a POOL relay?"))),
    }
}

pub(crate) async fn write_msg<W: AsyncWrite + Unpin>(sock: &mut W, m: &Msg) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(80);
    m.encode(&mut out);
    sock.write_all(&out).await
}

/// A relay's answer to a `*_ROUTED` intent from a relay that does not know
/// them (an older relay): the caller asks again with the plain intent.
fn is_old_relay(e: &Error) -> bool {
    matches!(e, Error::Relay { code, message, .. }
        if *code == relay::ERR_PROTOCOL && message.contains("bad AUTH intent"))
}

/// As [`handshake`] with the routed form of CONNECT or ACCEPT: the relays
/// past ours come back too. Falls back to the plain intent (and no route)
/// for a relay that does not know the routed one.
pub(crate) async fn handshake_routed(
    relay: &str,
    key: &SecretKey,
    intent: Intent,
) -> Result<(TcpStream, SocketAddr, Vec<RouteHop>), Error> {
    let routed = match intent {
        Intent::Connect(k) => Intent::ConnectRouted(k),
        Intent::Accept(c) => Intent::AcceptRouted(c),
        other => other,
    };
    match handshake_with(relay, key, routed).await {
        Ok((s, a, _, route)) => Ok((s, a, route)),
        Err(e) if is_old_relay(&e) && routed != intent => {
            let (s, a, _, route) = handshake_with(relay, key, intent).await?;
            Ok((s, a, route))
        }
        Err(e) => Err(e),
    }
}

/// Connects to a relay, proves `key`, states `intent`, and waits for
/// WELCOME. Returns the socket (raw and spliced for CONNECT and ACCEPT),
/// the relay's address and our address as the relay saw it.
pub(crate) async fn handshake(
    relay: &str,
    key: &SecretKey,
    intent: Intent,
) -> Result<(TcpStream, SocketAddr, SocketAddr), Error> {
    let (s, a, o, _) = handshake_with(relay, key, intent).await?;
    Ok((s, a, o))
}

async fn handshake_with(
    relay: &str,
    key: &SecretKey,
    intent: Intent,
) -> Result<(TcpStream, SocketAddr, SocketAddr, Vec<RouteHop>), Error> {
    let fut = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay)
            .await
            .map_err(|source| Error::Resolve {
                addr: relay.to_string(),
                source,
            })?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    sock = Some((s, a));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some((mut sock, relay_addr)) = sock else {
            return Err(Error::Connect {
                addr: relay.to_string(),
                source: last,
            });
        };
        tune(&sock);
        write_msg(
            &mut sock,
            &Msg::Hello {
                version: relay::VERSION,
            },
        )
        .await?;
        let (ephemeral, nonce) = match read_msg(&mut sock, relay).await? {
            Msg::Challenge { ephemeral, nonce } => (ephemeral, nonce),
            Msg::Error { code, message } => {
                return Err(Error::Relay {
                    addr: relay.to_string(),
                    code,
                    message,
                })
            }
            other => {
                return Err(Error::Relay {
                    addr: relay.to_string(),
                    code: 0,
                    message: format!("unexpected {other:?} instead of a challenge"),
                })
            }
        };
        let auth =
            relay::authenticate(key, &ephemeral, &nonce, intent).ok_or_else(|| Error::Relay {
                addr: relay.to_string(),
                code: 0,
                message: "the relay's ephemeral key is invalid".into(),
            })?;
        write_msg(&mut sock, &auth).await?;
        let mut route = Vec::new();
        let mut m = read_msg(&mut sock, relay).await?;
        if intent.wants_route() {
            if let Msg::Route(r) = m {
                route = r;
                m = read_msg(&mut sock, relay).await?;
            }
        }
        match m {
            Msg::Welcome { observed } => Ok((sock, relay_addr, observed, route)),
            Msg::Error { code, message } => Err(Error::Relay {
                addr: relay.to_string(),
                code,
                message,
            }),
            other => Err(Error::Relay {
                addr: relay.to_string(),
                code: 0,
                message: format!("unexpected {other:?} instead of WELCOME"),
            }),
        }
    };
    tokio::time::timeout(RELAY_TIMEOUT, fut)
        .await
        .map_err(|_| Error::Relay {
            addr: relay.to_string(),
            code: 0,
            message: format!(
                "no answer within {} s (is the relay up, and the peer registered there?)",
                RELAY_TIMEOUT.as_secs()
            ),
        })?
}

/// Opens carriers to `peer` through a relay.
pub struct RelayDialer {
    relay: String,
    key: SecretKey,
    peer: PublicKey,
}

impl RelayDialer {
    /// A dialer reaching `peer` through the relay at `relay` (`HOST:PORT`),
    /// proving `key` to the relay.
    pub fn new(relay: impl Into<String>, key: SecretKey, peer: PublicKey) -> Self {
        RelayDialer {
            relay: relay.into(),
            key,
            peer,
        }
    }
}

impl Dialer for RelayDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let (sock, relay, beyond) =
                handshake_routed(&self.relay, &self.key, Intent::Connect(self.peer)).await?;
            Ok(Box::new(RelayCarrier {
                sock,
                relay,
                beyond,
            }) as BoxedCarrier)
        })
    }
    fn describe(&self) -> String {
        format!("{} via relay {}", self.peer.short(), self.relay)
    }
}

/// Accepts one circuit the relay announced: the carrier, to be handled
/// like an incoming TCP connection.
pub(crate) async fn accept_circuit(
    relay: &str,
    key: &SecretKey,
    circuit: relay::CircuitId,
) -> Result<RelayCarrier, Error> {
    let (sock, relay, beyond) = handshake_routed(relay, key, Intent::Accept(circuit)).await?;
    Ok(RelayCarrier {
        sock,
        relay,
        beyond,
    })
}
