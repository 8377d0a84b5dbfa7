//! Signed checkpoints: the journal's Ed25519 key file, and the
//! `journal_checkpoint` entries that sign the leaves of the entries before
//! them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Map, Value};
use tracing::warn;

use crate::canonical::{canonical_object, format_ts, hex, unhex, unhex32, write_object};
use crate::record::{content_hash, LEAF_LEN};
use crate::{Event, JournalError};

/// Entries between two signed checkpoints, at most.
pub const CHECKPOINT_EVERY: usize = 128;
/// Longest time an entry waits for a signed checkpoint while the node runs.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// The event of a signed checkpoint ([`Event::JournalCheckpoint`]).
pub const CHECKPOINT_EVENT: &str = Event::JournalCheckpoint.name();
/// Prefix of every signed message (domain separation).
const SIG_CONTEXT: &[u8] = b"POOL journal checkpoint v1\n";

/// The journal's Ed25519 signing key.
pub(crate) struct Signer {
    pub(crate) pair: Ed25519KeyPair,
    pub(crate) public_hex: String,
}

/// Renders a checkpoint signing `leaves` (entries `from_seq` on) as entry
/// `seq`, advancing `prev` to its hash.
pub(crate) fn render_checkpoint(
    seq: u64,
    prev: &mut String,
    from_seq: u64,
    leaves: &[[u8; LEAF_LEN]],
    signer: &Signer,
) -> String {
    let mut obj = Map::new();
    obj.insert("seq".to_owned(), Value::from(seq));
    obj.insert("ts".to_owned(), Value::String(format_ts(SystemTime::now())));
    obj.insert(
        "event".to_owned(),
        Value::String(CHECKPOINT_EVENT.to_owned()),
    );
    obj.insert("key".to_owned(), Value::String(signer.public_hex.clone()));
    obj.insert("from_seq".to_owned(), Value::from(from_seq));
    obj.insert("to_seq".to_owned(), Value::from(seq - 1));
    obj.insert(
        "leaves".to_owned(),
        Value::Array(leaves.iter().map(|l| Value::String(hex(l))).collect()),
    );
    let sig = signer.pair.sign(&signed_message(&obj));
    obj.insert("sig".to_owned(), Value::String(hex(sig.as_ref())));
    obj.insert("prev".to_owned(), Value::String(prev.clone()));
    let hash = hex(&content_hash(&obj));
    obj.insert("hash".to_owned(), Value::String(hash.clone()));
    *prev = hash;
    let mut line = String::new();
    canonical_object(&obj, &mut line);
    line
}

/// What a checkpoint's signature covers: a fixed prefix, then the
/// canonical form of the checkpoint without `prev`, `hash` and `sig`. The
/// chain fields are left out on purpose, so that a recomputed chain leaves
/// the signature valid and the edited entry is named by its leaf.
pub(crate) fn signed_message(obj: &Map<String, Value>) -> Vec<u8> {
    let mut s = String::new();
    write_object(
        obj.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "prev" | "hash" | "sig")),
        &mut s,
    );
    let mut m = SIG_CONTEXT.to_vec();
    m.extend_from_slice(s.as_bytes());
    m
}

/// The signing key file of a journal: its path with `.key` appended
/// (`journal.log` → `journal.log.key`).
#[must_use]
pub fn key_path(journal: &Path) -> PathBuf {
    let mut name = journal.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// The hex public key of a journal's signing key file, for
/// `pool journal pubkey` (to keep elsewhere and give to
/// [`verify_with_key`](crate::verify_with_key)).
///
/// # Errors
///
/// [`JournalError::Key`] when the key file is missing, unreadable,
/// readable by others or malformed.
pub fn public_key(journal: &Path) -> Result<String, JournalError> {
    let path = key_path(journal);
    read_signer(&path)?
        .map(|s| s.public_hex)
        .ok_or_else(|| JournalError::Key {
            path,
            reason: "no such file (it is created when the node first opens the journal)".into(),
        })
}

pub(crate) fn key_error(path: &Path, reason: impl Into<String>) -> JournalError {
    JournalError::Key {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a signing key file; `None` when it does not exist.
pub(crate) fn read_signer(path: &Path) -> Result<Option<Signer>, JournalError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    // Never through a symlink: the link itself must be a regular file, and
    // the file opened must be the one looked at.
    let link = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(key_error(path, format!("cannot read: {e}"))),
    };
    if !link.file_type().is_file() {
        return Err(key_error(
            path,
            "is not a regular file (a symlink or something else); replace it with the key file itself",
        ));
    }
    let mut file = File::open(path).map_err(|e| key_error(path, format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| key_error(path, format!("cannot read: {e}")))?;
    if (meta.dev(), meta.ino()) != (link.dev(), link.ino()) {
        return Err(key_error(
            path,
            "changed while it was being opened; try again",
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(key_error(
            path,
            format!(
                "is readable or writable by other users (mode {:o}); run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| key_error(path, format!("cannot read: {e}")))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(unhex32)
        .ok_or_else(|| {
            key_error(
                path,
                "holds no key (64 hex digits); move it aside so that a new one is made",
            )
        })?;
    signer_from_seed(&seed)
        .map(Some)
        .ok_or_else(|| key_error(path, "holds an unusable key"))
}

pub(crate) fn signer_from_seed(seed: &[u8; 32]) -> Option<Signer> {
    let pair = Ed25519KeyPair::from_seed_unchecked(seed).ok()?;
    let public_hex = hex(pair.public_key().as_ref());
    Some(Signer { pair, public_hex })
}

/// Loads the journal's signing key, creating it (mode 0600, never
/// overwriting) when missing.
pub(crate) fn load_or_create_signer(path: &Path) -> Result<Signer, JournalError> {
    if let Some(s) = read_signer(path)? {
        return Ok(s);
    }
    let mut seed = Wipe([0u8; 32]);
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed.0);
    let signer = signer_from_seed(&seed.0).ok_or_else(|| key_error(path, "cannot make a key"))?;
    let text = format!(
        "# POOL journal signing key (Ed25519 seed). Keep it private; never copy it off this host.\n\
         # Its public key (give it to `pool journal verify --key`): {}\n{}\n",
        signer.public_hex,
        hex(&seed.0)
    );
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut f) => {
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| key_error(path, format!("cannot write: {e}")))?;
            warn!(path = %path.display(), public_key = %signer.public_hex, "created a new journal signing key; keep its public key elsewhere to check the journal with `pool journal verify --key`");
            Ok(signer)
        }
        // Another process made it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read_signer(path)?.ok_or_else(|| key_error(path, "vanished while it was being created"))
        }
        Err(e) => Err(key_error(
            path,
            format!(
                "cannot create: {e} (check that this user may write to the journal's directory)"
            ),
        )),
    }
}

/// A seed overwritten when dropped (best effort; ring keeps its own copy
/// of the key inside the key pair).
pub(crate) struct Wipe([u8; 32]);

impl Drop for Wipe {
    fn drop(&mut self) {
        self.0 = [0u8; 32];
        std::hint::black_box(&self.0);
    }
}

/// A checkpoint's signed content.
pub(crate) struct Checkpoint {
    pub(crate) key: [u8; 32],
    pub(crate) from_seq: u64,
    pub(crate) to_seq: u64,
    pub(crate) leaves: Vec<[u8; LEAF_LEN]>,
    /// The signature verifies under `key`.
    pub(crate) signature_ok: bool,
}

pub(crate) fn parse_checkpoint(obj: &Map<String, Value>) -> Result<Checkpoint, &'static str> {
    let key = obj
        .get("key")
        .and_then(Value::as_str)
        .and_then(unhex32)
        .ok_or("no \"key\"")?;
    let from_seq = obj
        .get("from_seq")
        .and_then(Value::as_u64)
        .ok_or("no \"from_seq\"")?;
    let to_seq = obj
        .get("to_seq")
        .and_then(Value::as_u64)
        .ok_or("no \"to_seq\"")?;
    let leaves = obj
        .get("leaves")
        .and_then(Value::as_array)
        .ok_or("no \"leaves\"")?
        .iter()
        .map(|v| {
            let b = unhex(v.as_str()?)?;
            <[u8; LEAF_LEN]>::try_from(b.as_slice()).ok()
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("a leaf is not 32 hex digits")?;
    let sig = obj
        .get("sig")
        .and_then(Value::as_str)
        .and_then(unhex)
        .ok_or("no \"sig\"")?;
    let signature_ok = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&signed_message(obj), &sig)
        .is_ok();
    Ok(Checkpoint {
        key,
        from_seq,
        to_seq,
        leaves,
        signature_ok,
    })
}
