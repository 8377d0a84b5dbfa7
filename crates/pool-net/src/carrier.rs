//! Carriers: reliable ordered byte pipes to the peer. A direct TCP
//! connection today; relays and other transports plug in through
//! [`Dialer`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pool_core::HandshakeError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::Error;

/// Anything that carries POOL records: a reliable, ordered byte stream.
pub trait Carrier: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The remote address, if the carrier has one.
    fn peer_addr(&self) -> Option<SocketAddr>;
    /// A short word for tables: "tcp", "relay", ...
    fn kind(&self) -> &'static str;
    /// A duplicate of the underlying TCP socket, for `TCP_INFO` counters
    /// (retransmissions); `None` when the carrier is not a TCP socket.
    fn tcp_socket(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
    /// The relays the carrier goes through, ours first (empty: direct).
    fn relays(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Carrier for TcpStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        TcpStream::peer_addr(self).ok()
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }
    fn tcp_socket(&self) -> Option<std::os::fd::OwnedFd> {
        socket2::SockRef::from(self)
            .try_clone()
            .ok()
            .map(Into::into)
    }
}

/// A boxed carrier.
pub type BoxedCarrier = Box<dyn Carrier>;

/// A boxed future returned by [`Dialer::dial`].
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = Result<BoxedCarrier, Error>> + Send + 'a>>;

/// Opens new carriers to one peer: used for the first connection and for
/// every resume after a carrier dies.
pub trait Dialer: Send + Sync + 'static {
    /// Opens a new carrier.
    fn dial(&self) -> DialFuture<'_>;
    /// Where it dials, for messages.
    fn describe(&self) -> String;
}

/// Dials TCP to `host:port`, resolving the name on every dial (so a peer
/// whose address changed is found again).
#[derive(Clone, Debug)]
pub struct TcpDialer {
    addr: String,
}

impl TcpDialer {
    /// A dialer for `HOST:PORT`, `1.2.3.4:PORT` or `[::1]:PORT`.
    pub fn new(addr: impl Into<String>) -> Self {
        TcpDialer { addr: addr.into() }
    }
}

impl Dialer for TcpDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.addr)
                .await
                .map_err(|source| Error::Resolve {
                    addr: self.addr.clone(),
                    source,
                })?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => {
                        tune(&s);
                        return Ok(Box::new(s) as BoxedCarrier);
                    }
                    Err(e) => last = e,
                }
            }
            Err(Error::Connect {
                addr: self.addr.clone(),
                source: last,
            })
        })
    }
    fn describe(&self) -> String {
        self.addr.clone()
    }
}

/// `TCP_NODELAY` and large buffers on every carrier socket.
pub(crate) fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_send_buffer_size(4 << 20);
    let _ = sock.set_recv_buffer_size(4 << 20);
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads exactly one record (handshake class) from a carrier, within `t`.
pub(crate) async fn read_record<R: AsyncRead + Unpin + ?Sized>(
    rd: &mut R,
    addr: &str,
    t: Duration,
) -> Result<Vec<u8>, Error> {
    let fut = async {
        let mut buf = vec![0u8; 4];
        rd.read_exact(&mut buf).await?;
        let len = match pool_core::peek_record(&buf) {
            Ok(_) => (usize::from(buf[1]) << 16) | (usize::from(buf[2]) << 8) | usize::from(buf[3]),
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            }
        };
        buf.resize(4 + len, 0);
        rd.read_exact(&mut buf[4..]).await?;
        Ok(buf)
    };
    match tokio::time::timeout(t, fut).await {
        Err(_) => Err(Error::Timeout {
            addr: addr.to_string(),
            secs: t.as_secs(),
        }),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::HandshakeEof {
            addr: addr.to_string(),
        }),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Err(Error::Handshake {
            addr: addr.to_string(),
            source: HandshakeError::Unexpected("not a POOL record"),
        }),
        Ok(Err(e)) => Err(Error::Io(e)),
        Ok(Ok(b)) => Ok(b),
    }
}
