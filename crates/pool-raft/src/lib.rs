//! # pool-raft: openraft over POOL, measured against plain TCP
//!
//! Three [openraft](https://docs.rs/openraft/0.9) nodes in one process, on
//! loopback, whose Raft RPCs go over POOL sessions; and the same cluster
//! with the same framing over plain TCP, for comparison. The benchmark
//! ([`bench::run`]) writes to the cluster at a steady rate while it cuts
//! every carrier every few seconds, and measures what a Raft deployment
//! cares about: how long each RPC takes, whether the leader stays put, and
//! whether every write lands on all three nodes.
//!
//! ## Why straight on POOL streams, and not tonic
//!
//! Each RPC (AppendEntries, RequestVote, InstallSnapshot) opens a new
//! stream on the long-lived session to its peer, writes one length-prefixed
//! JSON request, finishes the stream, and reads one length-prefixed JSON
//! answer ([`wire`]'s framing). That is all:
//!
//! - a new stream costs no round trip (its first frame is its opening), so
//!   an RPC is one round trip, as on a warm HTTP/2 connection, with no
//!   connection set-up ever on the RPC path: POOL keeps the session across
//!   carrier loss, which is the point being measured;
//! - streams are independent, so a large append does not hold a vote or a
//!   heartbeat behind it within the stream layer;
//! - gRPC would add HTTP/2 framing, its own flow control and HPACK on top
//!   of POOL's streams, which already are multiplexed, flow-controlled and
//!   encrypted, and protobuf code generation for messages openraft already
//!   serialises with serde. And tonic wants to own its connections (a
//!   `Channel` over a connector): a POOL session would have to pose as an
//!   HTTP/2 byte pipe, one stream per connection, losing the per-RPC
//!   streams above.
//!
//! ## The cut
//!
//! POOL: [`pool_net::Session::drop_carrier`] on every session each node
//! dialled (both directions), and the session resumes on a new TCP carrier
//! by itself, with no byte lost: RPCs in flight are delayed, not failed.
//! TCP: every pooled connection, idle or in use, is shut down; RPCs in
//! flight fail and openraft sends again on newly dialled connections.
//! Both cuts are clean (the peer sees FIN or RST at once); a path that
//! goes silent, which only a keepalive can detect, is not measured here.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod bench;
pub mod client;
pub mod cluster;
pub mod network_pool;
pub mod network_tcp;
pub mod server;
pub mod stats;
pub mod store;
pub mod wire;

pub use client::RaftClient;
pub use cluster::{Cluster, ClusterConfig, Error, Transport};

/// A node's id in the cluster (0, 1, 2).
pub type NodeId = u64;

/// A client request: the KV's only operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Sets `key` to `value`.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
}

/// What applying an entry returns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The value set, for a [`Request::Set`]; `None` for Raft's own
    /// entries (blank, membership).
    pub value: Option<String>,
}

openraft::declare_raft_types!(
    /// The cluster's openraft types: the KV's request and response, node
    /// ids `u64`, snapshots in memory.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
