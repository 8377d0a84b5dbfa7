//! The comparison: the same framing over plain TCP, with a small pool of
//! persistent connections to each peer (`TCP_NODELAY`, one RPC at a time
//! on a connection: take an idle one or dial, put it back after the
//! answer, drop it on any error).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::{BasicNode, RaftNetworkFactory};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::client::{CallError, Link, RaftClient};
use crate::stats::RpcStats;
use crate::wire::{read_frame, write_frame, RpcRequest, RpcResponse};
use crate::{NodeId, TypeConfig};

/// At most this many idle connections are kept per peer.
const MAX_IDLE: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every live connection of a node, idle or in use, so that a cut can shut
/// them all down: a duplicate of each socket, used only for `shutdown`.
#[derive(Default)]
struct Conns {
    next: AtomicU64,
    dials: AtomicU64,
    live: Mutex<HashMap<u64, std::net::TcpStream>>,
}

/// One pooled connection; leaves the registry when dropped.
struct Conn {
    id: u64,
    stream: TcpStream,
    conns: Arc<Conns>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        lock(&self.conns.live).remove(&self.id);
    }
}

/// The way to one peer over TCP.
pub struct TcpLink {
    addr: SocketAddr,
    idle: Mutex<Vec<Conn>>,
    conns: Arc<Conns>,
}

impl TcpLink {
    async fn dial(&self) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let std = stream.into_std()?;
        let dup = std.try_clone()?;
        let stream = TcpStream::from_std(std)?;
        let id = self.conns.next.fetch_add(1, Ordering::Relaxed);
        self.conns.dials.fetch_add(1, Ordering::Relaxed);
        lock(&self.conns.live).insert(id, dup);
        Ok(Conn {
            id,
            stream,
            conns: self.conns.clone(),
        })
    }

    async fn exchange(conn: &mut Conn, req: &RpcRequest) -> std::io::Result<RpcResponse> {
        write_frame(&mut conn.stream, req).await?;
        conn.stream.flush().await?;
        read_frame(&mut conn.stream).await?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection without an answer",
            )
        })
    }
}

impl Link for TcpLink {
    async fn call(&self, req: RpcRequest) -> Result<RpcResponse, CallError> {
        let pooled = lock(&self.idle).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.dial().await.map_err(CallError::Unreachable)?,
        };
        // On error `conn` is dropped here, never put back.
        let resp = Self::exchange(&mut conn, &req)
            .await
            .map_err(CallError::Network)?;
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        Ok(resp)
    }
}

/// A node's TCP network: openraft's `RaftNetworkFactory`, and the handle
/// the benchmark cuts connections with. Cloning shares the pools.
#[derive(Clone)]
pub struct TcpNetwork {
    links: Arc<BTreeMap<NodeId, Arc<TcpLink>>>,
    conns: Arc<Conns>,
    stats: Arc<RpcStats>,
}

impl TcpNetwork {
    /// Connects to `peers` (id to listening address) on demand, recording
    /// each RPC in `stats`.
    pub fn new(peers: BTreeMap<NodeId, SocketAddr>, stats: Arc<RpcStats>) -> Self {
        let conns = Arc::new(Conns::default());
        let links = peers
            .into_iter()
            .map(|(id, addr)| {
                let link = TcpLink {
                    addr,
                    idle: Mutex::new(Vec::new()),
                    conns: conns.clone(),
                };
                (id, Arc::new(link))
            })
            .collect();
        TcpNetwork {
            links: Arc::new(links),
            conns,
            stats,
        }
    }

    /// Shuts down every connection of this node, idle or carrying an RPC
    /// (which then fails, and openraft sends again on a new connection).
    /// How many were shut down.
    pub fn cut(&self) -> usize {
        let n = {
            let live = lock(&self.conns.live);
            for s in live.values() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            live.len()
        };
        for link in self.links.values() {
            lock(&link.idle).clear();
        }
        n
    }

    /// Dials one connection to every peer now and pools it.
    pub async fn connect_all(&self) -> std::io::Result<()> {
        for link in self.links.values() {
            let c = link.dial().await?;
            lock(&link.idle).push(c);
        }
        Ok(())
    }

    /// Connections dialled so far.
    pub fn dials(&self) -> u64 {
        self.conns.dials.load(Ordering::Relaxed)
    }
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = RaftClient<TcpLink>;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        RaftClient::new(target, self.links.get(&target).cloned(), self.stats.clone())
    }
}
