//! The daemon's TOML configuration. See `docs/pool.example.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pool_net::PublicKey;
use serde::Deserialize;

use crate::bridge::Limits;
use crate::types::{de_key, de_keys, de_opt_key, Cidr};

/// A configuration problem, said so a person can fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown/missing keys.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, with the line.
        message: String,
    },
    /// Values are wrong or conflict: every problem found, each with its
    /// line.
    #[error("config {path}: {}", list(problems))]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, where, and how to fix it.
        problems: Vec<Problem>,
    },
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The line it is on (1-based), when it can be told.
    pub line: Option<usize>,
    /// What and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn list(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => many.iter().map(|p| format!("\n  {p}")).collect::<String>(),
    }
}

impl ConfigError {
    /// The problems of an [`ConfigError::Invalid`] error (empty otherwise).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node itself.
    #[serde(default)]
    pub node: NodeSection,
    /// Whom to trust.
    #[serde(default)]
    pub trust: TrustSection,
    /// TCP listeners whose connections go to a POOL peer.
    #[serde(default)]
    pub tcp2pool: Vec<Tcp2PoolSection>,
    /// Where streams arriving over POOL go.
    #[serde(default)]
    pub pool2tcp: Vec<Pool2TcpSection>,
    /// The listener for programs run under `libpool_shim.so`.
    #[serde(default)]
    pub shim: Option<ShimSection>,
    /// Where shimmed connections go, by destination address.
    #[serde(default)]
    pub route: Vec<RouteSection>,
    /// Local ports that shimmed connections from peers may reach.
    #[serde(default)]
    pub expose: Vec<ExposeSection>,
    /// Who may run `pool ctl` and `pool config` over POOL.
    #[serde(default)]
    pub control: ControlSection,
    /// Live handoffs: the workers this node hands sessions to and takes
    /// them from, and which handoffs its own dialled sessions follow.
    #[serde(default)]
    pub handoff: HandoffSection,
    /// The director this worker registers with (docs/director.md).
    #[serde(default)]
    pub director: Option<DirectorSection>,
    /// The file vault this node serves (docs/vault.md).
    #[serde(default)]
    pub vault: Option<VaultSection>,
}

/// `[vault]`: serve `pool vault push/pull/ls` from a directory.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaultSection {
    /// The directory everything is confined to.
    pub root: PathBuf,
    /// `[[vault.grant]]`: who may do what where. No grant, no access.
    #[serde(default)]
    pub grant: Vec<VaultGrantSection>,
}

/// One `[[vault.grant]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaultGrantSection {
    /// A public key, or `"*"` for every key this node trusts.
    #[serde(deserialize_with = "crate::types::de_grant_key")]
    pub key: Option<PublicKey>,
    /// The subtree, relative to the root (`/incoming`).
    pub path: String,
    /// `"read"` or `"write"` (write implies read).
    pub access: VaultAccess,
}

/// What a grant allows.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VaultAccess {
    /// `ls` and `pull`.
    Read,
    /// `push` too.
    Write,
}

/// `[director]`: this node is a worker of the director named here.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectorSection {
    /// The director's POOL address, `HOST:PORT`; several directors sharing
    /// one store (and key): `"A:9260,B:9260"`, tried in turn.
    pub address: String,
    /// The director's public key.
    #[serde(deserialize_with = "de_key")]
    pub key: PublicKey,
    /// Where clients reach this worker, best first. Default: `[node]
    /// listen`, which must then name a specific address (not `[::]`).
    #[serde(default)]
    pub advertise: Vec<String>,
    /// At SIGTERM, how long to wait for the director to empty this worker
    /// before stopping anyway ("30s").
    #[serde(
        default = "default_leave_deadline",
        deserialize_with = "crate::types::de_duration"
    )]
    pub leave_deadline: std::time::Duration,
    /// How many idle sessions one of the director's move orders hands
    /// over at a time (sessions with open streams go first, two at a
    /// time). Lower: a drain takes longer and busy streams stall less on
    /// a loaded machine (docs/director.md#drain).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
}

fn default_parallel() -> usize {
    4
}

fn default_leave_deadline() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl DirectorSection {
    /// The addresses to advertise, given the node's listener.
    ///
    /// # Errors
    ///
    /// None are set and the listener's address is unspecified.
    pub fn addrs(&self, listen: &str) -> Result<Vec<String>, String> {
        if !self.advertise.is_empty() {
            return Ok(self.advertise.clone());
        }
        match listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => Err(format!(
                "[director] advertise is not set and [node] listen = \"{listen}\" names no address clients could dial; set advertise = [\"HOST:PORT\"]"
            )),
            _ if listen.is_empty() => Err("[director] needs [node] listen: a worker takes sessions".into()),
            _ => Ok(vec![listen.to_string()]),
        }
    }
}

/// `[handoff]` (docs/handoff.md).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandoffSection {
    /// The fleet: worker keys this node hands sessions to and accepts them
    /// from (each must also be trusted by `[trust]`). Empty: no handoffs.
    #[serde(default, deserialize_with = "de_keys")]
    pub peers: Vec<PublicKey>,
    /// Which offers this node's dialled sessions follow: "any" (the
    /// default), "none", or "listed" (only to the keys in `allowed`).
    #[serde(default = "default_follow")]
    pub follow: String,
    /// With `follow = "listed"`.
    #[serde(default, deserialize_with = "de_keys")]
    pub allowed: Vec<PublicKey>,
    /// How long a client has to reach the target ("10s").
    #[serde(
        default = "default_token_lifetime",
        deserialize_with = "crate::types::de_duration"
    )]
    pub token_lifetime: std::time::Duration,
    /// How long streams that stay behind are forwarded ("10m").
    #[serde(
        default = "default_forward_deadline",
        deserialize_with = "crate::types::de_duration"
    )]
    pub forward_deadline: std::time::Duration,
}

impl Default for HandoffSection {
    fn default() -> Self {
        HandoffSection {
            peers: Vec::new(),
            follow: default_follow(),
            allowed: Vec::new(),
            token_lifetime: default_token_lifetime(),
            forward_deadline: default_forward_deadline(),
        }
    }
}

fn default_follow() -> String {
    "any".into()
}
fn default_token_lifetime() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_forward_deadline() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

impl HandoffSection {
    /// The client policy this section describes.
    pub fn policy(&self) -> Result<pool_net::HandoffPolicy, String> {
        match self.follow.as_str() {
            "any" => Ok(pool_net::HandoffPolicy::Any),
            "none" => Ok(pool_net::HandoffPolicy::Refuse),
            "listed" => Ok(pool_net::HandoffPolicy::Only(
                self.allowed.iter().copied().collect(),
            )),
            other => Err(format!(
                "[handoff] follow = \"{other}\": use \"any\", \"none\" or \"listed\""
            )),
        }
    }
}

/// `[control]`: the control service over POOL (`pool ctl --node`). Keys
/// listed here must also be trusted by `[trust]` to open a session at all.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Keys that may run every command, `pool config apply` included.
    #[serde(default, deserialize_with = "de_keys")]
    pub admins: Vec<PublicKey>,
    /// Keys that may read (`status`, `sessions`, `config check`) only.
    #[serde(default, deserialize_with = "de_keys")]
    pub readers: Vec<PublicKey>,
}

fn default_shim_socket() -> PathBuf {
    PathBuf::from("/run/pool/shim.sock")
}
fn default_peer_port() -> u16 {
    9253
}
fn yes() -> bool {
    true
}

/// `[shim]`: accept connections from programs run with
/// `LD_PRELOAD=libpool_shim.so` and carry them to the destination's daemon.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShimSection {
    /// Turn the listener off without removing the section.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The Unix socket the shim connects to (`POOL_SHIM_SOCKET`). Its
    /// directory is created (mode 0755) if missing and must be owned by
    /// the daemon's user and writable by no one else.
    #[serde(default = "default_shim_socket")]
    pub socket: PathBuf,
    /// Local users whose programs the daemon carries, by name or uid
    /// (`["alice", 1001]`); root and the daemon's own user always are.
    #[serde(default)]
    pub allow_users: Vec<crate::types::Principal>,
    /// Local groups (name or gid) whose members' programs the daemon
    /// carries: the caller's group, or the caller listed in `/etc/group`.
    #[serde(default)]
    pub allow_groups: Vec<crate::types::Principal>,
    /// Gone: the shim reached the daemon over TCP, `127.0.0.1:9256`.
    /// Refused with a message, so an old config is not silently changed.
    #[serde(default)]
    pub listen: Option<String>,
    /// The POOL port of destination daemons when no `[[route]]` matches.
    #[serde(default = "default_peer_port")]
    pub default_peer_port: u16,
    /// Concurrent shimmed connections.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Seconds to reach the destination (its daemon, then the program).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds without traffic before a connection is reset (0: never).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
}

impl ShimSection {
    /// The connection limits.
    pub fn limits(&self) -> Limits {
        limits(
            self.max_connections,
            self.connect_timeout_secs,
            self.idle_timeout_secs,
        )
    }
}

/// `[[route]]`: shimmed connections to `cidr` go to this POOL peer.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Destination range, `10.0.0.0/8`, `fd00::/8` or one address.
    pub cidr: Cidr,
    /// The POOL daemon that serves it: `HOST:PORT`.
    pub peer: String,
    /// Its public key; without one the key must be pinned (TOFU) or the
    /// peer a fleet member.
    #[serde(default, deserialize_with = "de_opt_key")]
    pub peer_key: Option<PublicKey>,
}

/// `[[expose]]`: a port that shimmed connections from trusted peers may
/// reach on this host. Every other port is refused.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExposeSection {
    /// The destination port programs connect to.
    pub port: u16,
    /// Where to connect instead; default: loopback (of the destination's
    /// address family) at `port`.
    #[serde(default)]
    pub target: Option<String>,
    /// Peer keys that may reach this port; empty: every trusted peer.
    #[serde(default, deserialize_with = "de_keys")]
    pub allow: Vec<PublicKey>,
}

fn default_listen() -> String {
    "[::]:9253".into()
}
fn default_key() -> PathBuf {
    PathBuf::from("/var/lib/pool/node.key")
}
fn default_drain() -> u64 {
    30
}

/// `[node]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Private key file; created (mode 0600) on first start if missing.
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// POOL listener address; empty to not listen.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Control socket for `pool ctl` (owner-only).
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Prometheus endpoint, e.g. `127.0.0.1:9254`; empty disables.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Change journal file; empty disables.
    #[serde(default)]
    pub journal: Option<PathBuf>,
    /// Seal the journal and start a new file (continuing its chain) once
    /// it holds this many bytes; 0: only on `pool journal rotate` or
    /// SIGUSR1. Read at start.
    #[serde(default)]
    pub journal_rotate_bytes: u64,
    /// Seconds to let connections finish on SIGTERM.
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    /// Relays (`HOST:PORT`): the node registers at each (reachable by key
    /// alone) and uses them when no direct path works. Read at start.
    #[serde(default)]
    pub relays: Vec<String>,
    /// While on a relay, seconds between tries of direct paths.
    #[serde(default = "default_direct_retry")]
    pub direct_retry_secs: u64,
    /// A path that leaves data or a ping unanswered this long (and at
    /// least 4 RTT) is dead and the session moves: milliseconds.
    #[serde(default = "default_probe_timeout")]
    pub probe_timeout_ms: u64,
    /// Refused handshakes are journaled in aggregate: per source (an IPv4
    /// address, or an IPv6 /64) the first few at once, then one
    /// `handshake_refusals` line per this many seconds with the count.
    #[serde(default = "default_refusal_window")]
    pub refusal_window_secs: u64,
    /// How long a session without a carrier waits to resume before it
    /// closes: seconds. A peer that is gone for good (killed and not
    /// restarted) looks like a cut path until then, since refusals that
    /// anyone on the path could forge do not end a session.
    #[serde(default = "default_resume_deadline")]
    pub resume_deadline_secs: u64,
    /// Where the daemon keeps its state (a pending `pool config apply`);
    /// default: the key file's directory.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

fn default_resume_deadline() -> u64 {
    60
}

fn default_refusal_window() -> u64 {
    10
}

fn default_probe_timeout() -> u64 {
    2000
}

fn default_direct_retry() -> u64 {
    60
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            key: default_key(),
            listen: default_listen(),
            control: None,
            metrics: None,
            journal: None,
            journal_rotate_bytes: 0,
            drain_timeout_secs: default_drain(),
            relays: Vec::new(),
            direct_retry_secs: default_direct_retry(),
            probe_timeout_ms: default_probe_timeout(),
            refusal_window_secs: default_refusal_window(),
            resume_deadline_secs: default_resume_deadline(),
            state_dir: None,
        }
    }
}

/// `[trust]`: the same choices as the command-line trust flags.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Trusted keys.
    #[serde(default, deserialize_with = "de_keys")]
    pub allow: Vec<PublicKey>,
    /// Authorized-keys file.
    #[serde(default)]
    pub authorized: Option<PathBuf>,
    /// Fleet secret file.
    #[serde(default)]
    pub fleet_secret: Option<PathBuf>,
    /// Trust on first use.
    #[serde(default)]
    pub tofu: bool,
    /// Known-peers file for TOFU.
    #[serde(default)]
    pub known_peers: Option<PathBuf>,
}

fn default_max_conns() -> usize {
    4096
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    3600
}

/// `[[tcp2pool]]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tcp2PoolSection {
    /// A name for tables and logs.
    pub name: String,
    /// TCP address to listen on.
    pub listen: String,
    /// The POOL peer: `HOST:PORT`; empty to reach it by key through the
    /// node's relays.
    #[serde(default)]
    pub peer: String,
    /// The peer's public key.
    #[serde(deserialize_with = "de_key")]
    pub peer_key: PublicKey,
    /// Service at the peer (its `[[pool2tcp]]` `service`); empty: its default.
    #[serde(default)]
    pub service: String,
    /// Concurrent connections.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Seconds to reach the peer.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds without traffic before a connection is reset (0: never).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// `peer` and `peer_key` name a director (docs/director.md): the
    /// bridge asks it for a worker, dials that one, and goes back to it
    /// when the worker is lost.
    #[serde(default)]
    pub director: bool,
}

/// `[[pool2tcp]]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pool2TcpSection {
    /// Service name tcp2pool ends ask for; empty (the default) takes
    /// requests that name none.
    #[serde(default)]
    pub service: String,
    /// `HOST:PORT` to connect streams to. Peers can never choose another.
    pub target: String,
    /// Send a PROXY protocol v2 header with the real client address.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peer keys that may use this service; empty: every trusted peer.
    #[serde(default, deserialize_with = "de_keys")]
    pub allow: Vec<PublicKey>,
    /// Concurrent connections.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Seconds to reach the target.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds without traffic before a connection is reset (0: never).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
}

fn limits(max: usize, connect: u64, idle: u64) -> Limits {
    Limits {
        max_connections: max.max(1),
        connect_timeout: Duration::from_secs(connect.max(1)),
        idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
    }
}

impl Tcp2PoolSection {
    /// The bridge limits.
    pub fn limits(&self) -> Limits {
        limits(
            self.max_connections,
            self.connect_timeout_secs,
            self.idle_timeout_secs,
        )
    }
}

impl Pool2TcpSection {
    /// The bridge limits.
    pub fn limits(&self) -> Limits {
        limits(
            self.max_connections,
            self.connect_timeout_secs,
            self.idle_timeout_secs,
        )
    }
}

impl Config {
    /// Parses and checks a config text: values become their types (keys,
    /// address ranges) as they are read, then entries are checked against
    /// each other. Every problem is reported, each with its line.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let problems = crate::config_check::check(&cfg, text);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid { path: p, problems })
        }
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<(Config, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok((Config::parse(&text, path)?, text))
    }
}
