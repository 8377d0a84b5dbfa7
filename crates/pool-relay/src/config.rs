//! How a relay is configured: [`RelayConfig`], authorized-keys files and
//! the errors that stop a relay from starting.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pool_core::PublicKey;
use pool_journal::JournalError;

/// How the relay is run. `Default` is the production setting on
/// `[::]:9255`; the setters chain.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Address to listen on: `[::]:9255` takes IPv6 and IPv4.
    pub listen: String,
    /// Connections open at once, all nodes together (handshaking ones too).
    pub max_connections: usize,
    /// Connections open at once for one node key (control and circuits).
    pub max_connections_per_node: usize,
    /// Bytes per second one node may send through circuits, over all its
    /// circuits (a token bucket with one second of burst); 0: no cap.
    pub max_rate_per_node: u64,
    /// Time from accept to a verified AUTH.
    pub handshake_timeout: Duration,
    /// Time the peer has to ACCEPT a circuit after INCOMING.
    pub accept_timeout: Duration,
    /// A control connection silent this long is closed (nodes PING every
    /// 15 s).
    pub control_idle_timeout: Duration,
    /// A circuit that carries no byte either way this long is closed
    /// (`None`: never). POOL sessions PING every 5 s, so a live session's
    /// circuit is never idle that long; without it, circuits opened by
    /// keys that cost nothing could hold every connection slot.
    pub circuit_idle_timeout: Option<Duration>,
    /// Connections from one source (an IPv4 address, or an IPv6 /64) that
    /// may be open at once before they authenticate; more are refused at
    /// once with `ERR_CAPACITY`. 0: no cap.
    pub max_unauthenticated_per_address: usize,
    /// Keys this relay serves; empty: any key that proves ownership.
    pub allow: HashSet<PublicKey>,
    /// Append the change journal to this file.
    pub journal: Option<PathBuf>,
    /// Seal the journal and start a new file once it holds this many
    /// bytes (0: only when asked, SIGUSR1 to `pool relay`).
    pub journal_rotate_bytes: u64,
    /// Serve `/metrics` and `/health` here, e.g. `127.0.0.1:9257`.
    pub metrics: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: format!("[::]:{}", pool_core::relay::DEFAULT_PORT),
            max_connections: 10_000,
            max_connections_per_node: 256,
            max_rate_per_node: 0,
            handshake_timeout: Duration::from_secs(5),
            accept_timeout: Duration::from_secs(5),
            control_idle_timeout: Duration::from_secs(60),
            circuit_idle_timeout: Some(Duration::from_secs(120)),
            max_unauthenticated_per_address: 64,
            allow: HashSet::new(),
            journal: None,
            journal_rotate_bytes: 0,
            metrics: None,
        }
    }
}

impl RelayConfig {
    /// The defaults, listening on `listen`.
    #[must_use]
    pub fn new(listen: impl Into<String>) -> Self {
        RelayConfig {
            listen: listen.into(),
            ..RelayConfig::default()
        }
    }

    /// Sets [`RelayConfig::max_connections`].
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`RelayConfig::max_connections_per_node`].
    #[must_use]
    pub fn max_connections_per_node(mut self, n: usize) -> Self {
        self.max_connections_per_node = n;
        self
    }

    /// Sets [`RelayConfig::max_rate_per_node`] (bytes per second, 0: none).
    #[must_use]
    pub fn max_rate_per_node(mut self, bytes_per_sec: u64) -> Self {
        self.max_rate_per_node = bytes_per_sec;
        self
    }

    /// Sets [`RelayConfig::handshake_timeout`].
    #[must_use]
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets [`RelayConfig::accept_timeout`].
    #[must_use]
    pub fn accept_timeout(mut self, t: Duration) -> Self {
        self.accept_timeout = t;
        self
    }

    /// Sets [`RelayConfig::control_idle_timeout`].
    #[must_use]
    pub fn control_idle_timeout(mut self, t: Duration) -> Self {
        self.control_idle_timeout = t;
        self
    }

    /// Sets [`RelayConfig::circuit_idle_timeout`] (`None`: never).
    #[must_use]
    pub fn circuit_idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.circuit_idle_timeout = t;
        self
    }

    /// Sets [`RelayConfig::max_unauthenticated_per_address`] (0: no cap).
    #[must_use]
    pub fn max_unauthenticated_per_address(mut self, n: usize) -> Self {
        self.max_unauthenticated_per_address = n;
        self
    }

    /// Serves this key (once any key is added, only the listed keys).
    #[must_use]
    pub fn allow(mut self, key: PublicKey) -> Self {
        self.allow.insert(key);
        self
    }

    /// Sets [`RelayConfig::journal`].
    #[must_use]
    pub fn journal(mut self, path: impl Into<PathBuf>) -> Self {
        self.journal = Some(path.into());
        self
    }

    /// Sets [`RelayConfig::journal_rotate_bytes`].
    #[must_use]
    pub fn journal_rotate_bytes(mut self, bytes: u64) -> Self {
        self.journal_rotate_bytes = bytes;
        self
    }

    /// Sets [`RelayConfig::metrics`].
    #[must_use]
    pub fn metrics(mut self, addr: impl Into<String>) -> Self {
        self.metrics = Some(addr.into());
        self
    }
}

/// Reads an authorized-keys file (one key token a line, optionally
/// followed by a name; `#` starts a comment), the format `--authorized`
/// takes everywhere.
///
/// # Errors
///
/// [`RelayServerError::Authorized`] naming the file (and line) that is
/// unreadable or holds something that is not a key.
pub fn load_authorized(path: &Path) -> Result<HashSet<PublicKey>, RelayServerError> {
    let bad = |line: usize, reason: String| RelayServerError::Authorized {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let text = {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let mut f = std::fs::File::open(path).map_err(|e| bad(0, e.to_string()))?;
        let mode = f
            .metadata()
            .map_err(|e| bad(0, e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(bad(
                0,
                format!(
                    "writable by other users (mode {:o}), so anyone could add a key; refused until you run `chmod go-w {}`",
                    mode & 0o777,
                    path.display()
                ),
            ));
        }
        let mut text = String::new();
        f.read_to_string(&mut text)
            .map_err(|e| bad(0, e.to_string()))?;
        text
    };
    let mut keys = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(token) = line.split_whitespace().next() else {
            continue;
        };
        let key = PublicKey::from_token(token).map_err(|e| bad(n + 1, e.to_string()))?;
        keys.insert(key);
    }
    Ok(keys)
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayServerError {
    /// The listening socket could not be bound.
    #[error("relay: cannot listen on {addr}: {source} (is another relay or program using that port? choose another --listen address)")]
    Listen {
        /// The address asked for.
        addr: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The metrics endpoint could not be bound.
    #[error("relay: cannot serve metrics on {addr}: {source} (choose another --metrics address)")]
    Metrics {
        /// The address asked for.
        addr: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The journal could not be opened.
    #[error("relay: {0}")]
    Journal(#[from] JournalError),
    /// An authorized-keys file could not be read.
    #[error("relay: authorized keys {}{}: {reason} (one key per line, `#` comments)",
        path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Authorized {
        /// The file.
        path: PathBuf,
        /// The line (1-based; 0 when the file itself could not be read).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("relay: {0}")]
    Config(String),
}
