//! Two local users and the daemon's `[shim] allow_users`: a program run
//! as an allowed user (uid 4242) is carried; one run as a user who is not
//! allowed (uid 4243) is refused by the daemon — `ECONNREFUSED` for
//! blocking and non-blocking sockets, nothing reaches the destination in
//! clear, and the journal says who was refused — or, with
//! `POOL_SHIM_FALLBACK=1`, goes out as plain TCP and is told why on
//! stderr. The users need no account: `setpriv` switches to bare uids.
mod util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use util::shim::*;
use util::*;

const ALLOWED: u32 = 4242;
const OTHER: u32 = 4243;

/// `/usr/bin/python3`: a user switched to cannot run root's own Python
/// (pyenv under /root).
const PYTHON: &str = "/usr/bin/python3";

/// Blocking then non-blocking connect; the errno names, and for the first
/// that connected, whether HTTP worked.
const SCRIPT: &str = r#"
import errno, json, os, select, socket, sys
port = int(sys.argv[1])
res = [os.getuid()]
for blocking in (True, False):
    s = socket.socket()
    s.setblocking(blocking)
    e = s.connect_ex(('127.0.0.1', port))
    http = None
    if e in (0, errno.EINPROGRESS):
        select.select([], [s], [], 5)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            s.setblocking(True)
            s.settimeout(5)
            try:
                s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
                http = s.recv(100).startswith(b'HTTP/1.1 200')
            except OSError as x:
                http = errno.errorcode.get(x.errno, str(x.errno))
    res.append([errno.errorcode.get(e, '0'), http])
    s.close()
print(json.dumps(res))
"#;

fn as_user(uid: u32, socket: &str, port: u16, fallback: bool) -> (serde_json::Value, String) {
    let mut cmd = shimmed_as(uid, PYTHON, socket, &port.to_string());
    if fallback {
        cmd.env("POOL_SHIM_FALLBACK", "1");
    }
    cmd.arg("-c").arg(SCRIPT).arg(port.to_string());
    let out = run(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (serde_json::from_str(&stdout).expect("JSON"), stderr)
}

#[test]
fn allowed_user_is_carried_and_others_are_refused() {
    require_program(PYTHON, "python3");
    let dir = TempDir::new("shim-users");
    let (port, accepted) = http_server("through POOL\n");
    let nodes = shim_nodes_custom(
        &dir,
        &[port],
        "",
        false,
        &format!("allow_users = [{ALLOWED}]"),
    );
    let socket = nodes.shim_socket.clone();

    // (a) The allowed user: both connections carried, through POOL.
    let (v, _) = as_user(ALLOWED, &socket, port, false);
    assert_eq!(
        v,
        serde_json::json!([ALLOWED, ["0", true], ["EINPROGRESS", true]]),
        "allowed user"
    );
    assert_eq!(
        wait_counter(
            &nodes.dest_control,
            "shim_exposed",
            2,
            Duration::from_secs(5)
        ),
        2
    );
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 2);

    // (b) Another user: refused by the daemon; nothing in clear.
    let before = accepted.load(Ordering::SeqCst);
    let (v, stderr) = as_user(OTHER, &socket, port, false);
    assert_eq!(
        v,
        serde_json::json!([OTHER, ["ECONNREFUSED", null], ["ECONNREFUSED", null]]),
        "user not allowed"
    );
    assert!(
        stderr.contains("does not serve this user (uid 4243)"),
        "the program is told why:\n{stderr}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(accepted.load(Ordering::SeqCst), before, "nothing in clear");
    let denied = wait_journal(
        &nodes.source_journal,
        Duration::from_secs(5),
        "shim_denied",
        |e| e["event"] == "shim_denied",
    );
    assert_eq!(denied["uid"], OTHER, "{denied}");
    assert_eq!(denied["gid"], OTHER, "{denied}");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap_or("")
            .contains("allow_users"),
        "{denied}"
    );
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 2);
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 2);

    // ... or, with the fallback on, plain TCP (the program's choice).
    let (v, stderr) = as_user(OTHER, &socket, port, true);
    assert_eq!(
        v,
        serde_json::json!([OTHER, ["0", true], ["EINPROGRESS", true]]),
        "fallback"
    );
    assert!(stderr.contains("POOL_SHIM_FALLBACK=1"), "{stderr}");
    assert_eq!(accepted.load(Ordering::SeqCst), before + 2);
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 2);

    // Root is always served.
    let mut curl = shimmed("curl", &socket, &port.to_string());
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run(curl, Duration::from_secs(20));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through POOL\n");
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 3);
}
