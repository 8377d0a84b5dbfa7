//! No daemon listening where the shim looks for it (no socket at
//! `POOL_SHIM_SOCKET`): with
//! `POOL_SHIM_FALLBACK=1` connections go out as plain TCP (said once per
//! process on stderr); without it the program gets `ECONNREFUSED` at once,
//! for blocking and non-blocking sockets, and nothing reaches the
//! destination in clear.
mod util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use util::shim::*;
use util::*;

/// Three connections of each kind; prints `[errno name, milliseconds]`
/// per connect, and whether the HTTP exchange worked for those that
/// connected.
const SCRIPT: &str = r#"
import errno, json, select, socket, sys, time
port = int(sys.argv[1])
res = []
for blocking in (True, False, True):
    s = socket.socket()
    s.setblocking(blocking)
    t = time.monotonic()
    e = s.connect_ex(('127.0.0.1', port))
    ms = (time.monotonic() - t) * 1e3
    http = None
    if e in (0, errno.EINPROGRESS):
        select.select([], [s], [], 5)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            s.setblocking(True)
            s.settimeout(5)
            s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            http = s.recv(100).startswith(b'HTTP/1.1 200')
    res.append([errno.errorcode.get(e, '0'), ms, http])
    s.close()
print(json.dumps(res))
"#;

/// A socket path in a directory no one made: no daemon was ever there.
fn nobody_listening() -> String {
    format!("/run/pool-cli-tests-nobody-{}/shim.sock", free_port())
}

#[test]
fn fallback_on_goes_out_as_plain_tcp_and_says_so_once() {
    require_program("python3", "python3");
    let (port, accepted) = http_server("plain\n");
    let mut cmd = shimmed("python3", &nobody_listening(), &port.to_string());
    cmd.env("POOL_SHIM_FALLBACK", "1");
    cmd.arg("-c").arg(SCRIPT).arg(port.to_string());
    let out = run(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let res: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let want = serde_json::json!([["0", true], ["EINPROGRESS", true], ["0", true]]);
    let got: Vec<_> = res
        .as_array()
        .expect("array")
        .iter()
        .map(|r| serde_json::json!([r[0], r[2]]))
        .collect();
    assert_eq!(serde_json::Value::from(got), want, "{res}");
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "plain TCP connections");
    assert_eq!(
        stderr.matches("POOL_SHIM_FALLBACK=1").count(),
        1,
        "the fallback is logged once per process:\n{stderr}"
    );
}

#[test]
fn fallback_off_refuses_at_once() {
    require_program("python3", "python3");
    let (port, accepted) = http_server("must not be reached\n");
    let mut cmd = shimmed("python3", &nobody_listening(), &port.to_string());
    cmd.arg("-c").arg(SCRIPT).arg(port.to_string());
    let out = run(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let res: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    for (i, r) in res.as_array().expect("array").iter().enumerate() {
        assert_eq!(
            r[0], "ECONNREFUSED",
            "connect {i} (blocking, non-blocking, blocking): {res}"
        );
        let ms = r[1].as_f64().unwrap_or(f64::MAX);
        assert!(ms < 50.0, "connect {i} took {ms:.1} ms: {res}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing may reach the destination in clear"
    );

    // And `curl` says so the way it does for a refused connection.
    let mut curl = shimmed("curl", &nobody_listening(), &port.to_string());
    curl.args([
        "-sS",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run(curl, Duration::from_secs(10));
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl exit code for a refused connection"
    );
}
