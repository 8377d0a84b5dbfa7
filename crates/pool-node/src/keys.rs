//! Keys and trust: the node's key file, private files, and the trust
//! policy a `[trust]` section describes. Used by the daemon and by
//! `pool keygen` / `pool listen`.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use pool_net::{FleetSecret, SecretKey, Trust};
use tracing::info;

use crate::config::TrustSection;
use crate::daemon::DaemonError;

/// Creates a new private key file (mode 0600, never overwriting one) and
/// returns the key. Used by `pool keygen` and by the daemon's first start.
pub fn create_key_file(path: &Path) -> std::io::Result<SecretKey> {
    use std::io::Write;
    let mut b = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let key = SecretKey::from_bytes(b);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.to_file_text().as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

/// Reads a secret file, refusing it (as ssh refuses a private key) when
/// its group or others may read or write it. The mode is that of the file
/// actually opened, so a swap between the check and the read cannot help.
pub fn read_private_file(path: &Path, what: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{what} {} is accessible by other users (mode {:o}), so it is refused; run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            ),
        ));
    }
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    Ok(text)
}

/// Loads a key file (refused when others may read it), or creates it when
/// `create` and missing.
pub fn load_or_create_key(path: &Path, create: bool) -> Result<SecretKey, DaemonError> {
    match read_private_file(path, "key file") {
        Ok(text) => SecretKey::from_file_text(&text)
            .map_err(|e| DaemonError::Key(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && e.get_ref().is_some() => {
            Err(DaemonError::Key(e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let key = create_key_file(path).map_err(|e| {
                DaemonError::Key(format!("cannot create key file {}: {e}", path.display()))
            })?;
            info!(key = %key.public_key(), file = %path.display(), "created a new node key");
            Ok(key)
        }
        Err(e) => Err(DaemonError::Key(format!(
            "cannot read key file {}: {e} (create one with `pool keygen --out {}`)",
            path.display(),
            path.display()
        ))),
    }
}

/// SHA-256 of a text, in hex (config digests in the journal).
pub fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds a trust policy from a `[trust]` section (or the trust flags).
pub fn build_trust(t: &TrustSection, default_known_peers: &Path) -> Result<Trust, DaemonError> {
    let mut trust = Trust::new();
    for k in &t.allow {
        trust = trust.allow(*k);
    }
    if let Some(f) = &t.authorized {
        trust = trust
            .allow_file(f)
            .map_err(|e| DaemonError::Trust(e.to_string()))?;
    }
    if let Some(f) = &t.fleet_secret {
        let text = read_private_file(f, "fleet secret").map_err(|e| match e.get_ref() {
            Some(_) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                DaemonError::Trust(e.to_string())
            }
            _ => DaemonError::Trust(format!("cannot read fleet secret {}: {e}", f.display())),
        })?;
        if text.trim().len() < 16 {
            return Err(DaemonError::Trust(format!(
                "fleet secret {} is too short (use at least 16 random characters, e.g. `head -c 32 /dev/urandom | base64 > {}`)",
                f.display(),
                f.display()
            )));
        }
        trust = trust.fleet(FleetSecret::from_text(&text));
    }
    if t.tofu {
        let kp = t
            .known_peers
            .clone()
            .unwrap_or_else(|| default_known_peers.to_path_buf());
        trust = trust
            .tofu(&kp)
            .map_err(|e| DaemonError::Trust(e.to_string()))?;
    }
    Ok(trust)
}

/// A node that listens for services but trusts no client would refuse
/// every session: said at start and before any apply.
pub fn check_listener_trust(
    cfg: &crate::config::Config,
    trust: &Trust,
    listening: bool,
) -> Result<(), DaemonError> {
    if listening && !trust.accepts_clients() && !(cfg.pool2tcp.is_empty() && cfg.expose.is_empty())
    {
        return Err(DaemonError::Trust(
            "this node listens but trusts no client, so every session would be refused: \
             set [trust] allow, authorized (then `pool trust add KEY --authorized FILE` and reload) or fleet_secret \
             (tofu only pins the listeners this node dials)"
                .into(),
        ));
    }
    Ok(())
}
