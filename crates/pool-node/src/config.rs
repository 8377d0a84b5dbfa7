//! The daemon's TOML configuration. See `docs/pool.example.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::bridge::{Limits, Target};

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
    /// A value is wrong.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What and how to fix it.
        message: String,
    },
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
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
    pub allow_users: Vec<crate::shim::Principal>,
    /// Local groups (name or gid) whose members' programs the daemon
    /// carries: the caller's group, or the caller listed in `/etc/group`.
    #[serde(default)]
    pub allow_groups: Vec<crate::shim::Principal>,
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
    pub cidr: String,
    /// The POOL daemon that serves it: `HOST:PORT`.
    pub peer: String,
    /// Its public key; without one the key must be pinned (TOFU) or the
    /// peer a fleet member.
    #[serde(default)]
    pub peer_key: Option<String>,
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
#[derive(Clone, Debug, Deserialize)]
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
            drain_timeout_secs: default_drain(),
            relays: Vec::new(),
            direct_retry_secs: default_direct_retry(),
            probe_timeout_ms: default_probe_timeout(),
            refusal_window_secs: default_refusal_window(),
            resume_deadline_secs: default_resume_deadline(),
        }
    }
}

/// `[trust]`: the same choices as the command-line trust flags.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Trusted keys.
    #[serde(default)]
    pub allow: Vec<String>,
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
    pub peer_key: String,
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
    /// As a bridge target.
    pub fn target(&self) -> Target {
        Target {
            service: self.service.clone(),
            address: self.target.clone(),
            proxy_protocol: self.proxy_protocol,
        }
    }
}

impl Config {
    /// Parses and checks a config text.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: p.clone(),
            message,
        };
        let mut names = std::collections::HashSet::new();
        for b in &cfg.tcp2pool {
            if !names.insert(b.name.clone()) {
                return Err(invalid(format!(
                    "two [[tcp2pool]] sections are named `{}`",
                    b.name
                )));
            }
            if pool_net::PublicKey::from_token(&b.peer_key).is_err() {
                return Err(invalid(format!(
                    "[[tcp2pool]] `{}`: peer_key `{}` is not a POOL public key (run `pool pubkey KEYFILE` on the peer)",
                    b.name, b.peer_key
                )));
            }
        }
        let mut services = std::collections::HashSet::new();
        for t in &cfg.pool2tcp {
            if !services.insert(t.service.clone()) {
                return Err(invalid(format!(
                    "two [[pool2tcp]] sections have service `{}`",
                    t.service
                )));
            }
        }
        for r in &cfg.route {
            if crate::shim::Cidr::parse(&r.cidr).is_none() {
                return Err(invalid(format!(
                    "[[route]] cidr `{}` is not an address range (write 10.0.0.0/8, fd00::/8 or 10.1.2.3)",
                    r.cidr
                )));
            }
            if let Some(k) = &r.peer_key {
                if pool_net::PublicKey::from_token(k).is_err() {
                    return Err(invalid(format!(
                        "[[route]] `{}`: peer_key `{k}` is not a POOL public key (run `pool pubkey KEYFILE` on the peer)",
                        r.cidr
                    )));
                }
            }
        }
        if let Some(shim) = &cfg.shim {
            if let Some(l) = &shim.listen {
                return Err(invalid(format!(
                    "[shim] listen = \"{l}\" is gone: the shim now reaches the daemon over the Unix socket `socket` (default /run/pool/shim.sock), which checks who is calling; remove `listen`"
                )));
            }
            if !shim.socket.is_absolute() || shim.socket.as_os_str().len() > 100 {
                return Err(invalid(format!(
                    "[shim] socket `{}` must be an absolute path of at most 100 bytes",
                    shim.socket.display()
                )));
            }
            crate::shim::Allow::resolve_here(shim, 0)
                .map_err(|e| invalid(format!("[shim] {e}")))?;
        }
        let mut ports = std::collections::HashSet::new();
        for e in &cfg.expose {
            if e.port == 0 || !ports.insert(e.port) {
                return Err(invalid(format!(
                    "[[expose]] port {} is 0 or listed twice",
                    e.port
                )));
            }
        }
        if !cfg.expose.is_empty() && cfg.node.listen.is_empty() {
            return Err(invalid(
                "[[expose]] needs [node] listen (the POOL listener)".into(),
            ));
        }
        if !cfg.pool2tcp.is_empty() && cfg.node.listen.is_empty() {
            return Err(invalid(
                "[[pool2tcp]] needs [node] listen (the POOL listener)".into(),
            ));
        }
        Ok(cfg)
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
