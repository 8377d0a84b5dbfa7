//! What a program sees of its sockets under the shim is what the kernel
//! would show: the same `connect` return values and `errno` sequence,
//! `poll`/`SO_ERROR` completion, `getpeername` through `dup`, `dup2` and
//! `F_DUPFD_CLOEXEC`; a non-blocking `connect` never waits for the far
//! end; and what is not selected — another port, UDP, Unix sockets —
//! passes through untouched (the daemon never hears of it).
mod util;

use std::io::{Read, Write};
use std::time::Duration;

use util::shim::*;
use util::*;

/// The same calls, run with and without the shim; prints what each
/// returned. Addresses are printed as seen by getpeername.
const SEQUENCE: &str = r#"
import errno, fcntl, json, os, select, socket, sys
port = int(sys.argv[1])
out = []
def e(x): return errno.errorcode.get(x, str(x))
s = socket.socket()
s.setblocking(False)
out.append(['nonblocking connect', e(s.connect_ex(('127.0.0.1', port)))])
r, w, x = select.select([], [s], [], 5)
out.append(['writable', len(w)])
out.append(['SO_ERROR', s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)])
out.append(['connect again', e(s.connect_ex(('127.0.0.1', port)))])
out.append(['and again', e(s.connect_ex(('127.0.0.1', port)))])
out.append(['getpeername', s.getpeername()])
s.setblocking(True)
s.sendall(b'ping')
out.append(['echo', s.recv(4).decode()])
d = os.dup(s.fileno())
out.append(['dup getpeername', socket.socket(fileno=os.dup(d)).getpeername()])
spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
os.dup2(s.fileno(), spare.fileno())
out.append(['dup2 getpeername', spare.getpeername()])
c = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
out.append(['F_DUPFD_CLOEXEC getpeername', socket.socket(fileno=c).getpeername()])
s.close()
os.close(d)
b = socket.socket()
out.append(['blocking connect', e(b.connect_ex(('127.0.0.1', port)))])
out.append(['blocking again', e(b.connect_ex(('127.0.0.1', port)))])
b.sendall(b'pong')
out.append(['blocking echo', b.recv(4).decode()])
import subprocess
# The child (vfork + close_range in Python's subprocess) closes every
# descriptor it inherited: that must not touch the parent's sockets.
out.append(['child ran', subprocess.run(['true'], close_fds=True).returncode])
out.append(['getpeername after a child', b.getpeername()])
out.append(['connect after a child', e(b.connect_ex(('127.0.0.1', port)))])
v6 = socket.socket(socket.AF_INET6)
out.append(['v4-mapped connect', e(v6.connect_ex(('::ffff:127.0.0.1', port)))])
out.append(['v4-mapped getpeername', v6.getpeername()[:2]])
print(json.dumps(out))
"#;

#[test]
fn same_results_as_the_kernel() {
    require_program("python3", "python3");
    let dir = TempDir::new("shim-semantics");
    let port = echo_server();
    let nodes = shim_nodes(&dir, &[port]);
    let args = [port.to_string()];
    let plain = python(
        std::process::Command::new("python3"),
        SEQUENCE,
        &args,
        Duration::from_secs(20),
    );
    let shim = python(
        shimmed("python3", &nodes.shim_socket, &port.to_string()),
        SEQUENCE,
        &args,
        Duration::from_secs(20),
    );
    let plain: serde_json::Value = serde_json::from_str(&plain).expect("JSON");
    let shim: serde_json::Value = serde_json::from_str(&shim).expect("JSON");
    assert_eq!(shim, plain, "under the shim (left) vs plain (right)");
    // ...and it did go through the daemons: three connections.
    assert_eq!(
        wait_counter(
            &nodes.dest_control,
            "shim_exposed",
            3,
            Duration::from_secs(5)
        ),
        3
    );
}

/// A route to a peer that accepts TCP but never answers the handshake:
/// a non-blocking `connect` still returns `EINPROGRESS` at once (the
/// event loop is not held for the far end), and the program then gets a
/// reset, not a hang; a blocking `connect` fails with `ETIMEDOUT` after
/// the daemon's `connect_timeout_secs`.
#[test]
fn nonblocking_connect_never_waits_for_the_far_end() {
    require_program("python3", "python3");
    let dir = TempDir::new("shim-blackhole");
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_addr = hole.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hole.incoming() {
            held.push(s);
        }
    });
    let port = echo_server();
    let (_, some_key) = keygen(&dir, "any");
    let nodes = shim_nodes_with(
        &dir,
        &[port],
        &format!("[[route]]\ncidr = \"127.0.0.2/32\"\npeer = \"{hole_addr}\"\npeer_key = \"{some_key}\"\n"),
    );
    let script = r#"
import errno, json, select, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(); s.setblocking(False)
t = time.monotonic(); e = s.connect_ex(('127.0.0.2', port)); nb_ms = (time.monotonic() - t) * 1e3
r, _, _ = select.select([s], [], [], 15)
try:
    s.recv(10); after = 'eof'
except OSError as x:
    after = errno.errorcode.get(x.errno, str(x.errno))
ended_s = time.monotonic() - t
b = socket.socket()
t = time.monotonic(); eb = b.connect_ex(('127.0.0.2', port)); b_s = time.monotonic() - t
print(json.dumps({"nb": errno.errorcode.get(e, '0'), "nb_ms": nb_ms, "after": after, "ended_s": ended_s,
                  "blocking": errno.errorcode.get(eb, '0'), "blocking_s": b_s}))
"#;
    let out = python(
        shimmed("python3", &nodes.shim_socket, &port.to_string()),
        script,
        &[port.to_string()],
        Duration::from_secs(40),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["nb"], "EINPROGRESS", "{v}");
    assert!(
        v["nb_ms"].as_f64().unwrap_or(1e9) < 20.0,
        "non-blocking connect waited: {v}"
    );
    assert_eq!(v["after"], "ECONNRESET", "{v}");
    assert!(v["ended_s"].as_f64().unwrap_or(1e9) < 10.0, "{v}");
    assert_eq!(v["blocking"], "ETIMEDOUT", "{v}");
    let b = v["blocking_s"].as_f64().unwrap_or(0.0);
    assert!(
        (2.5..10.0).contains(&b),
        "blocking connect returned after {b:.1} s: {v}"
    );
    let failed = wait_journal(
        &nodes.source_journal,
        Duration::from_secs(5),
        "shim_failed",
        |e| e["event"] == "shim_failed",
    );
    assert_eq!(
        failed["destination"],
        format!("127.0.0.2:{port}"),
        "{failed}"
    );
}

/// Another port, UDP to a selected port, and a Unix socket: all work as
/// without the shim, and the daemon sees none of them.
#[test]
fn other_ports_udp_and_unix_sockets_pass_through() {
    require_program("python3", "python3");
    let dir = TempDir::new("shim-passthrough");
    let port = echo_server();
    let (other, accepted) = http_server("direct\n");
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("bind UDP on the same port");
    std::thread::spawn(move || {
        let mut b = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut b) {
            let _ = udp.send_to(&b[..n], from);
        }
    });
    let unix_path = dir.join("echo.sock");
    let ul = std::os::unix::net::UnixListener::bind(&unix_path).expect("bind unix");
    std::thread::spawn(move || {
        for s in ul.incoming() {
            let Ok(mut s) = s else { return };
            let mut b = [0u8; 64];
            if let Ok(n) = s.read(&mut b) {
                let _ = s.write_all(&b[..n]);
            }
        }
    });
    let nodes = shim_nodes(&dir, &[port]);
    let script = r#"
import json, socket, sys
port, other, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}
t = socket.create_connection(('127.0.0.1', other), timeout=5)
t.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
peer = t.getpeername()[1]
data = b''
while True:
    c = t.recv(1000)
    if not c:
        break
    data += c
out['other_port'] = [data.decode().endswith('direct\n'), peer]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.connect(('127.0.0.1', port)); u.send(b'udp')
out['udp'] = [u.recv(10).decode(), u.getpeername()[1]]
x = socket.socket(socket.AF_UNIX); x.settimeout(5); x.connect(path); x.sendall(b'unix')
out['unix'] = x.recv(10).decode()
print(json.dumps(out))
"#;
    let out = python(
        shimmed("python3", &nodes.shim_socket, &port.to_string()),
        script,
        &[
            port.to_string(),
            other.to_string(),
            unix_path.display().to_string(),
        ],
        Duration::from_secs(20),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["other_port"], serde_json::json!([true, other]), "{v}");
    assert_eq!(v["udp"], serde_json::json!(["udp", port]), "{v}");
    assert_eq!(v["unix"], "unix", "{v}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(counter(&nodes.source_control, "shim_connections"), 0);
}

/// `fork`: the child sees the inherited shimmed socket as the parent does
/// (`getpeername`, echo), and its own new connections are shimmed too.
#[test]
fn fork_child_keeps_and_makes_connections() {
    require_program("python3", "python3");
    let dir = TempDir::new("shim-fork");
    let port = echo_server();
    let nodes = shim_nodes(&dir, &[port]);
    let script = r#"
import json, os, socket, sys
port = int(sys.argv[1])
s = socket.create_connection(('127.0.0.1', port), timeout=5)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        out = [s.getpeername()]
        s.sendall(b'child'); out.append(s.recv(5).decode())
        t = socket.create_connection(('127.0.0.1', port), timeout=5)
        t.sendall(b'new'); out.append(t.recv(3).decode()); out.append(t.getpeername())
        os.write(w, json.dumps(out).encode())
    finally:
        os._exit(0)
os.close(w)
child = json.loads(os.read(r, 4096))
os.waitpid(pid, 0)
s.sendall(b'parent')
print(json.dumps({"child": child, "parent": [s.getpeername(), s.recv(6).decode()]}))
"#;
    let out = python(
        shimmed("python3", &nodes.shim_socket, &port.to_string()),
        script,
        &[port.to_string()],
        Duration::from_secs(20),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let peer = serde_json::json!(["127.0.0.1", port]);
    assert_eq!(
        v["child"],
        serde_json::json!([peer, "child", "new", peer]),
        "{v}"
    );
    assert_eq!(v["parent"], serde_json::json!([peer, "parent"]), "{v}");
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 2);
}

/// An IPv6 destination (`[::1]:PORT`, routed by a `::1/128` route) is
/// carried like an IPv4 one; the destination daemon connects to `::1`.
#[test]
fn ipv6_destination() {
    require_program("python3", "python3");
    let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dir = TempDir::new("shim-ipv6");
    let nodes = shim_nodes_with(
        &dir,
        &[port],
        "[[route]]\ncidr = \"::1/128\"\npeer = \"{dest}\"\npeer_key = \"{dest_key}\"\n",
    );
    let script = r#"
import json, socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET6)
s.settimeout(5)
s.connect(('::1', port))
s.sendall(b'six')
print(json.dumps([s.recv(3).decode(), list(s.getpeername()[:2])]))
"#;
    let out = python(
        shimmed("python3", &nodes.shim_socket, &port.to_string()),
        script,
        &[port.to_string()],
        Duration::from_secs(20),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v, serde_json::json!(["six", ["::1", port]]), "{v}");
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 1);
}

/// `LD_PRELOAD` set for the daemons too (as with /etc/ld.so.preload),
/// every port selected: the library leaves the `pool` process alone, so
/// the source daemon's own connection to the destination daemon is not
/// sent back into itself, and programs are still carried.
#[test]
fn the_daemon_itself_is_left_alone() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-self");
    let (port, _) = http_server("not looped\n");
    let nodes = shim_nodes_full(&dir, &[port], "", true);
    for p in [&nodes.source, &nodes.dest] {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.pid())).unwrap_or_default();
        assert!(
            maps.contains("libpool_shim.so"),
            "{} does not have the shim loaded",
            p.name
        );
    }
    let mut curl = shimmed("curl", &nodes.shim_socket, "");
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run(curl, Duration::from_secs(20));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "not looped\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 1);
    assert_eq!(counter(&nodes.source_control, "shim_failed"), 0);
}
