//! The server side of `batch`: many small files in two round trips and one
//! group sync, instead of two round trips and a sync each.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pool_net::{PublicKey, RecvStream, SendStream};

use crate::manifest::{chunk_count, Manifest, CHUNK};
use crate::partial::{sync_dir, sync_many, Opened, PartialFile};
use crate::paths::{resolve, Access, VaultPath};
use crate::server::{blocking, claim, BusyGuard, VaultServer};
use crate::wire::{self, BatchItem, FileMeta, Frame, Msg, MAX_BATCH};
use crate::VaultError;

/// A batch item being received.
struct Slot {
    item: u32,
    vp: VaultPath,
    local: PathBuf,
    meta: FileMeta,
    pf: PartialFile,
    _guard: BusyGuard,
}

impl VaultServer {
    pub(crate) async fn batch(
        &self,
        peer: &PublicKey,
        items: Vec<BatchItem>,
        recv: &mut RecvStream,
        send: &mut SendStream,
    ) -> Result<(), VaultError> {
        if items.len() > MAX_BATCH {
            return Err(VaultError::Protocol(format!(
                "a batch of {} files (at most {MAX_BATCH})",
                items.len()
            )));
        }
        let hashes = wire::read_hashes(recv).await?;
        let mut at = 0usize;
        let mut errors: Vec<(u32, String)> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        let (mut written, mut skipped) = (0u64, 0u64);
        for (n, item) in items.into_iter().enumerate() {
            let n = n as u32;
            let count = chunk_count(item.meta.size, CHUNK) as usize;
            if count > 1 {
                return Err(VaultError::Protocol(format!(
                    "batch item {} is larger than a chunk",
                    item.path
                )));
            }
            let Some(h) = hashes.get(at..at + count) else {
                return Err(VaultError::Protocol("a batch with too few hashes".into()));
            };
            at += count;
            let manifest = Manifest {
                size: item.meta.size,
                hashes: h.to_vec(),
            };
            manifest.check(&item.meta.root, CHUNK)?;
            let vp = match self.check(peer, &item.path, Access::Write, "push") {
                Ok(vp) => vp,
                Err(m) => {
                    errors.push((n, message(*m)));
                    continue;
                }
            };
            let local = match resolve(&self.root, &vp, true) {
                Ok(p) => p,
                Err(e) => {
                    errors.push((
                        n,
                        message(self.refuse(peer, "push", &item.path, self.tell(&e))),
                    ));
                    continue;
                }
            };
            let Ok((guard, _cancel)) = claim(&local, peer).await else {
                let m = self.refuse(
                    peer,
                    "push",
                    &item.path,
                    format!("{vp}: another push to it is under way; try again when it is done"),
                );
                errors.push((n, message(m)));
                continue;
            };
            let (l, root, mode, mtime) = (
                local.clone(),
                item.meta.root.clone(),
                item.meta.mode,
                item.meta.mtime_ns,
            );
            match blocking(move || PartialFile::open(&l, manifest, &root, mode, mtime)).await? {
                Ok(Opened::Complete { skipped: s }) => {
                    skipped += s;
                    self.stored(peer, &vp, &local, &item.meta, 0, s)?;
                }
                Ok(Opened::Partial(pf)) => slots.push(Slot {
                    item: n,
                    vp,
                    local,
                    meta: item.meta,
                    pf,
                    _guard: guard,
                }),
                Err(e) => {
                    errors.push((
                        n,
                        message(self.refuse(peer, "push", &item.path, self.tell(&e))),
                    ));
                }
            }
        }
        if at != hashes.len() {
            return Err(VaultError::Protocol("a batch with too many hashes".into()));
        }
        let need: Vec<u32> = slots
            .iter()
            .filter(|s| !s.pf.need().is_empty())
            .map(|s| s.item)
            .collect();
        wire::send_msg(
            send,
            &Msg::BatchNeed {
                need: need.clone(),
                errors: errors.clone(),
            },
        )
        .await?;
        let mut chunks = Vec::with_capacity(need.len());
        for _ in 0..need.len() {
            match wire::read_frame(recv).await? {
                Some(Frame::Chunk(i, d)) => chunks.push((i, d)),
                _ => return Err(VaultError::Protocol("expected a chunk of the batch".into())),
            }
        }
        // Write, sync together, rename, sync each directory once.
        let (slots, results) = blocking(move || {
            let mut slots = slots;
            let mut bad: Vec<(u32, String)> = Vec::new();
            for (i, d) in chunks {
                match slots.iter_mut().find(|s| u64::from(s.item) == i) {
                    Some(s) => {
                        if let Err(e) = s.pf.write(0, &d) {
                            bad.push((s.item, e.to_string()));
                        }
                    }
                    None => bad.push((i as u32, "a chunk for no file of the batch".into())),
                }
            }
            let mut pfs: Vec<PartialFile> = Vec::with_capacity(slots.len());
            let mut rest = Vec::with_capacity(slots.len());
            for s in slots {
                pfs.push(s.pf);
                rest.push((s.item, s.vp, s.local, s.meta, s._guard));
            }
            let synced = sync_many(&mut pfs);
            let mut dirs = BTreeSet::new();
            let mut done = Vec::new();
            for ((pf, r), (item, vp, local, meta, guard)) in pfs.into_iter().zip(synced).zip(rest) {
                let r = r.and_then(|()| pf.commit(meta.mode, meta.mtime_ns));
                if let Some(d) = local.parent() {
                    dirs.insert(d.to_path_buf());
                }
                done.push((item, vp, local, meta, r, guard));
            }
            for d in dirs {
                sync_dir(&d);
            }
            (done, bad)
        })
        .await?;
        let mut errors = Vec::new();
        errors.extend(results);
        for (item, vp, local, meta, r, _guard) in slots {
            match r {
                Ok((w, s)) => {
                    written += w;
                    skipped += s;
                    self.stored(peer, &vp, &local, &meta, w, s)?;
                }
                Err(e) => errors.push((
                    item,
                    message(self.refuse(peer, "push", &vp.to_string(), self.tell(&e))),
                )),
            }
        }
        wire::send_msg(
            send,
            &Msg::BatchDone {
                written,
                skipped,
                errors,
            },
        )
        .await
    }
}

fn message(m: Msg) -> String {
    match m {
        Msg::Error { message } => message,
        other => format!("{other:?}"),
    }
}
