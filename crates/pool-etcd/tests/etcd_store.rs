//! EtcdStore against a real etcd: each test starts its own `etcd` on
//! free loopback ports, in a data directory of its own, and kills it at
//! the end. The etcd binary is required (Debian's `etcd-server`): without
//! it these tests fail, they do not skip.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_director::store::{Store, StoreError, WorkerRecord, WorkerState};
use pool_etcd::EtcdStore;
use pool_net::{PublicKey, SecretKey};

/// A running etcd, killed (and its data removed) when dropped.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The etcd binary: `$ETCD_BIN`, else /usr/bin/etcd, else `etcd` on PATH.
fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/bin/etcd");
    if debian.exists() {
        return debian;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the etcd binary is missing: these tests need a real etcd \
         (Debian: apt-get install -y etcd-server, which puts it at /usr/bin/etcd; \
         or set ETCD_BIN to its path)"
    );
}

/// Go's name for this architecture, for ETCD_UNSUPPORTED_ARCH (etcd 3.4
/// refuses to start on any but amd64 and ppc64le without it).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

impl Etcd {
    async fn start() -> Etcd {
        static N: AtomicUsize = AtomicUsize::new(0);
        let binary = etcd_binary();
        let dir = std::env::temp_dir().join(format!(
            "pool-etcd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let child = Command::new(&binary)
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&url)
            .arg("--advertise-client-urls")
            .arg(&url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .env("ETCD_UNSUPPORTED_ARCH", go_arch())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut etcd = Etcd { child, dir, url };
        etcd.wait_ready().await;
        etcd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("etcd exited at start ({status}):\n{}", self.log());
            }
            let mut client = match etcd_client::Client::connect([self.url.as_str()], None).await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tokio::time::timeout(Duration::from_secs(1), client.get("/", None))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("etcd did not answer within 15 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn store(&self, lease_ttl: Duration) -> EtcdStore {
        let url = self.url.replace("http://", "etcd://");
        EtcdStore::connect(&url, "/pool/", lease_ttl).await.unwrap()
    }

    async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url.as_str()], None)
            .await
            .unwrap()
    }
}

fn key(n: u8) -> PublicKey {
    SecretKey::from_bytes([n; 32]).public_key()
}

fn worker(n: u8) -> WorkerRecord {
    WorkerRecord {
        key: key(n),
        addrs: vec![format!("127.0.0.1:{}", 7000 + u16::from(n))],
        state: WorkerState::Active,
        registered_ms: 1_700_000_000_000 + u64::from(n),
    }
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn put_renew_load_round_trip() {
    let etcd = Etcd::start().await;
    let store = etcd.store(LONG).await;
    assert_eq!(
        store.describe(),
        format!("etcd {} (prefix /pool/)", etcd.url)
    );
    let fleet = store.load().await.unwrap();
    assert!(fleet.workers.is_empty() && fleet.owners.is_empty());

    let mut a = worker(1);
    store.put_worker(&a, LONG).await.unwrap();
    store.put_worker(&worker(2), LONG).await.unwrap();
    store.renew(&a.key).await.unwrap();
    a.state = WorkerState::Draining;
    store.put_worker(&a, LONG).await.unwrap();

    let mut fleet = store.load().await.unwrap();
    fleet.workers.sort_by_key(|w| w.registered_ms);
    assert_eq!(fleet.workers, vec![a.clone(), worker(2)]);

    // Registering again kept the lease: one key on it.
    let mut c = etcd.client().await;
    let kv = c
        .get(format!("/pool/workers/{}", a.key), None)
        .await
        .unwrap();
    let lease = kv.kvs()[0].lease();
    assert_ne!(lease, 0);
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0 && ttl.granted_ttl() == 30, "{ttl:?}");

    // Another director (no lease in memory) renews from the worker's key.
    let other = etcd.store(LONG).await;
    other.renew(&a.key).await.unwrap();
    // An unknown worker's lease has lapsed.
    match other.renew(&key(9)).await {
        Err(StoreError::Lapsed { worker }) => assert_eq!(worker, key(9).to_string()),
        r => panic!("renew of an unknown worker: {r:?}"),
    }
}

#[tokio::test]
async fn claim_compares_and_swaps_with_rising_revisions() {
    let etcd = Etcd::start().await;
    let store = etcd.store(LONG).await;
    let (a, b) = (key(1), key(2));
    store.put_worker(&worker(1), LONG).await.unwrap();
    store.put_worker(&worker(2), LONG).await.unwrap();

    let r1 = store.claim("s1", None, a).await.unwrap();
    assert!(r1 > 0);
    // Owned by a: claiming it as if no one owned it, or from b, loses.
    match store.claim("s1", None, b).await {
        Err(StoreError::Conflict { session, owner }) => {
            assert_eq!(session, "s1");
            assert_eq!(owner, a.to_string());
        }
        r => panic!("claim from None of an owned session: {r:?}"),
    }
    match store.claim("s1", Some(b), b).await {
        Err(StoreError::Conflict { owner, .. }) => assert_eq!(owner, a.to_string()),
        r => panic!("claim from the wrong owner: {r:?}"),
    }
    // Nobody owns s2: claiming it from a loses, naming nobody.
    match store.claim("s2", Some(a), b).await {
        Err(StoreError::Conflict { owner, .. }) => assert_eq!(owner, "nobody"),
        r => panic!("claim from a of an unowned session: {r:?}"),
    }
    let r2 = store.claim("s1", Some(a), b).await.unwrap();
    assert!(r2 > r1, "{r2} > {r1}");
    let r3 = store.claim("s2", None, a).await.unwrap();
    assert!(r3 > r2);

    let mut owners = store.owners().await.unwrap();
    owners.sort_by(|x, y| x.session.cmp(&y.session));
    assert_eq!(owners.len(), 2);
    assert_eq!(
        (
            owners[0].session.as_str(),
            owners[0].owner,
            owners[0].revision
        ),
        ("s1", b, r2)
    );
    assert_eq!(
        (
            owners[1].session.as_str(),
            owners[1].owner,
            owners[1].revision
        ),
        ("s2", a, r3)
    );
    assert_eq!(store.load().await.unwrap().owners.len(), 2);

    // Release: only by its owner.
    store.release("s1", a).await.unwrap();
    assert_eq!(store.owners().await.unwrap().len(), 2);
    store.release("s1", b).await.unwrap();
    let owners = store.owners().await.unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].session, "s2");
    // Released: anyone may claim it from no one.
    store.claim("s1", None, a).await.unwrap();

    // A worker that never registered cannot own anything.
    match store.claim("s3", None, key(9)).await {
        Err(StoreError::Lapsed { worker }) => assert_eq!(worker, key(9).to_string()),
        r => panic!("claim for an unregistered worker: {r:?}"),
    }
}

#[tokio::test]
async fn a_lapsed_worker_is_fenced_and_loses_its_sessions() {
    let etcd = Etcd::start().await;
    let store = etcd.store(LONG).await;
    let (a, b) = (key(1), key(2));
    store
        .put_worker(&worker(1), Duration::from_secs(2))
        .await
        .unwrap();
    store.put_worker(&worker(2), LONG).await.unwrap();
    store.claim("s1", None, a).await.unwrap();
    store.claim("s2", None, a).await.unwrap();
    store.claim("s3", None, b).await.unwrap();
    store.renew(&a).await.unwrap();

    // a stops renewing: past its TTL etcd drops its key and its sessions.
    let start = Instant::now();
    loop {
        let owners = store.owners().await.unwrap();
        if owners.len() == 1 {
            assert_eq!((owners[0].session.as_str(), owners[0].owner), ("s3", b));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "a's sessions outlived its lease: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(1500));
    match store.claim("s4", None, a).await {
        Err(StoreError::Lapsed { worker }) => assert_eq!(worker, a.to_string()),
        r => panic!("claim by a lapsed worker: {r:?}"),
    }
    match store.renew(&a).await {
        Err(StoreError::Lapsed { .. }) => {}
        r => panic!("renew of a lapsed worker: {r:?}"),
    }
    let fleet = store.load().await.unwrap();
    assert_eq!(fleet.workers, vec![worker(2)]);
    // What a owned is free again; and a, registered anew, may claim.
    store.claim("s1", None, b).await.unwrap();
    store.put_worker(&worker(1), LONG).await.unwrap();
    store.claim("s2", None, a).await.unwrap();
}

#[tokio::test]
async fn remove_worker_drops_its_sessions() {
    let etcd = Etcd::start().await;
    let store = etcd.store(LONG).await;
    let (a, b) = (key(1), key(2));
    store.put_worker(&worker(1), LONG).await.unwrap();
    store.put_worker(&worker(2), LONG).await.unwrap();
    store.claim("s1", None, a).await.unwrap();
    store.claim("s2", None, a).await.unwrap();
    store.claim("s3", None, b).await.unwrap();

    // Removed by another director, which never saw a's lease.
    let other = etcd.store(LONG).await;
    other.remove_worker(&a).await.unwrap();
    let fleet = store.load().await.unwrap();
    assert_eq!(fleet.workers, vec![worker(2)]);
    assert_eq!(fleet.owners.len(), 1);
    assert_eq!(
        (fleet.owners[0].session.as_str(), fleet.owners[0].owner),
        ("s3", b)
    );
    match store.renew(&a).await {
        Err(StoreError::Lapsed { .. }) => {}
        r => panic!("renew of a removed worker: {r:?}"),
    }
    match store.claim("s1", None, a).await {
        Err(StoreError::Lapsed { .. }) => {}
        r => panic!("claim by a removed worker: {r:?}"),
    }
    // Removing it again, or one never known, is no error.
    store.remove_worker(&a).await.unwrap();
    store.remove_worker(&key(9)).await.unwrap();
}

/// Waits for the future to finish, or panics after `within`.
async fn within<T>(within: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(within, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {within:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_director_leads_once_the_first_is_dropped() {
    let etcd = Etcd::start().await;
    let first = etcd.store(LONG).await;
    let second = Arc::new(etcd.store(LONG).await);
    within(
        Duration::from_secs(3),
        "the first campaign",
        first.campaign("d1"),
    )
    .await
    .unwrap();
    // Campaigning again while leading: at once.
    within(
        Duration::from_secs(3),
        "a second campaign",
        first.campaign("d1"),
    )
    .await
    .unwrap();
    let mut c = etcd.client().await;
    let leader = c.leader("/pool/leader").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"d1");

    let waiting = tokio::spawn({
        let second = second.clone();
        async move { second.campaign("d2").await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "the second led while the first did");

    // The first goes (its lease of 30 s is revoked as it does): the second leads.
    let dropped = Instant::now();
    drop(first);
    within(Duration::from_secs(5), "the second's lead", waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(dropped.elapsed() < Duration::from_secs(5));
    let leader = c.leader("/pool/leader").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"d2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_director_whose_lease_is_revoked_is_deposed() {
    let etcd = Etcd::start().await;
    let ttl = Duration::from_secs(3);
    let first = Arc::new(etcd.store(ttl).await);
    let second = Arc::new(etcd.store(ttl).await);
    within(
        Duration::from_secs(3),
        "the first campaign",
        first.campaign("d1"),
    )
    .await
    .unwrap();
    let deposed = tokio::spawn({
        let first = first.clone();
        async move { first.deposed().await }
    });
    let waiting = tokio::spawn({
        let second = second.clone();
        async move { second.campaign("d2").await }
    });
    // Past several keep-alives (every second): still leading.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert!(!deposed.is_finished(), "deposed while its lease lived");
    assert!(!waiting.is_finished(), "the second led while the first did");

    // Someone revokes the first's lease (an operator, with etcdctl).
    let mut c = etcd.client().await;
    let leader = c.leader("/pool/leader").await.unwrap();
    let kv = leader.kv().unwrap();
    assert_eq!(kv.value(), b"d1");
    c.lease_revoke(kv.lease()).await.unwrap();

    within(Duration::from_secs(3), "the first's deposition", deposed)
        .await
        .unwrap()
        .unwrap();
    within(Duration::from_secs(3), "the second's lead", waiting)
        .await
        .unwrap()
        .unwrap();
    let leader = c.leader("/pool/leader").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"d2");

    // Deposed, the first may campaign again: it waits for the second.
    let again = tokio::spawn({
        let first = first.clone();
        async move { first.campaign("d1").await }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!again.is_finished());
    again.abort();
}

/// The leader's process dies without a word (its runtime stops, nothing
/// revokes its lease): the lead passes when the lease expires.
#[test]
fn the_lead_passes_when_the_leaders_lease_expires() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(Etcd::start());
    let ttl = Duration::from_secs(2);
    let dying = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let first = dying.block_on(async {
        let first = etcd.store(ttl).await;
        first.campaign("d1").await.unwrap();
        // Past a few keep-alives.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        first
    });
    rt.block_on(async {
        let second = Arc::new(etcd.store(ttl).await);
        let waiting = tokio::spawn({
            let second = second.clone();
            async move { second.campaign("d2").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the second led while the first did");
        let died = Instant::now();
        dying.shutdown_background();
        // Its store is never dropped: nothing revokes its lease.
        std::mem::forget(first);
        within(Duration::from_secs(8), "the second's lead", waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(
            died.elapsed() >= Duration::from_millis(900),
            "the lead passed before the lease could expire: {:?}",
            died.elapsed()
        );
        let mut c = etcd.client().await;
        let leader = c.leader("/pool/leader").await.unwrap();
        assert_eq!(leader.kv().unwrap().value(), b"d2");
    });
}

/// etcd goes away: the leader cannot keep its lease and knows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_etcd_is_deposed() {
    let mut etcd = Etcd::start().await;
    let ttl = Duration::from_secs(3);
    let store = Arc::new(etcd.store(ttl).await);
    store.campaign("d1").await.unwrap();
    let deposed = tokio::spawn({
        let store = store.clone();
        async move { store.deposed().await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!deposed.is_finished());
    etcd.child.kill().unwrap();
    let killed = Instant::now();
    within(Duration::from_secs(6), "the deposition", deposed)
        .await
        .unwrap()
        .unwrap();
    // Before the lease (renewed at most a second before the kill) could lapse.
    assert!(killed.elapsed() < ttl, "{:?}", killed.elapsed());
    match store.owners().await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains(&etcd.url), "{m}"),
        r => panic!("owners with etcd gone: {r:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_etcd_is_unavailable_naming_it() {
    let port = free_port();
    let started = Instant::now();
    let url = format!("etcd://127.0.0.1:{port}");
    match EtcdStore::connect(&url, "", Duration::from_secs(5)).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains(&format!("http://127.0.0.1:{port}")), "{m}");
        }
        Err(e) => panic!("connect to nobody: {e}"),
        Ok(_) => panic!("connect to nobody succeeded"),
    }
    assert!(started.elapsed() < Duration::from_secs(12));
    match EtcdStore::connect("https://127.0.0.1:1", "", Duration::from_secs(5)).await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("no TLS"), "{m}"),
        Err(e) => panic!("https: {e}"),
        Ok(_) => panic!("https succeeded"),
    }
}
