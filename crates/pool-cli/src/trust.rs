//! `pool trust add`: explicit enrolment of a key, the only way besides
//! `--allow` and a fleet secret that a listener comes to accept a client.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use pool_net::{KnownPeers, PublicKey, Trust};

use crate::cmd::{parse_key, CliError, Result};

/// Appends `key` to an authorized file, or pins it for `peer` (HOST:PORT)
/// in a known-peers file, rewriting the file atomically.
pub(crate) fn add(
    key: &str,
    authorized: Option<&Path>,
    known: Option<(&Path, &str)>,
    comment: Option<&str>,
) -> Result<()> {
    let key = parse_key(key, "KEY")?;
    let note = note(comment);
    match (authorized, known) {
        (Some(file), _) => add_authorized(file, key, &note),
        (None, Some((file, peer))) => add_known_peer(file, peer, key, &note),
        (None, None) => Err(CliError::msg(
            "say where: --authorized FILE (a client this node accepts) or --known-peers FILE --peer HOST:PORT (a listener this node dials)",
        )),
    }
}

fn add_authorized(file: &Path, key: PublicKey, note: &str) -> Result<()> {
    let existing = match std::fs::symlink_metadata(file) {
        Ok(_) => {
            // The same checks as a listener makes: no key is added to a
            // file it would refuse (writable by others, a broken line).
            let trust = Trust::new().allow_file(file)?;
            if trust.trusts(&key) {
                println!(
                    "{key} is already trusted in {}; nothing changed",
                    file.display()
                );
                return Ok(());
            }
            Some(std::fs::read_to_string(file)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(CliError::msg(format!("{}: {e}", file.display()))),
    };
    let mut text = existing.unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{key}  # {note}\n"));
    replace(file, &text, 0o644)?;
    println!(
        "{key} is now trusted as a client in {}\nA running daemon picks it up on `pool ctl reload` (or SIGHUP).",
        file.display()
    );
    Ok(())
}

fn add_known_peer(file: &Path, peer: &str, key: PublicKey, note: &str) -> Result<()> {
    if peer.starts_with('@') || peer.split_whitespace().count() != 1 {
        return Err(CliError::msg(format!(
            "--peer {peer}: give the listener's address as this node dials it (HOST:PORT)"
        )));
    }
    let store = KnownPeers::load(file)?;
    match store.lookup(peer) {
        Some(k) if k == key => {
            println!("{peer} is already pinned to {key} in {}; nothing changed", file.display());
            return Ok(());
        }
        Some(k) => {
            return Err(CliError::msg(format!(
                "{peer} is pinned to another key ({k}) in {}; if its key really changed, remove that line first",
                file.display()
            )))
        }
        None => {}
    }
    let mut text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(CliError::msg(format!("{}: {e}", file.display()))),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{peer} {key}  # {note}\n"));
    replace(file, &text, 0o600)?;
    println!("{peer} is now pinned to {key} in {}", file.display());
    Ok(())
}

/// `added YYYY-MM-DD by pool trust add[: comment]`, on one line.
fn note(comment: Option<&str>) -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let (y, m, d) = pool_journal::civil_from_days(days);
    let mut s = format!("added {y:04}-{m:02}-{d:02} by pool trust add");
    if let Some(c) = comment {
        let c: String = c
            .chars()
            .map(|ch| if ch.is_control() { ' ' } else { ch })
            .collect();
        s.push_str(": ");
        s.push_str(c.trim());
    }
    s
}

/// Writes `text` to a new file beside `file` (the old file's mode, minus
/// group/world write, or `new_mode`), fsyncs it and renames it over `file`,
/// then fsyncs the directory: a reader sees the old file or the new one.
fn replace(file: &Path, text: &str, new_mode: u32) -> Result<()> {
    let io = |e: std::io::Error| CliError::msg(format!("{}: {e}", file.display()));
    if std::fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(CliError::msg(format!(
            "{} is a symlink; give the file it points to, which is what gets rewritten",
            file.display()
        )));
    }
    let mode = match std::fs::metadata(file) {
        Ok(m) => m.permissions().mode() & 0o7755,
        Err(_) => new_mode,
    };
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| CliError::msg(format!("{}: not a file path", file.display())))?;
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        u64::from_le_bytes(nonce)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits; set exactly the mode meant.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
