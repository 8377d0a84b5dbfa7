//! Helpers for the shim tests: the library itself, and two daemons on
//! loopback — `source` (with `[shim]` and a `[[route]]` sending
//! 127.0.0.1/32 to `dest`) and `dest` (with `[[expose]]` ports).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::*;

/// `libpool_shim.so`, built (once per test binary) into its own target
/// directory so the build never waits on the lock of the `cargo test`
/// that runs this.
pub fn shim_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target = root.join("target/shim-test");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args(["build", "--release", "--locked", "-p", "pool-shim"])
            .arg("--target-dir")
            .arg(&target);
        let out = run(cmd, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "building libpool_shim.so failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = target.join("release/libpool_shim.so");
        assert!(lib.is_file(), "{} was not built", lib.display());
        lib
    })
    .clone()
}

/// The two daemons.
pub struct ShimNodes {
    pub source: Proc,
    pub dest: Proc,
    /// Where programs under the shim connect (`POOL_SHIM_DAEMON`).
    pub shim_addr: String,
    pub source_control: PathBuf,
    pub dest_control: PathBuf,
    pub source_journal: PathBuf,
    pub dest_journal: PathBuf,
    pub source_metrics: String,
    pub dest_metrics: String,
    pub source_pub: String,
    pub dest_pub: String,
}

/// Starts `dest` (exposing `ports`) and `source` (routing 127.0.0.1/32 to it).
pub fn shim_nodes(dir: &TempDir, ports: &[u16]) -> ShimNodes {
    shim_nodes_with(dir, ports, "")
}

/// As [`shim_nodes`], with `[[route]]` sections of the source node's
/// config ahead of the 127.0.0.1/32 one (`{dest}` and `{dest_key}` in them
/// stand for the destination daemon's address and key).
pub fn shim_nodes_with(dir: &TempDir, ports: &[u16], routes: &str) -> ShimNodes {
    shim_nodes_full(dir, ports, routes, false)
}

/// `pool daemon --config FILE`, with the shim preloaded into it if
/// `preload` (it must leave the daemon alone).
fn daemon(name: &str, config: &Path, dir: &TempDir, preload: bool) -> Proc {
    let mut cmd = Command::new(POOL);
    cmd.arg("daemon").arg("--config").arg(config);
    if preload {
        cmd.env("LD_PRELOAD", shim_lib())
            .env_remove("POOL_SHIM_PORTS")
            .env_remove("POOL_SHIM_DAEMON")
            .env_remove("POOL_SHIM_FALLBACK");
    }
    Proc::spawn(name, cmd, dir)
}

/// As [`shim_nodes_with`]; `preload_daemons` runs both daemons themselves
/// with `LD_PRELOAD=libpool_shim.so` (every port selected).
pub fn shim_nodes_full(
    dir: &TempDir,
    ports: &[u16],
    routes: &str,
    preload_daemons: bool,
) -> ShimNodes {
    let (skey, spub) = keygen(dir, "source");
    let (dkey, dpub) = keygen(dir, "dest");
    let d = dir.path().display();
    let mut text = format!(
        "[node]\nkey = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"{d}/dest.sock\"\n\
         journal = \"{d}/dest-journal.log\"\nmetrics = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
         [trust]\nallow = [\"{spub}\"]\n",
        dkey.display()
    );
    for p in ports {
        text.push_str(&format!("\n[[expose]]\nport = {p}\n"));
    }
    std::fs::write(dir.join("dest.toml"), text).expect("write dest.toml");
    let mut dest = daemon("dest-daemon", &dir.join("dest.toml"), dir, preload_daemons);
    let pool_addr = dest.wait_log("POOL listener on ", Duration::from_secs(10));
    let dest_metrics = dest.wait_log("metrics at http://", Duration::from_secs(10));
    let dest_metrics = dest_metrics.trim_end_matches("/metrics").to_string();
    let routes = routes
        .replace("{dest}", &pool_addr)
        .replace("{dest_key}", &dpub);
    let text = format!(
        "[node]\nkey = \"{}\"\nlisten = \"\"\ncontrol = \"{d}/source.sock\"\n\
         journal = \"{d}/source-journal.log\"\nmetrics = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\n\n\
         [shim]\nlisten = \"127.0.0.1:0\"\nconnect_timeout_secs = 3\n\n{routes}\n\
         [[route]]\ncidr = \"127.0.0.1/32\"\npeer = \"{pool_addr}\"\npeer_key = \"{dpub}\"\n",
        skey.display()
    );
    std::fs::write(dir.join("source.toml"), text).expect("write source.toml");
    let mut source = daemon(
        "source-daemon",
        &dir.join("source.toml"),
        dir,
        preload_daemons,
    );
    let shim_addr = source.wait_log("shim listener on ", Duration::from_secs(10));
    let source_metrics = source.wait_log("metrics at http://", Duration::from_secs(10));
    let source_metrics = source_metrics.trim_end_matches("/metrics").to_string();
    ShimNodes {
        source,
        dest,
        shim_addr,
        source_control: dir.join("source.sock"),
        dest_control: dir.join("dest.sock"),
        source_journal: dir.join("source-journal.log"),
        dest_journal: dir.join("dest-journal.log"),
        source_metrics,
        dest_metrics,
        source_pub: spub,
        dest_pub: dpub,
    }
}

/// `program` under the shim, carrying connections to `ports` through the
/// daemon at `shim_addr`.
pub fn shimmed(program: &str, shim_addr: &str, ports: &str) -> Command {
    let mut c = Command::new(program);
    c.env("LD_PRELOAD", shim_lib())
        .env("POOL_SHIM_DAEMON", shim_addr)
        .env("POOL_SHIM_PORTS", ports)
        .env_remove("POOL_SHIM_FALLBACK")
        .env_remove("POOL_SHIM_DISABLE");
    c
}

/// `pool ctl status --json`.
pub fn ctl_status(control: &Path) -> serde_json::Value {
    let out = pool_cmd(&[
        "ctl",
        "status",
        "--json",
        "--control",
        control.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "pool ctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl status JSON")
}

/// One node counter from `pool ctl status`.
pub fn counter(control: &Path, name: &str) -> u64 {
    let v = ctl_status(control);
    v["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{name}` in {v}"))
}

/// Waits until `counter(control, name) >= want`; returns the value.
pub fn wait_counter(control: &Path, name: &str, want: u64, timeout: Duration) -> u64 {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let n = counter(control, name);
        if n >= want {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counter {name} is {n}, expected at least {want} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tiny HTTP server on 127.0.0.1: every request gets `200` and `body`.
/// Returns its port and a counter of connections it accepted.
pub fn http_server(body: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind http");
    let port = l.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acc = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (port, accepted)
}

/// A TCP echo server on 127.0.0.1 (a thread per connection); its port.
pub fn echo_server() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 16384];
                loop {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&b[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// Runs a Python program (stdin-less), returning its stdout; fails the
/// test with its stderr if it exits non-zero.
pub fn python(mut cmd: Command, script: &str, args: &[String], timeout: Duration) -> String {
    cmd.arg("-c").arg(script).args(args);
    let out = run(cmd, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A real nginx serving `DIR/www` on 127.0.0.1:`port` (one process, no
/// daemonizing), up when this returns.
pub fn start_nginx(dir: &TempDir, port: u16) -> Proc {
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n access_log {d}/nginx-access.log;\n client_body_temp_path {d}/client_body;\n\
         proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n default_type application/octet-stream;\n\
         server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n"
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
    let nginx = Proc::spawn("nginx", cmd, dir);
    wait_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    nginx
}
