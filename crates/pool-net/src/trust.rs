//! Who may connect: explicit keys, an authorized-keys file, a fleet
//! secret, or trust on first use with pinning. Never anyone silently.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pool_core::{FleetSecret, PublicKey};

use crate::error::Error;

/// The trust policy of an endpoint.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    keys: HashSet<PublicKey>,
    fleet: Option<FleetSecret>,
    tofu: Option<Arc<Mutex<KnownPeers>>>,
}

impl Trust {
    /// Nobody yet: add keys, a file, a fleet secret or TOFU.
    pub fn new() -> Self {
        Trust::default()
    }

    /// Trusts one key.
    pub fn allow(mut self, key: PublicKey) -> Self {
        self.keys.insert(key);
        self
    }

    /// Trusts every key in an authorized-keys file: one key token a line,
    /// optionally followed by a name; `#` starts a comment.
    ///
    /// Refused when its group or others may write it (they could add a key),
    /// as ssh refuses such an `authorized_keys`.
    pub fn allow_file(mut self, path: &Path) -> Result<Self, Error> {
        let text = read_not_writable_by_others(path, "authorized keys file")?.ok_or_else(|| {
            Error::File {
                path: path.display().to_string(),
                source: std::io::ErrorKind::NotFound.into(),
            }
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some(token) = line.split_whitespace().next() else {
                continue;
            };
            let key = PublicKey::from_token(token).map_err(|source| Error::KeyFile {
                path: format!("{}:{}", path.display(), n + 1),
                source,
            })?;
            self.keys.insert(key);
        }
        Ok(self)
    }

    /// Trusts any holder of this fleet secret (the handshake proves it).
    pub fn fleet(mut self, secret: FleetSecret) -> Self {
        self.fleet = Some(secret);
        self
    }

    /// Trust on first use: a listener pins the first client key it sees
    /// (when it trusts no key otherwise) and refuses other keys after;
    /// a client pins the key a listener presents on first contact.
    pub fn tofu(mut self, known_peers: &Path) -> Result<Self, Error> {
        self.tofu = Some(Arc::new(Mutex::new(KnownPeers::load(known_peers)?)));
        Ok(self)
    }

    /// The fleet secret, if any.
    pub fn fleet_secret(&self) -> Option<&FleetSecret> {
        self.fleet.as_ref()
    }

    /// Whether any way of trusting a peer is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.fleet.is_none() && self.tofu.is_none()
    }

    /// Number of explicitly trusted keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The known-peers store, when TOFU is on.
    pub fn known_peers(&self) -> Option<Arc<Mutex<KnownPeers>>> {
        self.tofu.clone()
    }

    /// Whether `key` is trusted now, without pinning anything (used to
    /// close sessions of keys a reload no longer trusts).
    pub fn trusts(&self, key: &PublicKey) -> bool {
        if self.keys.contains(key) || self.fleet.is_some() {
            return true;
        }
        self.tofu
            .as_ref()
            .and_then(|t| t.lock().ok().map(|kp| kp.is_pinned_client(key)))
            .unwrap_or(false)
    }

    /// Decides on an authenticated client key (listener side).
    pub(crate) fn check_client(&self, key: &PublicKey) -> bool {
        if self.keys.contains(key) || self.fleet.is_some() {
            return true;
        }
        if let Some(t) = &self.tofu {
            if let Ok(mut kp) = t.lock() {
                return kp.check_or_pin_client(key);
            }
        }
        false
    }
}

/// The known-peers file: `NAME KEY` lines, where NAME is `HOST:PORT` for
/// listeners this node connected to and `@client` for client keys a
/// listener pinned.
#[derive(Debug)]
pub struct KnownPeers {
    path: PathBuf,
    entries: Vec<(String, PublicKey)>,
}

const CLIENT: &str = "@client";

impl KnownPeers {
    /// Loads the file (a missing file is an empty store). Refused when its
    /// group or others may write it (they could pin a key of theirs).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut entries = Vec::new();
        match read_not_writable_by_others(path, "known-peers file") {
            Ok(None) => {}
            Ok(Some(text)) => {
                for (n, line) in text.lines().enumerate() {
                    let line = line.split('#').next().unwrap_or("").trim();
                    let mut parts = line.split_whitespace();
                    let (Some(name), Some(token)) = (parts.next(), parts.next()) else {
                        continue;
                    };
                    let key = PublicKey::from_token(token).map_err(|source| Error::KeyFile {
                        path: format!("{}:{}", path.display(), n + 1),
                        source,
                    })?;
                    entries.push((name.to_string(), key));
                }
            }
            Err(e) => return Err(e),
        }
        Ok(KnownPeers {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The key pinned for a listener address.
    pub fn lookup(&self, name: &str) -> Option<PublicKey> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| *k)
    }

    /// Pins a key under a name and appends it to the file.
    pub fn pin(&mut self, name: &str, key: PublicKey) -> Result<(), Error> {
        let io = |source| Error::File {
            path: self.path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io)?;
        writeln!(f, "{name} {key}").map_err(io)?;
        f.sync_all().map_err(io)?;
        self.entries.push((name.to_string(), key));
        Ok(())
    }

    fn is_pinned_client(&self, key: &PublicKey) -> bool {
        self.entries.iter().any(|(n, k)| n == CLIENT && k == key)
    }

    fn check_or_pin_client(&mut self, key: &PublicKey) -> bool {
        let pinned: Vec<_> = self
            .entries
            .iter()
            .filter(|(n, _)| n == CLIENT)
            .map(|(_, k)| *k)
            .collect();
        if pinned.is_empty() {
            if self.pin(CLIENT, *key).is_ok() {
                tracing::warn!(key = %key, file = %self.path.display(), "trust on first use: pinned the first client key");
                return true;
            }
            return false;
        }
        pinned.contains(key)
    }
}

/// Reads a trust file (`None` when it does not exist), refusing one its
/// group or others may write. The mode checked is that of the file read.
fn read_not_writable_by_others(path: &Path, what: &str) -> Result<Option<String>, Error> {
    let err = |source| Error::File {
        path: path.display().to_string(),
        source,
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mode = f.metadata().map_err(err)?.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "this {what} is writable by other users (mode {:o}), so anyone could add a key to it; \
                 it is refused until you run `chmod go-w {}`",
                mode & 0o777,
                path.display()
            ),
        )));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(err)?;
    Ok(Some(text))
}
