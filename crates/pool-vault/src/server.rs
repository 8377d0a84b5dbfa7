//! The serving side: a node's `pool.vault` service, one stream at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_net::{PublicKey, RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::manifest::{Manifest, CHUNK};
use crate::partial::{is_partial_name, ns_of, Opened, PartialFile};
use crate::paths::{allowed, resolve, Access, Grant, VaultPath};
use crate::seal::SealInfo;
use crate::wire::{self, Entry, FileMeta, Frame, Msg};
use crate::VaultError;

/// How many times a push may send chunks that do not match before the
/// server gives up on it.
const MAX_ROUNDS: usize = 3;

/// What the service tells the node's journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaultEvent {
    /// A file was stored (or found already stored).
    Write {
        /// Who pushed it.
        peer: PublicKey,
        /// Where.
        path: String,
        /// Bytes written now.
        written: u64,
        /// Bytes already there.
        skipped: u64,
        /// Whether it is sealed.
        sealed: bool,
    },
    /// A request was refused or failed.
    Refused {
        /// Who asked.
        peer: PublicKey,
        /// `ls`, `push` or `pull`.
        op: &'static str,
        /// The path asked for.
        path: String,
        /// Why.
        reason: String,
    },
}

type Sink = Box<dyn Fn(VaultEvent) + Send + Sync>;

/// A vault: a root directory and the grants.
pub struct VaultServer {
    pub(crate) root: PathBuf,
    grants: Vec<Grant>,
    events: Sink,
}

/// A destination's push under way.
struct Claim {
    key: PublicKey,
    id: u64,
    /// Tells that push to stop: the same key is pushing the file again.
    cancel: Arc<Notify>,
    /// Told when it has stopped.
    released: Arc<Notify>,
}

/// The destinations with a push under way, process-wide (a config reload
/// makes a new server while pushes on the old one go on).
static BUSY: std::sync::LazyLock<Mutex<HashMap<PathBuf, Claim>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(1);

/// How long a push in progress may go without a frame before the server
/// gives up on it (longer than a session's resume takes).
const IDLE: Duration = Duration::from_secs(180);

/// How long a push waits for an earlier one of the same file by the same
/// key to stop.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(5);

/// Claims `local` for a push by `peer`. A push of the same destination by
/// the same key takes over (the earlier one, typically from a client that
/// was killed and whose session has not timed out yet, is stopped first);
/// one by another key is refused. Pushes are never interleaved.
pub(crate) async fn claim(local: &Path, peer: &PublicKey) -> Result<(BusyGuard, Arc<Notify>), ()> {
    let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
    loop {
        let released = {
            let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
            match busy.get(local) {
                None => {
                    let id = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
                    let cancel = Arc::new(Notify::new());
                    let released = Arc::new(Notify::new());
                    busy.insert(
                        local.to_path_buf(),
                        Claim {
                            key: *peer,
                            id,
                            cancel: cancel.clone(),
                            released: released.clone(),
                        },
                    );
                    let guard = BusyGuard {
                        local: local.to_path_buf(),
                        id,
                        released,
                    };
                    return Ok((guard, cancel));
                }
                Some(c) if c.key != *peer => return Err(()),
                Some(c) => {
                    c.cancel.notify_one();
                    c.released.clone()
                }
            }
        };
        let wait = released.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        // It may have gone between the unlock and `enable`.
        if !BUSY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(local)
        {
            continue;
        }
        if tokio::time::timeout_at(deadline, wait).await.is_err() {
            return Err(());
        }
    }
}

/// The sidecar that holds a sealed file's [`SealInfo`].
fn seal_sidecar(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.with_file_name(format!(".{name}.pool-vault-seal"))
}

fn is_hidden_name(name: &str) -> bool {
    is_partial_name(name) || (name.starts_with('.') && name.ends_with(".pool-vault-seal"))
}

/// Releases a destination when its push ends, however it ends.
pub(crate) struct BusyGuard {
    local: PathBuf,
    id: u64,
    released: Arc<Notify>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        {
            let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
            if busy.get(&self.local).is_some_and(|c| c.id == self.id) {
                busy.remove(&self.local);
            }
        }
        self.released.notify_waiters();
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, VaultError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VaultError::Protocol(format!("a file task failed: {e}")))
}

impl VaultServer {
    /// A vault at `root` (which must exist) with these grants; `events`
    /// receives every write and refusal.
    pub fn new(
        root: PathBuf,
        grants: Vec<Grant>,
        events: impl Fn(VaultEvent) + Send + Sync + 'static,
    ) -> VaultServer {
        VaultServer {
            root,
            grants,
            events: Box::new(events),
        }
    }

    /// A message for the peer: local paths shown as vault paths, a full
    /// disk said plainly.
    pub(crate) fn tell(&self, e: &VaultError) -> String {
        let s = match e {
            VaultError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                format!("{e} — the vault's disk is full; what was verified is kept: push again when there is room")
            }
            _ => e.to_string(),
        };
        let root = self.root.display().to_string();
        s.replace(&root, "")
    }

    pub(crate) fn refuse(
        &self,
        peer: &PublicKey,
        op: &'static str,
        path: &str,
        reason: String,
    ) -> Msg {
        info!(peer = %peer.short(), op, path, "vault: refused: {reason}");
        (self.events)(VaultEvent::Refused {
            peer: *peer,
            op,
            path: path.to_string(),
            reason: reason.clone(),
        });
        Msg::Error { message: reason }
    }

    pub(crate) fn check(
        &self,
        peer: &PublicKey,
        path: &str,
        need: Access,
        op: &'static str,
    ) -> Result<VaultPath, Box<Msg>> {
        let vp = VaultPath::parse(path)
            .map_err(|e| Box::new(self.refuse(peer, op, path, e.to_string())))?;
        if !allowed(&self.grants, peer, &vp, need) {
            let what = if need == Access::Write {
                "write"
            } else {
                "read"
            };
            return Err(Box::new(self.refuse(
                peer,
                op,
                path,
                format!("key {} has no {what} grant for {vp}", peer.short()),
            )));
        }
        Ok(vp)
    }

    /// Serves one stream until the client says `bye`, ends it, or breaks
    /// the protocol.
    pub async fn serve(
        self: Arc<Self>,
        peer: PublicKey,
        mut recv: RecvStream,
        mut send: SendStream,
    ) {
        let r = self.serve_inner(&peer, &mut recv, &mut send).await;
        match r {
            Ok(()) => {
                let _ = send.shutdown().await;
            }
            Err(e) => {
                debug!(peer = %peer.short(), "vault stream ended: {e}");
                let _ = wire::send_msg(
                    &mut send,
                    &Msg::Error {
                        message: self.tell(&e),
                    },
                )
                .await;
                let _ = send.shutdown().await;
            }
        }
    }

    async fn serve_inner(
        &self,
        peer: &PublicKey,
        recv: &mut RecvStream,
        send: &mut SendStream,
    ) -> Result<(), VaultError> {
        loop {
            let msg = match wire::read_frame(recv).await? {
                None | Some(Frame::Msg(Msg::Bye)) => return Ok(()),
                Some(Frame::Msg(m)) => m,
                Some(_) => return Err(VaultError::Protocol("expected a request".into())),
            };
            match msg {
                Msg::Ls { path } => {
                    let reply = match self.check(peer, &path, Access::Read, "ls") {
                        Err(m) => *m,
                        Ok(vp) => match self.list(&vp) {
                            Ok(entries) => Msg::List { entries },
                            Err(e) => self.refuse(peer, "ls", &path, self.tell(&e)),
                        },
                    };
                    wire::send_msg(send, &reply).await?;
                }
                Msg::Put { path, meta } => {
                    let hashes = wire::read_hashes(recv).await?;
                    self.put(peer, &path, meta, hashes, recv, send).await?;
                }
                Msg::Batch { items } => self.batch(peer, items, recv, send).await?,
                Msg::Get { path } => match self.check(peer, &path, Access::Read, "pull") {
                    Err(m) => wire::send_msg(send, &m).await?,
                    Ok(vp) => self.get(peer, &path, &vp, recv, send).await?,
                },
                other => {
                    return Err(VaultError::Protocol(format!("unexpected {other:?}")));
                }
            }
        }
    }

    fn list(&self, vp: &VaultPath) -> Result<Vec<Entry>, VaultError> {
        let p = resolve(&self.root, vp, false)?;
        let meta = std::fs::symlink_metadata(&p).map_err(|e| VaultError::io(&p, e))?;
        if !meta.is_dir() {
            let name = vp.file_name().unwrap_or("/").to_string();
            return Ok(vec![entry(&p, name, &meta)]);
        }
        let mut out = Vec::new();
        for e in std::fs::read_dir(&p).map_err(|e| VaultError::io(&p, e))? {
            let e = e.map_err(|e| VaultError::io(&p, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if is_hidden_name(&name) {
                continue;
            }
            if let Ok(m) = std::fs::symlink_metadata(e.path()) {
                out.push(entry(&e.path(), name, &m));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn put(
        &self,
        peer: &PublicKey,
        path: &str,
        meta: FileMeta,
        hashes: Vec<crate::manifest::Hash>,
        recv: &mut RecvStream,
        send: &mut SendStream,
    ) -> Result<(), VaultError> {
        let vp = match self.check(peer, path, Access::Write, "push") {
            Ok(vp) => vp,
            Err(m) => return wire::send_msg(send, &m).await,
        };
        let manifest = Manifest {
            size: meta.size,
            hashes,
        };
        manifest.check(&meta.root, CHUNK)?;
        let local = match resolve(&self.root, &vp, true) {
            Ok(p) => p,
            Err(e) => {
                let m = self.refuse(peer, "push", path, self.tell(&e));
                return wire::send_msg(send, &m).await;
            }
        };
        let Ok((_guard, cancel)) = claim(&local, peer).await else {
            let m = self.refuse(
                peer,
                "push",
                path,
                format!("{vp}: another push to it is under way; try again when it is done"),
            );
            return wire::send_msg(send, &m).await;
        };
        let (l, m, root, mode, mtime) = (
            local.clone(),
            manifest,
            meta.root.clone(),
            meta.mode,
            meta.mtime_ns,
        );
        let opened = match blocking(move || PartialFile::open(&l, m, &root, mode, mtime)).await? {
            Ok(o) => o,
            Err(e) => {
                let m = self.refuse(peer, "push", path, self.tell(&e));
                return wire::send_msg(send, &m).await;
            }
        };
        let (written, skipped) = match opened {
            Opened::Complete { skipped } => (0, skipped),
            Opened::Partial(mut pf) => {
                let mut rounds = 0;
                loop {
                    let need = pf.need();
                    if need.is_empty() {
                        break;
                    }
                    rounds += 1;
                    if rounds > MAX_ROUNDS {
                        return Err(VaultError::Protocol(
                            "chunks kept failing their hashes; giving up".into(),
                        ));
                    }
                    wire::send_msg(
                        send,
                        &Msg::Need {
                            ranges: wire::to_ranges(need.iter().copied()),
                        },
                    )
                    .await?;
                    let (p, fatal) = receive_round(pf, need.len(), recv, &cancel).await?;
                    pf = p;
                    if let Some(e) = fatal {
                        let m = self.refuse(peer, "push", path, self.tell(&e));
                        return wire::send_msg(send, &m).await.and(Err(e));
                    }
                }
                match blocking(move || pf.finish(mode, mtime)).await? {
                    Ok(ws) => ws,
                    Err(e) => {
                        let m = self.refuse(peer, "push", path, self.tell(&e));
                        return wire::send_msg(send, &m).await;
                    }
                }
            }
        };
        self.stored(peer, &vp, &local, &meta, written, skipped)?;
        wire::send_msg(send, &Msg::Done { written, skipped }).await
    }

    /// A file is in place: its seal sidecar, the log, the journal.
    pub(crate) fn stored(
        &self,
        peer: &PublicKey,
        vp: &VaultPath,
        local: &Path,
        meta: &FileMeta,
        written: u64,
        skipped: u64,
    ) -> Result<(), VaultError> {
        let side = seal_sidecar(local);
        match &meta.sealed {
            Some(info) => write_sidecar(&side, info)?,
            None => {
                let _ = std::fs::remove_file(&side);
            }
        }
        debug!(peer = %peer.short(), path = %vp, written, skipped, "vault: stored");
        (self.events)(VaultEvent::Write {
            peer: *peer,
            path: vp.to_string(),
            written,
            skipped,
            sealed: meta.sealed.is_some(),
        });
        Ok(())
    }

    async fn get(
        &self,
        peer: &PublicKey,
        path: &str,
        vp: &VaultPath,
        recv: &mut RecvStream,
        send: &mut SendStream,
    ) -> Result<(), VaultError> {
        let local = match resolve(&self.root, vp, false) {
            Ok(p) if p.exists() => p,
            Ok(_) => {
                let m = self.refuse(peer, "pull", path, format!("{vp} does not exist"));
                return wire::send_msg(send, &m).await;
            }
            Err(e) => {
                let m = self.refuse(peer, "pull", path, self.tell(&e));
                return wire::send_msg(send, &m).await;
            }
        };
        let mut files = Vec::new();
        walk(&local, "", &mut files).map_err(|e| VaultError::io(&local, e))?;
        for (p, rel) in files {
            send_file(&p, &rel, recv, send).await?;
        }
        wire::send_msg(send, &Msg::End).await
    }
}

/// Receives `count` chunks into `pf`: the network side reads frames while a
/// file thread checks and writes them, so neither waits for the other.
/// Chunks that fail their hash are not written (the caller asks again);
/// a file error (a full disk) is returned as the second value, and stops
/// the round. The file thread is always joined before this returns, so no
/// write of this push can land after it.
async fn receive_round(
    mut pf: PartialFile,
    count: usize,
    recv: &mut RecvStream,
    cancel: &Notify,
) -> Result<(PartialFile, Option<VaultError>), VaultError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(8);
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = failed.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut fatal = None;
        while let Some((i, d)) = rx.blocking_recv() {
            if fatal.is_some() {
                continue;
            }
            match pf.write(i, &d) {
                Ok(()) => {}
                Err(VaultError::Protocol(m)) => debug!("vault: {m}"),
                Err(e) => {
                    flag.store(true, Ordering::Relaxed);
                    fatal = Some(e);
                }
            }
        }
        (pf, fatal)
    });
    let mut net = Ok(());
    for _ in 0..count {
        if failed.load(Ordering::Relaxed) {
            break;
        }
        let frame = tokio::select! {
            f = tokio::time::timeout(IDLE, wire::read_frame(recv)) => match f {
                Ok(f) => f,
                Err(_) => Err(VaultError::Protocol("no chunk for 3 minutes".into())),
            },
            _ = cancel.notified() => Err(VaultError::Refused(
                "stopped: the same key is pushing this file again".into(),
            )),
        };
        match frame {
            Ok(Some(Frame::Chunk(i, d))) => {
                if tx.send((i, d)).await.is_err() {
                    break;
                }
            }
            Ok(_) => {
                net = Err(VaultError::Protocol("expected a chunk".into()));
                break;
            }
            Err(e) => {
                net = Err(e);
                break;
            }
        }
    }
    drop(tx);
    let (pf, fatal) = writer
        .await
        .map_err(|e| VaultError::Protocol(format!("the file thread failed: {e}")))?;
    net?;
    Ok((pf, fatal))
}

fn entry(p: &Path, name: String, m: &std::fs::Metadata) -> Entry {
    use std::os::unix::fs::PermissionsExt;
    let kind = if m.file_type().is_symlink() {
        "link"
    } else if m.is_dir() {
        "dir"
    } else {
        "file"
    };
    Entry {
        name,
        kind: kind.into(),
        size: m.len(),
        mode: m.permissions().mode() & 0o7777,
        mtime_ns: m.modified().map(ns_of).unwrap_or(0),
        sealed: seal_sidecar(p).exists(),
    }
}

fn write_sidecar(side: &Path, info: &SealInfo) -> Result<(), VaultError> {
    let tmp = side.with_extension("tmp");
    let body = serde_json::to_vec(info).map_err(|e| VaultError::Protocol(e.to_string()))?;
    std::fs::write(&tmp, body).map_err(|e| VaultError::io(&tmp, e))?;
    std::fs::rename(&tmp, side).map_err(|e| VaultError::io(side, e))
}

/// Every regular file under `p` (or `p` itself), sorted, with its path
/// relative to `p`; links and the vault's own files are left out.
fn walk(p: &Path, rel: &str, out: &mut Vec<(PathBuf, String)>) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(p)?;
    if m.is_file() {
        out.push((p.to_path_buf(), rel.to_string()));
    } else if m.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !is_hidden_name(n))
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n.clone()
            } else {
                format!("{rel}/{n}")
            };
            walk(&p.join(&n), &r, out)?;
        }
    }
    Ok(())
}

/// Sends one file of a pull: `file` and its hashes, then the chunks the
/// client asks for.
pub(crate) async fn send_file(
    p: &Path,
    rel: &str,
    recv: &mut RecvStream,
    send: &mut SendStream,
) -> Result<(), VaultError> {
    use std::os::unix::fs::PermissionsExt;
    let pb = p.to_path_buf();
    let (manifest, md) = blocking(move || {
        let md = std::fs::metadata(&pb).map_err(|e| VaultError::io(&pb, e))?;
        Ok::<_, VaultError>((Manifest::of_file(&pb)?, md))
    })
    .await??;
    let sealed = std::fs::read(seal_sidecar(p))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let meta = FileMeta {
        size: manifest.size,
        mode: md.permissions().mode() & 0o777,
        mtime_ns: md.modified().map(ns_of).unwrap_or(0),
        root: manifest.root_hex(),
        sealed,
    };
    wire::send_msg(
        send,
        &Msg::File {
            rel: rel.to_string(),
            meta,
        },
    )
    .await?;
    wire::send_hashes(send, &manifest.hashes).await?;
    let need = match wire::read_msg(recv).await? {
        Msg::Need { ranges } => wire::from_ranges(&ranges, manifest.hashes.len() as u64)?,
        other => {
            return Err(VaultError::Protocol(format!(
                "expected need, got {other:?}"
            )))
        }
    };
    let f = std::fs::File::open(p).map_err(|e| VaultError::io(p, e))?;
    let f = Arc::new(f);
    for i in need {
        let n = manifest.chunk_len(i, CHUNK);
        let f = f.clone();
        let pb = p.to_path_buf();
        let data = blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, i * CHUNK)
                .map(|_| buf)
                .map_err(|e| VaultError::io(&pb, e))
        })
        .await??;
        wire::send_chunk(send, i, &data).await?;
    }
    Ok(())
}
