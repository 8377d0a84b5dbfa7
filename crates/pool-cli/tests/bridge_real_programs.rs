//! Real programs, unchanged, talking through a bridge pair
//! (`curl` → tcp2pool → POOL → pool2tcp → server): nginx serving a file,
//! redis under `redis-benchmark` and `redis-cli`, and an iperf3 run.
mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

/// nginx serves a few MiB of random bytes; `curl` through the bridge gets
/// exactly them, and a 404 for a path that does not exist.
#[test]
fn nginx_file_and_404_through_bridge() {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new("nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    let mut content = vec![0u8; 3 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut content)
        .expect("random content");
    content.extend_from_slice(&pattern(1, 12345)); // not a multiple of anything
    std::fs::write(www.join("blob.bin"), &content).expect("write blob");

    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log {d}/nginx-access.log;\n\
           client_body_temp_path {d}/client_body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           default_type application/octet-stream;\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             root {d}/www;\n\
           }}\n\
         }}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&conf_path);
    let mut nginx = Proc::spawn("nginx", cmd, &dir);
    let target = format!("127.0.0.1:{port}");
    wait_port(&target, Duration::from_secs(10));
    nginx.assert_running();

    let mut pair = bridge_pair(&dir, &target, &[]);
    let out_file = dir.join("fetched.bin");
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail", "--max-time", "20", "-o"])
        .arg(&out_file)
        .arg(format!("http://{}/blob.bin", pair.tcp_addr));
    let out = run(curl, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "curl through the bridge failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = std::fs::read(&out_file).expect("read fetched file");
    assert_eq!(fetched.len(), content.len(), "size of the fetched file");
    assert_eq!(
        sha256_hex(&fetched),
        sha256_hex(&content),
        "SHA-256 of the file fetched through the bridge"
    );

    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg(format!("http://{}/no/such/file", pair.tcp_addr));
    let out = run(curl, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    pair.server.assert_running();
    pair.client.assert_running();
    nginx.assert_running();
}

/// A real redis behind the bridge: `redis-benchmark` (50 parallel clients)
/// completes, and `redis-cli SET` then `GET` round-trips a value.
#[test]
fn redis_benchmark_and_cli_through_bridge() {
    require_program("redis-server", "redis-server");
    require_program("redis-cli", "redis-tools");
    require_program("redis-benchmark", "redis-tools");
    let dir = TempDir::new("redis");
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path());
    let mut redis = Proc::spawn("redis-server", cmd, &dir);
    let target = format!("127.0.0.1:{port}");
    wait_port(&target, Duration::from_secs(10));
    redis.assert_running();

    let mut pair = bridge_pair(&dir, &target, &[]);
    let (host, bport) = pair.tcp_addr.rsplit_once(':').expect("host:port");

    let mut bench = Command::new("redis-benchmark");
    bench.args(["-h", host, "-p", bport, "-t", "set,get", "-n", "2000", "-q"]);
    let out = run(bench, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(
        out.status.success(),
        "redis-benchmark failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in ["SET", "GET"] {
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("{op}: ")) && l.contains("requests per second"))
            .unwrap_or_else(|| panic!("no `{op}: ... requests per second` in:\n{text}"));
        let rps: f64 = line[op.len() + 2..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number in `{line}`"));
        assert!(rps > 0.0, "{line}");
    }

    let cli = |args: &[&str]| {
        let mut c = Command::new("redis-cli");
        c.args(["-h", host, "-p", bport]).args(args);
        let out = run(c, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["set", "pool-test-key", "through the bridge"]), "OK");
    assert_eq!(cli(&["get", "pool-test-key"]), "through the bridge");

    pair.server.assert_running();
    pair.client.assert_running();
    redis.assert_running();
}

/// iperf3 (control and data connections both through the bridge) for two
/// seconds: the JSON report has no error and a positive rate.
#[test]
fn iperf3_through_bridge() {
    require_program("iperf3", "iperf3");
    let dir = TempDir::new("iperf3");
    let port = free_port();
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()]);
    let _server = Proc::spawn("iperf3-server", cmd, &dir);
    let target = format!("127.0.0.1:{port}");
    wait_port_iperf(&target);

    let mut pair = bridge_pair(&dir, &target, &[]);
    let (host, bport) = pair.tcp_addr.rsplit_once(':').expect("host:port");
    let mut client = Command::new("iperf3");
    client.args(["-c", host, "-p", bport, "-t", "2", "-J"]);
    let out = run(client, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 -J printed no JSON ({e}):\n{text}"));
    assert!(
        v.get("error").is_none(),
        "iperf3 reported an error: {}",
        v["error"]
    );
    assert!(out.status.success(), "iperf3 client failed:\n{text}");
    let sent = v["end"]["sum_sent"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let received = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(
        sent > 0.0 && received > 0.0 && bytes > 0.0,
        "iperf3 measured nothing: sent {sent} bit/s, received {received} bit/s ({bytes} bytes)"
    );
    eprintln!(
        "iperf3 through the bridge: {:.0} Mbit/s received",
        received / 1e6
    );
    pair.server.assert_running();
    pair.client.assert_running();
}

/// iperf3 `-s -1` serves one client and exits, so a probing connection
/// would use up the server: wait for its listening socket by reading
/// /proc/net/tcp instead.
fn wait_port_iperf(addr: &str) {
    let port: u16 = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port");
    let needle = format!(":{port:04X} 00000000:0000 0A");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tables = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<String>();
        if tables.contains(&needle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "iperf3 -s is not listening on {addr} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
