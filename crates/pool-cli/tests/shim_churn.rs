//! Churn for 30 s (`SHIM_CHURN_SECS`): threads of one process keep
//! opening shimmed connections (blocking and non-blocking), `dup2`-ing
//! them over other descriptors, closing the originals, and opening plain
//! connections to an unselected port in between, so descriptor numbers
//! are reused all the time between shimmed and plain sockets. Every echo
//! must come back on the right connection, every `getpeername` must be
//! the right address, no descriptor may leak in the program, and both
//! daemons must end with no connection left open.
mod util;

use std::time::Duration;

use util::shim::*;
use util::*;

const SCRIPT: &str = r#"
import errno, json, os, select, socket, sys, threading, time
port, other, secs, nthreads = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def fds(): return len(os.listdir('/proc/self/fd'))
before = fds()
stop = time.monotonic() + secs
errors, counts = [], [0] * nthreads
def check(ok, what):
    if not ok:
        errors.append(what)
        raise RuntimeError(what)
def worker(i):
    k = 0
    try:
        while time.monotonic() < stop and not errors:
            token = b'%04d%08d' % (i, k)
            s = socket.socket()
            if k % 3 == 0:
                s.setblocking(False)
                e = s.connect_ex(('127.0.0.1', port))
                check(e == errno.EINPROGRESS, 'non-blocking connect: %s' % errno.errorcode.get(e, e))
                select.select([], [s], [], 10)
                check(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0, 'SO_ERROR')
                s.setblocking(True)
            else:
                s.connect(('127.0.0.1', port))
            spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            os.dup2(s.fileno(), spare.fileno())
            s.close()
            q = socket.socket(fileno=spare.detach())
            q.settimeout(10)
            t = socket.create_connection(('127.0.0.1', other), timeout=10)
            check(t.getpeername()[1] == other, 'plain getpeername %r' % (t.getpeername(),))
            check(q.getpeername() == ('127.0.0.1', port), 'shim getpeername %r' % (q.getpeername(),))
            q.sendall(token)
            t.sendall(token[::-1])
            got = b''
            while len(got) < len(token):
                c = q.recv(len(token) - len(got))
                check(c, 'EOF on the shimmed connection')
                got += c
            check(got == token, 'echo %r != %r' % (got, token))
            check(t.recv(64) == token[::-1], 'plain echo')
            t.close()
            q.close()
            k += 1
    except Exception as x:
        if not errors:
            errors.append('thread %d: %r' % (i, x))
    counts[i] = k
threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"connections": sum(counts), "per_thread": counts, "errors": errors[:5],
                  "fds_before": before, "fds_after": fds()}))
"#;

#[test]
fn threads_dup2_and_close_for_thirty_seconds() {
    require_program("python3", "python3");
    let secs: f64 = std::env::var("SHIM_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0);
    let dir = TempDir::new("shim-churn");
    let port = echo_server();
    let other = echo_server();
    let mut nodes = shim_nodes(&dir, &[port]);
    let out = python(
        shimmed("python3", &nodes.shim_socket, &port.to_string()),
        SCRIPT,
        &[
            port.to_string(),
            other.to_string(),
            secs.to_string(),
            "8".to_string(),
        ],
        Duration::from_secs_f64(secs + 60.0),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    eprintln!("churn: {v}");
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    assert_eq!(v["fds_before"], v["fds_after"], "descriptors leaked: {v}");
    let n = v["connections"].as_u64().unwrap_or(0);
    assert!(n as f64 >= secs * 10.0, "only {n} connections in {secs} s");
    for c in v["per_thread"].as_array().expect("per_thread") {
        assert!(
            c.as_u64().unwrap_or(0) > 0,
            "a thread made no progress: {v}"
        );
    }
    // Every shimmed connection went through the daemons; none is left open.
    assert_eq!(
        wait_counter(
            &nodes.dest_control,
            "shim_exposed",
            n,
            Duration::from_secs(10)
        ),
        n
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let src = ctl_status(&nodes.source_control)["shim"]["active"].as_u64();
        let dst = ctl_status(&nodes.dest_control)["pool2tcp"]["active"].as_u64();
        if src == Some(0) && dst == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections left open: source shim {src:?}, destination {dst:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(counter(&nodes.source_control, "shim_failed"), 0);
    nodes.source.assert_running();
    nodes.dest.assert_running();
}
