//! A director and its workers for the director tests: workers are daemons
//! with a `[[pool2tcp]]` target, `[director]`, and the other workers in
//! `[handoff] peers`; clients are `pool bridge tcp2pool --director`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

pub struct DirectorNode {
    pub key: PathBuf,
    pub public: String,
    pub listen: String,
    pub control: PathBuf,
    pub state: PathBuf,
    pub journal: PathBuf,
}

impl DirectorNode {
    pub fn new(dir: &TempDir, name: &str) -> DirectorNode {
        let (key, public) = keygen(dir, name);
        DirectorNode {
            key,
            public,
            listen: format!("127.0.0.1:{}", free_port()),
            control: dir.join(&format!("{name}.sock")),
            state: dir.join(&format!("{name}-state.json")),
            journal: dir.join(&format!("{name}.journal")),
        }
    }

    /// Another director with this one's key (directors sharing a store
    /// share a key).
    pub fn sharing(&self, dir: &TempDir, name: &str) -> DirectorNode {
        DirectorNode {
            key: self.key.clone(),
            public: self.public.clone(),
            listen: format!("127.0.0.1:{}", free_port()),
            control: dir.join(&format!("{name}.sock")),
            state: dir.join(&format!("{name}-state.json")),
            journal: dir.join(&format!("{name}.journal")),
        }
    }

    /// Starts it, trusting `workers` as workers and `clients`, and waits
    /// until it serves.
    pub fn start(
        &self,
        dir: &TempDir,
        name: &str,
        workers: &[String],
        clients: &[String],
        extra: &[&str],
    ) -> Proc {
        let mut p = self.spawn(dir, name, workers, clients, extra);
        self.wait_serving(&mut p);
        p
    }

    /// Waits until it listens and answers on its control socket.
    pub fn wait_serving(&self, p: &mut Proc) {
        wait_port(&self.listen, Duration::from_secs(15));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.control).is_err() {
            assert!(Instant::now() < deadline, "no control socket:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p.assert_running();
    }

    /// Starts it without waiting (a director that waits for the lead does
    /// not listen yet).
    pub fn spawn(
        &self,
        dir: &TempDir,
        name: &str,
        workers: &[String],
        clients: &[String],
        extra: &[&str],
    ) -> Proc {
        let mut args: Vec<String> = [
            "director",
            "--listen",
            &self.listen,
            "--key",
            self.key.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
            "--state",
            self.state.to_str().unwrap(),
            "--journal",
            self.journal.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for w in workers {
            args.extend(["--worker".to_string(), w.clone()]);
        }
        for c in clients {
            args.extend(["--allow".to_string(), c.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = std::fs::remove_file(&self.control);
        Proc::pool(name, &refs, dir)
    }

    /// `pool director ARGS --control ... --json`, which must succeed.
    pub fn ask(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["director"];
        all.extend_from_slice(args);
        all.extend(["--control", self.control.to_str().unwrap(), "--json"]);
        let out = pool_cmd(&all);
        assert!(
            out.status.success(),
            "pool {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// The rows of `pool director workers`.
    pub fn workers(&self) -> Vec<serde_json::Value> {
        self.ask(&["workers"])["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The row of worker `key`.
    pub fn worker(&self, key: &str) -> Option<serde_json::Value> {
        self.workers().into_iter().find(|w| w["key"] == key)
    }

    /// Waits until `pred` holds of the worker rows.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.workers();
            if pred(&rows) {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {rows:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct FleetWorker {
    pub name: String,
    pub key: PathBuf,
    pub public: String,
    pub listen: String,
    pub control: PathBuf,
    pub journal: PathBuf,
}

impl FleetWorker {
    pub fn new(dir: &TempDir, name: &str) -> FleetWorker {
        let (key, public) = keygen(dir, name);
        FleetWorker {
            name: name.to_string(),
            key,
            public,
            listen: format!("127.0.0.1:{}", free_port()),
            control: dir.join(&format!("{name}.sock")),
            journal: dir.join(&format!("{name}.journal")),
        }
    }

    /// Starts the daemon: trusting `clients` and `peers` (the other
    /// workers, also its `[handoff] peers`), registered with `director`.
    pub fn start(
        &self,
        dir: &TempDir,
        director: &DirectorNode,
        clients: &[String],
        peers: &[String],
        target: &str,
    ) -> Proc {
        self.start_via(
            dir,
            &director.listen,
            &director.public,
            clients,
            peers,
            target,
        )
    }

    /// Like `start`, with the director at `address` (one or more, or a
    /// forwarder's) with key `key`.
    pub fn start_via(
        &self,
        dir: &TempDir,
        address: &str,
        key: &str,
        clients: &[String],
        peers: &[String],
        target: &str,
    ) -> Proc {
        let q = |v: &[String]| {
            v.iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut trusted = clients.to_vec();
        trusted.extend_from_slice(peers);
        let text = format!(
            "[node]\nkey = \"{}\"\nlisten = \"{}\"\ncontrol = \"{}\"\njournal = \"{}\"\n\n\
             [trust]\nallow = [{}]\n\n\
             [[pool2tcp]]\ntarget = \"{target}\"\n\n\
             [handoff]\npeers = [{}]\n\n\
             [director]\naddress = \"{}\"\nkey = \"{}\"\nleave_deadline = \"60s\"\n",
            self.key.display(),
            self.listen,
            self.control.display(),
            self.journal.display(),
            q(&trusted),
            q(peers),
            address,
            key,
        );
        let path = dir.join(&format!("{}.toml", self.name));
        std::fs::write(&path, text).expect("write config");
        let _ = std::fs::remove_file(&self.control);
        let mut p = Proc::pool(
            &self.name,
            &["daemon", "--config", path.to_str().unwrap()],
            dir,
        );
        wait_port(&self.listen, Duration::from_secs(10));
        p.assert_running();
        p
    }

    /// Waits until its link to the director is up (`pool ctl status`).
    pub fn wait_linked(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = pool_cmd(&[
                "ctl",
                "status",
                "--json",
                "--control",
                self.control.to_str().unwrap(),
            ]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if v["director"]["linked"] == true {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never linked to its director: {v}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client sessions it holds now (`peers`: the other workers' keys,
    /// whose links are not counted).
    pub fn sessions(&self, peers: &[String]) -> Vec<serde_json::Value> {
        let out = pool_cmd(&[
            "ctl",
            "sessions",
            "--json",
            "--control",
            self.control.to_str().unwrap(),
        ]);
        if !out.status.success() {
            return Vec::new();
        }
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.into_iter()
            .filter(|r| r["role"] == "responder")
            .filter(|r| !peers.iter().any(|p| r["peer"] == p.as_str()))
            .collect()
    }
}

/// The fleet's workers, named `w0`, `w1`, ...
pub fn workers(dir: &TempDir, n: usize) -> Vec<FleetWorker> {
    (0..n)
        .map(|i| FleetWorker::new(dir, &format!("w{i}")))
        .collect()
}

/// Every worker's key but `me`'s.
pub fn peers_of(all: &[FleetWorker], me: usize) -> Vec<String> {
    all.iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(_, w)| w.public.clone())
        .collect()
}

/// A client bridge placed by the director; returns it and its TCP address.
pub fn placed_client(
    dir: &TempDir,
    name: &str,
    key: &Path,
    director: &DirectorNode,
) -> (Proc, String) {
    start_tcp2pool(
        dir,
        name,
        key,
        &director.listen,
        &director.public,
        &["--director"],
    )
}

/// A redis-server on a free loopback port.
pub fn redis(dir: &TempDir) -> (Proc, String) {
    require_program("redis-server", "redis-server");
    let port = free_port();
    let mut cmd = std::process::Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .args(["--appendonly", "no", "--daemonize", "no"])
    .arg("--dir")
    .arg(dir.path());
    let p = Proc::spawn("redis-server", cmd, dir);
    let target = format!("127.0.0.1:{port}");
    wait_port(&target, Duration::from_secs(10));
    (p, target)
}

/// One PING through `addr` with redis-cli: whether PONG came back.
pub fn redis_ping(addr: &str) -> bool {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = std::process::Command::new("redis-cli");
    cmd.args(["-h", host, "-p", port, "PING"]);
    let out = run(cmd, Duration::from_secs(5));
    String::from_utf8_lossy(&out.stdout).trim() == "PONG"
}

/// A TCP forwarder that can be cut: every connection through it is closed
/// and new ones are refused (accepted and dropped) until `restore`.
pub struct Cuttable {
    pub addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cuttable {
    pub fn new(target: &str) -> Cuttable {
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let addr = l.local_addr().unwrap().to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> =
            std::sync::Arc::default();
        let (c2, k2, target) = (cut.clone(), conns.clone(), target.to_string());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                if c2.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                k2.lock().unwrap().push(s.try_clone().unwrap());
                k2.lock().unwrap().push(up.try_clone().unwrap());
                let (mut a, mut b) = (s.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                });
                let (mut a, mut b) = (up, s);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Cuttable { addr, cut, conns }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
