//! Who may connect: explicit keys, an authorized-keys file, or a fleet
//! secret. Never anyone silently.
//!
//! Trust on first use (TOFU) is only for peers this node *dials*, as SSH's
//! `known_hosts`: the key a listener presents on first contact is pinned
//! and required afterwards. A listener never pins a client: accepting the
//! first stranger who says hello would make that stranger a trusted client
//! (and with a default route, anyone who reaches the port first). Clients
//! are enrolled explicitly instead (`--allow`, an authorized file that
//! `pool trust add` appends to, or a fleet secret).

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
    /// Authorized files read (even empty ones: keys are added to them
    /// later with `pool trust add` and a reload).
    files: usize,
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
        self.files += 1;
        Ok(self)
    }

    /// Trusts any holder of this fleet secret (the handshake proves it).
    pub fn fleet(mut self, secret: FleetSecret) -> Self {
        self.fleet = Some(secret);
        self
    }

    /// Trust on first use for listeners this node dials: the key a
    /// listener presents on first contact is pinned in `known_peers` under
    /// its address and required from then on. It never makes a listener
    /// accept a client key: see the module docs.
    pub fn tofu(mut self, known_peers: &Path) -> Result<Self, Error> {
        self.tofu = Some(Arc::new(Mutex::new(KnownPeers::load(known_peers)?)));
        Ok(self)
    }

    /// The fleet secret, if any.
    pub fn fleet_secret(&self) -> Option<&FleetSecret> {
        self.fleet.as_ref()
    }

    /// Whether any way of trusting a peer is configured (dialled peers
    /// included: TOFU counts).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.fleet.is_none() && self.tofu.is_none() && self.files == 0
    }

    /// Whether a listener with this policy can accept anyone: a trusted
    /// key, an authorized file (possibly empty for now) or a fleet secret.
    /// TOFU does not count: it never trusts a client.
    pub fn accepts_clients(&self) -> bool {
        !self.keys.is_empty() || self.fleet.is_some() || self.files > 0
    }

    /// Number of explicitly trusted keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The known-peers store, when TOFU is on.
    pub fn known_peers(&self) -> Option<Arc<Mutex<KnownPeers>>> {
        self.tofu.clone()
    }

    /// Whether `key` is trusted as a client now (used to close sessions
    /// of keys a reload no longer trusts). The same rule as the listener's.
    pub fn trusts(&self, key: &PublicKey) -> bool {
        self.check_client(key)
    }

    /// Decides on an authenticated client key (listener side). Never pins
    /// and never reads the known-peers store: a client is trusted only
    /// explicitly (a key, an authorized file, or the fleet secret, which
    /// the handshake has proven by the time this is asked).
    pub(crate) fn check_client(&self, key: &PublicKey) -> bool {
        self.keys.contains(key) || self.fleet.is_some()
    }
}

/// The known-peers file: `HOST:PORT KEY` lines, one per listener this
/// node dialled and pinned. `@client` lines (client keys an older POOL
/// pinned on its listener) are kept in the file but trust nobody.
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
        let clients = entries.iter().filter(|(n, _)| n == CLIENT).count();
        if clients > 0 {
            tracing::warn!(
                file = %path.display(),
                clients,
                "the known-peers file holds client pins (@client) that an older POOL made when its listener \
                 pinned the first client it saw; they no longer trust anyone. To keep accepting one of \
                 those keys: pool trust add KEY --authorized FILE"
            );
        }
        Ok(KnownPeers {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The key pinned for a listener address.
    pub fn lookup(&self, name: &str) -> Option<PublicKey> {
        if name == CLIENT {
            return None;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use pool_core::SecretKey;

    fn key(n: u8) -> PublicKey {
        SecretKey::from_bytes([n; 32]).public_key()
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "pool-trust-unit-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ))
    }

    /// F3: `--allow A --tofu` on a listener accepted a stranger C and
    /// pinned it. Now a client is never pinned.
    #[test]
    fn a_listener_never_pins_a_client() {
        let kp = temp("kp");
        let trust = Trust::new().allow(key(1)).tofu(&kp).unwrap();
        assert!(trust.check_client(&key(1)));
        assert!(!trust.check_client(&key(3)), "stranger accepted");
        assert!(
            !trust.check_client(&key(3)),
            "stranger accepted the second time"
        );
        assert!(!kp.exists(), "something was pinned");
        assert!(!trust.trusts(&key(3)));

        // TOFU alone trusts no client at all.
        let alone = Trust::new().tofu(&kp).unwrap();
        assert!(!alone.accepts_clients() && !alone.is_empty());
        assert!(!alone.check_client(&key(3)));
        assert!(!kp.exists());
    }

    #[test]
    fn old_client_pins_trust_nobody() {
        let kp = temp("old");
        std::fs::write(&kp, format!("@client {}\nhost:9253 {}\n", key(3), key(4))).unwrap();
        let trust = Trust::new().tofu(&kp).unwrap();
        assert!(!trust.check_client(&key(3)));
        assert!(!trust.trusts(&key(3)));
        let store = trust.known_peers().unwrap();
        let store = store.lock().unwrap();
        assert_eq!(store.lookup("host:9253"), Some(key(4)));
        assert_eq!(store.lookup("@client"), None);
        drop(store);
        let _ = std::fs::remove_file(&kp);
    }

    #[test]
    fn an_empty_authorized_file_lets_a_listener_start() {
        let f = temp("auth");
        std::fs::write(&f, "# nobody yet\n").unwrap();
        let trust = Trust::new().allow_file(&f).unwrap();
        assert!(trust.accepts_clients());
        assert!(!trust.check_client(&key(1)));
        let _ = std::fs::remove_file(&f);
    }
}
