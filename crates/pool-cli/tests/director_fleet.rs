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
    s.director.wait("w0 drained", Duration::from_secs(30), |rows| {
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
    assert!(j.iter().any(|e| e["event"] == "worker_draining" && e["by"] == "worker"));
    assert!(j.iter().any(|e| e["event"] == "worker_drained"));
    eprintln!("drained 2 sessions in {drained_in:?}");
    for p in w.iter_mut().skip(1) {
        p.assert_running();
    }
}
