//! The writer's side of rotation (the I/O; names and policy are in
//! `series`): sealing the live file under its next number and starting a
//! new live file that continues its chain.
//!
//! The live name always refers to a whole file: the sealed file gets its
//! name as a second hard link first (a link never overwrites), then the
//! new file, written and fsynced under a temporary name, is renamed over
//! the live name. A crash between the two leaves both names on one file;
//! [`Writer::open`] notices and drops the sealed name again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::json;
use tracing::{info, warn};

use super::{last_line, Writer};
use crate::canonical::hex;
use crate::checkpoint::render_checkpoint;
use crate::record::{parse_line, render, Pending};
use crate::series::{next_index, sealed_files, sealed_path, CONTINUED_EVENT};
use crate::JournalError;

/// The names in the live file's directory.
fn dir_names(active: &Path) -> io::Result<Vec<String>> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(n) = entry?.file_name().to_str() {
            names.push(n.to_owned());
        }
    }
    Ok(names)
}

fn sync_dir(active: &Path) -> io::Result<()> {
    match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => File::open(d)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

impl Writer {
    /// The first lines of a file continuing the chain after entry `seq`
    /// with hash `prev` of the sealed file `from_file`: a
    /// `journal_continued` entry and a checkpoint signing it. Advances the
    /// writer's chain state to after them.
    fn continuation(&mut self, from_file: &str) -> io::Result<Vec<u8>> {
        let seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("journal seq exhausted; start a new journal"))?;
        let (line, hash, leaf) = render(
            seq,
            self.prev.clone(),
            Pending {
                event: CONTINUED_EVENT,
                fields: json!({ "from_file": from_file }),
                at: SystemTime::now(),
            },
        );
        let mut buf = line.into_bytes();
        buf.push(b'\n');
        let mut prev = hash;
        let mut last = seq;
        if let Some(signer) = &self.signer {
            last = seq + 1;
            let cp = render_checkpoint(last, &mut prev, seq, &[leaf], signer);
            buf.extend_from_slice(cp.as_bytes());
            buf.push(b'\n');
        }
        self.seq = last;
        self.prev = prev;
        self.leaves.clear();
        self.cover_from = last + 1;
        Ok(buf)
    }

    /// Seals the live file `active` (a checkpoint signing what is unsigned,
    /// an fsync) under its next number and starts a new live file whose
    /// first line continues the chain. `Ok(None)`: nothing to seal (an
    /// empty file, or not a regular file). On an error before the new file
    /// is in place, the live file is left as it was and writing goes on in
    /// it.
    pub(super) fn rotate(&mut self, active: &Path) -> io::Result<Option<PathBuf>> {
        if !self.regular || self.good_len == 0 {
            return Ok(None);
        }
        if self.uncovered() {
            self.write_batch(Vec::new(), true)?;
        }
        self.file.sync_data()?;
        self.dirty = false;
        let sealed = sealed_path(active, next_index(active, dir_names(active)?));
        let from_file = sealed
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        // A link fails rather than replace a file that has the name.
        fs::hard_link(active, &sealed)?;
        let mut tmp_name = active.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".rotating");
        let tmp = active.with_file_name(tmp_name);
        let saved = (self.seq, self.prev.clone(), self.cover_from);
        let started = (|| -> io::Result<(File, u64)> {
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut file = OpenOptions::new()
                .read(true)
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let buf = self.continuation(&from_file)?;
            file.write_all(&buf)?;
            file.sync_data()?;
            fs::rename(&tmp, active)?;
            Ok((file, buf.len() as u64))
        })();
        match started {
            Ok((file, len)) => {
                self.file = file;
                self.good_len = len;
                self.needs_truncate = false;
                if let Err(e) = sync_dir(active) {
                    warn!(path = %active.display(), error = %e, "journal rotated, but the directory's fsync failed");
                }
                info!(path = %active.display(), sealed = %sealed.display(), next_seq = self.seq + 1, "journal rotated");
                Ok(Some(sealed))
            }
            Err(e) => {
                (self.seq, self.prev, self.cover_from) = saved;
                let _ = fs::remove_file(&tmp);
                let _ = fs::remove_file(&sealed);
                Err(e)
            }
        }
    }

    /// At open, for an empty live file: when the directory holds sealed
    /// files of it, continue the chain of the newest one (a rotation that
    /// was cut short, or a live file removed on purpose after it was
    /// sealed). Also undoes a rotation cut short between its two steps.
    pub(super) fn continue_series(&mut self, active: &Path) -> Result<(), JournalError> {
        let read_err = |source| JournalError::Read {
            path: active.to_path_buf(),
            source,
        };
        let names = dir_names(active).map_err(read_err)?;
        let Some((_, newest)) = sealed_files(active, &names).pop() else {
            return Ok(());
        };
        let same_file = match (fs::metadata(active), fs::metadata(&newest)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same_file {
            // Cut short after the link: the live file was never replaced.
            warn!(path = %active.display(), sealed = %newest.display(), "journal: an unfinished rotation is undone");
            fs::remove_file(&newest).map_err(read_err)?;
            return Ok(());
        }
        if self.good_len != 0 {
            return Ok(());
        }
        let corrupt = |reason: String| JournalError::Corrupt {
            path: newest.clone(),
            reason,
        };
        let file = File::open(&newest).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        let Some(line) = last_line(&file, len).map_err(read_err)? else {
            return Ok(());
        };
        let entry = parse_line(&line.map_err(corrupt)?)
            .map_err(|r| corrupt(format!("its last line is not a journal entry ({r})")))?;
        if !entry.content_ok {
            return Err(corrupt(
                "its last line was edited (hash does not match its content)".to_owned(),
            ));
        }
        self.seq = entry.seq;
        self.prev = hex(&entry.hash);
        let from_file = newest
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let buf = self.continuation(&from_file).map_err(read_err)?;
        self.file.write_all(&buf).map_err(read_err)?;
        self.file.sync_data().map_err(read_err)?;
        self.good_len = buf.len() as u64;
        info!(path = %active.display(), continues = %newest.display(), "journal continues its sealed predecessor");
        Ok(())
    }
}
