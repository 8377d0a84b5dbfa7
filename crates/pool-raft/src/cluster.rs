//! Three nodes in one process: start them, find the leader, write through
//! it, cut carriers, and check that the state machines agree.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState};
use pool_net::{Endpoint, EndpointConfig, SecretKey, Trust};

use crate::network_pool::PoolNetwork;
use crate::network_tcp::TcpNetwork;
use crate::stats::RpcStats;
use crate::store::{LogStore, SmView, StateMachine};
use crate::{NodeId, Request, Response, TypeConfig};

/// Nodes in the cluster.
pub const NODES: u64 = 3;

/// What carries the Raft RPCs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// POOL sessions, a stream per RPC.
    Pool,
    /// Plain TCP, a pool of persistent connections per peer.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Pool => "pool",
            Transport::Tcp => "tcp",
        })
    }
}

/// How the cluster is set up.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The transport.
    pub transport: Transport,
    /// Raft heartbeat interval, ms (openraft's default: 50).
    pub heartbeat_ms: u64,
    /// Election timeout range, ms (openraft's default: 150..300).
    pub election_ms: (u64, u64),
    /// How many of the nodes the cluster is initialised with as voters;
    /// the others wait until [`Cluster::add_learners`] (default: all).
    pub voters: u64,
    /// A snapshot every this many entries, and this many entries kept
    /// behind it (default: openraft's, 5,000 and 1,000).
    pub snapshots: Option<(u64, u64)>,
}

impl ClusterConfig {
    /// openraft's default timers over `transport`.
    pub fn new(transport: Transport) -> Self {
        ClusterConfig {
            transport,
            heartbeat_ms: 50,
            election_ms: (150, 300),
            voters: NODES,
            snapshots: None,
        }
    }

    /// Initialises the cluster with only the first `n` nodes as voters.
    pub fn voters(mut self, n: u64) -> Self {
        self.voters = n.clamp(1, NODES);
        self
    }

    /// A snapshot every `every` entries, keeping `keep` entries behind it.
    pub fn snapshots(mut self, every: u64, keep: u64) -> Self {
        self.snapshots = Some((every, keep));
        self
    }

    /// Sets the heartbeat interval (ms).
    pub fn heartbeat_ms(mut self, ms: u64) -> Self {
        self.heartbeat_ms = ms;
        self
    }
}

/// What went wrong with a cluster.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A POOL endpoint could not be set up.
    Pool(pool_net::Error),
    /// A socket could not be set up.
    Io(std::io::Error),
    /// openraft refused its configuration or failed.
    Raft(String),
    /// No leader was elected in time.
    NoLeader {
        /// How long we waited.
        waited: Duration,
    },
    /// A write did not commit in time.
    WriteTimeout {
        /// How long we tried.
        waited: Duration,
        /// The last error, if any.
        last: String,
    },
    /// The three state machines differ at the end: a correctness failure.
    Diverged(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Pool(e) => write!(f, "POOL endpoint: {e}"),
            Error::Io(e) => write!(f, "socket: {e}"),
            Error::Raft(e) => write!(f, "openraft: {e}"),
            Error::NoLeader { waited } => write!(f, "no leader elected within {waited:?}"),
            Error::WriteTimeout { waited, last } => {
                write!(
                    f,
                    "a write did not commit within {waited:?} (last error: {last})"
                )
            }
            Error::Diverged(d) => write!(f, "the state machines differ: {d}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<pool_net::Error> for Error {
    fn from(e: pool_net::Error) -> Self {
        Error::Pool(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

enum Net {
    Pool(PoolNetwork),
    Tcp(TcpNetwork),
}

/// One node: its Raft, its state machine, and its network's handle.
pub struct Node {
    /// The node's id.
    pub id: NodeId,
    /// The node's Raft.
    pub raft: Raft<TypeConfig>,
    /// Its state machine (shared with Raft).
    pub sm: StateMachine,
    net: Net,
    server: tokio::task::JoinHandle<()>,
}

/// Leader and term as one node sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// The leader it knows, if any.
    pub leader: Option<NodeId>,
    /// Its current term.
    pub term: u64,
}

/// Three nodes on loopback.
pub struct Cluster {
    /// The nodes, by id.
    pub nodes: Vec<Node>,
    /// Every RPC any node sent, timed.
    pub stats: Arc<RpcStats>,
    /// The configuration it was started with.
    pub config: ClusterConfig,
    members: BTreeMap<NodeId, BasicNode>,
}

fn raft_config(c: &ClusterConfig) -> Result<Arc<Config>, Error> {
    let mut cfg = Config {
        cluster_name: "pool-raft".into(),
        heartbeat_interval: c.heartbeat_ms,
        election_timeout_min: c.election_ms.0,
        election_timeout_max: c.election_ms.1,
        ..Default::default()
    };
    if let Some((every, keep)) = c.snapshots {
        cfg.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(every);
        cfg.max_in_snapshot_log_to_keep = keep;
    }
    Ok(Arc::new(
        cfg.validate().map_err(|e| Error::Raft(e.to_string()))?,
    ))
}

impl Cluster {
    /// Starts three nodes and initialises the cluster on node 0. Returns
    /// once the nodes run; [`Cluster::wait_leader`] waits for a leader.
    pub async fn start(config: ClusterConfig) -> Result<Cluster, Error> {
        let raft_cfg = raft_config(&config)?;
        let stats = Arc::new(RpcStats::default());
        let ids: Vec<NodeId> = (0..NODES).collect();
        let mut members = BTreeMap::new();
        let mut nodes = Vec::new();
        match config.transport {
            Transport::Pool => {
                let keys: Vec<SecretKey> = ids
                    .iter()
                    .map(|&i| SecretKey::from_bytes([i as u8 + 1; 32]))
                    .collect();
                let mut eps = Vec::new();
                for &i in &ids {
                    let mut trust = Trust::new();
                    for &j in ids.iter().filter(|&&j| j != i) {
                        trust = trust.allow(keys[j as usize].public_key());
                    }
                    let cfg = EndpointConfig::new(keys[i as usize].clone()).trust(trust);
                    let ep = Endpoint::bind("127.0.0.1:0", cfg).await?;
                    let addr = ep.local_addr().ok_or_else(|| {
                        Error::Io(std::io::Error::other("endpoint has no address"))
                    })?;
                    members.insert(i, BasicNode::new(addr));
                    eps.push(ep);
                }
                for &i in &ids {
                    let peers = ids
                        .iter()
                        .filter(|&&j| j != i)
                        .map(|&j| {
                            let addr = members[&j].addr.clone();
                            (j, (addr, keys[j as usize].public_key()))
                        })
                        .collect();
                    let ep = eps[i as usize].clone();
                    let net = PoolNetwork::new(ep.clone(), peers, stats.clone());
                    let (raft, sm) = new_raft(i, &raft_cfg, net.clone()).await?;
                    let server = tokio::spawn(crate::server::serve_pool(ep, raft.clone()));
                    nodes.push(Node {
                        id: i,
                        raft,
                        sm,
                        net: Net::Pool(net),
                        server,
                    });
                }
            }
            Transport::Tcp => {
                let mut listeners = Vec::new();
                for &i in &ids {
                    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    members.insert(i, BasicNode::new(l.local_addr()?));
                    listeners.push(l);
                }
                for (&i, listener) in ids.iter().zip(listeners) {
                    let mut peers = BTreeMap::new();
                    for &j in ids.iter().filter(|&&j| j != i) {
                        let addr = members[&j]
                            .addr
                            .parse()
                            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
                        peers.insert(j, addr);
                    }
                    let net = TcpNetwork::new(peers, stats.clone());
                    let (raft, sm) = new_raft(i, &raft_cfg, net.clone()).await?;
                    let server = tokio::spawn(crate::server::serve_tcp(listener, raft.clone()));
                    nodes.push(Node {
                        id: i,
                        raft,
                        sm,
                        net: Net::Tcp(net),
                        server,
                    });
                }
            }
        }
        for n in &nodes {
            match &n.net {
                Net::Pool(p) => p.connect_all().await?,
                Net::Tcp(t) => t.connect_all().await?,
            }
        }
        let voters: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .filter(|(&id, _)| id < config.voters)
            .map(|(&id, n)| (id, n.clone()))
            .collect();
        nodes[0]
            .raft
            .initialize(voters)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        Ok(Cluster {
            nodes,
            stats,
            config,
            members,
        })
    }

    /// Each node's view of leader and term, now.
    pub fn views(&self) -> Vec<View> {
        self.nodes
            .iter()
            .map(|n| {
                let m = n.raft.metrics();
                let m = m.borrow();
                View {
                    leader: m.current_leader,
                    term: m.current_term,
                }
            })
            .collect()
    }

    /// The node that is leader now, by its own account.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes.iter().find_map(|n| {
            let m = n.raft.metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader).then_some(n.id)
        })
    }

    /// Waits until a node is leader and all voters agree on it.
    pub async fn wait_leader(&self, within: Duration) -> Result<NodeId, Error> {
        let start = Instant::now();
        let voters = self.config.voters as usize;
        loop {
            if let Some(l) = self.leader() {
                if self.views()[..voters].iter().all(|v| v.leader == Some(l)) {
                    return Ok(l);
                }
            }
            if start.elapsed() > within {
                return Err(Error::NoLeader {
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes `req` through the current leader: asks the node the metrics
    /// name, follows `ForwardToLeader`, and tries again on other errors
    /// until `within` has passed.
    pub async fn write(&self, req: Request, within: Duration) -> Result<Response, Error> {
        let start = Instant::now();
        let mut target = self.leader();
        let mut last = String::from("no leader");
        loop {
            if let Some(t) = target {
                match self.nodes[t as usize].raft.client_write(req.clone()).await {
                    Ok(r) => return Ok(r.data),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                        last = format!("node {t} is not the leader");
                        if f.leader_id.is_some() && f.leader_id != Some(t) {
                            target = f.leader_id;
                            continue;
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if start.elapsed() > within {
                return Err(Error::WriteTimeout {
                    waited: start.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            target = self.leader();
        }
    }

    /// Adds the nodes that were not voters at the start as learners, and
    /// waits until each has caught up with the leader's log (by
    /// replication, or by a snapshot when the entries it needs are
    /// purged).
    pub async fn add_learners(&self) -> Result<(), Error> {
        for (&id, node) in self
            .members
            .iter()
            .filter(|(&id, _)| id >= self.config.voters)
        {
            let leader = self.wait_leader(Duration::from_secs(10)).await?;
            self.nodes[leader as usize]
                .raft
                .add_learner(id, node.clone(), true)
                .await
                .map_err(|e| Error::Raft(e.to_string()))?;
        }
        Ok(())
    }

    /// Cuts every carrier (POOL) or connection (TCP) of every node. How
    /// many were cut.
    pub fn cut(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| match &n.net {
                Net::Pool(p) => p.cut(),
                Net::Tcp(t) => t.cut(),
            })
            .sum()
    }

    /// POOL: session resumes so far, all nodes. TCP: connections dialled.
    pub fn reconnects(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| match &n.net {
                Net::Pool(p) => p.resumes(),
                Net::Tcp(t) => t.dials(),
            })
            .sum()
    }

    /// Waits until every node has applied what the leader has, then
    /// compares the three state machines; `Err(Diverged)` if they differ.
    pub async fn check_identical(&self, within: Duration) -> Result<SmView, Error> {
        let start = Instant::now();
        loop {
            let applied: Vec<_> = self.nodes.iter().map(|n| n.sm.last_applied()).collect();
            let leader_applied = self.leader().map(|l| applied[l as usize]);
            let caught_up = applied.iter().all(|a| Some(*a) == leader_applied);
            if caught_up || start.elapsed() > within {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let views: Vec<SmView> = self.nodes.iter().map(|n| n.sm.view()).collect();
        let first = &views[0];
        for (i, v) in views.iter().enumerate().skip(1) {
            if v.last_applied != first.last_applied {
                return Err(Error::Diverged(format!(
                    "node 0 applied up to {:?}, node {i} up to {:?}",
                    first.last_applied, v.last_applied
                )));
            }
            if v.kv != first.kv {
                let differ = first
                    .kv
                    .iter()
                    .filter(|(k, val)| v.kv.get(*k) != Some(*val))
                    .count()
                    + v.kv.keys().filter(|k| !first.kv.contains_key(*k)).count();
                return Err(Error::Diverged(format!(
                    "node 0 and node {i} differ in {differ} keys ({} and {} keys)",
                    first.kv.len(),
                    v.kv.len()
                )));
            }
        }
        Ok(first.clone())
    }

    /// All state machines' views (for the snapshot counters).
    pub fn sm_views(&self) -> Vec<SmView> {
        self.nodes.iter().map(|n| n.sm.view()).collect()
    }

    /// Stops the nodes and their servers.
    pub async fn shutdown(&self) {
        for n in &self.nodes {
            let _ = n.raft.shutdown().await;
            n.server.abort();
        }
    }
}

async fn new_raft<N>(
    id: NodeId,
    cfg: &Arc<Config>,
    net: N,
) -> Result<(Raft<TypeConfig>, StateMachine), Error>
where
    N: openraft::RaftNetworkFactory<TypeConfig>,
{
    let sm = StateMachine::new();
    let raft = Raft::new(id, cfg.clone(), net, LogStore::new(), sm.clone())
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
    Ok((raft, sm))
}
