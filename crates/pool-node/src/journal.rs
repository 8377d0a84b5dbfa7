//! The change journal: an append-only, hash-chained log of what an auditor
//! asks about (sessions opened and closed, refused handshakes, config
//! reloads, key changes, resumes).
//!
//! Each line is one JSON object with these keys, plus the event's own fields:
//!
//! - `seq`: 1 for the first entry of a file, then +1 per entry;
//! - `ts`: when the event was recorded, RFC 3339 UTC with milliseconds;
//! - `event`: what happened (`session_opened`, `config_applied`, ...);
//! - `prev`: the previous entry's `hash` (64 zeros for the first entry);
//! - `hash`: hex SHA-256 of the entry's canonical form without `hash`.
//!
//! The canonical form is compact JSON with object keys sorted bytewise at
//! every level, and lines are written in that form, so a line's bytes are
//! fixed by its content. Editing a line breaks its `hash`; editing it and
//! recomputing the hash breaks the next line's `prev`; removing or
//! reordering lines breaks the `seq` run. [`verify`] names the line.
//!
//! The chain has no key: whoever can write the file can edit a line and
//! recompute every later hash. So the writer also appends **signed
//! checkpoints** (`journal_checkpoint` entries, Ed25519): every
//! [`CHECKPOINT_EVERY`] entries, when an entry has waited
//! [`CHECKPOINT_INTERVAL`] without one, and on [`Journal::checkpoint`]
//! (clean shutdown). A checkpoint lists a 128-bit digest of every entry
//! since the previous one (its "leaf": the entry without `prev` and
//! `hash`) and signs that list with the journal's key, kept in a file
//! beside the journal ([`key_path`], mode 0600, created on first open). An
//! edited entry then no longer matches the leaf a checkpoint signed, even
//! after the chain was recomputed, and [`verify_with_key`] names its line.
//!
//! Why a key file of its own and not a key derived from the node key: the
//! relay has no node key; a node key change (`key_changed`) must not change
//! the key mid-file; and the two secrets have different jobs (the node key
//! authenticates sessions and is given to peers by its public half; the
//! journal key only signs an audit log), so a leak of one must not be a
//! leak of the other.
//!
//! What this cannot show: lines cut off the *end* after the last
//! checkpoint (or a tail cut together with its checkpoints), entries
//! written after the last checkpoint (a crash leaves them unsigned;
//! [`VerifyReport::unsigned`] lists them), a whole file deleted, and
//! anything done by someone who holds the key file (root on the node, or
//! the node's user): they can sign what they like. Keep the public key and
//! the last hash that `pool journal verify` prints somewhere else.
//!
//! Writing never holds up traffic: [`Journal::record`] only queues. A
//! writer task appends and fsyncs in batches. If the queue is full or the
//! disk refuses writes (full disk, I/O error), entries are dropped and
//! counted, an error is logged once per burst, and the chain stays valid:
//! dropped entries take no `seq`. Once writes succeed again a
//! `journal_entries_lost` entry records how many were lost.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Map, Value};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// Entries that may wait for the writer before [`Journal::record`] drops.
const QUEUE: usize = 4096;
/// Most entries written per batch, and most entries left unsynced.
const BATCH: usize = 256;
/// Longest time a written entry waits for its fsync.
const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// `prev` of the first entry.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Keys the journal sets itself; an event field with one of these names is
/// stored with a leading underscore instead.
const RESERVED: [&str; 5] = ["seq", "ts", "event", "prev", "hash"];
/// The entry written after entries were lost.
const LOST_EVENT: &str = "journal_entries_lost";
/// Longest last line [`Journal::open`] reads back.
const MAX_LINE: u64 = 1 << 20;
/// Entries between two signed checkpoints, at most.
pub const CHECKPOINT_EVERY: usize = 128;
/// Longest time an entry waits for a signed checkpoint while the node runs.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// The event of a signed checkpoint.
pub const CHECKPOINT_EVENT: &str = "journal_checkpoint";
/// Prefix of every signed message (domain separation).
const SIG_CONTEXT: &[u8] = b"POOL journal checkpoint v1\n";
/// Bytes of an entry's digest listed in a checkpoint (128 bits: a second
/// preimage stays out of reach).
const LEAF_LEN: usize = 16;
/// Keys left out of an entry's leaf: they depend on the lines before it.
const NOT_IN_LEAF: [&str; 2] = ["prev", "hash"];

/// What went wrong opening or reading a journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file could not be opened or created.
    #[error(
        "journal {}: cannot open: {source} (check that the directory exists and that this user may write to it)",
        path.display()
    )]
    Open {
        /// The journal file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file could not be read.
    #[error("journal {}: cannot read: {source}", path.display())]
    Read {
        /// The journal file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The last line of an existing journal is not an intact entry, so the
    /// chain cannot be continued from it.
    #[error(
        "journal {}: cannot continue the chain: {reason}. Run `pool journal verify {}` to see what changed, then move the file aside so that a new journal can start",
        path.display(),
        path.display()
    )]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// What is wrong with the last line.
        reason: String,
    },
    /// [`verify`] was given something other than a regular file.
    #[error("journal {}: not a regular file", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The journal's signing key file cannot be created, read or used.
    #[error("journal signing key {}: {reason}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The public key given to check checkpoints against is malformed.
    #[error("journal public key `{given}` is not 64 hex digits (print it with `pool journal pubkey JOURNAL`)")]
    BadPublicKey {
        /// What was given.
        given: String,
    },
}

/// Counters of a [`Journal`], as [`Journal::stats`] returns them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalStats {
    /// Entries written to the file (including `journal_entries_lost`).
    pub written: u64,
    /// Entries dropped before the writer saw them: the queue was full, or
    /// the writer had stopped.
    pub dropped: u64,
    /// Entries dropped because the file refused the write (full disk, I/O
    /// error).
    pub failed: u64,
    /// Signed checkpoints written (not counted in `written`).
    pub checkpoints: u64,
    /// Bulk entries ([`Journal::record_bulk`]) shed to keep room in the
    /// queue for the others (also counted in `dropped`).
    pub shed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    checkpoints: AtomicU64,
    shed: AtomicU64,
    /// Set on the first drop of a burst, so that it is logged once.
    dropping: AtomicBool,
}

/// A handle on an open journal. Cheap to clone; the file is closed (after a
/// last fsync) when every handle is gone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    public_key: Option<String>,
}

enum Msg {
    Entry(Pending),
    Flush(oneshot::Sender<()>),
    Checkpoint(oneshot::Sender<()>),
}

/// An entry waiting for the writer.
struct Pending {
    event: String,
    fields: Value,
    at: SystemTime,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.shared.path)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Journal {
    /// Opens `path` for appending, creating it with mode 0600 if needed,
    /// continues the chain from its last line, and starts the writer task.
    ///
    /// Refuses ([`JournalError::Corrupt`]) when the last line is not an
    /// intact entry: appending after it would hide the damage.
    ///
    /// # Errors
    ///
    /// [`JournalError::Open`] or [`JournalError::Read`] when the file cannot
    /// be opened or read, [`JournalError::Corrupt`] as above.
    pub async fn open(path: &Path) -> Result<Journal, JournalError> {
        let owned = path.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || Writer::open(&owned))
            .await
            .map_err(|e| JournalError::Open {
                path: path.to_path_buf(),
                source: io::Error::other(e.to_string()),
            })??;
        let public_key = writer.signer.as_ref().map(|s| s.public_hex.clone());
        info!(path = %path.display(), next_seq = writer.seq + 1, signing_key = public_key.as_deref().unwrap_or("none"), "journal opened");
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        tokio::spawn(run_writer(rx, writer, counters.clone(), path.to_path_buf()));
        Ok(Journal {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                tx,
                counters,
                public_key,
            }),
        })
    }

    /// The hex Ed25519 public key that signs this journal's checkpoints
    /// (`None` when the journal is not a regular file, e.g. a pipe).
    #[must_use]
    pub fn public_key(&self) -> Option<&str> {
        self.shared.public_key.as_deref()
    }

    /// Queues an entry that may be shed under load: it is dropped (and
    /// counted in [`JournalStats::shed`]) unless a quarter of the queue is
    /// still free, so that a flood of such entries (aggregated refusals)
    /// can never crowd out the entries [`Journal::record`] queues.
    pub fn record_bulk(&self, event: &str, fields: Value) {
        if self.shared.tx.capacity() < QUEUE / 4 {
            let c = &self.shared.counters;
            c.shed.fetch_add(1, Ordering::Relaxed);
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.record(event, fields);
    }

    /// Waits until every entry recorded before this call is written, then
    /// writes a signed checkpoint covering them and fsyncs. Call it at a
    /// clean shutdown and before rotating the file; the writer also signs
    /// every [`CHECKPOINT_EVERY`] entries and after [`CHECKPOINT_INTERVAL`].
    pub async fn checkpoint(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.tx.send(Msg::Checkpoint(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The journal file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues an entry. Never blocks and never fails: when the queue is
    /// full the entry is dropped and counted in [`JournalStats::dropped`].
    ///
    /// An object's fields are stored at the top level of the entry (a
    /// field named like a journal key, e.g. `seq`, gets a leading
    /// underscore); `null` adds nothing; any other value is stored as
    /// `value`.
    pub fn record(&self, event: &str, fields: Value) {
        let msg = Msg::Entry(Pending {
            event: event.to_owned(),
            fields,
            at: SystemTime::now(),
        });
        if let Err(e) = self.shared.tx.try_send(msg) {
            let c = &self.shared.counters;
            c.dropped.fetch_add(1, Ordering::Relaxed);
            if !c.dropping.swap(true, Ordering::Relaxed) {
                let path = self.shared.path.display();
                match e {
                    TrySendError::Full(_) => warn!(
                        path = %path,
                        "journal queue is full (the disk is too slow); entries are being dropped and counted"
                    ),
                    TrySendError::Closed(_) => error!(
                        path = %path,
                        "journal writer has stopped; entries are being dropped (restart the node to resume the journal)"
                    ),
                }
            }
        }
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> JournalStats {
        let c = &self.shared.counters;
        JournalStats {
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            shed: c.shed.load(Ordering::Relaxed),
        }
    }

    /// Waits until every entry recorded before this call has been written
    /// and fsynced (or dropped, if the disk refused it).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The writer task: batches queued entries, writes them off the runtime's
/// threads, fsyncs at most every [`SYNC_INTERVAL`] or [`BATCH`] entries, and
/// keeps the counters.
async fn run_writer(
    mut rx: mpsc::Receiver<Msg>,
    mut writer: Writer,
    counters: Arc<Counters>,
    path: PathBuf,
) {
    // Entries lost to failed writes since the last successful one.
    let mut lost_failed: u64 = 0;
    // The `dropped` counter as last reported in the file.
    let mut seen_dropped: u64 = 0;
    let mut failing = false;
    let mut unsynced: usize = 0;
    let mut sync_due: Option<tokio::time::Instant> = None;
    // When the oldest entry not yet under a signed checkpoint is owed one.
    let mut checkpoint_due: Option<tokio::time::Instant> = None;
    loop {
        let wake = match (sync_due, checkpoint_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let msg = match wake {
            Some(due) => tokio::select! {
                m = rx.recv() => Some(m),
                () = tokio::time::sleep_until(due) => None,
            },
            None => Some(rx.recv().await),
        };
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut want_checkpoint = false;
        let closed = match msg {
            // A deadline passed with nothing new queued.
            None => false,
            Some(None) => true,
            Some(Some(first)) => {
                let mut next = Some(first);
                while let Some(m) = next {
                    match m {
                        Msg::Entry(p) => batch.push(p),
                        Msg::Flush(w) => waiters.push(w),
                        Msg::Checkpoint(w) => {
                            want_checkpoint = true;
                            waiters.push(w);
                        }
                    }
                    next = if batch.len() < BATCH {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                false
            }
        };
        let real = batch.len() as u64;
        let dropped_now = counters.dropped.load(Ordering::Relaxed);
        let lost_dropped = dropped_now.saturating_sub(seen_dropped);
        let wants_write = real > 0 || !waiters.is_empty() || closed;
        if wants_write && (lost_failed > 0 || lost_dropped > 0) {
            batch.insert(
                0,
                Pending {
                    event: LOST_EVENT.to_owned(),
                    fields: serde_json::json!({"failed": lost_failed, "dropped": lost_dropped}),
                    at: SystemTime::now(),
                },
            );
        }
        let now = tokio::time::Instant::now();
        let checkpoint = want_checkpoint || checkpoint_due.is_some_and(|d| d <= now);
        let sync = closed
            || checkpoint
            || !waiters.is_empty()
            || unsynced + batch.len() >= BATCH
            || sync_due.is_some_and(|d| d <= now);
        let job = tokio::task::spawn_blocking(move || {
            let out = writer.append(batch, sync, checkpoint);
            (writer, out)
        });
        let out;
        (writer, out) = match job.await {
            Ok(r) => r,
            Err(e) => {
                error!(path = %path.display(), error = %e, "journal writer stopped; entries are being dropped (restart the node to resume the journal)");
                return;
            }
        };
        match &out.write_error {
            Some(e) => {
                counters.failed.fetch_add(real, Ordering::Relaxed);
                lost_failed += real;
                if !failing {
                    failing = true;
                    error!(
                        path = %path.display(),
                        error = %e,
                        "journal write failed: free disk space (or fix the I/O error); entries are being dropped and counted until writes succeed"
                    );
                }
            }
            None if out.written > 0 || out.checkpoints > 0 => {
                counters
                    .written
                    .fetch_add(out.written as u64, Ordering::Relaxed);
                counters
                    .checkpoints
                    .fetch_add(out.checkpoints as u64, Ordering::Relaxed);
                if failing {
                    failing = false;
                    info!(path = %path.display(), lost = lost_failed, "journal writes succeed again");
                }
                lost_failed = 0;
                seen_dropped = dropped_now;
                counters.dropping.store(false, Ordering::Relaxed);
            }
            None => {}
        }
        if let Some(e) = &out.sync_error {
            error!(
                path = %path.display(),
                error = %e,
                "journal fsync failed: recent entries may not be on disk; check the disk (dmesg) and run `pool journal verify`"
            );
        }
        if out.synced {
            unsynced = 0;
            sync_due = None;
        } else if out.written + out.checkpoints > 0 {
            unsynced += out.written + out.checkpoints;
            sync_due.get_or_insert(now + SYNC_INTERVAL);
        }
        checkpoint_due = if !writer.uncovered() {
            None
        } else if checkpoint || checkpoint_due.is_none() {
            // New uncovered entries, or a checkpoint that failed: try later.
            Some(now + CHECKPOINT_INTERVAL)
        } else {
            checkpoint_due
        };
        for w in waiters {
            let _ = w.send(());
        }
        if closed {
            return;
        }
    }
}

/// The file and where the chain stands. Moved into blocking threads for I/O.
struct Writer {
    file: File,
    /// `seq` of the last entry in the file (0: none).
    seq: u64,
    /// `hash` of the last entry in the file.
    prev: String,
    /// Length of the file up to the end of the last whole entry.
    good_len: u64,
    /// A regular file (which can be truncated), not a device or a pipe.
    regular: bool,
    /// A failed write left bytes after `good_len` that are still there.
    needs_truncate: bool,
    /// Bytes were written since the last fsync.
    dirty: bool,
    /// Signs checkpoints (regular files only).
    signer: Option<Signer>,
    /// Leaves of the entries written since the last checkpoint.
    leaves: Vec<[u8; LEAF_LEN]>,
    /// `seq` of the first of them.
    cover_from: u64,
}

/// The journal's Ed25519 signing key.
struct Signer {
    pair: Ed25519KeyPair,
    public_hex: String,
}

/// What one [`Writer::append`] did.
struct Outcome {
    written: usize,
    checkpoints: usize,
    write_error: Option<io::Error>,
    synced: bool,
    sync_error: Option<io::Error>,
}

impl Writer {
    fn open(path: &Path) -> Result<Writer, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| JournalError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| JournalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let regular = meta.is_file();
        let mut writer = Writer {
            file,
            seq: 0,
            prev: GENESIS.to_owned(),
            good_len: 0,
            regular,
            needs_truncate: false,
            dirty: false,
            signer: None,
            leaves: Vec::new(),
            cover_from: 1,
        };
        if !regular {
            return Ok(writer);
        }
        writer.signer = Some(load_or_create_signer(&key_path(path))?);
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "journal file is readable by other users; consider `chmod 600`"
            );
        }
        writer.good_len = meta.len();
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let read_err = |source| JournalError::Read {
            path: path.to_path_buf(),
            source,
        };
        let Some(line) = last_line(&writer.file, meta.len()).map_err(read_err)? else {
            return Ok(writer);
        };
        let line = line.map_err(corrupt)?;
        let entry = parse_line(&line)
            .map_err(|r| corrupt(format!("its last line is not a journal entry ({r})")))?;
        if !entry.content_ok {
            return Err(corrupt(
                "its last line was edited (hash does not match its content)".to_owned(),
            ));
        }
        writer.seq = entry.seq;
        writer.prev = hex(&entry.hash);
        // Entries before a restart that no checkpoint signed stay unsigned:
        // signing them now would vouch for whatever the file holds today.
        writer.cover_from = entry.seq.saturating_add(1);
        Ok(writer)
    }

    /// Entries were written that no checkpoint signs yet.
    fn uncovered(&self) -> bool {
        self.signer.is_some() && !self.leaves.is_empty()
    }

    /// Appends `entries` as one write, continuing the chain, then fsyncs if
    /// `sync`. On a failed write nothing of the batch stays in the file and
    /// the chain does not advance.
    /// With `checkpoint`, a signed checkpoint follows the batch when any
    /// entry is unsigned.
    fn append(&mut self, entries: Vec<Pending>, sync: bool, checkpoint: bool) -> Outcome {
        let mut out = Outcome {
            written: 0,
            checkpoints: 0,
            write_error: None,
            synced: false,
            sync_error: None,
        };
        if !entries.is_empty() || (checkpoint && self.uncovered()) {
            match self.write_batch(entries, checkpoint) {
                Ok((n, c)) => {
                    out.written = n;
                    out.checkpoints = c;
                }
                Err(e) => out.write_error = Some(e),
            }
        }
        if sync {
            out.synced = true;
            if self.dirty {
                self.dirty = false;
                out.sync_error = self.file.sync_data().err();
            }
        }
        out
    }

    /// Entries and checkpoints written.
    fn write_batch(
        &mut self,
        entries: Vec<Pending>,
        checkpoint: bool,
    ) -> io::Result<(usize, usize)> {
        if self.needs_truncate {
            self.file.set_len(self.good_len)?;
            self.needs_truncate = false;
        }
        let n = entries.len();
        let mut buf = Vec::with_capacity(n * 256);
        let mut seq = self.seq;
        let mut prev = self.prev.clone();
        let mut leaves = self.leaves.clone();
        let mut cover_from = self.cover_from;
        let mut checkpoints = 0;
        let next = |seq: u64| {
            seq.checked_add(1)
                .ok_or_else(|| io::Error::other("journal seq exhausted; start a new journal"))
        };
        let mut sign = |seq: &mut u64,
                        prev: &mut String,
                        leaves: &mut Vec<[u8; LEAF_LEN]>,
                        cover_from: &mut u64,
                        buf: &mut Vec<u8>|
         -> io::Result<()> {
            if let Some(signer) = &self.signer {
                *seq = next(*seq)?;
                let line = render_checkpoint(*seq, prev, *cover_from, leaves, signer);
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
                leaves.clear();
                *cover_from = *seq + 1;
                checkpoints += 1;
            }
            Ok(())
        };
        for p in entries {
            seq = next(seq)?;
            let (line, hash, leaf) = render(seq, prev, p);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            prev = hash;
            if leaves.is_empty() {
                cover_from = seq;
            }
            leaves.push(leaf);
            if leaves.len() >= CHECKPOINT_EVERY {
                sign(&mut seq, &mut prev, &mut leaves, &mut cover_from, &mut buf)?;
            }
        }
        if checkpoint && !leaves.is_empty() {
            sign(&mut seq, &mut prev, &mut leaves, &mut cover_from, &mut buf)?;
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.write(&buf[done..]) {
                Ok(0) => {
                    self.undo(done);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(k) => {
                    done += k;
                    self.dirty = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.undo(done);
                    return Err(e);
                }
            }
        }
        self.seq = seq;
        self.prev = prev;
        self.leaves = leaves;
        self.cover_from = cover_from;
        self.good_len += buf.len() as u64;
        Ok((n, checkpoints))
    }

    /// Removes the `done` bytes a failed write left behind, or remembers to.
    fn undo(&mut self, done: usize) {
        if done > 0 && self.regular && self.file.set_len(self.good_len).is_err() {
            self.needs_truncate = true;
        }
    }
}

/// Renders one entry: its line in canonical form, its hash and its leaf.
fn render(seq: u64, prev: String, p: Pending) -> (String, String, [u8; LEAF_LEN]) {
    let mut obj = Map::new();
    match p.fields {
        Value::Object(fields) => {
            for (k, v) in fields {
                let k = if RESERVED.contains(&k.as_str()) {
                    format!("_{k}")
                } else {
                    k
                };
                obj.insert(k, v);
            }
        }
        Value::Null => {}
        other => {
            obj.insert("value".to_owned(), other);
        }
    }
    obj.insert("seq".to_owned(), Value::from(seq));
    obj.insert("ts".to_owned(), Value::String(format_ts(p.at)));
    obj.insert("event".to_owned(), Value::String(p.event));
    let leaf = leaf_of(&obj);
    obj.insert("prev".to_owned(), Value::String(prev));
    let hash = hex(&content_hash(&obj));
    obj.insert("hash".to_owned(), Value::String(hash.clone()));
    let mut line = String::new();
    canonical_object(&obj, &mut line);
    (line, hash, leaf)
}

/// Renders a checkpoint signing `leaves` (entries `from_seq` on) as entry
/// `seq`, advancing `prev` to its hash.
fn render_checkpoint(
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
fn signed_message(obj: &Map<String, Value>) -> Vec<u8> {
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

/// An entry's leaf: SHA-256 of its canonical form without `prev` and
/// `hash`, cut to [`LEAF_LEN`] bytes.
fn leaf_of(obj: &Map<String, Value>) -> [u8; LEAF_LEN] {
    let mut s = String::new();
    write_object(
        obj.iter()
            .filter(|(k, _)| !NOT_IN_LEAF.contains(&k.as_str())),
        &mut s,
    );
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; LEAF_LEN];
    out.copy_from_slice(&d.as_ref()[..LEAF_LEN]);
    out
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
/// [`verify_with_key`]).
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

fn key_error(path: &Path, reason: impl Into<String>) -> JournalError {
    JournalError::Key {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a signing key file; `None` when it does not exist.
fn read_signer(path: &Path) -> Result<Option<Signer>, JournalError> {
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

fn signer_from_seed(seed: &[u8; 32]) -> Option<Signer> {
    let pair = Ed25519KeyPair::from_seed_unchecked(seed).ok()?;
    let public_hex = hex(pair.public_key().as_ref());
    Some(Signer { pair, public_hex })
}

/// Loads the journal's signing key, creating it (mode 0600, never
/// overwriting) when missing.
fn load_or_create_signer(path: &Path) -> Result<Signer, JournalError> {
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
struct Wipe([u8; 32]);

impl Drop for Wipe {
    fn drop(&mut self) {
        self.0 = [0u8; 32];
        std::hint::black_box(&self.0);
    }
}

/// SHA-256 over the canonical form of `obj` without its `hash` key.
fn content_hash(obj: &Map<String, Value>) -> [u8; 32] {
    let mut s = String::new();
    write_object(obj.iter().filter(|(k, _)| k.as_str() != "hash"), &mut s);
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compact JSON with object keys sorted, whatever order the map keeps.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => canonical_object(m, out),
    }
}

fn canonical_object(m: &Map<String, Value>, out: &mut String) {
    write_object(m.iter(), out);
}

fn write_object<'a>(items: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut String) {
    let mut items: Vec<_> = items.collect();
    items.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, v)) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(k, out);
        out.push(':');
        canonical(v, out);
    }
    out.push('}');
}

/// A JSON string, escaped the way `serde_json` does.
fn write_str(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let b = c as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX[b >> 4]));
                out.push(char::from(HEX[b & 0xf]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Lowercase hex digits (an even number) to bytes.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    b.chunks(2)
        .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

/// 64 lowercase hex digits to 32 bytes.
fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// RFC 3339 UTC with milliseconds, e.g. `2024-02-29T12:34:56.789Z`.
fn format_ts(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// The last line of a file of length `len`, without its newline: `None` for
/// an empty file, `Some(Err(reason))` when the file does not end in a whole
/// line.
fn last_line(file: &File, len: u64) -> io::Result<Option<Result<Vec<u8>, String>>> {
    if len == 0 {
        return Ok(None);
    }
    let mut end = [0u8; 1];
    file.read_exact_at(&mut end, len - 1)?;
    if end[0] != b'\n' {
        return Ok(Some(Err(
            "its last line is incomplete (a write was cut short, or the file was edited)"
                .to_owned(),
        )));
    }
    let line_end = len - 1;
    let mut start = line_end;
    let mut line = Vec::new();
    while start > 0 {
        if line_end - start > MAX_LINE {
            return Ok(Some(Err("its last line is longer than 1 MiB".to_owned())));
        }
        let n = start.min(64 * 1024);
        let from = start - n;
        let mut chunk = vec![0u8; n as usize];
        file.read_exact_at(&mut chunk, from)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            line.splice(0..0, chunk[pos + 1..].iter().copied());
            break;
        }
        line.splice(0..0, chunk);
        start = from;
    }
    if line.is_empty() {
        return Ok(Some(Err("it ends with an empty line".to_owned())));
    }
    Ok(Some(Ok(line)))
}

/// One line that parsed as an entry.
struct Parsed {
    seq: u64,
    prev: [u8; 32],
    hash: [u8; 32],
    /// `hash` matches the content.
    content_ok: bool,
    /// The line's bytes are the canonical form of its content.
    canonical_ok: bool,
    /// The entry's digest as a checkpoint lists it.
    leaf: [u8; LEAF_LEN],
    /// Set when the entry is a checkpoint: what it signs, or why it is
    /// malformed.
    checkpoint: Option<Result<Checkpoint, &'static str>>,
}

/// A checkpoint's signed content.
struct Checkpoint {
    key: [u8; 32],
    from_seq: u64,
    to_seq: u64,
    leaves: Vec<[u8; LEAF_LEN]>,
    /// The signature verifies under `key`.
    signature_ok: bool,
}

fn parse_checkpoint(obj: &Map<String, Value>) -> Result<Checkpoint, &'static str> {
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

/// Parses one line (without its newline); `Err` says why it is not an entry.
fn parse_line(line: &[u8]) -> Result<Parsed, &'static str> {
    if line.is_empty() {
        return Err("empty line");
    }
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8")?;
    let value: Value = serde_json::from_str(text).map_err(|_| "invalid JSON")?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object");
    };
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("no \"seq\" number")?;
    if !obj.get("ts").is_some_and(Value::is_string) {
        return Err("no \"ts\" string");
    }
    let Some(event) = obj.get("event").and_then(Value::as_str) else {
        return Err("no \"event\" string");
    };
    let digest = |key| obj.get(key).and_then(Value::as_str).and_then(unhex32);
    let prev = digest("prev").ok_or("no \"prev\" SHA-256")?;
    let hash = digest("hash").ok_or("no \"hash\" SHA-256")?;
    let content_ok = content_hash(&obj) == hash;
    let mut again = String::with_capacity(text.len());
    canonical_object(&obj, &mut again);
    let checkpoint = (event == CHECKPOINT_EVENT).then(|| parse_checkpoint(&obj));
    Ok(Parsed {
        seq,
        prev,
        hash,
        content_ok,
        canonical_ok: again == text,
        leaf: leaf_of(&obj),
        checkpoint,
    })
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The file checked.
    pub path: PathBuf,
    /// Lines that parsed as entries (intact or not), checkpoints included.
    pub entries: u64,
    /// `seq` of the first entry line, if any.
    pub first_seq: Option<u64>,
    /// `seq` of the last entry line, if any.
    pub last_seq: Option<u64>,
    /// `hash` of the last entry line. Keep it elsewhere: lines cut off the
    /// end of the file can only be detected against it.
    pub last_hash: Option<String>,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The hex key the checkpoints are signed with (the one given to
    /// [`verify_with_key`], or else the one the first checkpoint names).
    pub signing_key: Option<String>,
    /// Whether `signing_key` was given by the caller (pinned) rather than
    /// read from the file itself.
    pub key_pinned: bool,
    /// Entries no valid checkpoint signs, as line ranges with the reason,
    /// e.g. `lines 130-141: after the last checkpoint`. Only the unkeyed
    /// chain protects them. Not problems: a running node always has some.
    pub unsigned: Vec<String>,
    /// Every problem found, in line order, one per line at most, e.g.
    /// `line 7: edited (hash does not match its content)`. Empty when the
    /// chain is intact.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// No problems were found.
    #[must_use]
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.path.display())?;
        match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => write!(f, "{} entries, seq {a} to {b}", self.entries)?,
            _ => write!(f, "no entries")?,
        }
        match &self.signing_key {
            Some(k) => write!(
                f,
                "\n{} signed checkpoint(s), key {k}{}",
                self.checkpoints,
                if self.key_pinned {
                    " (as given)"
                } else {
                    " (named by the file itself: pass --key with the key you kept to rule out a forged file)"
                }
            )?,
            None => write!(
                f,
                "\nno signed checkpoint: only the unkeyed hash chain protects this file"
            )?,
        }
        for u in &self.unsigned {
            write!(f, "\n  unsigned: {u}")?;
        }
        if self.problems.is_empty() {
            write!(f, "\nthe chain and its checkpoints are intact")?;
            if let Some(h) = &self.last_hash {
                write!(
                    f,
                    "\nlast hash {h}\n(keep it elsewhere: lines removed from the end can only be detected against it)"
                )?;
            }
            return Ok(());
        }
        write!(f, "\n{} problem(s):", self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        write!(
            f,
            "\nThese lines were edited, removed or reordered after they were written, or a write was cut short. \
             Keep this file as evidence and compare it with your backups; to start a new journal, move it aside and restart the node."
        )
    }
}

/// [`verify_with_key`] without a pinned key: checkpoints are checked
/// against the key the file's first checkpoint names.
///
/// # Errors
///
/// As [`verify_with_key`].
pub fn verify(path: &Path) -> Result<VerifyReport, JournalError> {
    verify_with_key(path, None)
}

/// Checks a journal file: every line is an entry, every hash matches its
/// line, `seq` rises by exactly 1, every `prev` is the previous entry's
/// hash, every checkpoint's signature verifies under `key` (hex Ed25519,
/// from `pool journal pubkey`; `None`: the key the first checkpoint names)
/// and every entry a checkpoint signed still matches it. Problems are
/// reported, not returned as errors; `Err` only when the file cannot be
/// read or `key` is malformed.
///
/// With a key given, a file with entries but no checkpoint signed by it
/// is a problem (a file rewritten from scratch has none).
///
/// # Errors
///
/// [`JournalError::Read`] when the file cannot be read,
/// [`JournalError::NotAFile`] when `path` is not a regular file,
/// [`JournalError::BadPublicKey`] when `key` is not 64 hex digits.
pub fn verify_with_key(path: &Path, key: Option<&str>) -> Result<VerifyReport, JournalError> {
    use std::collections::btree_map::{BTreeMap, Entry};

    let pinned = match key {
        Some(k) => Some(unhex32(k.trim()).ok_or_else(|| JournalError::BadPublicKey {
            given: k.to_owned(),
        })?),
        None => None,
    };
    let read_err = |source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(JournalError::NotAFile {
            path: path.to_path_buf(),
        });
    }

    // Pass 1: parse every line; note where each seq first appears.
    let mut lines: Vec<Result<Parsed, String>> = Vec::new();
    let mut by_seq: BTreeMap<u64, (usize, [u8; 32])> = BTreeMap::new();
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(read_err)? == 0 {
            break;
        }
        let whole = buf.last() == Some(&b'\n');
        if whole {
            buf.pop();
        }
        let n = lines.len() + 1;
        let parsed = match parse_line(&buf) {
            Ok(_) if !whole => Err("incomplete (the file does not end with a newline)".to_owned()),
            Ok(p) => {
                if let Entry::Vacant(v) = by_seq.entry(p.seq) {
                    v.insert((n, p.hash));
                }
                Ok(p)
            }
            Err(r) => Err(format!("not a journal entry ({r})")),
        };
        lines.push(parsed);
    }

    // Pass 2: walk the entries in file order.
    let mut report = VerifyReport {
        path: path.to_path_buf(),
        entries: 0,
        first_seq: None,
        last_seq: None,
        last_hash: None,
        checkpoints: 0,
        signing_key: pinned.map(|k| hex(&k)),
        key_pinned: pinned.is_some(),
        unsigned: Vec::new(),
        problems: Vec::new(),
    };
    // At most one problem per line, the first found.
    let mut problems: BTreeMap<usize, String> = BTreeMap::new();
    let mut max_seq: Option<u64> = None;
    let mut prev_seq: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let p = match line {
            Ok(p) => p,
            Err(r) => {
                problems.insert(n, r.clone());
                continue;
            }
        };
        report.entries += 1;
        report.first_seq.get_or_insert(p.seq);
        report.last_seq = Some(p.seq);
        report.last_hash = Some(hex(&p.hash));
        let s = p.seq;
        let problem = if !p.content_ok {
            Some("edited (hash does not match its content)".to_owned())
        } else if !p.canonical_ok {
            Some("edited (reformatted; its content still matches its hash)".to_owned())
        } else if let Some(&(m, _)) = by_seq.get(&s).filter(|(m, _)| *m != n) {
            Some(format!("duplicate (seq {s} is also on line {m})"))
        } else {
            let expected = max_seq.map_or(1, |m| m.saturating_add(1));
            let after = prev_seq.map_or_else(|| "the start".to_owned(), |t| t.to_string());
            if s == expected {
                if s == 1 {
                    (p.prev != [0u8; 32])
                        .then(|| "chain broken (the first entry's prev is not zero)".to_owned())
                } else {
                    match by_seq.get(&(s - 1)) {
                        Some((m, h)) if *h != p.prev => {
                            Some(format!("chain broken (prev does not match line {m})"))
                        }
                        _ => None,
                    }
                }
            } else if s > expected {
                if by_seq.range(expected..s).next().is_some() {
                    Some(format!("out of order (seq {s} after {after})"))
                } else if s - expected == 1 {
                    Some(format!("entry seq {expected} missing before it (removed?)"))
                } else {
                    Some(format!(
                        "entries seq {expected} to {} missing before it (removed?)",
                        s - 1
                    ))
                }
            } else {
                Some(format!("out of order (seq {s} after {after})"))
            }
        };
        if let Some(problem) = problem {
            problems.insert(n, problem);
        }
        max_seq = Some(max_seq.map_or(s, |m| m.max(s)));
        prev_seq = Some(s);
    }

    // Pass 3: checkpoints. The first line of each seq is the one checked.
    let mut key = pinned;
    let line_of = |seq: u64| by_seq.get(&seq).map(|(m, _)| *m);
    // seq -> whether a valid checkpoint signed it.
    let mut signed: std::collections::HashSet<u64> = std::collections::HashSet::new();
    // Line numbers of checkpoints whose signature and range are good.
    let mut valid: std::collections::HashSet<usize> = std::collections::HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let Ok(p) = line else { continue };
        let Some(cp) = &p.checkpoint else { continue };
        let cp = match cp {
            Ok(cp) => cp,
            Err(r) => {
                problems
                    .entry(n)
                    .or_insert_with(|| format!("checkpoint malformed ({r})"));
                continue;
            }
        };
        let want = *key.get_or_insert(cp.key);
        let problem = if cp.key != want {
            Some(if pinned.is_some() {
                format!(
                    "checkpoint signed by key {}, not by the key given",
                    hex(&cp.key)
                )
            } else {
                format!(
                    "checkpoint signed by key {}, earlier ones by {} (was the key file replaced?)",
                    hex(&cp.key),
                    hex(&want)
                )
            })
        } else if !cp.signature_ok {
            Some(
                "checkpoint signature does not verify (the checkpoint was forged or edited)"
                    .to_owned(),
            )
        } else if cp.to_seq.checked_add(1) != Some(p.seq)
            || cp.to_seq.saturating_add(1).saturating_sub(cp.from_seq) != cp.leaves.len() as u64
            || cp.from_seq > p.seq
        {
            Some(
                "checkpoint malformed (its range does not match its place or its leaves)"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(problem) = problem {
            problems.entry(n).or_insert(problem);
            continue;
        }
        report.checkpoints += 1;
        valid.insert(n);
        for (j, leaf) in cp.leaves.iter().enumerate() {
            let s = cp.from_seq + j as u64;
            signed.insert(s);
            let Some(m) = line_of(s) else { continue };
            if let Some(Ok(e)) = lines.get(m - 1) {
                if e.leaf != *leaf {
                    problems.entry(m).or_insert_with(|| {
                        format!("edited (does not match what the checkpoint on line {n} signed)")
                    });
                }
            }
        }
    }
    report.signing_key = key.map(|k| hex(&k));
    let any_checkpoint = lines
        .iter()
        .any(|l| matches!(l, Ok(p) if p.checkpoint.is_some()));
    if pinned.is_some() && report.entries > 0 && !any_checkpoint {
        problems.entry(1).or_insert_with(|| {
            "no checkpoint signed by the key given in the whole file (rewritten from scratch? \
             a journal younger than a minute may have none yet)"
                .to_owned()
        });
    }

    // Unsigned ranges: entries (not checkpoints) no valid checkpoint signed.
    let checkpoint_lines: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, Ok(p) if p.checkpoint.is_some()))
        .map(|(i, _)| i + 1)
        .collect();
    let mut run: Option<(usize, usize)> = None;
    let mut runs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let unsigned = matches!(line, Ok(p) if p.checkpoint.is_none() && !signed.contains(&p.seq));
        match (unsigned, run) {
            (true, Some((a, b))) if b + 1 == n => run = Some((a, n)),
            (true, _) => {
                if let Some(r) = run.take() {
                    runs.push(r);
                }
                run = Some((n, n));
            }
            (false, _) => {
                if let Some(r) = run.take() {
                    runs.push(r);
                }
            }
        }
    }
    runs.extend(run);
    for (a, b) in runs {
        let lines = if a == b {
            format!("line {a}")
        } else {
            format!("lines {a}-{b}")
        };
        let why = match checkpoint_lines.iter().find(|&&c| c > b) {
            None => "after the last checkpoint (recent, or the node stopped without one)".to_owned(),
            Some(c) if valid.contains(c) => {
                "before a checkpoint that does not sign them (the node restarted without a clean stop)"
                    .to_owned()
            }
            Some(c) => format!("the checkpoint on line {c} that follows them is not valid"),
        };
        report.unsigned.push(format!("{lines}: {why}"));
    }
    report.problems = problems
        .into_iter()
        .map(|(n, p)| format!("line {n}: {p}"))
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(format_ts(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_ts(at(1_709_210_096, 789)),
            "2024-02-29T12:34:56.789Z"
        );
        assert_eq!(format_ts(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            format_ts(at(4_102_444_799, 999)),
            "2099-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn canonical_matches_serde_json_sorted() {
        assert_eq!(GENESIS.len(), 64);
        let v = serde_json::json!({
            "z": [1, -2, 3.5, 1e300, null, true],
            "a": {"y": "q\"\\\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é/", "b": {}},
            "m": u64::MAX,
        });
        let mut s = String::new();
        canonical(&v, &mut s);
        // serde_json without `preserve_order` keeps keys sorted.
        assert_eq!(s, serde_json::to_string(&v).unwrap());
        let back: Value = serde_json::from_str(&s).unwrap();
        let mut again = String::new();
        canonical(&back, &mut again);
        assert_eq!(s, again);
    }

    #[test]
    fn reserved_field_names_are_kept_aside() {
        let p = Pending {
            event: "e".into(),
            fields: serde_json::json!({"seq": 99, "hash": "x", "peer": "k"}),
            at: UNIX_EPOCH,
        };
        let (line, hash, _) = render(1, GENESIS.to_owned(), p);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["_seq"], 99);
        assert_eq!(v["_hash"], "x");
        assert_eq!(v["hash"], hash.as_str());
        let parsed = parse_line(line.as_bytes()).unwrap();
        assert!(parsed.content_ok && parsed.canonical_ok);
    }

    fn temp(name: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "pool-journal-unit-{name}-{}-{nanos}",
            std::process::id()
        ))
    }

    fn pending(i: u64) -> Pending {
        Pending {
            event: "test".into(),
            fields: serde_json::json!({ "i": i }),
            at: SystemTime::now(),
        }
    }

    /// A failed write leaves the file and the chain as they were; the next
    /// good write continues the chain.
    #[test]
    fn failed_write_does_not_advance_chain() {
        let path = temp("fail");
        let mut w = Writer::open(&path).unwrap();
        let out = w.append(vec![pending(1), pending(2)], true, false);
        assert!(out.write_error.is_none() && out.written == 2);
        let good = w.good_len;
        // Swap in a read-only handle: writes fail with EBADF.
        let writable = std::mem::replace(&mut w.file, File::open(&path).unwrap());
        let out = w.append(vec![pending(3), pending(4)], true, false);
        assert!(out.write_error.is_some());
        assert_eq!((w.seq, w.good_len), (2, good));
        w.file = writable;
        let out = w.append(vec![pending(5)], true, false);
        assert!(out.write_error.is_none());
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report}");
        assert_eq!(report.last_seq, Some(3));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(key_path(&path));
    }
}
