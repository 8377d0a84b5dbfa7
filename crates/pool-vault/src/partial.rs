//! The receiving side of one file: a partial file beside the destination,
//! written chunk by checked chunk, synced, then renamed into place.
//!
//! The partial is `.NAME.pool-vault-ROOT16.part` in the destination's
//! directory, so a transfer of the same file (same root hash) finds it
//! again after any interruption. Its chunks are hashed again when it is
//! reopened: only those that still match are kept, so a partial damaged
//! between runs costs a re-send of the damaged chunks, never a wrong file.
//! A partial of another version of the file is removed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::manifest::{chunk_count, chunk_hash, Manifest, CHUNK};
use crate::VaultError;

/// A file being received.
pub struct PartialFile {
    final_path: PathBuf,
    part_path: PathBuf,
    file: File,
    manifest: Manifest,
    have: Vec<bool>,
    written: u64,
    skipped: u64,
    /// Bytes written since the last background flush was started.
    unflushed: u64,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// Written bytes between background flushes: the disk writes while the
/// network goes on, and the final sync has only the tail left.
const FLUSH_EVERY: u64 = 64 << 20;

/// What [`PartialFile::open`] found.
pub enum Opened {
    /// The destination already holds this exact file (its mode and mtime
    /// were set as asked); `skipped` bytes need not be sent.
    Complete {
        /// The file's size.
        skipped: u64,
    },
    /// These chunks are needed.
    Partial(PartialFile),
}

fn part_name(final_path: &Path, root_hex: &str) -> Option<(String, PathBuf)> {
    let name = final_path.file_name()?.to_str()?;
    let prefix = format!(".{name}.pool-vault-");
    let part = final_path.with_file_name(format!("{prefix}{}.part", &root_hex[..16]));
    Some((prefix, part))
}

/// Whether `name` is one of the vault's partial files (hidden from `ls`).
pub fn is_partial_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".pool-vault-") && name.ends_with(".part")
}

/// Sets the permission bits (no set-id bits from a peer) and mtime.
pub fn set_meta(path: &Path, mode: u32, mtime_ns: i64) -> Result<(), VaultError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| VaultError::io(path, e))?;
    let f = File::options()
        .write(true)
        .open(path)
        .map_err(|e| VaultError::io(path, e))?;
    f.set_modified(time_of(mtime_ns))
        .map_err(|e| VaultError::io(path, e))
}

/// Nanoseconds since the epoch as a `SystemTime`.
pub fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// A `SystemTime` as nanoseconds since the epoch.
pub fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

impl PartialFile {
    /// Prepares to receive `manifest` (already checked against its root)
    /// at `final_path`, whose directory exists.
    pub fn open(
        final_path: &Path,
        manifest: Manifest,
        root_hex: &str,
        mode: u32,
        mtime_ns: i64,
    ) -> Result<Opened, VaultError> {
        let io = |e| VaultError::io(final_path, e);
        let same = match std::fs::symlink_metadata(final_path) {
            Ok(m) if m.is_dir() => {
                return Err(VaultError::Refused(format!(
                    "{} is a directory (to push into it, end the destination with /)",
                    final_path.display()
                )))
            }
            Ok(m) if m.is_file() && m.len() == manifest.size => {
                Manifest::of_file(final_path)?.root_hex() == root_hex
            }
            _ => false,
        };
        if same {
            set_meta(final_path, mode, mtime_ns)?;
            return Ok(Opened::Complete {
                skipped: manifest.size,
            });
        }
        let (prefix, part_path) = part_name(final_path, root_hex)
            .ok_or_else(|| VaultError::Refused("a destination needs a file name".into()))?;
        // Partials of other versions of this file are of no use now.
        if let Some(dir) = final_path.parent() {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    if n.starts_with(&prefix) && n.ends_with(".part") && e.path() != part_path {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&part_path)
            .map_err(io)?;
        let count = chunk_count(manifest.size, CHUNK);
        let mut have = vec![false; count as usize];
        let len = file.metadata().map_err(io)?.len();
        if len > manifest.size {
            file.set_len(0).map_err(io)?;
        } else {
            let mut buf = vec![0u8; CHUNK as usize];
            for i in 0..count {
                let n = manifest.chunk_len(i, CHUNK);
                if i * CHUNK + n as u64 > len {
                    break;
                }
                file.read_exact_at(&mut buf[..n], i * CHUNK).map_err(io)?;
                have[i as usize] = chunk_hash(&buf[..n]) == manifest.hashes[i as usize];
            }
        }
        let skipped = have
            .iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .map(|(i, _)| manifest.chunk_len(i as u64, CHUNK) as u64)
            .sum();
        Ok(Opened::Partial(PartialFile {
            final_path: final_path.to_path_buf(),
            part_path,
            file,
            manifest,
            have,
            written: 0,
            skipped,
            unflushed: 0,
            flusher: None,
        }))
    }

    /// The chunks still needed, in order.
    pub fn need(&self) -> Vec<u64> {
        self.have
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// Bytes already there when the partial was opened.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Checks chunk `i` against its hash and writes it. A chunk that does
    /// not match is not written (and is still needed).
    pub fn write(&mut self, i: u64, data: &[u8]) -> Result<(), VaultError> {
        let Some(want) = self.manifest.hashes.get(i as usize) else {
            return Err(VaultError::Protocol(format!("chunk {i} is past the end")));
        };
        if data.len() != self.manifest.chunk_len(i, CHUNK) || chunk_hash(data) != *want {
            return Err(VaultError::Protocol(format!(
                "chunk {i} does not match its hash: not written"
            )));
        }
        self.file
            .write_all_at(data, i * CHUNK)
            .map_err(|e| VaultError::io(&self.part_path, e))?;
        self.have[i as usize] = true;
        self.written += data.len() as u64;
        self.unflushed += data.len() as u64;
        if self.unflushed >= FLUSH_EVERY && self.flusher.as_ref().is_none_or(|h| h.is_finished()) {
            if let Ok(f) = self.file.try_clone() {
                self.unflushed = 0;
                self.flusher = Some(std::thread::spawn(move || {
                    let _ = f.sync_data();
                }));
            }
        }
        Ok(())
    }

    /// Once every chunk is there: sync, set mode and mtime, rename into
    /// place, sync the directory. Returns (written, skipped) bytes.
    pub fn finish(mut self, mode: u32, mtime_ns: i64) -> Result<(u64, u64), VaultError> {
        self.sync()?;
        let dir = self.final_path.parent().map(Path::to_path_buf);
        let ws = self.commit(mode, mtime_ns)?;
        if let Some(d) = dir {
            sync_dir(&d);
        }
        Ok(ws)
    }

    /// Every chunk there: trims and syncs the data (the slow half of
    /// [`PartialFile::finish`], which a batch does for many files at once).
    pub fn sync(&mut self) -> Result<(), VaultError> {
        if let Some(i) = self.have.iter().position(|h| !h) {
            return Err(VaultError::Protocol(format!("chunk {i} never arrived")));
        }
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        let io = |e| VaultError::io(&self.part_path, e);
        self.file.set_len(self.manifest.size).map_err(io)?;
        self.file.sync_all().map_err(io)
    }

    /// After [`PartialFile::sync`]: mode, mtime, rename into place (the
    /// directory is the caller's to sync). Returns (written, skipped).
    pub fn commit(self, mode: u32, mtime_ns: i64) -> Result<(u64, u64), VaultError> {
        drop(self.file);
        set_meta(&self.part_path, mode, mtime_ns)?;
        std::fs::rename(&self.part_path, &self.final_path)
            .map_err(|e| VaultError::io(&self.final_path, e))?;
        Ok((self.written, self.skipped))
    }

    /// Where the file goes.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }
}

/// Syncs a directory (a rename in it), ignoring failure: the data is
/// already synced, and some file systems refuse to sync directories.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Syncs many finished partial files at once, on a few threads: a file
/// system commits concurrent syncs together, so a batch of small files
/// costs about as much as one.
pub fn sync_many(files: &mut [PartialFile]) -> Vec<Result<(), VaultError>> {
    let threads = 8usize.min(files.len().max(1));
    let per = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks_mut(per)
            .map(|group| s.spawn(move || group.iter_mut().map(|f| f.sync()).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Err(VaultError::Protocol("a sync thread failed".into()))]
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("pool-vault-partial-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_partial_resumes_and_a_damaged_chunk_is_needed_again() {
        let d = tmp("resume");
        let data: Vec<u8> = (0..(3 * CHUNK + 10))
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        let m = Manifest::of_reader(&data[..], data.len() as u64, CHUNK).unwrap();
        let root = m.root_hex();
        let dest = d.join("f.bin");
        let chunk =
            |i: u64| &data[(i * CHUNK) as usize..((i * CHUNK) as usize + m.chunk_len(i, CHUNK))];
        let Opened::Partial(mut p) = PartialFile::open(&dest, m.clone(), &root, 0o640, 0).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.need(), vec![0, 1, 2, 3]);
        p.write(0, chunk(0)).unwrap();
        p.write(1, chunk(1)).unwrap();
        assert!(p.write(2, chunk(1)).is_err(), "a wrong chunk was accepted");
        drop(p);
        assert!(
            !dest.exists(),
            "a partial file appeared under the final name"
        );
        // Damage chunk 0 on disk between runs.
        let part = part_name(&dest, &root).unwrap().1;
        let f = OpenOptions::new().write(true).open(&part).unwrap();
        f.write_all_at(b"X", 5).unwrap();
        let Opened::Partial(mut p) =
            PartialFile::open(&dest, m.clone(), &root, 0o640, 1_000_000_000).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.need(), vec![0, 2, 3]);
        assert_eq!(p.skipped(), CHUNK);
        for i in p.need() {
            p.write(i, chunk(i)).unwrap();
        }
        assert_eq!(
            p.finish(0o4755, 1_000_000_000).unwrap(),
            (2 * CHUNK + 10, CHUNK)
        );
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o755,
            "set-id bits from a peer"
        );
        assert_eq!(ns_of(meta.modified().unwrap()), 1_000_000_000);
        assert!(!part.exists());
        // The same file again: complete, nothing needed.
        assert!(matches!(
            PartialFile::open(&dest, m, &root, 0o644, 0).unwrap(),
            Opened::Complete { .. }
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
