//! The [`Journal`] handle and its writer task: entries are queued, then
//! appended, chained, fsynced in batches and signed by checkpoints.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::canonical::hex;
use crate::checkpoint::{
    key_path, load_or_create_signer, render_checkpoint, Signer, CHECKPOINT_EVERY,
    CHECKPOINT_INTERVAL,
};
use crate::record::{parse_line, render, Pending, GENESIS, LEAF_LEN};
use crate::{Event, JournalConfig, JournalError};

mod rotate;

/// Entries that may wait for the writer before [`Journal::record`] drops.
const QUEUE: usize = 4096;
/// Most entries written per batch, and most entries left unsynced.
const BATCH: usize = 256;
/// Longest time a written entry waits for its fsync.
const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// The entry written after entries were lost.
const LOST_EVENT: &str = Event::JournalEntriesLost.name();
/// Longest last line [`Journal::open`] reads back.
const MAX_LINE: u64 = 1 << 20;

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
    /// Times the file was sealed and a new one started ([`Journal::rotate`]
    /// or the size set with [`JournalConfig::rotate_at_bytes`]).
    pub rotations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    checkpoints: AtomicU64,
    shed: AtomicU64,
    rotations: AtomicU64,
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
    Rotate(oneshot::Sender<Result<Option<PathBuf>, String>>),
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
        Journal::open_with(path, JournalConfig::default()).await
    }

    /// [`Journal::open`], kept as `config` says (rotation by size). An
    /// empty or missing file whose directory holds sealed files of it
    /// (`FILE.000001`, ...) continues the chain of the newest one.
    ///
    /// # Errors
    ///
    /// As [`Journal::open`]; [`JournalError::Corrupt`] also when the newest
    /// sealed file's last line is not an intact entry.
    pub async fn open_with(path: &Path, config: JournalConfig) -> Result<Journal, JournalError> {
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
        tokio::spawn(run_writer(
            rx,
            writer,
            counters.clone(),
            path.to_path_buf(),
            config,
        ));
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
    pub fn record_bulk(&self, event: Event, fields: Value) {
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

    /// Seals the file and starts a new one that continues its chain: every
    /// entry recorded before this call goes to the sealed file (after a
    /// checkpoint signing them), every later one to the new file, in
    /// order; none is lost while it happens. The sealed file is renamed to
    /// the next number of the series ([`sealed_path`](crate::sealed_path):
    /// `FILE.000001`, `FILE.000002`, ...) and the new file's first line is
    /// a `journal_continued` entry chained to its last hash.
    ///
    /// `Ok(None)` when there was nothing to seal (an empty file, or not a
    /// regular file).
    ///
    /// # Errors
    ///
    /// [`JournalError::Rotate`] when the rotation failed (the file is kept
    /// and written to as before), or the writer has stopped.
    pub async fn rotate(&self) -> Result<Option<PathBuf>, JournalError> {
        let err = |reason: String| JournalError::Rotate {
            path: self.shared.path.clone(),
            reason,
        };
        let (tx, rx) = oneshot::channel();
        if self.shared.tx.send(Msg::Rotate(tx)).await.is_err() {
            return Err(err("the journal writer has stopped".to_owned()));
        }
        match rx.await {
            Ok(r) => r.map_err(err),
            Err(_) => Err(err("the journal writer has stopped".to_owned())),
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
    ///
    /// The journal's own events ([`Event::is_internal`]) are refused (an
    /// error is logged): a line that looks like a checkpoint but is not one
    /// would read as tampering to every later `pool journal verify`.
    pub fn record(&self, event: Event, fields: Value) {
        if event.is_internal() {
            error!(event = %event, "journal: this event is written by the journal itself; not recorded (a bug in the caller)");
            return;
        }
        let msg = Msg::Entry(Pending {
            event: event.name(),
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
            rotations: c.rotations.load(Ordering::Relaxed),
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
    config: JournalConfig,
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
        let mut rotate_waiter = None;
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
                        // Entries queued after it go to the new file.
                        Msg::Rotate(w) => rotate_waiter = Some(w),
                    }
                    next = if batch.len() < BATCH && rotate_waiter.is_none() {
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
                    event: LOST_EVENT,
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
        let asked = rotate_waiter.is_some();
        let live = path.clone();
        let job = tokio::task::spawn_blocking(move || {
            let out = writer.append(batch, sync, checkpoint);
            let rotated =
                (asked || config.rotation_due(writer.good_len)).then(|| writer.rotate(&live));
            (writer, out, rotated)
        });
        let out;
        let rotated;
        (writer, out, rotated) = match job.await {
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
        match rotated {
            Some(Ok(r)) => {
                if r.is_some() {
                    counters.rotations.fetch_add(1, Ordering::Relaxed);
                    checkpoint_due = None;
                }
                if let Some(w) = rotate_waiter {
                    let _ = w.send(Ok(r));
                }
            }
            Some(Err(e)) => {
                error!(path = %path.display(), error = %e, "journal rotation failed; writing goes on in the same file");
                if let Some(w) = rotate_waiter {
                    let _ = w.send(Err(e.to_string()));
                }
            }
            None => {}
        }
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
        writer.continue_series(path)?;
        if writer.seq > 0 {
            return Ok(writer);
        }
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

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::verify;

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
            event: "test",
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
