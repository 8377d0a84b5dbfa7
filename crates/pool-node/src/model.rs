//! The shapes shared by the control socket, the metrics and the journal.

use serde::{Deserialize, Serialize};

/// One session, as `pool ctl sessions` and `/metrics` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SessionRow {
    /// Short session id (hex).
    pub id: String,
    /// Peer public key (token).
    pub peer: String,
    /// Remote address of the current carrier, if any.
    pub address: Option<String>,
    /// Carrier kind: "tcp", "relay", or "none" while resuming.
    pub carrier: String,
    /// Path: "direct", "relay", or "none" while resuming.
    #[serde(default)]
    pub path: String,
    /// Moves between paths (relay to direct, back, new addresses).
    #[serde(default)]
    pub path_changes: u64,
    /// Seconds since the last path change, if any.
    #[serde(default)]
    pub last_path_change_secs: Option<f64>,
    /// "initiator" or "responder".
    pub role: String,
    /// Seconds since the session started.
    pub age_secs: f64,
    /// Streams open now.
    pub streams: u64,
    /// Streams opened in total.
    pub streams_total: u64,
    /// Carrier bytes sent / received.
    pub bytes_sent: u64,
    /// Carrier bytes received.
    pub bytes_received: u64,
    /// Smoothed RTT in milliseconds (from session pings), if measured.
    pub rtt_ms: Option<f64>,
    /// Jitter in milliseconds (RFC 3550 estimator over RTT samples).
    pub jitter_ms: f64,
    /// TCP retransmissions on the current carrier (from TCP_INFO), if known.
    pub tcp_retransmits: Option<u64>,
    /// Frames resent after resumes.
    pub frames_resent: u64,
    /// Carrier changes (resumes).
    pub resumes: u64,
    /// Key epoch.
    pub epoch: u32,
    /// Data cipher.
    pub cipher: String,
    /// (Client) the server this session left at its last handoff.
    #[serde(default)]
    pub moved_from: Option<String>,
    /// (Client) handoffs this session followed.
    #[serde(default)]
    pub handoffs: u64,
    /// (Server) a handoff of this session is under way.
    #[serde(default)]
    pub handing_off: bool,
    /// Streams of this session that carried shimmed connections
    /// (`LD_PRELOAD=libpool_shim.so`), in total.
    #[serde(default)]
    pub shim_streams: u64,
}

/// Node-wide counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeCounters {
    /// Sessions accepted by the listener.
    pub sessions_accepted: u64,
    /// Sessions dialled.
    pub sessions_dialled: u64,
    /// Handshakes refused (any reason).
    pub handshakes_refused: u64,
    /// Resumes accepted by the listener.
    pub resumes_accepted: u64,
    /// Bridge TCP connections accepted (tcp2pool) / made (pool2tcp).
    pub bridge_connections: u64,
    /// Bridge connections refused (cap reached, target down, timeouts).
    pub bridge_errors: u64,
    /// Journal entries written / dropped (full disk, I/O error).
    pub journal_written: u64,
    /// Journal entries that could not be written.
    pub journal_failed: u64,
    /// Times the journal was sealed and a new file started.
    #[serde(default)]
    pub journal_rotations: u64,
    /// A `pool config apply --confirm-within` awaits `pool config confirm`.
    #[serde(default)]
    pub config_pending: bool,
    /// Connections from programs under the shim (source node).
    #[serde(default)]
    pub shim_connections: u64,
    /// Of those, carried to the destination.
    #[serde(default)]
    pub shim_streams: u64,
    /// Of those, failed (no route, peer down, refused by the destination).
    #[serde(default)]
    pub shim_failed: u64,
    /// Shim streams from peers connected to an exposed port (destination node).
    #[serde(default)]
    pub shim_exposed: u64,
    /// Shim streams from peers refused (port not exposed, target down).
    #[serde(default)]
    pub shim_refused: u64,
    /// Handoffs this node started as the source.
    #[serde(default)]
    pub handoffs_started: u64,
    /// Of those, committed at the target.
    #[serde(default)]
    pub handoffs_committed: u64,
    /// Handoffs that failed before the commit, by reason (as the source,
    /// and as the target for its own refusals).
    #[serde(default)]
    pub handoffs_aborted: std::collections::BTreeMap<String, u64>,
    /// Sessions handed to this node that committed here.
    #[serde(default)]
    pub handoffs_imported: u64,
}
