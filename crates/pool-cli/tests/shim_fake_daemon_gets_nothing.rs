//! While the daemon is down, a local user who is not root (uid 4242)
//! listens where a shimmed program might look for the daemon: on a shim
//! socket in a directory it could write (its own, under world-writable
//! `/tmp`), and on the old fixed TCP port 127.0.0.1:9256. The program
//! sends it nothing — the fake listener reads 0 bytes — and gets
//! `ECONNREFUSED` (or, with `POOL_SHIM_FALLBACK=1`, goes straight to the
//! destination). The same holds when the program names the daemon's uid
//! (`POOL_SHIM_DAEMON_UID=0`): the shim connects, the kernel says uid
//! 4242 is listening, and the shim closes without a byte. And the real
//! daemon's socket directory, left behind by a stopped daemon, cannot be
//! taken over at all.
mod util;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use util::shim::*;
use util::*;

const ATTACKER: u32 = 4242;
const PYTHON: &str = "/usr/bin/python3";

/// Listens on a Unix socket (argv[1], unless "-") and on TCP
/// 127.0.0.1:argv[2]; reads whatever comes until argv[3] (a file)
/// exists; prints what it got.
const FAKE: &str = r#"
import json, os, select, socket, sys, time
path, port, stop, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ls, out = [], {"unix": None, "tcp": None, "connections": 0, "bytes": 0}
if path != '-':
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        u = socket.socket(socket.AF_UNIX); u.bind(path); os.chmod(path, 0o777); u.listen(64)
        ls.append(u); out["unix"] = True
    except OSError as e:
        out["unix"] = str(e)
try:
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(('127.0.0.1', port)); t.listen(64); ls.append(t); out["tcp"] = True
except OSError as e:
    out["tcp"] = str(e)
open(ready, 'w').close()
conns = []
while not os.path.exists(stop):
    r, _, _ = select.select(ls + conns, [], [], 0.05)
    for s in r:
        if s in ls:
            c, _ = s.accept(); conns.append(c); out["connections"] += 1
        else:
            d = s.recv(65536)
            out["bytes"] += len(d)
            if not d:
                conns.remove(s); s.close()
time.sleep(0.2)
for s in conns:
    s.setblocking(False)
    try:
        out["bytes"] += len(s.recv(65536))
    except OSError:
        pass
print(json.dumps(out))
"#;

struct Fake {
    child: std::process::Child,
    stop: std::path::PathBuf,
}

impl Fake {
    /// Starts the fake as the attacker; returns once it listens.
    fn start(dir: &TempDir, public: &std::path::Path, socket: &str, tcp_port: u16) -> Fake {
        let stop = public.join("stop");
        let ready = public.join("ready");
        let _ = std::fs::remove_file(&stop);
        let _ = std::fs::remove_file(&ready);
        let child = Command::new("setpriv")
            .args([
                &format!("--reuid={ATTACKER}"),
                &format!("--regid={ATTACKER}"),
                "--clear-groups",
                "--",
                PYTHON,
                "-c",
                FAKE,
                socket,
                &tcp_port.to_string(),
            ])
            .arg(&stop)
            .arg(&ready)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the fake listener");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the fake listener did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Fake { child, stop }
    }

    /// Stops it; what it saw.
    fn finish(self) -> serde_json::Value {
        std::fs::write(&self.stop, "").expect("stop file");
        let out = self.child.wait_with_output().expect("fake listener");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fake listener: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).expect("fake listener JSON")
    }
}

/// Blocking and non-blocking connects and an HTTP request on each one
/// that connected; the errno names.
const PROGRAM: &str = r#"
import errno, json, select, socket, sys
port = int(sys.argv[1])
res = []
for blocking in (True, False):
    s = socket.socket()
    s.setblocking(blocking)
    e = s.connect_ex(('127.0.0.1', port))
    if e in (0, errno.EINPROGRESS):
        select.select([], [s], [], 5)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            s.setblocking(True)
            s.settimeout(3)
            try:
                s.sendall(b'GET /secret HTTP/1.1\r\nHost: x\r\n\r\n')
                s.recv(100)
            except OSError:
                pass
    res.append(errno.errorcode.get(e, '0'))
    s.close()
print(json.dumps(res))
"#;

fn program(socket: &str, port: u16, env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let mut cmd = shimmed(PYTHON, socket, &port.to_string());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("-c").arg(PROGRAM).arg(port.to_string());
    let out = run(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (serde_json::from_str(&stdout).expect("JSON"), stderr)
}

#[test]
fn a_fake_daemon_receives_nothing() {
    require_program(PYTHON, "python3");
    require_program("setpriv", "util-linux");
    let dir = TempDir::new("shim-fake");
    // A world-writable place, as /tmp is.
    let public = dir.join("public");
    std::fs::create_dir(&public).expect("mkdir");
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let (port, accepted) = http_server("the real destination\n");
    let fake_socket = public.join("pool/shim.sock").display().to_string();

    // 1. The attacker's socket in its own directory, and the old port.
    let fake = Fake::start(&dir, &public, &fake_socket, 9256);
    let (v, stderr) = program(&fake_socket, port, &[]);
    assert_eq!(
        v,
        serde_json::json!(["ECONNREFUSED", "ECONNREFUSED"]),
        "{stderr}"
    );
    assert!(
        stderr.contains("writable by others") && stderr.contains("not trusting it"),
        "the program is told why:\n{stderr}"
    );
    // With the fallback, straight to the destination; still nothing to the fake.
    let (v, _) = program(&fake_socket, port, &[("POOL_SHIM_FALLBACK", "1")]);
    assert_eq!(v, serde_json::json!(["0", "EINPROGRESS"]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "plain, to the destination"
    );
    // Naming the daemon's uid: the shim connects, sees uid 4242, closes.
    let (v, stderr) = program(&fake_socket, port, &[("POOL_SHIM_DAEMON_UID", "0")]);
    assert_eq!(
        v,
        serde_json::json!(["ECONNREFUSED", "ECONNREFUSED"]),
        "{stderr}"
    );
    assert!(stderr.contains("served by uid 4242"), "{stderr}");
    let seen = fake.finish();
    assert_eq!(seen["unix"], true, "the fake could listen: {seen}");
    assert_eq!(seen["bytes"], 0, "the fake read nothing: {seen}");
    assert_eq!(seen["connections"], 2, "only the two uid checks: {seen}");

    // 2. A real daemon that died (SIGKILL): its directory and its dead
    // socket stay; the attacker cannot put a socket there, and the old TCP
    // port gets nothing either.
    let mut nodes = shim_nodes(&dir, &[port]);
    let real_socket = nodes.shim_socket.clone();
    nodes.source.kill9();
    let fake = Fake::start(&dir, &public, &real_socket, 9256);
    let (v, _) = program(&real_socket, port, &[]);
    assert_eq!(v, serde_json::json!(["ECONNREFUSED", "ECONNREFUSED"]));
    let seen = fake.finish();
    assert_ne!(
        seen["unix"], true,
        "the daemon's directory is not writable: {seen}"
    );
    assert_eq!(seen["tcp"], true, "{seen}");
    assert_eq!(seen["connections"], 0, "{seen}");
    assert_eq!(seen["bytes"], 0, "{seen}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    drop(nodes);
}
