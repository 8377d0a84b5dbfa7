//! A daemon serving a vault, and `pool vault` runs against it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// A daemon with a `[vault]` whose root is `DIR/root`, granting `client`
/// write on `/incoming` and `reader` read on `/incoming`.
pub struct VaultNode {
    pub dir: TempDir,
    pub root: PathBuf,
    pub listen: String,
    pub key: (PathBuf, String),
    pub client: (PathBuf, String),
    pub reader: (PathBuf, String),
    pub stranger: (PathBuf, String),
    /// A second key with write access to /incoming.
    pub writer2: (PathBuf, String),
    pub journal: PathBuf,
    pub daemon: Option<Proc>,
}

impl VaultNode {
    pub fn new(tag: &str) -> VaultNode {
        let dir = TempDir::new(tag);
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("incoming")).expect("vault root");
        VaultNode {
            key: keygen(&dir, "node"),
            client: keygen(&dir, "client"),
            reader: keygen(&dir, "reader"),
            stranger: keygen(&dir, "stranger"),
            writer2: keygen(&dir, "writer2"),
            listen: format!("127.0.0.1:{}", free_port()),
            journal: dir.join("journal.log"),
            root,
            dir,
            daemon: None,
        }
    }

    /// Writes the config (root may be moved elsewhere, e.g. onto a tmpfs)
    /// and starts the daemon.
    pub fn start(&mut self) {
        let text = format!(
            "[node]\nkey = \"{}\"\nlisten = \"{}\"\njournal = \"{}\"\n\n\
             [trust]\nallow = [\"{}\", \"{}\", \"{}\", \"{}\"]\n\n\
             [vault]\nroot = \"{}\"\n\n\
             [[vault.grant]]\nkey = \"{}\"\npath = \"/incoming\"\naccess = \"write\"\n\n\
             [[vault.grant]]\nkey = \"{}\"\npath = \"/incoming\"\naccess = \"read\"\n\n\
             [[vault.grant]]\nkey = \"{}\"\npath = \"/incoming\"\naccess = \"write\"\n",
            self.key.0.display(),
            self.listen,
            self.journal.display(),
            self.client.1,
            self.reader.1,
            self.stranger.1,
            self.writer2.1,
            self.root.display(),
            self.client.1,
            self.reader.1,
            self.writer2.1,
        );
        let cfg = self.dir.join("pool.toml");
        std::fs::write(&cfg, text).expect("config");
        let p = Proc::pool(
            "daemon",
            &["daemon", "--config", cfg.to_str().unwrap()],
            &self.dir,
        );
        wait_port(&self.listen, Duration::from_secs(10));
        self.daemon = Some(p);
    }

    /// `pool vault OP HOST ARGS --key KEY --peer-key NODE --json`.
    pub fn command(&self, who: &Path, op: &str, args: &[&str]) -> Command {
        self.command_via(&self.listen, who, op, args)
    }

    /// The same, dialling `addr` (a forwarder in front of the node).
    pub fn command_via(&self, addr: &str, who: &Path, op: &str, args: &[&str]) -> Command {
        let mut c = Command::new(POOL);
        c.args(["vault", op, addr]).args(args).args([
            "--key",
            who.to_str().unwrap(),
            "--peer-key",
            &self.key.1,
            "--json",
        ]);
        c
    }

    /// Runs a vault command; its final JSON report, or the error text.
    pub fn run(&self, who: &Path, op: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = run(self.command(who, op, args), Duration::from_secs(300));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let last = stdout.lines().last().unwrap_or_default().to_string();
        serde_json::from_str(&last).map_err(|e| format!("not a JSON report ({e}): {stdout}"))
    }

    pub fn push(&self, args: &[&str]) -> serde_json::Value {
        self.run(&self.client.0, "push", args)
            .unwrap_or_else(|e| panic!("push {args:?} failed: {e}"))
    }
}

/// A file of `len` bytes of a pseudo-random pattern.
pub fn make_file(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

/// SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    hex(ctx.finish().as_ref())
}

/// The JSON progress lines a running push printed so far: the last
/// `bytes` value.
pub fn progress_bytes(p: &Proc) -> u64 {
    p.log()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "progress")
        .find_map(|v| v["bytes"].as_u64())
        .unwrap_or(0)
}

/// The vault's partial files under `dir` (recursively) and their sizes.
pub fn partials(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(partials(&p));
            } else if e.file_name().to_string_lossy().ends_with(".part") {
                out.push((
                    p.clone(),
                    std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
                ));
            }
        }
    }
    out
}
