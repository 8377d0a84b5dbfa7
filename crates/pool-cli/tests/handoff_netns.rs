//! A change of server across hosts, in real network namespaces: the client
//! (C) and two workers (W1, W2) on three networks joined by a router (R).
//! A paced, timestamped stream runs from W1's backend to C through
//! `tcp2pool` (in C) and W1's daemon; `pool ctl handoff` moves the session
//! to W2 (another host, another address). The stream, forwarded from W1
//! through W2, arrives whole (hash and chunk index: 0 lost, 0 repeated); a
//! connection made after the handoff is served by W2's backend.
//!
//! ```text
//!   C 10.79.1.1 ── 10.79.1.254 ┐
//!   W1 10.79.2.1 ── 10.79.2.254 R (routes)
//!   W2 10.79.3.1 ── 10.79.3.254 ┘
//! ```
//!
//! Needs root, `ip` (iproute2) and `python3`.
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, deleted on drop.
struct Net {
    c: String,
    w1: String,
    w2: String,
    r: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.c, &self.w1, &self.w2, &self.r] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Net {
    fn new() -> Net {
        require_program("ip", "iproute2");
        require_program("python3", "python3");
        let p = format!("hoff{}", std::process::id());
        let n = Net {
            c: format!("{p}c"),
            w1: format!("{p}w1"),
            w2: format!("{p}w2"),
            r: format!("{p}r"),
        };
        for ns in [&n.c, &n.w1, &n.w2, &n.r] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (i, ns) in [(1, &n.c), (2, &n.w1), (3, &n.w2)] {
            let (inner, outer) = (format!("h{i}"), format!("r{i}"));
            ip(&[
                "-n", ns, "link", "add", "name", &inner, "type", "veth", "peer", "name", &outer,
                "netns", &n.r,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.79.{i}.1/24"),
                "dev",
                &inner,
            ]);
            ip(&[
                "-n",
                &n.r,
                "addr",
                "add",
                &format!("10.79.{i}.254/24"),
                "dev",
                &outer,
            ]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", &n.r, "link", "set", &outer, "up"]);
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.79.{i}.254"),
            ]);
        }
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                &n.r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .expect("sysctl");
        assert!(st.success());
        n
    }

    fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c
    }
}

fn paced_py() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib/paced.py");
    p.to_string_lossy().into_owned()
}

fn report(p: &Proc, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = p.log();
        if let Some(l) = log.lines().rev().find(|l| l.contains("sha256")) {
            return serde_json::from_str(l).expect("a JSON report");
        }
        assert!(Instant::now() < deadline, "{what} never reported:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    net: &Net,
    ns: &str,
    dir: &TempDir,
    name: &str,
    key: &Path,
    client: &str,
    peer: &str,
    control: &Path,
) -> Proc {
    let cfg = format!(
        "[node]\nkey = {key:?}\nlisten = \"0.0.0.0:9253\"\ncontrol = {control:?}\njournal = {:?}\n\n\
         [trust]\nallow = [\"{client}\", \"{peer}\"]\n\n[[pool2tcp]]\ntarget = \"127.0.0.1:7100\"\n\n\
         [handoff]\npeers = [\"{peer}\"]\n",
        dir.join(&format!("{name}.journal"))
    );
    let path = dir.join(&format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let mut p = Proc::spawn(
        name,
        net.exec(ns, POOL, &["daemon", "--config", path.to_str().unwrap()]),
        dir,
    );
    p.wait_log("POOL listener on", Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(control).is_err() {
        assert!(Instant::now() < deadline, "no control socket:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

#[test]
fn a_session_moves_to_a_worker_on_another_host_with_zero_loss() {
    let net = Net::new();
    let dir = TempDir::new("handoff-netns");
    let (ckey, cpub) = keygen(&dir, "c");
    let (k1, p1) = keygen(&dir, "w1");
    let (k2, p2) = keygen(&dir, "w2");
    let (stop1, stop2) = (dir.join("stop1"), dir.join("stop2"));
    let paced = paced_py();
    let mut src1 = Proc::spawn(
        "paced-w1",
        net.exec(
            &net.w1,
            "python3",
            &[
                &paced,
                "serve",
                "127.0.0.1",
                "7100",
                "4",
                stop1.to_str().unwrap(),
            ],
        ),
        &dir,
    );
    src1.wait_log("listening", Duration::from_secs(10));
    let mut src2 = Proc::spawn(
        "paced-w2",
        net.exec(
            &net.w2,
            "python3",
            &[
                &paced,
                "serve",
                "127.0.0.1",
                "7100",
                "4",
                stop2.to_str().unwrap(),
            ],
        ),
        &dir,
    );
    src2.wait_log("listening", Duration::from_secs(10));
    let (c1, c2) = (dir.join("w1.sock"), dir.join("w2.sock"));
    let mut w1 = worker(&net, &net.w1, &dir, "w1", &k1, &cpub, &p2, &c1);
    let mut w2 = worker(&net, &net.w2, &dir, "w2", &k2, &cpub, &p1, &c2);
    let mut bridge = Proc::spawn(
        "tcp2pool",
        net.exec(
            &net.c,
            POOL,
            &[
                "bridge",
                "tcp2pool",
                "--listen",
                "127.0.0.1:7000",
                "--peer",
                "10.79.2.1:9253",
                "--peer-key",
                &p1,
                "--key",
                ckey.to_str().unwrap(),
            ],
        ),
        &dir,
    );
    bridge.wait_log("listening on", Duration::from_secs(10));
    let mut fetch1 = Proc::spawn(
        "fetch-1",
        net.exec(&net.c, "python3", &[&paced, "fetch", "127.0.0.1", "7000"]),
        &dir,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let out = pool_cmd(&[
        "ctl",
        "handoff",
        &cpub[..8],
        "--to",
        "10.79.3.1:9253",
        "--to-key",
        &p2,
        "--control",
        c1.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "handoff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A connection after the handoff: W2's backend serves it.
    let mut fetch2 = Proc::spawn(
        "fetch-2",
        net.exec(&net.c, "python3", &[&paced, "fetch", "127.0.0.1", "7000"]),
        &dir,
    );
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&stop1, b"").unwrap();
    std::fs::write(&stop2, b"").unwrap();
    for (f, name) in [(&mut fetch1, "fetch-1"), (&mut fetch2, "fetch-2")] {
        let st = f.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "{name} failed:\n{}", f.log());
    }
    let got1 = report(&fetch1, "fetch-1");
    let got2 = report(&fetch2, "fetch-2");
    let sent1 = report(&src1, "W1's backend");
    let sent2 = report(&src2, "W2's backend");
    eprintln!("across the handoff: sent {sent1}, received {got1}; after it: {got2}");
    for got in [&got1, &got2] {
        assert_eq!(got["lost"], 0, "{got}");
        assert_eq!(got["duplicated"], 0, "{got}");
        assert_eq!(got["corrupt"], 0, "{got}");
    }
    assert_eq!(
        got1["sha256"], sent1["sha256"],
        "the forwarded stream, whole"
    );
    assert_eq!(got1["chunks"], sent1["chunks"]);
    assert_eq!(
        got2["sha256"], sent2["sha256"],
        "the new connection, from W2"
    );
    assert!(got1["chunks"].as_u64().unwrap_or(0) > 300, "{got1}");
    for p in [&mut w1, &mut w2, &mut bridge] {
        p.assert_running();
    }
}
