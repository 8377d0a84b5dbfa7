//! The memory log store and the KV state machine.
//!
//! Both keep their state behind a `std::sync::Mutex` that no `.await`
//! ever holds, so openraft's tasks and the benchmark's final check can
//! share them. Nothing is written to disk: a node that restarts has lost
//! its vote and log, which is fine for a benchmark in one process and
//! would not be for a real deployment.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::{NodeId, Response, TypeConfig};

type Node = openraft::BasicNode;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct LogInner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
}

/// The Raft log, in memory. Cloning gives another handle to the same log
/// (openraft's log reader is one).
#[derive(Clone, Default)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok(inner.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        // After a purge of everything, the last log id is the purged one.
        let last = inner
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        {
            let mut inner = lock(&self.inner);
            for e in entries {
                inner.log.insert(e.log_id.index, e);
            }
        }
        // Memory is "durable" as soon as it is written.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Deletes `log_id` and everything after it (conflicting entries).
        let mut inner = lock(&self.inner);
        let _ = inner.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Deletes everything up to and including `log_id`.
        let mut inner = lock(&self.inner);
        debug_assert!(inner.last_purged <= Some(log_id));
        inner.last_purged = Some(log_id);
        let keep = inner.log.split_off(&(log_id.index + 1));
        inner.log = keep;
        Ok(())
    }
}

/// What a snapshot holds: the applied log id, the membership and the KV.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    kv: BTreeMap<String, String>,
}

struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

#[derive(Default)]
struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    kv: BTreeMap<String, String>,
    snapshots_built: u64,
    snapshots_installed: u64,
    current: Option<StoredSnapshot>,
}

/// The state machine: a string-to-string map. Cloning gives another handle
/// to the same state (the snapshot builder is one, and so is the handle
/// the benchmark compares at the end).
#[derive(Clone, Default)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

/// A state machine's content at one moment, for comparing nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmView {
    /// The last log id applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The map.
    pub kv: BTreeMap<String, String>,
    /// Snapshots this node built.
    pub snapshots_built: u64,
    /// Snapshots this node installed from a leader.
    pub snapshots_installed: u64,
}

impl StateMachine {
    /// An empty state machine.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the state (the whole map: meant for the end of a run).
    pub fn view(&self) -> SmView {
        let inner = lock(&self.inner);
        SmView {
            last_applied: inner.last_applied,
            kv: inner.kv.clone(),
            snapshots_built: inner.snapshots_built,
            snapshots_installed: inner.snapshots_installed,
        }
    }

    /// The last log id applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        lock(&self.inner).last_applied
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Copy under the lock, serialise off the runtime's threads: the
        // map can be large, and the nodes' RPCs share those threads.
        let (body, meta) = {
            let mut inner = lock(&self.inner);
            inner.snapshots_built += 1;
            let snapshot_id = match inner.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
                None => format!("none-{}", inner.snapshots_built),
            };
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
                snapshot_id,
            };
            (
                SnapshotBody {
                    kv: inner.kv.clone(),
                },
                meta,
            )
        };
        let data = tokio::task::spawn_blocking(move || serde_json::to_vec(&body))
            .await
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        lock(&self.inner).current = Some(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = lock(&self.inner);
        let mut out = Vec::new();
        for e in entries {
            inner.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Response { value: None }),
                EntryPayload::Normal(req) => {
                    let crate::Request::Set { key, value } = req;
                    inner.kv.insert(key, value.clone());
                    out.push(Response { value: Some(value) });
                }
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Response { value: None });
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut inner = lock(&self.inner);
        inner.kv = body.kv;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshots_installed += 1;
        inner.current = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok(inner.current.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload,
        }
    }

    #[tokio::test]
    async fn snapshot_carries_the_map_to_another_node() {
        let mut a = StateMachine::new();
        let members = Membership::new(vec![[0u64, 1, 2].into()], None);
        let mut entries = vec![entry(1, EntryPayload::Membership(members))];
        for i in 2..50 {
            let req = crate::Request::Set {
                key: format!("k{i}"),
                value: i.to_string(),
            };
            entries.push(entry(i, EntryPayload::Normal(req)));
        }
        let out = a.apply(entries).await.unwrap();
        assert_eq!(out[10].value.as_deref(), Some("11"));
        let snap = a
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(49));

        let mut b = StateMachine::new();
        b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        let (va, vb) = (a.view(), b.view());
        assert_eq!(va.kv, vb.kv);
        assert_eq!(va.last_applied, vb.last_applied);
        assert_eq!(vb.kv.len(), 48);
        assert_eq!(
            b.applied_state().await.unwrap().1,
            a.applied_state().await.unwrap().1
        );
        let current = b.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }
}
