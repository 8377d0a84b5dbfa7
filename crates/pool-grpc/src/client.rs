//! The client side: a connector for tonic's `Channel`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use pool_net::{Endpoint, Preamble, PublicKey, Session};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Uri};

use crate::server::PoolConn;

/// Opens POOL streams for tonic: give it to
/// `tonic::transport::Endpoint::connect_with_connector` (or use
/// [`PoolConnector::channel`]). Each HTTP/2 connection tonic makes is one
/// stream of a session to `peer`; the session is dialled once and shared by
/// every connection, and dialled again when it has closed. The URI tonic
/// passes is ignored: the peer is the one given here.
///
/// Streams start with a [`Preamble`] naming a service: the default (`""`)
/// unless [`PoolConnector::service`] says otherwise, so the same connector
/// reaches a `pool-grpc` server (which answers `""` and
/// [`DEFAULT_SERVICE`](crate::DEFAULT_SERVICE)) or a POOL node's
/// `[[pool2tcp]]` service in front of any gRPC server.
#[derive(Clone)]
pub struct PoolConnector {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    addr: String,
    peer: PublicKey,
    service: String,
    session: Mutex<Option<Session>>,
}

impl PoolConnector {
    /// Connections to the node with key `peer` at `addr` (`host:port`; a
    /// comma-separated list is tried in order, as [`Endpoint::connect`]
    /// does).
    pub fn new(endpoint: Endpoint, addr: &str, peer: PublicKey) -> PoolConnector {
        PoolConnector {
            inner: Arc::new(Inner {
                endpoint,
                addr: addr.to_string(),
                peer,
                service: String::new(),
                session: Mutex::new(None),
            }),
        }
    }

    /// The service name to put in each stream's preamble (a node's
    /// `[[pool2tcp]]` name, or a `pool-grpc` server's service).
    pub fn service(self, name: &str) -> PoolConnector {
        let i = &self.inner;
        PoolConnector {
            inner: Arc::new(Inner {
                endpoint: i.endpoint.clone(),
                addr: i.addr.clone(),
                peer: i.peer,
                service: name.to_string(),
                session: Mutex::new(None),
            }),
        }
    }

    /// A `Channel` that connects now (an error if the peer cannot be
    /// reached), with tonic's default endpoint settings.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        endpoint().connect_with_connector(self.clone()).await
    }

    /// A `Channel` that connects on its first request.
    pub fn channel_lazy(&self) -> Channel {
        endpoint().connect_with_connector_lazy(self.clone())
    }

    /// The session streams are opened on, once dialled (for stats, or to
    /// cut its carrier in a test).
    pub async fn session(&self) -> Option<Session> {
        self.inner.session.lock().await.clone()
    }

    async fn open(self) -> Result<TokioIo<PoolConn>, pool_net::Error> {
        let session = {
            let mut slot = self.inner.session.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self
                        .inner
                        .endpoint
                        .connect(&self.inner.addr, self.inner.peer)
                        .await?;
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        let mut stream = session.open_stream().await?;
        stream
            .write_all(&Preamble::for_service(&self.inner.service).encode())
            .await?;
        Ok(TokioIo::new(PoolConn::client(stream)))
    }
}

/// The endpoint settings tonic's `Channel` gets: the URI is a placeholder
/// (the connector knows the peer).
fn endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_static("http://pool.invalid")
}

impl tower_service::Service<Uri> for PoolConnector {
    type Response = TokioIo<PoolConn>;
    type Error = pool_net::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().open())
    }
}
