//! The tests' echo service, and servers and clients for it on both
//! transports.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pool_grpc::{AllowKeys, PoolConnector};
use pool_net::{Endpoint, EndpointConfig, PublicKey, SecretKey, Trust};
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("pool.echo.v1");
}
pub use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
pub use pb::{CountRequest, Message, Total};

pub fn key(n: u8) -> SecretKey {
    SecretKey::from_bytes([n; 32])
}

/// What the service saw, for the tests to check.
#[derive(Default)]
pub struct Seen {
    /// RPCs that reached a handler.
    pub calls: AtomicU64,
    /// Server-streaming RPCs whose client went away before the end.
    pub cancelled: AtomicU64,
    pub cancelled_note: Notify,
    /// The POOL key of the last caller (`None` over TCP).
    pub last_peer: std::sync::Mutex<Option<PublicKey>>,
}

#[derive(Clone)]
pub struct EchoService(pub Arc<Seen>);

type Msgs = Pin<Box<dyn Stream<Item = Result<Message, Status>> + Send>>;

impl EchoService {
    fn saw<T>(&self, r: &Request<T>) {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        *self.0.last_peer.lock().unwrap() = pool_grpc::peer_key(r);
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, r: Request<Message>) -> Result<Response<Message>, Status> {
        self.saw(&r);
        let m = r.into_inner();
        if m.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(m.delay_ms)).await;
        }
        Ok(Response::new(m))
    }

    async fn sum(&self, r: Request<Streaming<Message>>) -> Result<Response<Total>, Status> {
        self.saw(&r);
        let mut s = r.into_inner();
        let mut t = Total::default();
        while let Some(m) = s.message().await? {
            t.count += 1;
            t.sum += m.seq;
        }
        Ok(Response::new(t))
    }

    type CountStream = Msgs;

    async fn count(&self, r: Request<CountRequest>) -> Result<Response<Msgs>, Status> {
        self.saw(&r);
        let c = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let seen = self.0.clone();
        tokio::spawn(async move {
            for seq in 0..c.count {
                let m = Message {
                    seq,
                    pad: vec![b'x'; c.pad as usize],
                    ..Default::default()
                };
                if tx.send(Ok(m)).await.is_err() {
                    seen.cancelled.fetch_add(1, Ordering::SeqCst);
                    seen.cancelled_note.notify_waiters();
                    return;
                }
                if c.every_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(c.every_ms)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ChatStream = Msgs;

    async fn chat(&self, r: Request<Streaming<Message>>) -> Result<Response<Msgs>, Status> {
        self.saw(&r);
        let s = r.into_inner();
        Ok(Response::new(Box::pin(s.map(|m| m))))
    }
}

/// An echo server on TCP and POOL at once (loopback, ephemeral ports).
pub struct Server {
    pub tcp: std::net::SocketAddr,
    pub pool: String,
    pub key: PublicKey,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a server trusting `clients`; with `only`, the echo service is
/// wrapped in an interceptor letting only those keys through.
pub async fn server(clients: &[PublicKey], only: Option<&[PublicKey]>) -> Server {
    let seen = Arc::new(Seen::default());
    let svc = EchoService(seen.clone());
    let mut trust = Trust::new();
    for k in clients {
        trust = trust.allow(*k);
    }
    let ep = Endpoint::bind("127.0.0.1:0", EndpointConfig::new(key(1)).trust(trust))
        .await
        .unwrap();
    let pool = ep.local_addr().unwrap().to_string();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let mut builder = tonic::transport::Server::builder();
    let router = match only {
        Some(keys) => builder.add_service(EchoServer::with_interceptor(
            svc,
            AllowKeys::new(keys.iter().copied()),
        )),
        None => builder.add_service(EchoServer::new(svc)),
    };
    let task = tokio::spawn(async move {
        let _ = pool_grpc::serve(router, Some(tcp), Some(ep)).await;
    });
    Server {
        tcp: tcp_addr,
        pool,
        key: key(1).public_key(),
        seen,
        task,
    }
}

pub fn connector(s: &Server, me: u8) -> PoolConnector {
    PoolConnector::new(
        Endpoint::client(EndpointConfig::new(key(me))),
        &s.pool,
        s.key,
    )
}

pub async fn pool_channel(s: &Server, me: u8) -> Channel {
    connector(s, me).channel().await.unwrap()
}

pub async fn tcp_channel(s: &Server) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", s.tcp))
        .unwrap()
        .connect()
        .await
        .unwrap()
}
