//! The server side: POOL streams as tonic connections.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pool_net::{Endpoint, Preamble, PublicKey, Session, SessionId, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, Router};
use tracing::{debug, warn};

/// The service name a gRPC server answers besides the default (`""`): a
/// `tcp2pool` bridge or a [`PoolConnector`](crate::PoolConnector) names it
/// in the stream preamble.
pub const DEFAULT_SERVICE: &str = "grpc";

/// Stream reset code for a stream naming a service this server does not
/// serve (the same code as a node's router uses).
const RESET_NO_SERVICE: u64 = 4;

/// How long a new stream may take to send its preamble.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request learns about the POOL connection it came on, from its
/// extensions: `request.extensions().get::<PoolConnectInfo>()`, or
/// [`peer_key`](crate::peer_key).
#[derive(Clone, Debug)]
pub struct PoolConnectInfo {
    /// The peer's key, authenticated by the handshake and trusted by the
    /// endpoint.
    pub peer: PublicKey,
    /// The session the connection's stream belongs to.
    pub session_id: SessionId,
    /// The service name the stream's preamble named.
    pub service: String,
    /// The original TCP client's address when the stream came through a
    /// `tcp2pool` bridge (`None` for a native POOL client).
    pub bridged_from: Option<SocketAddr>,
    session: Session,
}

impl PoolConnectInfo {
    /// The session's path right now: `"direct"`, `"relay"`, or `"none"`
    /// while it resumes.
    pub fn path(&self) -> &'static str {
        self.session.stats().path
    }

    /// The carrier's remote address right now, if one is attached.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.session.stats().remote
    }
}

/// One POOL stream carrying one HTTP/2 connection.
pub struct PoolConn {
    stream: Stream,
    info: Option<PoolConnectInfo>,
}

impl PoolConn {
    pub(crate) fn client(stream: Stream) -> PoolConn {
        PoolConn { stream, info: None }
    }
}

impl Connected for PoolConn {
    type ConnectInfo = Option<PoolConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PoolConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PoolConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections a POOL endpoint accepts, for
/// `tonic::transport::Server::serve_with_incoming`: every stream a trusted
/// peer opens whose preamble names `""` or the server's service name.
/// Streams naming another service are reset. Dropping the incoming stops
/// accepting (live connections go on).
pub struct PoolIncoming {
    rx: ReceiverStream<io::Result<PoolConn>>,
}

impl PoolIncoming {
    /// Accepts on `endpoint` (a bound endpoint), answering the default
    /// service names (`""` and [`DEFAULT_SERVICE`]).
    pub fn new(endpoint: Endpoint) -> PoolIncoming {
        PoolIncoming::with_service(endpoint, DEFAULT_SERVICE)
    }

    /// Accepts on `endpoint`, answering streams naming `""` or `service`.
    pub fn with_service(endpoint: Endpoint, service: &str) -> PoolIncoming {
        let (tx, rx) = mpsc::channel(64);
        let service = service.to_string();
        tokio::spawn(async move {
            loop {
                let session = tokio::select! {
                    s = endpoint.accept() => s,
                    _ = tx.closed() => return,
                };
                let Some(session) = session else { return };
                debug!(peer = %session.peer_key().short(), "gRPC: session accepted");
                tokio::spawn(accept_streams(session, service.clone(), tx.clone()));
            }
        });
        PoolIncoming {
            rx: ReceiverStream::new(rx),
        }
    }
}

async fn accept_streams(session: Session, service: String, tx: mpsc::Sender<io::Result<PoolConn>>) {
    loop {
        let stream = tokio::select! {
            s = session.accept_stream() => s,
            _ = tx.closed() => return,
        };
        let Some(stream) = stream else { return };
        let (session, service, tx) = (session.clone(), service.clone(), tx.clone());
        tokio::spawn(async move {
            if let Some(conn) = open(stream, session, &service).await {
                let _ = tx.send(Ok(conn)).await;
            }
        });
    }
}

/// Reads a new stream's preamble; `None` (and the stream reset) when it is
/// late, malformed or names another service.
async fn open(stream: Stream, session: Session, service: &str) -> Option<PoolConn> {
    let (mut recv, mut send) = stream.into_split();
    let pre = match tokio::time::timeout(PREAMBLE_TIMEOUT, Preamble::read(&mut recv)).await {
        Ok(Ok(p)) if p.service.is_empty() || p.service == service => p,
        Ok(Ok(p)) => {
            warn!(peer = %session.peer_key().short(), service = %p.service, "gRPC: stream for another service refused");
            send.reset(RESET_NO_SERVICE);
            return None;
        }
        Ok(Err(e)) => {
            debug!(peer = %session.peer_key().short(), "gRPC: bad stream preamble: {e}");
            send.reset(RESET_NO_SERVICE);
            return None;
        }
        Err(_) => {
            send.reset(RESET_NO_SERVICE);
            return None;
        }
    };
    let stream = Stream::reunite(recv, send).ok()?;
    let bridged_from = (!pre.source.ip().is_unspecified()).then_some(pre.source);
    let info = PoolConnectInfo {
        peer: session.peer_key(),
        session_id: session.id(),
        service: pre.service,
        bridged_from,
        session,
    };
    Some(PoolConn {
        stream,
        info: Some(info),
    })
}

impl tokio_stream::Stream for PoolIncoming {
    type Item = io::Result<PoolConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

/// Serves the same router on TCP and on POOL at once (either may be
/// `None`); returns when both servers have stopped, with the first error.
/// TCP connections get `TCP_NODELAY`, as tonic's own listener sets it.
pub async fn serve(
    router: Router,
    tcp: Option<TcpListener>,
    pool: Option<Endpoint>,
) -> Result<(), tonic::transport::Error> {
    let on_tcp = async {
        let Some(l) = tcp else { return Ok(()) };
        let incoming = TcpListenerStream::new(l).map(|s| {
            let s = s?;
            s.set_nodelay(true)?;
            Ok::<_, io::Error>(s)
        });
        router.clone().serve_with_incoming(incoming).await
    };
    let on_pool = async {
        let Some(ep) = pool else { return Ok(()) };
        router
            .clone()
            .serve_with_incoming(PoolIncoming::new(ep))
            .await
    };
    let (a, b) = tokio::join!(on_tcp, on_pool);
    a.and(b)
}
