//! Raft RPCs over POOL: one long-lived session to each peer, one new
//! stream per RPC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use openraft::{BasicNode, RaftNetworkFactory};
use pool_net::{Endpoint, PublicKey, Session};
use tokio::io::AsyncWriteExt;

use crate::client::{CallError, Link, RaftClient};
use crate::stats::RpcStats;
use crate::wire::{read_frame, write_frame, RpcRequest, RpcResponse};
use crate::{NodeId, TypeConfig};

/// The way to one peer: its address and key, and the session to it once
/// dialled.
pub struct PoolLink {
    ep: Endpoint,
    addr: String,
    key: PublicKey,
    session: Mutex<Option<Session>>,
    /// Held while dialling, so that concurrent RPCs make one session.
    dialling: tokio::sync::Mutex<()>,
}

impl PoolLink {
    fn current(&self) -> Option<Session> {
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn session(&self) -> Result<Session, std::io::Error> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _one = self.dialling.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let s = self
            .ep
            .connect(&self.addr, self.key)
            .await
            .map_err(std::io::Error::other)?;
        tracing::debug!(to = %self.addr, session = %s.id(), "raft session up");
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        Ok(s)
    }
}

impl Link for PoolLink {
    async fn call(&self, req: RpcRequest) -> Result<RpcResponse, CallError> {
        let session = self.session().await.map_err(CallError::Unreachable)?;
        let net = CallError::Network;
        let mut stream = session
            .open_stream()
            .await
            .map_err(|e| net(std::io::Error::other(e)))?;
        write_frame(&mut stream, &req).await.map_err(net)?;
        // FIN with the request: the server needs nothing more from us.
        stream.shutdown().await.map_err(net)?;
        read_frame(&mut stream).await.map_err(net)?.ok_or_else(|| {
            net(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer finished the stream without an answer",
            ))
        })
    }
}

/// A node's POOL network: openraft's `RaftNetworkFactory`, and the handle
/// the benchmark cuts carriers with. Cloning shares the sessions.
#[derive(Clone)]
pub struct PoolNetwork {
    links: Arc<BTreeMap<NodeId, Arc<PoolLink>>>,
    stats: Arc<RpcStats>,
}

impl PoolNetwork {
    /// Dials from `ep` to `peers` (id to address and key), recording each
    /// RPC in `stats`. Sessions are made at the first RPC to each peer.
    pub fn new(
        ep: Endpoint,
        peers: BTreeMap<NodeId, (String, PublicKey)>,
        stats: Arc<RpcStats>,
    ) -> Self {
        let links = peers
            .into_iter()
            .map(|(id, (addr, key))| {
                let link = PoolLink {
                    ep: ep.clone(),
                    addr,
                    key,
                    session: Mutex::new(None),
                    dialling: tokio::sync::Mutex::new(()),
                };
                (id, Arc::new(link))
            })
            .collect();
        PoolNetwork {
            links: Arc::new(links),
            stats,
        }
    }

    /// Cuts the carrier of every session this node dialled; each resumes
    /// by itself. How many were cut.
    pub fn cut(&self) -> usize {
        let mut n = 0;
        for link in self.links.values() {
            if let Some(s) = link.current() {
                s.drop_carrier();
                n += 1;
            }
        }
        n
    }

    /// Dials a session to every peer now (a node keeps one to each, so a
    /// new leader needs no handshake before its first RPC).
    pub async fn connect_all(&self) -> Result<(), std::io::Error> {
        for link in self.links.values() {
            link.session().await?;
        }
        Ok(())
    }

    /// Resumes of the sessions this node dialled, added up.
    pub fn resumes(&self) -> u64 {
        self.links
            .values()
            .filter_map(|l| l.current())
            .map(|s| s.stats().core.resumes)
            .sum()
    }
}

impl RaftNetworkFactory<TypeConfig> for PoolNetwork {
    type Network = RaftClient<PoolLink>;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        RaftClient::new(target, self.links.get(&target).cloned(), self.stats.clone())
    }
}
