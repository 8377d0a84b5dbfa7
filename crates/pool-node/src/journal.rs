//! The change journal: an append-only, hash-chained log of what an auditor
//! asks about (sessions opened and closed, refused handshakes, config
//! reloads, key changes, resumes).
//!
//! Each line is one JSON object with these keys, plus the event's own fields:
//!
//! - `seq`: 1 for the first entry of a file, then +1 per entry;
//! - `ts`: when the event was recorded, RFC 3339 UTC with milliseconds;
//! - `event`: what happened (`session_opened`, `config_reloaded`, ...);
//! - `prev`: the previous entry's `hash` (64 zeros for the first entry);
//! - `hash`: hex SHA-256 of the entry's canonical form without `hash`.
//!
//! The canonical form is compact JSON with object keys sorted bytewise at
//! every level, and lines are written in that form, so a line's bytes are
//! fixed by its content. Editing a line breaks its `hash`; editing it and
//! recomputing the hash breaks the next line's `prev`; removing or
//! reordering lines breaks the `seq` run. [`verify`] names the line.
//!
//! What the chain cannot show on its own: lines cut off the *end* of the
//! file, or a whole file rewritten from scratch. Keep the last hash that
//! `pool journal verify` prints somewhere else to detect those.
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
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
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
}

enum Msg {
    Entry(Pending),
    Flush(oneshot::Sender<()>),
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
        info!(path = %path.display(), next_seq = writer.seq + 1, "journal opened");
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        tokio::spawn(run_writer(rx, writer, counters.clone(), path.to_path_buf()));
        Ok(Journal {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                tx,
                counters,
            }),
        })
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
    loop {
        let msg = match sync_due {
            Some(due) => tokio::select! {
                m = rx.recv() => Some(m),
                () = tokio::time::sleep_until(due) => None,
            },
            None => Some(rx.recv().await),
        };
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let closed = match msg {
            // The fsync deadline passed with nothing new queued.
            None => false,
            Some(None) => true,
            Some(Some(first)) => {
                let mut next = Some(first);
                while let Some(m) = next {
                    match m {
                        Msg::Entry(p) => batch.push(p),
                        Msg::Flush(w) => waiters.push(w),
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
        let sync = closed
            || !waiters.is_empty()
            || unsynced + batch.len() >= BATCH
            || sync_due.is_some_and(|d| d <= now);
        let job = tokio::task::spawn_blocking(move || {
            let out = writer.append(batch, sync);
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
            None if out.written > 0 => {
                counters
                    .written
                    .fetch_add(out.written as u64, Ordering::Relaxed);
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
        } else if out.written > 0 {
            unsynced += out.written;
            sync_due.get_or_insert(now + SYNC_INTERVAL);
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
}

/// What one [`Writer::append`] did.
struct Outcome {
    written: usize,
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
        };
        if !regular {
            return Ok(writer);
        }
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
        Ok(writer)
    }

    /// Appends `entries` as one write, continuing the chain, then fsyncs if
    /// `sync`. On a failed write nothing of the batch stays in the file and
    /// the chain does not advance.
    fn append(&mut self, entries: Vec<Pending>, sync: bool) -> Outcome {
        let mut out = Outcome {
            written: 0,
            write_error: None,
            synced: false,
            sync_error: None,
        };
        if !entries.is_empty() {
            match self.write_batch(entries) {
                Ok(n) => out.written = n,
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

    fn write_batch(&mut self, entries: Vec<Pending>) -> io::Result<usize> {
        if self.needs_truncate {
            self.file.set_len(self.good_len)?;
            self.needs_truncate = false;
        }
        let n = entries.len();
        let mut buf = Vec::with_capacity(n * 256);
        let mut seq = self.seq;
        let mut prev = self.prev.clone();
        for p in entries {
            seq = seq
                .checked_add(1)
                .ok_or_else(|| io::Error::other("journal seq exhausted; start a new journal"))?;
            let (line, hash) = render(seq, prev, p);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            prev = hash;
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
        self.good_len += buf.len() as u64;
        Ok(n)
    }

    /// Removes the `done` bytes a failed write left behind, or remembers to.
    fn undo(&mut self, done: usize) {
        if done > 0 && self.regular && self.file.set_len(self.good_len).is_err() {
            self.needs_truncate = true;
        }
    }
}

/// Renders one entry: its line in canonical form and its hash.
fn render(seq: u64, prev: String, p: Pending) -> (String, String) {
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
    obj.insert("prev".to_owned(), Value::String(prev));
    let hash = hex(&content_hash(&obj));
    obj.insert("hash".to_owned(), Value::String(hash.clone()));
    let mut line = String::new();
    canonical_object(&obj, &mut line);
    (line, hash)
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
fn civil_from_days(z: i64) -> (i64, u32, u32) {
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
    if !obj.get("event").is_some_and(Value::is_string) {
        return Err("no \"event\" string");
    }
    let digest = |key| obj.get(key).and_then(Value::as_str).and_then(unhex32);
    let prev = digest("prev").ok_or("no \"prev\" SHA-256")?;
    let hash = digest("hash").ok_or("no \"hash\" SHA-256")?;
    let content_ok = content_hash(&obj) == hash;
    let mut again = String::with_capacity(text.len());
    canonical_object(&obj, &mut again);
    Ok(Parsed {
        seq,
        prev,
        hash,
        content_ok,
        canonical_ok: again == text,
    })
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The file checked.
    pub path: PathBuf,
    /// Lines that parsed as entries (intact or not).
    pub entries: u64,
    /// `seq` of the first entry line, if any.
    pub first_seq: Option<u64>,
    /// `seq` of the last entry line, if any.
    pub last_seq: Option<u64>,
    /// `hash` of the last entry line. Keep it elsewhere: lines cut off the
    /// end of the file can only be detected against it.
    pub last_hash: Option<String>,
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
        if self.problems.is_empty() {
            write!(f, "; the chain is intact")?;
            if let Some(h) = &self.last_hash {
                write!(
                    f,
                    "\nlast hash {h}\n(keep it elsewhere: lines removed from the end can only be detected against it)"
                )?;
            }
            return Ok(());
        }
        write!(f, "; {} problem(s):", self.problems.len())?;
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

/// Checks a journal file: every line is an entry, every hash matches its
/// line, `seq` rises by exactly 1 and every `prev` is the previous entry's
/// hash. Problems are reported, not returned as errors; `Err` only when the
/// file cannot be read.
///
/// # Errors
///
/// [`JournalError::Read`] when the file cannot be read,
/// [`JournalError::NotAFile`] when `path` is not a regular file.
pub fn verify(path: &Path) -> Result<VerifyReport, JournalError> {
    use std::collections::btree_map::{BTreeMap, Entry};

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
        problems: Vec::new(),
    };
    let mut max_seq: Option<u64> = None;
    let mut prev_seq: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let p = match line {
            Ok(p) => p,
            Err(r) => {
                report.problems.push(format!("line {n}: {r}"));
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
            report.problems.push(format!("line {n}: {problem}"));
        }
        max_seq = Some(max_seq.map_or(s, |m| m.max(s)));
        prev_seq = Some(s);
    }
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
        let (line, hash) = render(1, GENESIS.to_owned(), p);
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
        let out = w.append(vec![pending(1), pending(2)], true);
        assert!(out.write_error.is_none() && out.written == 2);
        let good = w.good_len;
        // Swap in a read-only handle: writes fail with EBADF.
        let writable = std::mem::replace(&mut w.file, File::open(&path).unwrap());
        let out = w.append(vec![pending(3), pending(4)], true);
        assert!(out.write_error.is_some());
        assert_eq!((w.seq, w.good_len), (2, good));
        w.file = writable;
        let out = w.append(vec![pending(5)], true);
        assert!(out.write_error.is_none());
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report}");
        assert_eq!(report.last_seq, Some(3));
        let _ = std::fs::remove_file(&path);
    }
}
