//! # pool-etcd: the director's fleet state in etcd v3
//!
//! [`EtcdStore`] implements [`pool_director::store::Store`] on an etcd v3
//! cluster (etcd 3.4 or later: it uses only the KV range, put, delete and
//! txn calls, the lease grant, keep-alive and revoke calls, and the
//! v3election `Campaign` call), so that several directors can share one
//! fleet and hand it over when the one that leads dies.
//!
//! ## Keys
//!
//! Under a prefix (`/pool/` unless told, [`DEFAULT_PREFIX`]):
//!
//! - `{prefix}workers/{worker key}`: the JSON of the
//!   [`WorkerRecord`], attached to an etcd lease of the `ttl` given to
//!   [`Store::put_worker`]. A worker that registers again while its lease
//!   lives keeps that lease (its sessions hang on it); otherwise it gets a
//!   new one. [`Store::renew`] sends one keep-alive for it; a lease etcd no
//!   longer knows (TTL 0) or a missing worker key is
//!   [`StoreError::Lapsed`]. The store remembers which lease each worker
//!   has, and when it does not know (another director registered the
//!   worker, then lost the lead) it reads the lease off the worker's key,
//!   so any director can renew any worker.
//! - `{prefix}sessions/{session}`: the owner's worker key (text form),
//!   attached to the owner's lease: when a worker's lease lapses, etcd
//!   deletes its key and every session it owned in one step.
//! - `{prefix}leader/…`: the election (etcd's v3election API, named
//!   `{prefix}leader`).
//!
//! ## Claims and fencing
//!
//! [`Store::claim`] reads the session's key, checks its owner is `from`
//! ([`StoreError::Conflict`] if not), reads `to`'s lease off its worker
//! key ([`StoreError::Lapsed`] if there is none), then commits one txn:
//! *if* the session's key is still at the revision read (absent, when
//! `from` is `None`) *and* `to`'s worker key exists with that lease,
//! *then* put the session's key = `to`, with `to`'s lease. The txn's
//! revision is returned: it is the session key's `mod_revision`, the
//! fencing epoch that [`Store::owners`] reports too. A worker whose lease
//! has lapsed can therefore never be made an owner, and loses what it
//! owned. When the txn fails the store reads again to tell a conflict
//! from a lapse, and tries again (three times at most) when neither is
//! the cause (`to` registered anew between the reads).
//!
//! ## Leader election
//!
//! [`Store::campaign`] grants the director its own lease (the
//! `lease_ttl` given to [`EtcdStore::connect`]), keeps it alive from a
//! background task every third of its TTL, and campaigns on
//! `{prefix}leader` with it: the call returns when this director leads,
//! which waits for the one leading now to resign, or for its lease to
//! lapse. [`Store::deposed`] returns when that lease is gone: revoked or
//! expired (etcd answers a keep-alive with TTL 0), or not renewed for two
//! thirds of its TTL (etcd unreachable: the lease may lapse any time
//! now). Dropping the store revokes the lease (from the keeper task, so
//! while the tokio runtime runs), which hands the lead over at once; a
//! director that dies without that holds the lead until its lease
//! expires. Before any campaign, [`Store::deposed`] never returns.
//!
//! ## What etcd keeps, and what it does not
//!
//! A worker whose lease lapsed is gone from etcd, key and sessions: the
//! store never reports a [`pool_director::store::WorkerState::Lost`]
//! worker (the director sees it missing from [`Store::load`] instead). A
//! worker that registers again while its lease lives keeps that lease and
//! its granted TTL, even if [`Store::put_worker`] names another `ttl`.
//! [`Store::renew`] keeps alive the lease the store knows for the worker
//! (one keep-alive on a stream of its own, one round trip); it reads the
//! worker's key only when it knows none, or that one is gone, so a worker
//! key deleted by hand while its lease lives still renews (its claims are
//! [`StoreError::Lapsed`] until it registers again).
//!
//! ## Errors and time
//!
//! Every etcd error, and every call that has no answer within
//! five seconds, is [`StoreError::Unavailable`], with a message naming
//! the endpoints. etcd counts lease TTLs in whole seconds: a TTL is
//! rounded up to the next second, and etcd raises TTLs below its minimum
//! (about 1.5 × its election timeout: 2 s by default) to that minimum.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod election;

use election::{Campaign, Lead, Phase};

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, LeaseClient, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use pool_director::store::{Fleet, Ownership, Store, StoreError, StoreFuture, WorkerRecord};
use pool_net::PublicKey;
use tokio::sync::watch;

/// The prefix of every key the store writes, unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/pool/";

/// How long any one etcd call may take (but a campaign, which waits for
/// the lead).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a claim that lost to neither a conflict nor a lapse is tried.
const CLAIM_TRIES: usize = 3;

/// The director's fleet state in etcd v3 (see the [crate] docs).
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
    lease_ttl: Duration,
    /// Each worker's lease, as this store last saw it.
    leases: Mutex<HashMap<PublicKey, i64>>,
    /// Where the campaign stands; the lease keeper writes it too.
    lead: Arc<watch::Sender<Lead>>,
    /// The campaign under way or won (one at a time).
    campaign: tokio::sync::Mutex<Option<Campaign>>,
}

impl EtcdStore {
    /// Connects to etcd at `url`: `etcd://HOST:PORT` or
    /// `http://HOST:PORT`, or several of them separated by commas (an
    /// endpoint without a scheme takes `http://`). `prefix` starts every
    /// key ([`DEFAULT_PREFIX`] if empty; a `/` is added at its end if
    /// missing); `lease_ttl` is the TTL of the lease the director
    /// campaigns with. Fails with [`StoreError::Unavailable`] if etcd does
    /// not answer.
    pub async fn connect(
        url: &str,
        prefix: &str,
        lease_ttl: Duration,
    ) -> Result<EtcdStore, StoreError> {
        let endpoints = parse_endpoints(url)?;
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), CALL_TIMEOUT);
        let client = timed(Client::connect(endpoints.clone(), Some(options)))
            .await
            .map_err(|e| unavailable(&endpoints, "cannot connect", e))?;
        let store = EtcdStore {
            client,
            endpoints,
            prefix,
            lease_ttl,
            leases: Mutex::new(HashMap::new()),
            lead: Arc::new(watch::Sender::new(Lead {
                generation: 0,
                phase: Phase::Idle,
            })),
            campaign: tokio::sync::Mutex::new(None),
        };
        // The client connects lazily: ask once, to fail here if no one answers.
        let mut kv = store.client.kv_client();
        let probe = GetOptions::new().with_keys_only().with_limit(1);
        timed(kv.get(store.prefix.clone(), Some(probe)))
            .await
            .map_err(|e| store.err("no answer", e))?;
        tracing::debug!(store = %store.describe(), "connected to etcd");
        Ok(store)
    }

    /// The key prefix in use (ends with `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The election's name: its keys are under it.
    pub fn election_name(&self) -> String {
        format!("{}leader", self.prefix)
    }

    fn worker_key(&self, worker: &PublicKey) -> String {
        format!("{}workers/{worker}", self.prefix)
    }

    fn workers_prefix(&self) -> String {
        format!("{}workers/", self.prefix)
    }

    fn session_key(&self, session: &str) -> String {
        format!("{}sessions/{session}", self.prefix)
    }

    fn sessions_prefix(&self) -> String {
        format!("{}sessions/", self.prefix)
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        unavailable(&self.endpoints, what, e)
    }

    fn remember(&self, worker: PublicKey, lease: i64) {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(worker, lease);
    }

    fn forget(&self, worker: &PublicKey) {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(worker);
    }

    fn remembered(&self, worker: &PublicKey) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(worker)
            .copied()
    }

    /// The worker's key as etcd has it now, if it has it.
    async fn get_one(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let mut resp = timed(kv.get(key, None))
            .await
            .map_err(|e| self.err(&format!("get {key}"), e))?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// The lease on the worker's key (`None`: no key, or no lease).
    async fn lease_on_key(&self, worker: &PublicKey) -> Result<Option<i64>, StoreError> {
        let kv = self.get_one(&self.worker_key(worker)).await?;
        let lease = kv.map(|kv| kv.lease()).filter(|&l| l != 0);
        match lease {
            Some(l) => self.remember(*worker, l),
            None => self.forget(worker),
        }
        Ok(lease)
    }

    /// One keep-alive for `lease`: `true` if it lives (and is extended).
    async fn keep_alive_once(&self, lease: i64) -> Result<bool, StoreError> {
        let mut leases = self.client.lease_client();
        keep_alive_fresh(&mut leases, lease)
            .await
            .map_err(|e| self.err(&format!("keep-alive of lease {lease:x}"), e))
    }

    fn parse_owner(&self, kv: &KeyValue) -> Result<Ownership, StoreError> {
        let key = String::from_utf8_lossy(kv.key());
        let session = key
            .strip_prefix(&self.sessions_prefix())
            .unwrap_or(&key)
            .to_string();
        let owner = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| v.parse::<PublicKey>().ok())
            .ok_or_else(|| {
                self.err(
                    &format!("session key {key}"),
                    format!(
                        "its value {:?} is no worker key",
                        String::from_utf8_lossy(kv.value())
                    ),
                )
            })?;
        Ok(Ownership {
            session,
            owner,
            revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        })
    }

    fn parse_worker(&self, kv: &KeyValue) -> Result<WorkerRecord, StoreError> {
        serde_json::from_slice(kv.value()).map_err(|e| {
            self.err(
                &format!("worker key {}", String::from_utf8_lossy(kv.key())),
                format!("not a worker record: {e}"),
            )
        })
    }

    async fn load_inner(&self) -> Result<Fleet, StoreError> {
        // One txn, so that workers and owners are read at one revision.
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.workers_prefix(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(
                self.sessions_prefix(),
                Some(GetOptions::new().with_prefix()),
            ),
        ]);
        let mut kv = self.client.kv_client();
        let resp = timed(kv.txn(txn)).await.map_err(|e| self.err("load", e))?;
        let mut fleet = Fleet::default();
        let mut gets = resp.op_responses().into_iter();
        if let Some(TxnOpResponse::Get(workers)) = gets.next() {
            for kv in workers.kvs() {
                let record = self.parse_worker(kv)?;
                if kv.lease() != 0 {
                    self.remember(record.key, kv.lease());
                }
                fleet.workers.push(record);
            }
        }
        if let Some(TxnOpResponse::Get(sessions)) = gets.next() {
            for kv in sessions.kvs() {
                fleet.owners.push(self.parse_owner(kv)?);
            }
        }
        Ok(fleet)
    }

    async fn put_worker_inner(
        &self,
        worker: &WorkerRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.worker_key(&worker.key);
        let value =
            serde_json::to_vec(worker).map_err(|e| self.err(&format!("encode {key}"), e))?;
        // Keep the lease the worker has while it lives: its sessions hang on it.
        let mut lease = match self.lease_on_key(&worker.key).await? {
            Some(l) if self.keep_alive_once(l).await? => Some(l),
            _ => None,
        };
        let mut kv = self.client.kv_client();
        for _ in 0..2 {
            let id = match lease {
                Some(id) => id,
                None => {
                    let mut leases = self.client.lease_client();
                    let granted = timed(leases.grant(ttl_secs(ttl), None))
                        .await
                        .map_err(|e| self.err(&format!("lease for {key}"), e))?;
                    tracing::debug!(worker = %worker.key, lease = granted.id(), "new worker lease");
                    granted.id()
                }
            };
            let put = PutOptions::new().with_lease(id);
            match timed(kv.put(key.clone(), value.clone(), Some(put))).await {
                Ok(_) => {
                    self.remember(worker.key, id);
                    return Ok(());
                }
                // It lapsed between the keep-alive and the put: a new one.
                Err(e) if lease.is_some() && lease_not_found(&e) => lease = None,
                Err(e) => return Err(self.err(&format!("put {key}"), e)),
            }
        }
        Err(self.err(&format!("put {key}"), "its lease lapsed twice"))
    }

    async fn renew_inner(&self, worker: &PublicKey) -> Result<(), StoreError> {
        let lapsed = || StoreError::Lapsed {
            worker: worker.to_string(),
        };
        if let Some(lease) = self.remembered(worker) {
            if self.keep_alive_once(lease).await? {
                return Ok(());
            }
            // Gone: but another director may have registered the worker anew.
            self.forget(worker);
        }
        match self.lease_on_key(worker).await? {
            Some(lease) if self.keep_alive_once(lease).await? => Ok(()),
            _ => {
                self.forget(worker);
                Err(lapsed())
            }
        }
    }

    async fn remove_worker_inner(&self, worker: &PublicKey) -> Result<(), StoreError> {
        let key = self.worker_key(worker);
        let on_key = self.lease_on_key(worker).await?;
        let mut leases: Vec<i64> = on_key.into_iter().collect();
        if let Some(l) = self.remembered(worker) {
            if !leases.contains(&l) {
                leases.push(l);
            }
        }
        let mut lease_client = self.client.lease_client();
        for lease in leases {
            match timed(lease_client.revoke(lease)).await {
                Ok(_) => tracing::debug!(%worker, lease, "worker lease revoked"),
                Err(e) if lease_not_found(&e) => {}
                Err(e) => return Err(self.err(&format!("revoke lease {lease:x} of {key}"), e)),
            }
        }
        self.forget(worker);
        let mut kv = self.client.kv_client();
        timed(kv.delete(key.clone(), None))
            .await
            .map_err(|e| self.err(&format!("delete {key}"), e))?;
        // Its sessions hung on its lease; any that did not (written by
        // hand, say) go too, each only if it still names this worker.
        let owner = worker.to_string();
        for o in self.owners_inner().await? {
            if o.owner == *worker {
                self.delete_if_owner(&self.session_key(&o.session), &owner)
                    .await?;
            }
        }
        Ok(())
    }

    async fn delete_if_owner(&self, key: &str, owner: &str) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when(vec![Compare::value(key, CompareOp::Equal, owner)])
            .and_then(vec![TxnOp::delete(key, None)]);
        let mut kv = self.client.kv_client();
        let resp = timed(kv.txn(txn))
            .await
            .map_err(|e| self.err(&format!("delete {key}"), e))?;
        Ok(resp.succeeded())
    }

    async fn claim_inner(
        &self,
        session: &str,
        from: Option<PublicKey>,
        to: PublicKey,
    ) -> Result<u64, StoreError> {
        let key = self.session_key(session);
        let worker_key = self.worker_key(&to);
        let from_text = from.map(|k| k.to_string());
        let conflict = |now: &Option<KeyValue>| StoreError::Conflict {
            session: session.to_string(),
            owner: now
                .as_ref()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .unwrap_or_else(|| "nobody".to_string()),
        };
        for _ in 0..CLAIM_TRIES {
            let now = self.get_one(&key).await?;
            let owned_by_from = match (&now, &from_text) {
                (None, None) => true,
                (Some(kv), Some(f)) => kv.value() == f.as_bytes(),
                _ => false,
            };
            if !owned_by_from {
                return Err(conflict(&now));
            }
            let Some(lease) = self.lease_on_key(&to).await? else {
                return Err(StoreError::Lapsed {
                    worker: to.to_string(),
                });
            };
            let session_unchanged = match &now {
                Some(kv) => Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when(vec![
                    session_unchanged,
                    Compare::version(worker_key.clone(), CompareOp::Greater, 0),
                    Compare::lease(worker_key.clone(), CompareOp::Equal, lease),
                ])
                .and_then(vec![TxnOp::put(
                    key.clone(),
                    to.to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let mut kv = self.client.kv_client();
            let resp = timed(kv.txn(txn))
                .await
                .map_err(|e| self.err(&format!("claim {key}"), e))?;
            if resp.succeeded() {
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                tracing::debug!(session, %to, revision, "session claimed");
                return Ok(u64::try_from(revision).unwrap_or(0));
            }
            // Lost: to whom? The next round reads again and tells a
            // conflict or a lapse; if neither, it tries again.
            tracing::debug!(session, %to, "claim txn lost; reading again");
        }
        Err(conflict(&self.get_one(&key).await?))
    }

    async fn owners_inner(&self) -> Result<Vec<Ownership>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = timed(kv.get(
            self.sessions_prefix(),
            Some(GetOptions::new().with_prefix()),
        ))
        .await
        .map_err(|e| self.err("list sessions", e))?;
        resp.kvs().iter().map(|kv| self.parse_owner(kv)).collect()
    }
}

impl Store for EtcdStore {
    fn load(&self) -> StoreFuture<'_, Fleet> {
        Box::pin(self.load_inner())
    }

    fn put_worker(&self, worker: &WorkerRecord, ttl: Duration) -> StoreFuture<'_, ()> {
        let worker = worker.clone();
        Box::pin(async move { self.put_worker_inner(&worker, ttl).await })
    }

    fn renew(&self, worker: &PublicKey) -> StoreFuture<'_, ()> {
        let worker = *worker;
        Box::pin(async move { self.renew_inner(&worker).await })
    }

    fn remove_worker(&self, worker: &PublicKey) -> StoreFuture<'_, ()> {
        let worker = *worker;
        Box::pin(async move { self.remove_worker_inner(&worker).await })
    }

    fn claim(&self, session: &str, from: Option<PublicKey>, to: PublicKey) -> StoreFuture<'_, u64> {
        let session = session.to_string();
        Box::pin(async move { self.claim_inner(&session, from, to).await })
    }

    fn release(&self, session: &str, owner: PublicKey) -> StoreFuture<'_, ()> {
        let key = self.session_key(session);
        Box::pin(async move {
            self.delete_if_owner(&key, &owner.to_string()).await?;
            Ok(())
        })
    }

    fn owners(&self) -> StoreFuture<'_, Vec<Ownership>> {
        Box::pin(self.owners_inner())
    }

    fn campaign(&self, me: &str) -> StoreFuture<'_, ()> {
        let me = me.to_string();
        Box::pin(async move { self.campaign_inner(&me).await })
    }

    fn deposed(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.deposed_inner())
    }

    fn describe(&self) -> String {
        format!("etcd {} (prefix {})", self.endpoints.join(","), self.prefix)
    }
}

/// `etcd://H:P`, `http://H:P`, `H:P`, comma-separated, as `http://H:P`s.
fn parse_endpoints(url: &str) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let rest = if let Some(r) = part.strip_prefix("etcd://") {
            r
        } else if let Some(r) = part.strip_prefix("http://") {
            r
        } else if part.contains("://") {
            return Err(StoreError::Unavailable(format!(
                "etcd endpoint {part}: only etcd:// and http:// (no TLS) are supported"
            )));
        } else {
            part
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(StoreError::Unavailable(format!(
                "etcd endpoint {part}: expected etcd://HOST:PORT"
            )));
        }
        out.push(format!("http://{rest}"));
    }
    if out.is_empty() {
        return Err(StoreError::Unavailable(format!(
            "etcd endpoints {url:?}: none given (expected etcd://HOST:PORT[,HOST:PORT…])"
        )));
    }
    Ok(out)
}

fn unavailable(endpoints: &[String], what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd {}: {what}: {e}", endpoints.join(",")))
}

/// A TTL in etcd's whole seconds (rounded up, at least 1).
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// The call's answer, or an error if it has none within [`CALL_TIMEOUT`].
async fn timed<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => answer,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        ))),
    }
}

/// etcd's "requested lease not found" (a put or revoke naming a lease
/// that lapsed), or the client's own word for a keep-alive answered with
/// TTL 0.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// One keep-alive on a stream of its own: `true` if the lease lives.
async fn keep_alive_fresh(
    leases: &mut LeaseClient,
    lease: i64,
) -> Result<bool, etcd_client::Error> {
    // The client sends one request and reads its answer; TTL 0 (the lease
    // is gone) comes back as "lease not found".
    match timed(leases.keep_alive(lease)).await {
        Ok(_) => Ok(true),
        Err(e) if lease_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_etcd_http_or_no_scheme_comma_separated() {
        assert_eq!(
            parse_endpoints("etcd://127.0.0.1:2379").unwrap(),
            vec!["http://127.0.0.1:2379"]
        );
        assert_eq!(
            parse_endpoints("etcd://a:1, b:2,http://c:3/").unwrap(),
            vec!["http://a:1", "http://b:2", "http://c:3"]
        );
        for bad in ["", " , ", "https://a:1", "etcd://", "etcd://a:1/x"] {
            assert!(
                matches!(parse_endpoints(bad), Err(StoreError::Unavailable(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_millis(300)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(2001)), 3);
    }
}
