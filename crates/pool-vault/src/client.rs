//! The commands: `push`, `pull` and `ls`, each on one stream of a session
//! to the node.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pool_net::{Preamble, RecvStream, SecretKey, SendStream, Session};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::manifest::{Manifest, CHUNK};
use crate::partial::{ns_of, Opened, PartialFile};
use crate::paths::VaultPath;
use crate::seal::{Sealer, PLAIN_CHUNK};
use crate::wire::{self, Entry, FileMeta, Frame, Msg};
use crate::{VaultError, SERVICE};

/// What a command did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    /// Files handled.
    pub files: u64,
    /// Files whose bytes (some or all) crossed the wire.
    pub files_sent: u64,
    /// Files already there in full.
    pub files_skipped: u64,
    /// Chunk bytes that crossed the wire.
    pub bytes_sent: u64,
    /// Bytes that were already there, verified, and not sent.
    pub bytes_skipped: u64,
    /// Files whose every chunk and root hash checked out.
    pub verified: u64,
    /// Symbolic links left out (the vault does not carry links).
    pub links_skipped: u64,
}

/// What a command reports as it goes (a progress bar, JSON lines, nothing).
pub trait Progress: Send {
    /// The total bytes, when known up front (a push).
    fn total(&mut self, _bytes: u64) {}
    /// A file starts.
    fn file(&mut self, _path: &str, _size: u64) {}
    /// Bytes were sent or found already there.
    fn advance(&mut self, _bytes: u64) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// Keeps a transfer under a rate (`--bwlimit`): after each chunk, sleeps
/// until the bytes so far fit the rate.
struct Pace {
    limit: Option<u64>,
    start: std::time::Instant,
    bytes: u64,
}

impl Pace {
    fn new(limit: Option<u64>) -> Pace {
        Pace {
            limit: limit.filter(|l| *l > 0),
            start: std::time::Instant::now(),
            bytes: 0,
        }
    }

    async fn after(&mut self, n: u64) {
        let Some(l) = self.limit else { return };
        self.bytes += n;
        let due = std::time::Duration::from_secs_f64(self.bytes as f64 / l as f64);
        let now = self.start.elapsed();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
    }
}

async fn open(session: &Session) -> Result<(RecvStream, SendStream), VaultError> {
    let s = session
        .open_stream()
        .await
        .map_err(|e| VaultError::Net(std::io::Error::other(e.to_string())))?;
    let (r, mut w) = s.into_split();
    w.write_all(&Preamble::for_service(SERVICE).encode())
        .await?;
    Ok((r, w))
}

async fn bye(mut w: SendStream) -> Result<(), VaultError> {
    wire::send_msg(&mut w, &Msg::Bye).await?;
    w.shutdown().await?;
    Ok(())
}

fn remote(m: Msg) -> VaultError {
    match m {
        Msg::Error { message } => VaultError::Remote(message),
        other => VaultError::Protocol(format!("unexpected answer {other:?}")),
    }
}

/// Lists `path` on the node.
pub async fn ls(session: &Session, path: &str) -> Result<Vec<Entry>, VaultError> {
    let (mut r, mut w) = open(session).await?;
    wire::send_msg(
        &mut w,
        &Msg::Ls {
            path: path.to_string(),
        },
    )
    .await?;
    let entries = match wire::read_msg(&mut r).await? {
        Msg::List { entries } => entries,
        other => return Err(remote(other)),
    };
    bye(w).await?;
    Ok(entries)
}

/// One file to push: where it is here, where it goes there.
struct Job {
    local: PathBuf,
    dest: VaultPath,
}

fn jobs(sources: &[PathBuf], dest: &str, report: &mut Report) -> Result<Vec<Job>, VaultError> {
    let base = VaultPath::parse(dest)?;
    let into_dir = sources.len() > 1 || dest.ends_with('/') || sources.iter().any(|s| s.is_dir());
    let mut out = Vec::new();
    for s in sources {
        let m = std::fs::symlink_metadata(s).map_err(|e| VaultError::io(s, e))?;
        let name = s
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| VaultError::Refused(format!("{}: no file name", s.display())))?;
        let top = if into_dir {
            base.join(&name)?
        } else {
            base.clone()
        };
        if m.file_type().is_symlink() {
            report.links_skipped += 1;
        } else if m.is_dir() {
            walk_local(s, &top, &mut out, report)?;
        } else {
            out.push(Job {
                local: s.clone(),
                dest: top,
            });
        }
    }
    Ok(out)
}

fn walk_local(
    dir: &Path,
    at: &VaultPath,
    out: &mut Vec<Job>,
    report: &mut Report,
) -> Result<(), VaultError> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| VaultError::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let m = std::fs::symlink_metadata(&p).map_err(|e| VaultError::io(&p, e))?;
        let d = at.join(&n)?;
        if m.file_type().is_symlink() {
            report.links_skipped += 1;
        } else if m.is_dir() {
            walk_local(&p, &d, out, report)?;
        } else if m.is_file() {
            out.push(Job { local: p, dest: d });
        }
    }
    Ok(())
}

/// A file ready to push: its manifest as stored (sealed or not) and how
/// to produce each stored chunk.
struct Prepared {
    meta: FileMeta,
    manifest: Manifest,
    file: std::fs::File,
    sealer: Option<Sealer>,
}

fn prepare(local: &Path, seal: Option<&SecretKey>) -> Result<Prepared, VaultError> {
    let io = |e| VaultError::io(local, e);
    let md = std::fs::metadata(local).map_err(io)?;
    let file = std::fs::File::open(local).map_err(io)?;
    let (manifest, sealer) = match seal {
        None => (
            Manifest::of_reader(&file, md.len(), CHUNK).map_err(io)?,
            None,
        ),
        Some(key) => {
            let plain = Manifest::of_reader(&file, md.len(), PLAIN_CHUNK).map_err(io)?;
            let s = Sealer::for_file(key, &plain)?;
            let mut hashes = Vec::with_capacity(plain.hashes.len());
            for i in 0..plain.hashes.len() as u64 {
                hashes.push(crate::manifest::chunk_hash(&sealed_chunk(
                    &file,
                    &s,
                    i,
                    md.len(),
                )?));
            }
            (
                Manifest {
                    size: s.sealed_size(),
                    hashes,
                },
                Some(s),
            )
        }
    };
    Ok(Prepared {
        meta: FileMeta {
            size: manifest.size,
            mode: md.permissions().mode() & 0o777,
            mtime_ns: md.modified().map(ns_of).unwrap_or(0),
            root: manifest.root_hex(),
            sealed: sealer.as_ref().map(|s| s.info.clone()),
        },
        manifest,
        file,
        sealer,
    })
}

fn sealed_chunk(
    f: &std::fs::File,
    s: &Sealer,
    i: u64,
    plain_size: u64,
) -> Result<Vec<u8>, VaultError> {
    let n = (plain_size - i * PLAIN_CHUNK).min(PLAIN_CHUNK) as usize;
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, i * PLAIN_CHUNK)?;
    s.seal(i, &buf)
}

impl Prepared {
    fn chunk(&self, i: u64) -> Result<Vec<u8>, VaultError> {
        match &self.sealer {
            Some(s) => sealed_chunk(&self.file, s, i, s.info.plain_size),
            None => {
                let mut buf = vec![0u8; self.manifest.chunk_len(i, CHUNK)];
                self.file.read_exact_at(&mut buf, i * CHUNK)?;
                Ok(buf)
            }
        }
    }
}

/// Pushes `sources` (files or directories, recursively) to `dest` on the
/// node. With `seal`, every chunk is sealed to that key first. Into a
/// directory when there are several sources, a directory among them, or
/// `dest` ends with `/`.
///
/// `bwlimit` caps the rate, in bytes per second.
pub async fn push(
    session: &Session,
    sources: &[PathBuf],
    dest: &str,
    seal: Option<&SecretKey>,
    bwlimit: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<Report, VaultError> {
    let mut pace = Pace::new(bwlimit);
    let mut report = Report::default();
    let jobs = jobs(sources, dest, &mut report)?;
    let total = jobs
        .iter()
        .map(|j| std::fs::metadata(&j.local).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.total(total);
    let (mut r, mut w) = open(session).await?;
    let mut small: Vec<(Job, Prepared)> = Vec::new();
    let mut small_bytes = 0u64;
    for job in jobs {
        let p = prepare(&job.local, seal)?;
        if p.meta.size <= CHUNK {
            small_bytes += p.meta.size;
            small.push((job, p));
            if small.len() == wire::MAX_BATCH || small_bytes >= BATCH_BYTES {
                push_batch(
                    &mut r,
                    &mut w,
                    std::mem::take(&mut small),
                    &mut report,
                    progress,
                )
                .await?;
                small_bytes = 0;
            }
            continue;
        }
        progress.file(&job.dest.to_string(), p.meta.size);
        wire::send_msg(
            &mut w,
            &Msg::Put {
                path: job.dest.to_string(),
                meta: p.meta.clone(),
            },
        )
        .await?;
        wire::send_hashes(&mut w, &p.manifest.hashes).await?;
        let mut sent = 0;
        loop {
            match wire::read_msg(&mut r).await? {
                Msg::Need { ranges } => {
                    let need = wire::from_ranges(&ranges, p.manifest.hashes.len() as u64)?;
                    if sent == 0 {
                        let have = p.meta.size
                            - need
                                .iter()
                                .map(|&i| p.manifest.chunk_len(i, CHUNK) as u64)
                                .sum::<u64>();
                        progress.advance(have);
                    }
                    for i in need {
                        let data = p.chunk(i)?;
                        wire::send_chunk(&mut w, i, &data).await?;
                        sent += data.len() as u64;
                        progress.advance(data.len() as u64);
                        pace.after(data.len() as u64).await;
                    }
                }
                Msg::Done { written, skipped } => {
                    report.files += 1;
                    report.verified += 1;
                    report.bytes_sent += sent;
                    report.bytes_skipped += skipped;
                    if written == 0 && sent == 0 {
                        report.files_skipped += 1;
                        progress.advance(p.meta.size);
                    } else {
                        report.files_sent += 1;
                    }
                    break;
                }
                other => {
                    let e = remote(other);
                    return Err(VaultError::Remote(format!("{}: {e}", job.dest)));
                }
            }
        }
    }
    if !small.is_empty() {
        push_batch(&mut r, &mut w, small, &mut report, progress).await?;
    }
    bye(w).await?;
    Ok(report)
}

/// Small files go in batches of at most this many bytes (and
/// [`wire::MAX_BATCH`] files).
const BATCH_BYTES: u64 = 16 << 20;

/// Pushes small files (one chunk or none each) as one batch.
async fn push_batch(
    r: &mut RecvStream,
    w: &mut SendStream,
    batch: Vec<(Job, Prepared)>,
    report: &mut Report,
    progress: &mut dyn Progress,
) -> Result<(), VaultError> {
    let items = batch
        .iter()
        .map(|(j, p)| wire::BatchItem {
            path: j.dest.to_string(),
            meta: p.meta.clone(),
        })
        .collect();
    let hashes: Vec<_> = batch
        .iter()
        .flat_map(|(_, p)| p.manifest.hashes.iter().copied())
        .collect();
    wire::send_msg(w, &Msg::Batch { items }).await?;
    wire::send_hashes(w, &hashes).await?;
    let (need, mut errors) = match wire::read_msg(r).await? {
        Msg::BatchNeed { need, errors } => (need, errors),
        other => return Err(remote(other)),
    };
    let mut sent = 0;
    for &i in &need {
        let Some((_, p)) = batch.get(i as usize) else {
            return Err(VaultError::Protocol(format!(
                "the server asked for item {i}"
            )));
        };
        let data = p.chunk(0)?;
        wire::send_chunk(w, u64::from(i), &data).await?;
        sent += data.len() as u64;
    }
    let skipped = match wire::read_msg(r).await? {
        Msg::BatchDone {
            skipped, errors: e, ..
        } => {
            errors.extend(e);
            skipped
        }
        other => return Err(remote(other)),
    };
    if let Some((i, m)) = errors.first() {
        let path = batch
            .get(*i as usize)
            .map(|(j, _)| j.dest.to_string())
            .unwrap_or_default();
        return Err(VaultError::Remote(format!("{path}: {m}")));
    }
    let n = batch.len() as u64;
    report.files += n;
    report.verified += n;
    report.files_sent += need.len() as u64;
    report.files_skipped += n - need.len() as u64;
    report.bytes_sent += sent;
    report.bytes_skipped += skipped;
    progress.advance(batch.iter().map(|(_, p)| p.meta.size).sum());
    Ok(())
}

/// Pulls `src` from the node into `dest` (a file's new name, or a
/// directory to put it in; for a directory, where its tree goes). Sealed
/// files are opened with `key`, and refused when sealed to another.
pub async fn pull(
    session: &Session,
    src: &str,
    dest: &Path,
    key: &SecretKey,
    progress: &mut dyn Progress,
) -> Result<Report, VaultError> {
    let mut report = Report::default();
    let (mut r, mut w) = open(session).await?;
    wire::send_msg(
        &mut w,
        &Msg::Get {
            path: src.to_string(),
        },
    )
    .await?;
    let src_name = VaultPath::parse(src)?
        .file_name()
        .unwrap_or("vault")
        .to_string();
    loop {
        let (rel, meta) = match wire::read_msg(&mut r).await? {
            Msg::File { rel, meta } => (rel, meta),
            Msg::End => break,
            other => return Err(remote(other)),
        };
        let hashes = wire::read_hashes(&mut r).await?;
        let manifest = Manifest {
            size: meta.size,
            hashes,
        };
        manifest.check(&meta.root, CHUNK)?;
        let target = local_target(dest, &src_name, &rel)?;
        progress.file(&target.display().to_string(), meta.size);
        let (sent, skipped) =
            receive(&target, manifest, &meta, key, &mut r, &mut w, progress).await?;
        report.files += 1;
        report.verified += 1;
        report.bytes_sent += sent;
        report.bytes_skipped += skipped;
        if sent == 0 {
            report.files_skipped += 1;
        } else {
            report.files_sent += 1;
        }
    }
    bye(w).await?;
    Ok(report)
}

/// Where a pulled file goes here; `rel` is checked as a vault path, so a
/// server cannot send a file out of `dest`.
fn local_target(dest: &Path, src_name: &str, rel: &str) -> Result<PathBuf, VaultError> {
    let mut t = if rel.is_empty() {
        if dest.is_dir() {
            dest.join(src_name)
        } else {
            dest.to_path_buf()
        }
    } else {
        dest.to_path_buf()
    };
    for c in VaultPath::parse(rel)?.components() {
        t.push(c);
    }
    if let Some(dir) = t.parent() {
        std::fs::create_dir_all(dir).map_err(|e| VaultError::io(dir, e))?;
    }
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    target: &Path,
    manifest: Manifest,
    meta: &FileMeta,
    key: &SecretKey,
    r: &mut RecvStream,
    w: &mut SendStream,
    progress: &mut dyn Progress,
) -> Result<(u64, u64), VaultError> {
    let sealer = match &meta.sealed {
        Some(info) => Some(Sealer::for_info(key, info)?),
        None => None,
    };
    // Sealed: the ciphertext goes to a hidden file first, then is opened
    // into place; the plaintext already there in full is left alone.
    let landing = match &sealer {
        None => target.to_path_buf(),
        Some(s) => {
            if std::fs::metadata(target).map(|m| m.len()).ok() == Some(s.info.plain_size)
                && Manifest::of_reader(
                    std::fs::File::open(target).map_err(|e| VaultError::io(target, e))?,
                    s.info.plain_size,
                    PLAIN_CHUNK,
                )
                .map(|m| m.root_hex() == s.info.plain_root)
                .unwrap_or(false)
            {
                wire::send_msg(w, &Msg::Need { ranges: vec![] }).await?;
                progress.advance(meta.size);
                return Ok((0, s.info.plain_size));
            }
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            target.with_file_name(format!(".{name}.pool-vault-sealed"))
        }
    };
    let opened = PartialFile::open(&landing, manifest, &meta.root, 0o600, meta.mtime_ns)?;
    let mut sent = 0;
    let skipped;
    match opened {
        Opened::Complete { skipped: s } => {
            wire::send_msg(w, &Msg::Need { ranges: vec![] }).await?;
            progress.advance(s);
            skipped = s;
            if sealer.is_none() {
                crate::partial::set_meta(target, meta.mode, meta.mtime_ns)?;
            }
        }
        Opened::Partial(mut pf) => {
            let need = pf.need();
            skipped = pf.skipped();
            progress.advance(skipped);
            wire::send_msg(
                w,
                &Msg::Need {
                    ranges: wire::to_ranges(need.iter().copied()),
                },
            )
            .await?;
            for _ in 0..need.len() {
                match wire::read_frame(r).await? {
                    Some(Frame::Chunk(i, d)) => {
                        pf.write(i, &d)?;
                        sent += d.len() as u64;
                        progress.advance(d.len() as u64);
                    }
                    Some(Frame::Msg(m)) => return Err(remote(m)),
                    _ => return Err(VaultError::Protocol("expected a chunk".into())),
                }
            }
            let mode = if sealer.is_some() { 0o600 } else { meta.mode };
            pf.finish(mode, meta.mtime_ns)?;
        }
    }
    if let Some(s) = sealer {
        open_sealed(&landing, target, &s, meta)?;
    }
    Ok((sent, skipped))
}

/// Opens a sealed file into `target` (through a partial name, synced,
/// renamed), checks the plaintext's root, and removes the ciphertext.
fn open_sealed(
    sealed: &Path,
    target: &Path,
    s: &Sealer,
    meta: &FileMeta,
) -> Result<(), VaultError> {
    use std::io::Write;
    let io = |p: &Path, e| VaultError::io(p, e);
    let f = std::fs::File::open(sealed).map_err(|e| io(sealed, e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = target.with_file_name(format!(".{name}.pool-vault-open.part"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?);
    let mut hashes = Vec::new();
    let n = s.info.plain_size.div_ceil(PLAIN_CHUNK);
    let mut off = 0u64;
    for i in 0..n {
        let plain_len = (s.info.plain_size - i * PLAIN_CHUNK).min(PLAIN_CHUNK);
        let mut buf = vec![0u8; plain_len as usize + 16];
        f.read_exact_at(&mut buf, off).map_err(|e| io(sealed, e))?;
        off += buf.len() as u64;
        let plain = s.open(i, &buf)?;
        hashes.push(crate::manifest::chunk_hash(&plain));
        out.write_all(&plain).map_err(|e| io(&tmp, e))?;
    }
    let plain = Manifest {
        size: s.info.plain_size,
        hashes,
    };
    if plain.root_hex() != s.info.plain_root {
        let _ = std::fs::remove_file(&tmp);
        return Err(VaultError::Refused(
            "the opened file does not match its sealed root hash".into(),
        ));
    }
    let out = out.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
    out.sync_all().map_err(|e| io(&tmp, e))?;
    drop(out);
    crate::partial::set_meta(&tmp, meta.mode, meta.mtime_ns)?;
    std::fs::rename(&tmp, target).map_err(|e| io(target, e))?;
    let _ = std::fs::remove_file(sealed);
    Ok(())
}
