//! A change of server with real programs: two worker daemons (A and B),
//! each with its own nginx (or a shared redis) behind `[[pool2tcp]]`, and a
//! client `pool bridge tcp2pool` dialling A. `pool ctl handoff` moves the
//! client's session from A to B (and back) while programs run through it:
//! the download in flight completes with the right SHA-256 (its stream stays
//! on A and is forwarded through B), new requests are served by B (B's
//! nginx log shows them), and `redis-benchmark` sees no error across ten
//! handoffs A → B → A.
mod util;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use util::*;

struct Worker {
    name: &'static str,
    key: PathBuf,
    public: String,
    listen: String,
    control: PathBuf,
    journal: PathBuf,
}

impl Worker {
    fn new(dir: &TempDir, name: &'static str) -> Worker {
        let (key, public) = keygen(dir, name);
        Worker {
            name,
            key,
            public,
            listen: format!("127.0.0.1:{}", free_port()),
            control: dir.join(&format!("{name}.sock")),
            journal: dir.join(&format!("{name}.journal")),
        }
    }

    fn start(&self, dir: &TempDir, client: &str, peer: &str, target: &str) -> Proc {
        let text = format!(
            "[node]\nkey = \"{}\"\nlisten = \"{}\"\ncontrol = \"{}\"\njournal = \"{}\"\n\n\
             [trust]\nallow = [\"{client}\", \"{peer}\"]\n\n\
             [[pool2tcp]]\ntarget = \"{target}\"\n\n\
             [handoff]\npeers = [\"{peer}\"]\n",
            self.key.display(),
            self.listen,
            self.control.display(),
            self.journal.display(),
        );
        let path = dir.join(&format!("{}.toml", self.name));
        std::fs::write(&path, text).expect("write config");
        let mut p = Proc::pool(
            self.name,
            &["daemon", "--config", path.to_str().unwrap()],
            dir,
        );
        wait_port(&self.listen, Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.control).is_err() {
            assert!(Instant::now() < deadline, "no control socket:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p.assert_running();
        p
    }

    /// `pool ctl handoff` of the session of `client` to `to`.
    fn handoff(&self, client: &str, to: &Worker) -> serde_json::Value {
        let out = pool_cmd(&[
            "ctl",
            "handoff",
            &client[..8],
            "--to",
            &to.listen,
            "--to-key",
            &to.public,
            "--control",
            self.control.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "pool ctl handoff {} -> {} failed: {}",
            self.name,
            to.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains("handed to"), "{text}");
        serde_json::json!(text)
    }
}

fn nginx(dir: &TempDir, name: &str, www: &std::path::Path) -> (Proc, String, PathBuf) {
    let port = free_port();
    let d = dir.path().display();
    let log = dir.join(&format!("{name}-access.log"));
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/{name}.pid;\n\
         error_log {d}/{name}-error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n access_log {};\n client_body_temp_path {d}/{name}-cb;\n proxy_temp_path {d}/{name}-p;\n\
         fastcgi_temp_path {d}/{name}-f;\n uwsgi_temp_path {d}/{name}-u;\n scgi_temp_path {d}/{name}-s;\n\
         default_type application/octet-stream;\n server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
        log.display(),
        www.display()
    );
    let conf_path = dir.join(&format!("{name}.conf"));
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.join(&format!("{name}-error.log")))
        .arg("-c")
        .arg(&conf_path);
    let p = Proc::spawn(name, cmd, dir);
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr, Duration::from_secs(10));
    (p, addr, log)
}

fn curl_get(addr: &str, path: &str) -> String {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://{addr}{path}"));
    let out = run(c, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn download_survives_a_handoff_and_new_requests_go_to_the_target() {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new("handoff-nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    // 1 GiB: one random MiB repeated, each copy stamped with its index.
    let mut block = vec![0u8; 1 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut block).unwrap();
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(www.join("big.bin")).unwrap());
        for i in 0u32..1024 {
            block[..4].copy_from_slice(&i.to_be_bytes());
            f.write_all(&block).unwrap();
            hasher.update(&block);
        }
    }
    let want = hex(hasher.finish().as_ref());
    std::fs::write(www.join("small.txt"), b"hello\n").unwrap();
    let (mut ng_a, addr_a, log_a) = nginx(&dir, "nginx-a", &www);
    let (mut ng_b, addr_b, log_b) = nginx(&dir, "nginx-b", &www);

    let (ckey, cpub) = keygen(&dir, "client");
    let a = Worker::new(&dir, "a");
    let b = Worker::new(&dir, "b");
    let mut pa = a.start(&dir, &cpub, &b.public, &addr_a);
    let mut pb = b.start(&dir, &cpub, &a.public, &addr_b);
    let (mut client, tcp) = start_tcp2pool(&dir, "tcp2pool", &ckey, &a.listen, &a.public, &[]);
    assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");

    // The download, paced so that it is surely in flight at the handoff.
    let out_file = dir.join("fetched.bin");
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--fail",
        "--limit-rate",
        "150M",
        "--max-time",
        "120",
        "-o",
    ])
    .arg(&out_file)
    .arg(format!("http://{tcp}/big.bin"));
    let dl = std::thread::spawn(move || run(curl, Duration::from_secs(150)));
    std::thread::sleep(Duration::from_millis(1500));
    a.handoff(&cpub, &b);
    // New requests, during the download and after the handoff: B serves them.
    for _ in 0..3 {
        assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");
    }
    let out = dl.join().unwrap();
    assert!(
        out.status.success(),
        "download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&out_file).unwrap();
    assert_eq!(got.len(), 1 << 30, "the whole file arrived");
    assert_eq!(sha256_hex(&got), want, "byte for byte");
    let la = std::fs::read_to_string(&log_a).unwrap();
    let lb = std::fs::read_to_string(&log_b).unwrap();
    assert!(la.contains("/big.bin"), "the download was A's");
    assert_eq!(
        la.matches("/small.txt").count(),
        1,
        "A served only the request before: {la}"
    );
    assert_eq!(
        lb.matches("/small.txt").count(),
        3,
        "B served the requests after: {lb}"
    );
    // All three journals say so.
    wait_journal(
        &a.journal,
        Duration::from_secs(5),
        "handoff_committed",
        |e| e["event"] == "handoff_committed",
    );
    wait_journal(
        &b.journal,
        Duration::from_secs(5),
        "handoff_imported",
        |e| e["event"] == "handoff_imported",
    );
    for p in [&mut pa, &mut pb, &mut client, &mut ng_a, &mut ng_b] {
        p.assert_running();
    }
}

#[test]
fn redis_benchmark_runs_through_ten_handoffs() {
    require_program("redis-server", "redis-server");
    require_program("redis-benchmark", "redis-tools");
    let dir = TempDir::new("handoff-redis");
    let port = free_port();
    let mut cmd = Command::new("redis-server");
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
    let mut redis = Proc::spawn("redis-server", cmd, &dir);
    let target = format!("127.0.0.1:{port}");
    wait_port(&target, Duration::from_secs(10));

    let (ckey, cpub) = keygen(&dir, "client");
    let a = Worker::new(&dir, "a");
    let b = Worker::new(&dir, "b");
    let mut pa = a.start(&dir, &cpub, &b.public, &target);
    let mut pb = b.start(&dir, &cpub, &a.public, &target);
    let (mut client, tcp) = start_tcp2pool(&dir, "tcp2pool", &ckey, &a.listen, &a.public, &[]);
    let (host, bport) = tcp.rsplit_once(':').unwrap();
    let mut bench = Command::new("redis-benchmark");
    bench.args([
        "-h", host, "-p", bport, "-t", "set,get", "-n", "200000", "-c", "10", "-q",
    ]);
    let runner = std::thread::spawn(move || run(bench, Duration::from_secs(120)));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..10 {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        from.handoff(&cpub, to);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = runner.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(
        out.status.success(),
        "redis-benchmark failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SET") && text.contains("GET"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    for p in [&mut pa, &mut pb, &mut client, &mut redis] {
        p.assert_running();
    }
}
