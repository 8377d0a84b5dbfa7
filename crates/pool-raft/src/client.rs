//! The client side of the Raft RPCs, for either transport: timing, and
//! turning transport failures and remote errors into openraft's
//! `RPCError`.
//!
//! How failures map, and why:
//! - no way to reach the peer at all (no session could be made, a TCP
//!   dial was refused) is [`Unreachable`]: openraft backs off before it
//!   tries that peer again;
//! - a call that failed under way (the carrier cut under it, the peer
//!   closed the stream without an answer, a garbled answer) is a
//!   [`NetworkError`]: openraft tries again at the next heartbeat or
//!   replication event, without backing off. Backing off here would stop
//!   heartbeats for longer than the election timeout and cause the very
//!   election that the benchmark is counting;
//! - an answer that is an error of the remote `Raft` is a
//!   [`RemoteError`].

use std::future::Future;
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork};

use crate::stats::{RpcKind, RpcStats};
use crate::wire::{RpcRequest, RpcResponse};
use crate::{NodeId, TypeConfig};

/// Why a call got no answer (see the module docs for what openraft does
/// with each).
#[derive(Debug)]
pub enum CallError {
    /// The peer cannot be reached at all.
    Unreachable(std::io::Error),
    /// The call failed under way.
    Network(std::io::Error),
}

/// One way to a peer: sends a request and waits for its answer. The two
/// transports implement it.
pub trait Link: Send + Sync + 'static {
    /// One RPC.
    fn call(&self, req: RpcRequest) -> impl Future<Output = Result<RpcResponse, CallError>> + Send;
}

/// The `RaftNetwork` openraft gets for one target.
pub struct RaftClient<L> {
    target: NodeId,
    link: Option<Arc<L>>,
    stats: Arc<RpcStats>,
}

impl<L: Link> RaftClient<L> {
    pub(crate) fn new(target: NodeId, link: Option<Arc<L>>, stats: Arc<RpcStats>) -> Self {
        RaftClient {
            target,
            link,
            stats,
        }
    }

    async fn call<E: std::error::Error>(
        &self,
        kind: RpcKind,
        req: RpcRequest,
    ) -> Result<RpcResponse, RPCError<NodeId, BasicNode, E>> {
        let Some(link) = &self.link else {
            let e = std::io::Error::other(format!("node {} is not in the peer list", self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let timer = self.stats.start(kind);
        match link.call(req).await {
            Ok(resp) => {
                timer.done(true);
                Ok(resp)
            }
            Err(e) => {
                timer.done(false);
                tracing::debug!(target = self.target, error = ?e, "rpc failed");
                Err(match e {
                    CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
                    CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
                })
            }
        }
    }

    fn mismatch<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("node {} answered with another RPC's response", self.target),
        );
        RPCError::Network(NetworkError::new(&e))
    }
}

impl<L: Link> RaftNetwork<TypeConfig> for RaftClient<L> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RpcKind::Append, RpcRequest::Append(rpc)).await? {
            RpcResponse::Append(Ok(r)) => Ok(r),
            RpcResponse::Append(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.mismatch()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(RpcKind::Snapshot, RpcRequest::Snapshot(rpc))
            .await?
        {
            RpcResponse::Snapshot(Ok(r)) => Ok(r),
            RpcResponse::Snapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.mismatch()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RpcKind::Vote, RpcRequest::Vote(rpc)).await? {
            RpcResponse::Vote(Ok(r)) => Ok(r),
            RpcResponse::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.mismatch()),
        }
    }
}
