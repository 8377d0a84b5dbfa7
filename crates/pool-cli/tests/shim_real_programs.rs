//! Unmodified programs under `LD_PRELOAD=libpool_shim.so`: `curl` to a
//! real nginx, `redis-benchmark` and `redis-cli` to a real redis, and
//! programs started by `bash -c` and Python's `os.system` — each shown to
//! go through POOL by the destination daemon's counters and journal, not
//! only by the answer.
mod util;

use std::process::Command;
use std::time::Duration;

use util::shim::*;
use util::*;

/// nginx serves 3 MiB of random bytes; `curl` under the shim gets exactly
/// them and a 404 for a missing path. The destination daemon counted both
/// connections as shim streams from the source node's key, its journal
/// has that key's session, `/metrics` on both sides and `pool ctl
/// sessions` count them, and nginx logged nothing the shim could have
/// sent around POOL.
#[test]
fn curl_to_nginx_through_pool() {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new("shim-nginx");
    std::fs::create_dir_all(dir.join("www")).expect("mkdir www");
    let mut content = vec![0u8; 3 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut content)
        .expect("random content");
    std::fs::write(dir.join("www/blob.bin"), &content).expect("write blob");
    let port = free_port();
    let mut nginx = start_nginx(&dir, port);
    let mut nodes = shim_nodes(&dir, &[port]);
    let base = counter(&nodes.dest_control, "shim_exposed");

    let out_file = dir.join("fetched.bin");
    let mut curl = shimmed("curl", &nodes.shim_socket, &port.to_string());
    curl.args(["-sS", "--fail", "--max-time", "20", "-o"])
        .arg(&out_file)
        .arg(format!("http://127.0.0.1:{port}/blob.bin"));
    let out = run(curl, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "curl under the shim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = std::fs::read(&out_file).expect("read fetched file");
    assert_eq!(
        sha256_hex(&fetched),
        sha256_hex(&content),
        "SHA-256 of the file"
    );

    let mut curl = shimmed("curl", &nodes.shim_socket, &port.to_string());
    curl.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg(format!("http://127.0.0.1:{port}/no/such/file"));
    let out = run(curl, Duration::from_secs(20));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // Through POOL: the destination daemon connected both to nginx.
    assert_eq!(
        wait_counter(
            &nodes.dest_control,
            "shim_exposed",
            base + 2,
            Duration::from_secs(5)
        ),
        base + 2
    );
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 2);
    assert_eq!(counter(&nodes.source_control, "shim_failed"), 0);
    let opened = wait_journal(
        &nodes.dest_journal,
        Duration::from_secs(5),
        "session_opened",
        |e| e["event"] == "session_opened",
    );
    assert_eq!(opened["peer"], nodes.source_pub.as_str(), "{opened}");
    let out = pool_cmd(&[
        "ctl",
        "sessions",
        "--json",
        "--control",
        nodes.dest_control.to_str().expect("utf-8"),
    ]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sessions JSON");
    let shim_streams: u64 = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["peer"] == nodes.source_pub.as_str())
        .map(|r| r["shim_streams"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        shim_streams, 2,
        "pool ctl sessions on the destination: {rows}"
    );
    let (status, body) = http_get(&nodes.dest_metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.lines().any(|l| l == "pool_shim_exposed_total 2"),
        "destination /metrics:\n{body}"
    );
    let (_, body) = http_get(&nodes.source_metrics, "/metrics");
    assert!(
        body.lines().any(|l| l == "pool_shim_streams_total 2"),
        "source /metrics:\n{body}"
    );
    // The human table has the SHIM column.
    let out = pool_cmd(&[
        "ctl",
        "sessions",
        "--control",
        nodes.source_control.to_str().expect("utf-8"),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().next().unwrap_or("").ends_with("SHIM"),
        "{table}"
    );

    nginx.assert_running();
    nodes.source.assert_running();
    nodes.dest.assert_running();
}

/// `redis-benchmark` (10 clients, PING/SET/GET) and `redis-cli` under the
/// shim against a real redis: every connection is a shim stream at the
/// destination.
#[test]
fn redis_benchmark_under_shim() {
    require_program("redis-server", "redis-server");
    require_program("redis-benchmark", "redis-tools");
    require_program("redis-cli", "redis-tools");
    let dir = TempDir::new("shim-redis");
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path());
    let mut redis = Proc::spawn("redis-server", cmd, &dir);
    wait_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    let nodes = shim_nodes(&dir, &[port]);
    let ports = port.to_string();

    let mut bench = shimmed("redis-benchmark", &nodes.shim_socket, &ports);
    bench
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &ports,
            "-c",
            "10",
            "-n",
            "3000",
            "-q",
        ])
        .args(["-t", "ping,set,get"]);
    let out = run(bench, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "redis-benchmark failed: {text}");
    for op in ["SET", "GET"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{op}: ")) && l.contains("requests per second")),
            "no {op} result in:\n{text}"
        );
    }
    let carried = counter(&nodes.dest_control, "shim_exposed");
    assert!(carried >= 10, "only {carried} shim streams for 10 clients");

    let cli = |args: &[&str]| {
        let mut c = shimmed("redis-cli", &nodes.shim_socket, &ports);
        c.args(["-h", "127.0.0.1", "-p", &ports]).args(args);
        let out = run(c, Duration::from_secs(10));
        assert!(out.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["set", "shim-key", "over POOL"]), "OK");
    assert_eq!(cli(&["get", "shim-key"]), "over POOL");
    wait_counter(
        &nodes.dest_control,
        "shim_exposed",
        carried + 2,
        Duration::from_secs(5),
    );
    redis.assert_running();
}

/// The shim is inherited: `curl` started by `bash -c` and by Python's
/// `os.system` is shimmed too (the destination counts both).
#[test]
fn children_of_bash_and_python_are_shimmed() {
    require_program("curl", "curl");
    require_program("bash", "bash");
    require_program("python3", "python3");
    let dir = TempDir::new("shim-children");
    let (port, _) = http_server("hello from the target\n");
    let nodes = shim_nodes(&dir, &[port]);
    let url = format!("http://127.0.0.1:{port}/");

    let mut bash = shimmed("bash", &nodes.shim_socket, &port.to_string());
    bash.arg("-c").arg(format!("curl -sS --max-time 10 {url}"));
    let out = run(bash, Duration::from_secs(20));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the target\n"
    );
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 1);

    let py = shimmed("python3", &nodes.shim_socket, &port.to_string());
    let script = "import os, sys\nrc = os.system('curl -sS --max-time 10 ' + sys.argv[1])\nsys.exit(rc >> 8)";
    let stdout = python(py, script, &[url], Duration::from_secs(20));
    assert_eq!(stdout, "hello from the target\n");
    wait_counter(
        &nodes.dest_control,
        "shim_exposed",
        2,
        Duration::from_secs(5),
    );
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 2);
}

/// nginx itself under the shim, as a reverse proxy with a master and two
/// worker processes (forked after the library is loaded): its upstream
/// connections — non-blocking `connect`, epoll, `SO_ERROR` — go through
/// POOL, while its own listener is untouched.
#[test]
fn nginx_as_a_shimmed_reverse_proxy() {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new("shim-nginx-proxy");
    let (backend, accepted) = http_server("from the backend\n");
    let front = free_port();
    // nginx started as root runs its workers as `nobody`: the daemon must
    // serve that user too (as it must serve a real deployment's).
    let nodes = shim_nodes_custom(&dir, &[backend], "", false, "allow_users = [\"nobody\"]");
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n access_log {d}/nginx-access.log;\n client_body_temp_path {d}/client_body;\n\
         proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\
         server {{ listen 127.0.0.1:{front}; location / {{ proxy_pass http://127.0.0.1:{backend}; }} }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
    let mut cmd = shimmed("nginx", &nodes.shim_socket, &backend.to_string());
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    let mut nginx = Proc::spawn("nginx", cmd, &dir);
    // SIGTERM first (also on a failing test), so the master stops its
    // workers; the Proc guard's SIGKILL would leave them running.
    let _stop = StopGracefully(nginx.pid());
    wait_port(&format!("127.0.0.1:{front}"), Duration::from_secs(10));
    for i in 0..5 {
        let (status, body) = http_get(&format!("127.0.0.1:{front}"), "/");
        assert_eq!(
            (status, body.as_str()),
            (200, "from the backend\n"),
            "request {i}"
        );
    }
    // Every upstream connection was carried by POOL (the backend's only
    // client is the destination daemon).
    assert_eq!(
        wait_counter(
            &nodes.dest_control,
            "shim_exposed",
            5,
            Duration::from_secs(5)
        ),
        5
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 5);
    nginx.assert_running();
}

struct StopGracefully(u32);

impl Drop for StopGracefully {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(500));
    }
}
