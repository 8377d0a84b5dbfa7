//! The director with real programs: three worker daemons (`pool2tcp` in
//! front of one `redis-server`), a director, and clients through
//! `pool bridge tcp2pool --director`.
//!
//! - A worker drained by SIGTERM while `redis-benchmark` runs through every
//!   client: no errors, its sessions end up on the other two, it exits 0.
//! - `kill -9` of a worker under load: the director marks it lost within
//!   its lease, its clients work again through another worker, and the
//!   request in flight got a reset, not a hang.
//! - A worker joining under skewed load: sessions rebalance onto it, then
//!   stop moving.
//! - The director restarted: its registry comes back from its state file.
mod util;

use std::process::Command;
use std::time::{Duration, Instant};

use util::fleet::*;
use util::*;

struct Setup {
    dir: TempDir,
    director: DirectorNode,
    workers: Vec<FleetWorker>,
    clients: Vec<(std::path::PathBuf, String)>,
    _redis: Proc,
    target: String,
}

fn setup(tag: &str, n_workers: usize, n_clients: usize) -> Setup {
    let dir = TempDir::new(tag);
    let (redis, target) = redis(&dir);
    let director = DirectorNode::new(&dir, "director");
    let workers = workers(&dir, n_workers);
    let clients: Vec<_> = (0..n_clients)
        .map(|i| keygen(&dir, &format!("client{i}")))
        .collect();
    Setup {
        dir,
        director,
        workers,
        clients,
        _redis: redis,
        target,
    }
}

impl Setup {
    fn worker_keys(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.public.clone()).collect()
    }
    fn client_keys(&self) -> Vec<String> {
        self.clients.iter().map(|c| c.1.clone()).collect()
    }
    fn start_director(&self, extra: &[&str]) -> Proc {
        self.director.start(
            &self.dir,
            "director",
            &self.worker_keys(),
            &self.client_keys(),
            extra,
        )
    }
    fn start_worker(&self, i: usize) -> Proc {
        self.workers[i].start(
            &self.dir,
            &self.director,
            &self.client_keys(),
            &peers_of(&self.workers, i),
            &self.target,
        )
    }
    fn start_clients(&self) -> Vec<(Proc, String)> {
        self.clients
            .iter()
            .enumerate()
            .map(|(i, (k, _))| placed_client(&self.dir, &format!("client{i}"), k, &self.director))
            .collect()
    }
    fn sessions_of(&self, i: usize) -> usize {
        self.workers[i]
            .sessions(&self.worker_keys())
            .into_iter()
            .filter(|r| self.client_keys().iter().any(|c| r["peer"] == c.as_str()))
            .count()
    }
    fn wait_active(&self, n: usize) {
        self.director.wait(
            &format!("{n} active workers"),
            Duration::from_secs(15),
            |rows| {
                rows.iter()
                    .filter(|w| w["state"] == "active" && w["connected"] == true)
                    .count()
                    == n
            },
        );
    }
}

fn bench(addr: &str, n: u32) -> std::thread::JoinHandle<std::process::Output> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", host, "-p", port, "-t", "set,get", "-c", "4", "-q"])
        .args(["-n", &n.to_string()]);
    std::thread::spawn(move || run(cmd, Duration::from_secs(240)))
}

#[test]
fn a_worker_drained_by_sigterm_under_redis_benchmark_loses_nothing_and_exits_0() {
    require_program("redis-benchmark", "redis-tools");
    let s = setup("director-drain", 3, 6);
    let _d = s.start_director(&["--no-rebalance"]);
    let mut w: Vec<Proc> = (0..3).map(|i| s.start_worker(i)).collect();
    s.wait_active(3);
    let clients = s.start_clients();
    // One PING each places every client (two per worker).
    for (_, addr) in &clients {
        assert!(redis_ping(addr), "PING through {addr}");
    }
    let per: Vec<usize> = (0..3).map(|i| s.sessions_of(i)).collect();
    assert_eq!(per, vec![2, 2, 2], "placement by least sessions");
    let runs: Vec<_> = clients.iter().map(|(_, a)| bench(a, 40_000)).collect();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    w[0].signal("TERM");
    // The director drains it: its sessions move to the other two.
    s.director
        .wait("w0 drained", Duration::from_secs(30), |rows| {
            rows.iter()
                .any(|r| r["key"] == s.workers[0].public.as_str() && r["state"] == "drained")
        });
    let drained_in = started.elapsed();
    assert_eq!(s.sessions_of(0), 0, "w0 still holds sessions");
    assert_eq!(s.sessions_of(1) + s.sessions_of(2), 6);
    for r in runs {
        let out = r.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
        assert!(
            out.status.success() && !text.to_lowercase().contains("error"),
            "redis-benchmark: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    }
    // Empty once the forwarded benchmark connections have ended: exit 0.
    let status = w[0].wait_exit(Duration::from_secs(60));
    assert!(status.success(), "w0 exited with {status}:\n{}", w[0].log());
    // New connections go to the others directly.
    for (_, addr) in &clients {
        assert!(redis_ping(addr));
    }
    let j = journal_entries(&s.director.journal);
    assert!(j
        .iter()
        .any(|e| e["event"] == "worker_draining" && e["by"] == "worker"));
    assert!(j.iter().any(|e| e["event"] == "worker_drained"));
    eprintln!("drained 2 sessions in {drained_in:?}");
    for p in w.iter_mut().skip(1) {
        p.assert_running();
    }
}

/// The client whose session is on worker `w`.
fn client_on(s: &Setup, w: usize) -> usize {
    let rows = s.workers[w].sessions(&s.worker_keys());
    let peer = rows.first().expect("a session on the worker")["peer"]
        .as_str()
        .unwrap()
        .to_string();
    s.clients.iter().position(|c| c.1 == peer).unwrap()
}

#[test]
fn a_killed_worker_is_lost_within_its_lease_and_its_clients_come_back_elsewhere() {
    require_program("redis-benchmark", "redis-tools");
    require_program("redis-cli", "redis-tools");
    let s = setup("director-kill", 3, 3);
    let _d = s.start_director(&["--no-rebalance", "--lease", "3s"]);
    let mut w: Vec<Proc> = (0..3).map(|i| s.start_worker(i)).collect();
    s.wait_active(3);
    let clients = s.start_clients();
    for (_, addr) in &clients {
        assert!(redis_ping(addr));
    }
    let victim = 1;
    let c = client_on(&s, victim);
    let addr = clients[c].1.clone();
    // A request in flight when the worker dies: BLPOP waits for ever.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut blpop = Command::new("redis-cli");
    blpop.args(["-h", host, "-p", port, "BLPOP", "never", "0"]);
    let blocked = std::thread::spawn(move || {
        let t = Instant::now();
        let out = run(blpop, Duration::from_secs(30));
        (t.elapsed(), out)
    });
    // Load through the others.
    let others: Vec<_> = clients
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != c)
        .map(|(_, (_, a))| bench(a, 30_000))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    w[victim].kill9();
    let rows = s
        .director
        .wait("the victim lost", Duration::from_secs(6), |rows| {
            rows.iter()
                .any(|r| r["key"] == s.workers[victim].public.as_str() && r["state"] == "lost")
        });
    let lost_after = killed.elapsed();
    assert!(
        lost_after < Duration::from_millis(3000 + 600),
        "declared lost after {lost_after:?} (lease 3 s): {rows:#?}"
    );
    // The client works again, through another worker.
    let back = loop {
        if redis_ping(&addr) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the client never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        back < Duration::from_millis(3000 + 2000),
        "a working session elsewhere only {back:?} after the kill (lease 3 s)"
    );
    // The request in flight was reset, not left hanging.
    let (waited, out) = blocked.join().unwrap();
    assert!(
        waited < Duration::from_secs(10),
        "BLPOP hung for {waited:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.to_lowercase().contains("reset"), "BLPOP: {said}");
    let now_on = s.workers.iter().enumerate().find(|(i, fw)| {
        *i != victim
            && fw
                .sessions(&s.worker_keys())
                .iter()
                .any(|r| r["peer"] == s.clients[c].1.as_str())
    });
    assert!(
        now_on.is_some(),
        "the client's new session is on no live worker"
    );
    for r in others {
        let out = r.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let j = journal_entries(&s.director.journal);
    assert!(j.iter().any(|e| e["event"] == "worker_lost"));
    eprintln!(
        "lost after {lost_after:?}; client back after {back:?}; BLPOP after {waited:?}: {said:?}"
    );
    for (i, p) in w.iter_mut().enumerate() {
        if i != victim {
            p.assert_running();
        }
    }
}

#[test]
fn a_joining_worker_takes_sessions_until_balanced_then_nothing_moves() {
    let s = setup("director-join", 3, 8);
    let metrics = format!("127.0.0.1:{}", free_port());
    let d = s.start_director(&["--moves-per-sec", "20", "--metrics", &metrics]);
    let mut w: Vec<Proc> = (0..2).map(|i| s.start_worker(i)).collect();
    s.wait_active(2);
    let clients = s.start_clients();
    for (_, addr) in &clients {
        assert!(redis_ping(addr));
    }
    assert_eq!((s.sessions_of(0), s.sessions_of(1)), (4, 4));
    w.push(s.start_worker(2));
    let rows = s.director.wait("rebalanced", Duration::from_secs(20), |_| {
        let mut n = [s.sessions_of(0), s.sessions_of(1), s.sessions_of(2)];
        n.sort();
        n == [2, 3, 3]
    });
    // Then nothing moves: stable for three seconds, well past the
    // heartbeats that would start another round.
    let moved = |d: &DirectorNode| d.ask(&["status"])["sessions_moved"].as_u64().unwrap();
    let before = moved(&s.director);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        moved(&s.director),
        before,
        "sessions still moving: {rows:#?}"
    );
    let mut n = [s.sessions_of(0), s.sessions_of(1), s.sessions_of(2)];
    n.sort();
    assert_eq!(n, [2, 3, 3]);
    // Every client still works.
    for (_, addr) in &clients {
        assert!(redis_ping(addr));
    }
    let j = journal_entries(&s.director.journal);
    assert!(j.iter().any(|e| e["event"] == "sessions_rebalanced"));
    // The same on /metrics.
    let (code, text) = http_get(&metrics, "/metrics");
    assert_eq!(code, 200, "{text}");
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(value("pool_director_rebalance_orders_total") >= 1.0);
    assert!(value("pool_director_sessions_moved_total") >= 2.0);
    assert_eq!(value("pool_director_placements_total"), 8.0);
    assert_eq!(value("pool_director_workers{state=\"active\"}"), 3.0);
    drop(d);
}

#[test]
fn a_restarted_director_has_its_registry_back_from_its_state_file() {
    let s = setup("director-restart", 2, 1);
    let mut d = s.start_director(&[]);
    let _w: Vec<Proc> = (0..2).map(|i| s.start_worker(i)).collect();
    s.wait_active(2);
    let v = s.director.ask(&["drain", &s.workers[0].public[..10]]);
    assert_eq!(v["worker"], s.workers[0].public.as_str());
    s.director
        .wait("w0 drained", Duration::from_secs(10), |rows| {
            rows.iter()
                .any(|r| r["key"] == s.workers[0].public.as_str() && r["state"] == "drained")
        });
    // The state file is written within half a second of a change.
    std::thread::sleep(Duration::from_millis(800));
    d.kill9();
    let _d2 = s.start_director(&[]);
    // Straight from the file, before any worker is back.
    let j = journal_entries(&s.director.journal);
    let started: Vec<_> = j
        .iter()
        .filter(|e| e["event"] == "director_started")
        .collect();
    assert_eq!(started.len(), 2);
    assert_eq!(started[1]["workers_restored"], 2);
    // The workers come back on their own; w0 stays drained.
    let rows = s
        .director
        .wait("both back", Duration::from_secs(10), |rows| {
            rows.len() == 2 && rows.iter().all(|r| r["connected"] == true)
        });
    let w0 = rows
        .iter()
        .find(|r| r["key"] == s.workers[0].public.as_str())
        .unwrap();
    assert_eq!(w0["state"], "drained", "{rows:#?}");
    let w1 = rows
        .iter()
        .find(|r| r["key"] == s.workers[1].public.as_str())
        .unwrap();
    assert_eq!(w1["state"], "active");
    // A new client goes to the active one.
    let (_c, addr) = placed_client(&s.dir, "client0", &s.clients[0].0, &s.director);
    assert!(redis_ping(&addr));
    assert_eq!((s.sessions_of(0), s.sessions_of(1)), (0, 1));
}

#[test]
fn a_worker_cannot_claim_a_session_that_was_not_handed_to_it() {
    use pool_director::wire::{write_line, FromWorker, LineReader, ToWorker};
    let s = setup("director-claim", 2, 1);
    let _d = s.start_director(&["--no-rebalance"]);
    let _w0 = s.start_worker(0);
    s.wait_active(1);
    let (_c, addr) = placed_client(&s.dir, "client0", &s.clients[0].0, &s.director);
    assert!(redis_ping(&addr));
    let id = s.workers[0].sessions(&s.worker_keys())[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Recorded as w0's from its next heartbeat.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.director.ask(&["owners"])["owners"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the session was never recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
    // w1's key, but not its daemon: it registers and claims w0's session.
    let text = std::fs::read_to_string(&s.workers[1].key).unwrap();
    let key = pool_net::SecretKey::from_file_text(&text).unwrap();
    let w0: pool_net::PublicKey = s.workers[0].public.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let ep = pool_net::Endpoint::client(pool_net::EndpointConfig::new(key));
        let dk: pool_net::PublicKey = s.director.public.parse().unwrap();
        let session = ep.connect(&s.director.listen, dk).await.unwrap();
        let (r, mut w) = session.open_stream().await.unwrap().into_split();
        let mut r = LineReader::new(r);
        let hello = FromWorker::Hello {
            addrs: vec!["127.0.0.1:1".into()],
            sessions: Vec::new(),
            load: Default::default(),
            was: None,
        };
        write_line(&mut w, &hello).await.unwrap();
        assert!(matches!(
            r.next::<ToWorker>().await.unwrap(),
            Some(ToWorker::Welcome { .. })
        ));
        let claim = FromWorker::Claim {
            id: 1,
            session: id.clone(),
            from: w0,
        };
        write_line(&mut w, &claim).await.unwrap();
        loop {
            match r.next::<ToWorker>().await.unwrap() {
                Some(ToWorker::Claimed { ok, error, .. }) => break (ok, error),
                Some(_) => continue,
                None => panic!("the director closed the link"),
            }
        }
    });
    assert!(
        !answer.0,
        "the director let a worker take a session no one handed it"
    );
    assert!(answer.1.unwrap_or_default().contains("did not announce"));
    let owners = s.director.ask(&["owners"]);
    let o = &owners["owners"].as_array().unwrap()[0];
    assert_eq!(o["owner"], s.workers[0].public.as_str());
    let j = journal_entries(&s.director.journal);
    assert!(j.iter().any(|e| e["event"] == "claim_refused"));
    assert!(redis_ping(&addr), "the session broke");
}
