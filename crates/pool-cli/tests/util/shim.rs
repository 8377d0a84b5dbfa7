//! Helpers for the shim tests: the library itself, and two daemons on
//! loopback — `source` (with `[shim]` and a `[[route]]` sending
//! 127.0.0.1/32 to `dest`) and `dest` (with `[[expose]]` ports).
//!
//! The source daemon's shim socket is in a directory under `/run` (see
//! [`RunDir`]), not in the test's temp dir: the shim trusts a socket only
//! where no one but its owner could have made it, and `/tmp` is writable
//! by everyone.

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

/// A directory for a daemon's shim socket, `/run/pool-cli-tests/NAME`
/// (the daemon creates it), removed when dropped. Tests run as root.
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new(dir: &TempDir) -> RunDir {
        let base = Path::new("/run/pool-cli-tests");
        let name = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "x".into());
        // Keep the socket path under the 108 bytes of sun_path.
        let name: String = name
            .chars()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        RunDir(base.join(name))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The socket path in it.
    pub fn socket(&self) -> String {
        self.0.join("shim.sock").display().to_string()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The two daemons.
pub struct ShimNodes {
    pub source: Proc,
    pub dest: Proc,
    /// The source daemon's shim socket (`POOL_SHIM_SOCKET`).
    pub shim_socket: String,
    /// Its directory.
    pub run_dir: RunDir,
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
            .env_remove("POOL_SHIM_SOCKET")
            .env_remove("POOL_SHIM_DAEMON_UID")
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
    shim_nodes_custom(dir, ports, routes, preload_daemons, "")
}

/// As [`shim_nodes_full`], with more keys for the source's `[shim]`
/// section (`allow_users = [4242]`).
pub fn shim_nodes_custom(
    dir: &TempDir,
    ports: &[u16],
    routes: &str,
    preload_daemons: bool,
    shim_extra: &str,
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
    let run_dir = RunDir::new(dir);
    let text = format!(
        "[node]\nkey = \"{}\"\nlisten = \"\"\ncontrol = \"{d}/source.sock\"\n\
         journal = \"{d}/source-journal.log\"\nmetrics = \"127.0.0.1:0\"\ndrain_timeout_secs = 1\nresume_deadline_secs = 15\n\n\
         [shim]\nsocket = \"{}\"\nconnect_timeout_secs = 3\n{shim_extra}\n{routes}\n\
         [[route]]\ncidr = \"127.0.0.1/32\"\npeer = \"{pool_addr}\"\npeer_key = \"{dpub}\"\n",
        skey.display(),
        run_dir.socket()
    );
    std::fs::write(dir.join("source.toml"), text).expect("write source.toml");
    let mut source = daemon(
        "source-daemon",
        &dir.join("source.toml"),
        dir,
        preload_daemons,
    );
    let shim_socket = source.wait_log("shim listener on ", Duration::from_secs(10));
    assert_eq!(shim_socket, run_dir.socket());
    let source_metrics = source.wait_log("metrics at http://", Duration::from_secs(10));
    let source_metrics = source_metrics.trim_end_matches("/metrics").to_string();
    ShimNodes {
        source,
        dest,
        shim_socket,
        run_dir,
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
/// daemon whose socket is `shim_socket`.
pub fn shimmed(program: &str, shim_socket: &str, ports: &str) -> Command {
    let mut c = Command::new(program);
    c.env("LD_PRELOAD", shim_lib())
        .env("POOL_SHIM_SOCKET", shim_socket)
        .env("POOL_SHIM_PORTS", ports)
        .env_remove("POOL_SHIM_DAEMON")
        .env_remove("POOL_SHIM_DAEMON_UID")
        .env_remove("POOL_SHIM_FALLBACK")
        .env_remove("POOL_SHIM_DISABLE");
    c
}

/// As [`shimmed`], run as `uid` (and gid `uid`, no supplementary groups)
/// through `setpriv`; no account needs to exist.
pub fn shimmed_as(uid: u32, program: &str, shim_socket: &str, ports: &str) -> Command {
    require_program("setpriv", "util-linux");
    let mut c = shimmed("setpriv", shim_socket, ports);
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "--",
        program,
    ])
    .env("HOME", "/");
    c
}

/// Asks the daemon at `shim_socket` for a data port the way the shim
/// does (a header for `dest`), returning the open Unix connection and the
/// `GO` reply's port and token (the 16 bytes it sent after the header).
pub fn ask_for_data_port(
    shim_socket: &str,
    dest: std::net::SocketAddr,
) -> (std::os::unix::net::UnixStream, u16, [u8; 16]) {
    use std::io::{Read, Write};
    let mut u = std::os::unix::net::UnixStream::connect(shim_socket).expect("connect shim socket");
    u.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut h = [0u8; 44];
    h[..4].copy_from_slice(b"PSH2");
    h[28..].copy_from_slice(b"not a real token");
    h[6..8].copy_from_slice(&dest.port().to_be_bytes());
    let ip = match dest.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    h[8..24].copy_from_slice(&ip.octets());
    u.write_all(&h).expect("send header");
    let mut r = [0u8; 20];
    u.read_exact(&mut r).expect("GO reply");
    assert_eq!(r[0], 1, "GO reply: {r:?}");
    let mut token = [0u8; 16];
    token.copy_from_slice(&r[4..]);
    (u, u16::from_be_bytes([r[2], r[3]]), token)
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
