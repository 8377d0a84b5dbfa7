//! The framing both transports share, and the server side of an RPC.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON. An
//! RPC is one request frame ([`RpcRequest`]) answered by one response frame
//! ([`RpcResponse`]). On POOL each RPC has a stream of its own, finished
//! after its frame; on TCP the frames follow one another on a connection,
//! one RPC at a time. This framing is private to these nodes: it is not
//! the POOL node's stream preamble, and a POOL node's bridge would not
//! understand it.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Raft;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{NodeId, TypeConfig};

/// The largest frame accepted (a snapshot chunk is at most
/// `snapshot_max_chunk_size`, 3 MiB by default, before JSON).
pub const MAX_FRAME: usize = 64 << 20;

/// A Raft RPC, as sent.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RpcRequest {
    /// Replicate entries, or a heartbeat (no entries).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// A chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The answer to an [`RpcRequest`]: what the receiver's `Raft` returned.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RpcResponse {
    /// Answer to [`RpcRequest::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RpcRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RpcRequest::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

/// Writes `msg` as one frame (not flushed: TCP callers flush, POOL
/// callers finish the stream).
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other(format!("frame of {} bytes", body.len())))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await
}

/// Reads one frame; `Ok(None)` on a clean end of stream before it.
pub async fn read_frame<R, T>(r: &mut R) -> std::io::Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The server side of one RPC: hands it to the local `Raft`.
pub async fn serve(raft: &Raft<TypeConfig>, req: RpcRequest) -> RpcResponse {
    match req {
        RpcRequest::Append(r) => RpcResponse::Append(raft.append_entries(r).await),
        RpcRequest::Vote(r) => RpcResponse::Vote(raft.vote(r).await),
        RpcRequest::Snapshot(r) => RpcResponse::Snapshot(raft.install_snapshot(r).await),
    }
}
