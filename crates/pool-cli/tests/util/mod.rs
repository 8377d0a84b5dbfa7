//! Shared helpers for the tests that run the real `pool` binary (and real
//! programs: nginx, redis, iperf3, curl) as child processes on loopback.
//!
//! Every child is held by a [`Proc`] guard that kills it when dropped, so
//! nothing is left running when a test panics. Its stdout and stderr go to
//! a log file in the test's [`TempDir`]; a failing test prints the tail.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod etcd;
pub mod fleet;
pub mod netns;
pub mod shim;
pub mod vault;
pub mod workers;

/// The binary under test.
pub const POOL: &str = env!("CARGO_BIN_EXE_pool");

/// A directory under the system temp dir, removed when dropped (kept, and
/// named on stderr, when the test is failing).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "pool-cli-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(test files kept in {})", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Fails the test unless `program` is on PATH.
pub fn require_program(program: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| {
        let f = d.join(program);
        f.is_file()
            && std::fs::metadata(&f)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                .unwrap_or(false)
    });
    assert!(
        found,
        "`{program}` is not installed, and this test runs it for real: \
         install it (Debian/Ubuntu: apt-get install {package}; .ci/run does this)"
    );
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout + stderr appended to
    /// `DIR/NAME.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &TempDir) -> Proc {
        let log = dir.join(&format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log file");
        let f2 = f.try_clone().expect("dup log file");
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// Starts the `pool` binary with these arguments.
    pub fn pool(name: &str, args: &[&str], dir: &TempDir) -> Proc {
        let mut cmd = Command::new(POOL);
        cmd.args(args);
        Proc::spawn(name, cmd, dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.exited() {
            panic!(
                "{} exited unexpectedly ({st}); its output:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// Waits until the log has a line containing `needle`; returns what
    /// follows `needle` on that line, trimmed.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                let at = line.find(needle).unwrap_or(0) + needle.len();
                return line[at..].trim().to_string();
            }
            if let Some(st) = self.exited() {
                panic!(
                    "{} exited ({st}) before printing `{needle}`; its output:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print `{needle}` within {timeout:?}; its output:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -s {sig} {} failed", self.pid());
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; its output:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- last output of {} ----\n{}\n----",
                self.name,
                self.log_tail()
            );
        }
    }
}

/// Runs a command to completion with a deadline; kills it and fails the
/// test when it takes longer.
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let so = t_out.join().unwrap_or_default();
            let se = t_err.join().unwrap_or_default();
            panic!(
                "{shown} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&so),
                String::from_utf8_lossy(&se)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// `pool ARGS`, to completion (30 s at most).
pub fn pool_cmd(args: &[&str]) -> Output {
    let mut cmd = Command::new(POOL);
    cmd.args(args);
    run(cmd, Duration::from_secs(30))
}

/// A new key file `DIR/NAME.key`; returns its path and public key.
pub fn keygen(dir: &TempDir, name: &str) -> (PathBuf, String) {
    let path = dir.join(&format!("{name}.key"));
    let out = pool_cmd(&["keygen", "--out", path.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "pool keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(public.len(), 43, "unexpected public key `{public}`");
    (path, public)
}

/// A port that was free a moment ago on 127.0.0.1 (for programs that
/// cannot listen on port 0 and say which port they got).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_port(addr: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let sa: std::net::SocketAddr = addr.parse().expect("socket address");
    loop {
        if TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing accepts connections at {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `pool2tcp` end of a bridge: `pool bridge pool2tcp` listening on a
/// port of its own choosing on 127.0.0.1. Returns the process and the POOL
/// address it listens on.
pub fn start_pool2tcp(
    dir: &TempDir,
    name: &str,
    key: &Path,
    target: &str,
    extra: &[&str],
) -> (Proc, String) {
    start_pool2tcp_on(dir, name, key, "127.0.0.1:0", target, extra)
}

pub fn start_pool2tcp_on(
    dir: &TempDir,
    name: &str,
    key: &Path,
    listen: &str,
    target: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut args = vec![
        "bridge",
        "pool2tcp",
        "--listen",
        listen,
        "--target",
        target,
        "--key",
        key.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::pool(name, &args, dir);
    let addr = p.wait_log("POOL listener on ", Duration::from_secs(10));
    (p, addr)
}

/// The `tcp2pool` end: `pool bridge tcp2pool` with a TCP listener on a
/// port of its own choosing on 127.0.0.1. Returns the process and the TCP
/// address that clients connect to.
pub fn start_tcp2pool(
    dir: &TempDir,
    name: &str,
    key: &Path,
    peer: &str,
    peer_key: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut args = vec![
        "bridge",
        "tcp2pool",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        peer,
        "--peer-key",
        peer_key,
        "--key",
        key.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::pool(name, &args, dir);
    let addr = p.wait_log("listening on ", Duration::from_secs(10));
    (p, addr)
}

/// A bridge pair in front of `target`: pool2tcp trusting the client key,
/// tcp2pool pinned to the server key.
pub struct Pair {
    pub server: Proc,
    pub client: Proc,
    /// The POOL listener (pool2tcp).
    pub pool_addr: String,
    /// Where TCP clients connect (tcp2pool).
    pub tcp_addr: String,
    pub server_key: PathBuf,
    pub server_pub: String,
    pub client_key: PathBuf,
    pub client_pub: String,
}

pub fn bridge_pair(dir: &TempDir, target: &str, server_extra: &[&str]) -> Pair {
    let (server_key, server_pub) = keygen(dir, "server");
    let (client_key, client_pub) = keygen(dir, "client");
    let mut extra = vec!["--allow", client_pub.as_str()];
    extra.extend_from_slice(server_extra);
    let (server, pool_addr) = start_pool2tcp(dir, "pool2tcp", &server_key, target, &extra);
    let (client, tcp_addr) =
        start_tcp2pool(dir, "tcp2pool", &client_key, &pool_addr, &server_pub, &[]);
    Pair {
        server,
        client,
        pool_addr,
        tcp_addr,
        server_key,
        server_pub,
        client_key,
        client_pub,
    }
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `len` deterministic pseudo-random bytes for `seed` (splitmix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < len {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The soft limit on open files of this process, from /proc/self/limits.
pub fn nofile_soft_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/self/limits");
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .unwrap_or("0");
    if soft == "unlimited" {
        u64::MAX
    } else {
        soft.parse().unwrap_or(0)
    }
}

/// The journal's entries (one JSON object a line).
pub fn journal_entries(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line `{l}`: {e}")))
        .collect()
}

/// Waits until the journal has an entry that `pred` accepts; returns it.
pub fn wait_journal(
    path: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let entries = journal_entries(path);
        if let Some(e) = entries.iter().find(|e| pred(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {what} entry in the journal {} after {timeout:?}; it has:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in `{text}`"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in `{head}`"));
    (status, body.to_string())
}
