//! The embedded store: the fleet in memory, kept in a state file so a
//! restarted director loses nothing. Leases are kept here too, so fencing
//! holds as with etcd: a worker whose lease lapsed claims nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_net::PublicKey;
use tokio::sync::Notify;
use tracing::warn;

use crate::store::{Fleet, Ownership, Store, StoreError, StoreFuture, WorkerRecord};

#[derive(Default)]
struct State {
    workers: BTreeMap<PublicKey, WorkerRecord>,
    leases: HashMap<PublicKey, (Instant, Duration)>,
    owners: BTreeMap<String, (PublicKey, u64)>,
    revision: u64,
    dirty: bool,
}

/// The embedded store.
pub struct FileStore {
    path: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

impl FileStore {
    /// A store kept in `path` (read now if it exists), or only in memory
    /// with `None`. The file is rewritten (atomically) at most twice a
    /// second while something changes.
    ///
    /// # Errors
    ///
    /// The file exists and cannot be read or is not a state file.
    pub fn open(path: Option<&Path>) -> Result<FileStore, StoreError> {
        let mut st = State::default();
        if let Some(p) = path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let fleet: Fleet =
                        serde_json::from_slice(&bytes).map_err(|e| StoreError::File {
                            path: p.display().to_string(),
                            reason: format!("not a director state file: {e}"),
                        })?;
                    for w in fleet.workers {
                        st.workers.insert(w.key, w);
                    }
                    for o in fleet.owners {
                        st.revision = st.revision.max(o.revision);
                        st.owners.insert(o.session, (o.owner, o.revision));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::File {
                        path: p.display().to_string(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        let store = FileStore {
            path: path.map(Path::to_path_buf),
            state: Arc::new(Mutex::new(st)),
            wake: Arc::new(Notify::new()),
        };
        if let Some(p) = store.path.clone() {
            let (state, wake) = (store.state.clone(), store.wake.clone());
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Err(e) = write_now(&p, &state) {
                        warn!("{e}");
                    }
                }
            });
        }
        Ok(store)
    }

    /// Writes the state file now (at shutdown).
    ///
    /// # Errors
    ///
    /// The file could not be written.
    pub fn write_out(&self) -> Result<(), StoreError> {
        match &self.path {
            Some(p) => write_now(p, &self.state),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self, st: &mut State) {
        st.dirty = true;
        self.wake.notify_one();
    }
}

fn snapshot(st: &State) -> Fleet {
    Fleet {
        workers: st.workers.values().cloned().collect(),
        owners: st
            .owners
            .iter()
            .map(|(s, (o, r))| Ownership {
                session: s.clone(),
                owner: *o,
                revision: *r,
            })
            .collect(),
    }
}

fn write_now(path: &Path, state: &Mutex<State>) -> Result<(), StoreError> {
    let fail = |e: std::io::Error| StoreError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let bytes = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.dirty {
            return Ok(());
        }
        st.dirty = false;
        serde_json::to_vec_pretty(&snapshot(&st)).map_err(|e| fail(std::io::Error::other(e)))?
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)
}

fn ready<'a, T: Send + 'a>(r: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

impl State {
    fn lease_live(&self, k: &PublicKey) -> bool {
        self.leases
            .get(k)
            .is_some_and(|(at, ttl)| at.elapsed() <= *ttl)
    }
}

impl Store for FileStore {
    fn load(&self) -> StoreFuture<'_, Fleet> {
        ready(Ok(snapshot(&self.lock())))
    }

    fn put_worker(&self, worker: &WorkerRecord, ttl: Duration) -> StoreFuture<'_, ()> {
        let mut st = self.lock();
        st.leases.insert(worker.key, (Instant::now(), ttl));
        if st.workers.get(&worker.key) != Some(worker) {
            st.workers.insert(worker.key, worker.clone());
            self.changed(&mut st);
        }
        ready(Ok(()))
    }

    fn renew(&self, worker: &PublicKey) -> StoreFuture<'_, ()> {
        let mut st = self.lock();
        let r = match st.leases.get_mut(worker) {
            Some((at, ttl)) if at.elapsed() <= *ttl => {
                *at = Instant::now();
                Ok(())
            }
            _ => Err(StoreError::Lapsed {
                worker: worker.to_string(),
            }),
        };
        ready(r)
    }

    fn remove_worker(&self, worker: &PublicKey) -> StoreFuture<'_, ()> {
        let mut st = self.lock();
        st.workers.remove(worker);
        st.leases.remove(worker);
        st.owners.retain(|_, (o, _)| o != worker);
        self.changed(&mut st);
        ready(Ok(()))
    }

    fn claim(&self, session: &str, from: Option<PublicKey>, to: PublicKey) -> StoreFuture<'_, u64> {
        let mut st = self.lock();
        let now = st.owners.get(session).map(|(o, _)| *o);
        let r = if !st.lease_live(&to) {
            Err(StoreError::Lapsed {
                worker: to.to_string(),
            })
        } else if now != from && now != Some(to) {
            Err(StoreError::Conflict {
                session: session.to_string(),
                owner: now.map_or("nobody".into(), |k| k.to_string()),
            })
        } else {
            st.revision += 1;
            let rev = st.revision;
            st.owners.insert(session.to_string(), (to, rev));
            self.changed(&mut st);
            Ok(rev)
        };
        ready(r)
    }

    fn release(&self, session: &str, owner: PublicKey) -> StoreFuture<'_, ()> {
        let mut st = self.lock();
        if st.owners.get(session).is_some_and(|(o, _)| *o == owner) {
            st.owners.remove(session);
            self.changed(&mut st);
        }
        ready(Ok(()))
    }

    fn owners(&self) -> StoreFuture<'_, Vec<Ownership>> {
        ready(Ok(snapshot(&self.lock()).owners))
    }

    fn campaign(&self, _me: &str) -> StoreFuture<'_, ()> {
        ready(Ok(()))
    }

    fn deposed(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::pending())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        ready(self.write_out())
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("embedded (state file {})", p.display()),
            None => "embedded (memory only)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WorkerState;

    fn rec(n: u8) -> WorkerRecord {
        WorkerRecord {
            key: PublicKey([n; 32]),
            addrs: vec![format!("127.0.0.1:{n}")],
            state: WorkerState::Active,
            registered_ms: 1,
        }
    }

    #[tokio::test]
    async fn claims_are_compare_and_swap_and_fenced_by_the_lease() {
        let s = FileStore::open(None).unwrap();
        let (a, b) = (rec(1), rec(2));
        s.put_worker(&a, Duration::from_secs(3)).await.unwrap();
        s.put_worker(&b, Duration::from_millis(1)).await.unwrap();
        let r1 = s.claim("s1", None, a.key).await.unwrap();
        assert!(matches!(
            s.claim("s1", None, a.key).await,
            Ok(r) if r > r1
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
        // b's lease lapsed: it cannot take the session (fencing).
        assert!(matches!(
            s.claim("s1", Some(a.key), b.key).await,
            Err(StoreError::Lapsed { .. })
        ));
        assert!(matches!(
            s.renew(&b.key).await,
            Err(StoreError::Lapsed { .. })
        ));
        s.put_worker(&b, Duration::from_secs(3)).await.unwrap();
        // Only from the owner: b does not own it.
        assert!(matches!(
            s.claim("s1", Some(b.key), b.key).await,
            Err(StoreError::Conflict { .. })
        ));
        s.claim("s1", Some(a.key), b.key).await.unwrap();
        assert_eq!(s.owners().await.unwrap()[0].owner, b.key);
        let c = rec(3);
        s.put_worker(&c, Duration::from_secs(3)).await.unwrap();
        assert!(matches!(
            s.claim("s1", Some(a.key), c.key).await,
            Err(StoreError::Conflict { .. })
        ));
        s.release("s1", c.key).await.unwrap();
        assert_eq!(s.owners().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_state_file_brings_the_fleet_back() {
        let dir = std::env::temp_dir().join(format!("pool-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("director.json");
        let _ = std::fs::remove_file(&path);
        {
            let s = FileStore::open(Some(&path)).unwrap();
            let mut a = rec(1);
            s.put_worker(&a, Duration::from_secs(3)).await.unwrap();
            s.claim("s9", None, a.key).await.unwrap();
            a.state = WorkerState::Draining;
            s.put_worker(&a, Duration::from_secs(3)).await.unwrap();
            s.write_out().unwrap();
        }
        let s = FileStore::open(Some(&path)).unwrap();
        let f = s.load().await.unwrap();
        assert_eq!(f.workers.len(), 1);
        assert_eq!(f.workers[0].state, WorkerState::Draining);
        assert_eq!(f.owners[0].session, "s9");
        std::fs::write(&path, b"{ not json").unwrap();
        let e = FileStore::open(Some(&path)).err().unwrap();
        assert!(e.to_string().contains("not a director state file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
