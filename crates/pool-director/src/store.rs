//! Where the director keeps the fleet's state: the [`Store`] trait, and
//! the embedded [`FileStore`](crate::file_store::FileStore) (memory and a state file).
//!
//! The store holds what must outlive a director: the workers (with their
//! state: active, draining, drained) and each session's owner. It also
//! says which director leads, for stores shared by several
//! ([`Store::campaign`]). A store outside the process (etcd, in the
//! `pool-etcd` crate) adds leases that expire on their own and
//! compare-and-swap on each session's owner: its revision is the fencing
//! epoch (docs/director.md).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pool_net::PublicKey;
use serde::{Deserialize, Serialize};

/// What a store call returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or answered with an error.
    #[error("the director's store: {0}")]
    Unavailable(String),
    /// A compare-and-swap lost: the session is owned by another worker
    /// than the one named (or by one, when none was named).
    #[error("session {session} is owned by {owner}, not by the worker that asked")]
    Conflict {
        /// The session id.
        session: String,
        /// Who owns it now ("nobody" if no one).
        owner: String,
    },
    /// The worker's lease has lapsed: it may not claim sessions until it
    /// registers again (fencing).
    #[error("the lease of worker {worker} has lapsed: it must register again")]
    Lapsed {
        /// The worker's key.
        worker: String,
    },
    /// The state file could not be read or written.
    #[error("the director's state file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A worker's standing with the director.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Takes new sessions.
    Active,
    /// Its sessions are being handed to others; takes none.
    Draining,
    /// Drained: empty, takes none until it registers again.
    Drained,
    /// Its lease expired: presumed dead.
    Lost,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Active => "active",
            WorkerState::Draining => "draining",
            WorkerState::Drained => "drained",
            WorkerState::Lost => "lost",
        })
    }
}

/// A worker as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker's POOL key (its identity).
    #[serde(with = "key_text")]
    pub key: PublicKey,
    /// Where clients reach it (`HOST:PORT`, first preferred).
    pub addrs: Vec<String>,
    /// Its standing.
    pub state: WorkerState,
    /// When it registered, in Unix milliseconds.
    pub registered_ms: u64,
}

/// One session's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The session id (hex, as `pool ctl sessions` shows it).
    pub session: String,
    /// The worker that holds it.
    #[serde(with = "key_text")]
    pub owner: PublicKey,
    /// The store's revision of this ownership: the fencing epoch (0 in
    /// stores without revisions).
    pub revision: u64,
}

/// Everything a store holds, as read at start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Fleet {
    /// The workers known.
    pub workers: Vec<WorkerRecord>,
    /// Who owns which session.
    pub owners: Vec<Ownership>,
}

/// Where the director keeps the fleet's state. Every call may fail with
/// [`StoreError::Unavailable`]; the director then refuses what it could
/// not record (a claim above all) rather than guess.
pub trait Store: Send + Sync + 'static {
    /// Everything known now (at start, or on becoming the leader).
    fn load(&self) -> StoreFuture<'_, Fleet>;

    /// A worker registered, or its record changed (state, addresses):
    /// keep it, with a lease of `ttl` that [`Store::renew`] extends.
    fn put_worker(&self, worker: &WorkerRecord, ttl: Duration) -> StoreFuture<'_, ()>;

    /// The worker's heartbeat reached the director: extend its lease.
    /// [`StoreError::Lapsed`] if the lease is gone (it must register
    /// again).
    fn renew(&self, worker: &PublicKey) -> StoreFuture<'_, ()>;

    /// The worker is gone (lost, or drained and left): forget it and the
    /// sessions it owned.
    fn remove_worker(&self, worker: &PublicKey) -> StoreFuture<'_, ()>;

    /// Makes `to` the owner of `session` if `from` owns it now (`None`:
    /// if no one does), and only while `to`'s lease lives. Returns the
    /// new revision. [`StoreError::Conflict`] or [`StoreError::Lapsed`]
    /// otherwise.
    fn claim(&self, session: &str, from: Option<PublicKey>, to: PublicKey) -> StoreFuture<'_, u64>;

    /// The session ended at `owner`: forget it, if `owner` still owns it.
    fn release(&self, session: &str, owner: PublicKey) -> StoreFuture<'_, ()>;

    /// Who owns which session now.
    fn owners(&self) -> StoreFuture<'_, Vec<Ownership>>;

    /// Returns once this director leads (`me` names it to the others).
    /// A store with one director returns at once.
    fn campaign(&self, me: &str) -> StoreFuture<'_, ()>;

    /// Returns when this director has lost the lead it won (a store with
    /// one director: never).
    fn deposed(&self) -> StoreFuture<'_, ()>;

    /// What to call the store in logs and `pool director workers`.
    fn describe(&self) -> String;

    /// Writes out what is not written yet (at shutdown). Stores that
    /// write as they go need not do anything.
    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A [`PublicKey`] in JSON as its text form (`pool key show`'s).
pub mod key_text {
    use pool_net::PublicKey;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the key's text form.
    pub fn serialize<S: Serializer>(k: &PublicKey, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }

    /// Reads a key's text form.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
