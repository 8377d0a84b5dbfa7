//! Shared by the C tests: build tests/c/peer.c against libpool, make keys,
//! run the pattern server, and a TCP forwarder whose connections can be cut.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The directory holding libpool.so / libpool.a of this build: the test's
/// own deps/ directory (`cargo test` rebuilds them there; the copies in
/// target/<profile> are refreshed only by `cargo build`).
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libpool.so").exists() && dir.join("libpool.a").exists() {
            return dir.to_path_buf();
        }
    }
    panic!("libpool.so not found next to {}", exe.display());
}

pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pool-ffi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub enum Link {
    Shared,
    /// libpool.a, with extra compiler flags (e.g. -fsanitize=address).
    Static(&'static [&'static str]),
}

/// Compiles tests/c/peer.c into `dir`; returns the binary.
pub fn build_peer(dir: &Path, link: Link) -> PathBuf {
    let out = dir.join("peer");
    let lib = lib_dir();
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("tests/c/peer.c"))
        .arg("-o")
        .arg(&out);
    match link {
        Link::Shared => {
            cc.arg(format!("-L{}", lib.display()))
                .arg(format!("-Wl,-rpath,{}", lib.display()))
                .arg("-lpool");
        }
        Link::Static(flags) => {
            cc.args(flags).arg(lib.join("libpool.a"));
        }
    }
    cc.args(["-lpthread", "-ldl", "-lm"]);
    let status = cc.status().expect("cc not found");
    assert!(status.success(), "cc failed: {cc:?}");
    out
}

/// Makes a key with the C program; returns (file, public key).
pub fn keygen(peer: &Path, dir: &Path, name: &str) -> (PathBuf, String) {
    let file = dir.join(name);
    let out = Command::new(peer)
        .arg("keygen")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        file,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// A running C server: its address and key, and its stdout.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub key: String,
    pub out: BufReader<std::process::ChildStdout>,
}

pub fn start_server(mut cmd: Command) -> Server {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut key) = (String::new(), String::new());
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if let Some(a) = line.strip_prefix("ADDR ") {
            addr = a.trim().to_string();
        } else if let Some(k) = line.strip_prefix("KEY ") {
            key = k.trim().to_string();
        }
    }
    assert!(!addr.is_empty() && !key.is_empty(), "server did not start");
    Server {
        child,
        addr,
        key,
        out,
    }
}

impl Server {
    pub fn rest(&mut self) -> String {
        let mut s = String::new();
        self.out.read_to_string(&mut s).unwrap();
        s
    }
}

/// A TCP forwarder to `target`; `cut()` kills every connection through
/// it (the client's session redials and resumes).
pub struct Forwarder {
    pub addr: String,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    pub bytes: Arc<AtomicU64>,
    pub accepted: Arc<AtomicU64>,
}

impl Forwarder {
    pub fn start(target: &str) -> Forwarder {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (c, b, a, target) = (
            conns.clone(),
            bytes.clone(),
            accepted.clone(),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for down in l.incoming() {
                let Ok(down) = down else { return };
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                c.lock()
                    .unwrap()
                    .extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let b = b.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            b.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Forwarder {
            addr,
            conns,
            bytes,
            accepted,
        }
    }

    /// Kills every connection through the forwarder now.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Cuts once, when `after` bytes have crossed, in a thread.
    pub fn cut_after(self: &Arc<Self>, after: u64) {
        let f = self.clone();
        std::thread::spawn(move || {
            while f.bytes.load(Ordering::SeqCst) < after {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            f.cut();
        });
    }
}

/// Release builds move the full amounts; debug builds (slow crypto) less.
pub fn scaled(release: u64) -> u64 {
    if cfg!(debug_assertions) {
        release / 8
    } else {
        release
    }
}
