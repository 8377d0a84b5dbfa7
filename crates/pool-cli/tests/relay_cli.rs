//! `pool relay` as users run it: the real binary on loopback, announcing
//! its addresses on stderr; two nodes register and connect through it,
//! bytes cross, a key outside `--authorized` is refused, `/metrics` and
//! the journal show it, and SIGTERM stops it cleanly.
mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::Duration;

use pool_core::relay::{authenticate, Intent, Msg, ERR_NOT_ALLOWED, VERSION};
use pool_core::SecretKey;
use util::*;

const T: Duration = Duration::from_secs(10);

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn next(&mut self) -> Msg {
        loop {
            if let Some((m, used)) = Msg::decode(&self.buf).expect("relay message") {
                self.buf.drain(..used);
                return m;
            }
            let mut tmp = [0u8; 4096];
            let n = self.s.read(&mut tmp).expect("read from relay");
            assert!(n > 0, "relay closed the connection");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    fn send(&mut self, m: &Msg) {
        let mut out = Vec::new();
        m.encode(&mut out);
        self.s.write_all(&out).expect("write to relay");
    }
}

fn auth(relay: &str, key: &SecretKey, intent: Intent) -> Conn {
    let s = TcpStream::connect(relay).expect("connect to the relay");
    s.set_read_timeout(Some(T)).unwrap();
    let mut c = Conn { s, buf: Vec::new() };
    c.send(&Msg::Hello { version: VERSION });
    let Msg::Challenge { ephemeral, nonce } = c.next() else {
        panic!("expected CHALLENGE")
    };
    c.send(&authenticate(key, &ephemeral, &nonce, intent).expect("auth"));
    c
}

fn load(path: &Path) -> SecretKey {
    SecretKey::from_file_text(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn relay_command_connects_two_nodes_and_reports() {
    let dir = TempDir::new("relay");
    let (a_path, a_pub) = keygen(&dir, "a");
    let (b_path, b_pub) = keygen(&dir, "b");
    let (c_path, _) = keygen(&dir, "c");
    let authorized = dir.join("authorized");
    std::fs::write(&authorized, format!("# nodes\n{a_pub} alice\n{b_pub}\n")).unwrap();
    let journal = dir.join("relay.journal");
    let mut relay = Proc::pool(
        "relay",
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--journal",
            journal.to_str().unwrap(),
            "--authorized",
            authorized.to_str().unwrap(),
            "--max-per-node",
            "8",
        ],
        &dir,
    );
    let addr = relay.wait_log("relay listening on ", T);
    let metrics = relay.wait_log("metrics at http://", T);
    let metrics = metrics.trim_end_matches("/metrics").to_string();
    let (a, b, c) = (load(&a_path), load(&b_path), load(&c_path));

    // B registers; A connects; B accepts; bytes cross both ways.
    let mut b_ctl = auth(&addr, &b, Intent::Register);
    let Msg::Welcome { observed } = b_ctl.next() else {
        panic!("expected WELCOME")
    };
    assert_eq!(observed, b_ctl.s.local_addr().unwrap());
    let mut ca = auth(&addr, &a, Intent::Connect(b.public_key()));
    let Msg::Incoming { circuit, from } = b_ctl.next() else {
        panic!("expected INCOMING")
    };
    assert_eq!(from, a.public_key());
    let mut cb = auth(&addr, &b, Intent::Accept(circuit));
    assert!(matches!(cb.next(), Msg::Welcome { .. }));
    assert!(matches!(ca.next(), Msg::Welcome { .. }));
    ca.s.write_all(b"hello through the relay").unwrap();
    ca.s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    cb.s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello through the relay");
    cb.s.write_all(b"and back").unwrap();
    drop(cb);
    let mut back = Vec::new();
    ca.s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"and back");
    drop(ca);

    // C is not in --authorized.
    let mut cc = auth(&addr, &c, Intent::Register);
    match cc.next() {
        Msg::Error { code, message } => {
            assert_eq!(code, ERR_NOT_ALLOWED);
            assert!(message.contains("not served"), "{message}");
        }
        other => panic!("expected ERROR, got {other:?}"),
    }

    // /metrics and /health.
    let deadline = std::time::Instant::now() + T;
    let text = loop {
        let text = http_get(&metrics, "/metrics");
        if text.contains("pool_relay_circuits_open 0") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for line in [
        "pool_relay_nodes 1",
        "pool_relay_circuits_total 1",
        "pool_relay_circuits_open 0",
        "pool_relay_bytes_total 31",
        "pool_relay_refused_total{reason=\"not_allowed\"} 1",
        "pool_relay_auth_failures_total 0",
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    assert!(http_get(&metrics, "/health").ends_with("ok\n"));

    // SIGTERM: a clean stop, and an intact journal.
    drop(b_ctl);
    relay.signal("TERM");
    let st = relay.wait_exit(T);
    assert!(st.success(), "relay exited with {st}:\n{}", relay.log());
    let out = pool_cmd(&["journal", "verify", journal.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&journal).unwrap();
    for event in [
        "relay_started",
        "node_registered",
        "circuit_opened",
        "circuit_closed",
        "relay_refused",
        "relay_stopped",
    ] {
        assert!(
            text.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in:\n{text}"
        );
    }
}

#[test]
fn relay_command_explains_a_busy_port() {
    let dir = TempDir::new("relay-busy");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let out = pool_cmd(&["relay", "--listen", &addr]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    drop(dir);
}

/// Killed hard while nodes are registered and a circuit is open, the relay
/// starts again on the same port at once, and nodes register again.
#[test]
fn relay_command_restarts_on_the_same_port_after_kill() {
    let dir = TempDir::new("relay-restart");
    let (a_path, _) = keygen(&dir, "a");
    let (b_path, _) = keygen(&dir, "b");
    let (a, b) = (load(&a_path), load(&b_path));
    let mut relay = Proc::pool("relay1", &["relay", "--listen", "127.0.0.1:0"], &dir);
    let addr = relay.wait_log("relay listening on ", T);

    let circuit = |b_ctl: &mut Conn| {
        let mut ca = auth(&addr, &a, Intent::Connect(b.public_key()));
        let Msg::Incoming { circuit, .. } = b_ctl.next() else {
            panic!("expected INCOMING")
        };
        let mut cb = auth(&addr, &b, Intent::Accept(circuit));
        assert!(matches!(cb.next(), Msg::Welcome { .. }));
        assert!(matches!(ca.next(), Msg::Welcome { .. }));
        ca.s.write_all(b"ping").unwrap();
        let mut four = [0u8; 4];
        cb.s.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"ping");
        (ca, cb)
    };
    let mut b_ctl = auth(&addr, &b, Intent::Register);
    assert!(matches!(b_ctl.next(), Msg::Welcome { .. }));
    let (mut ca, _cb) = circuit(&mut b_ctl);

    relay.kill9();
    // The nodes see their connections end.
    let mut tmp = [0u8; 8];
    assert!(matches!(b_ctl.s.read(&mut tmp), Ok(0) | Err(_)));
    assert!(matches!(ca.s.read(&mut tmp), Ok(0) | Err(_)));

    let mut relay = Proc::pool("relay2", &["relay", "--listen", &addr], &dir);
    assert_eq!(relay.wait_log("relay listening on ", T), addr);
    let mut b_ctl = auth(&addr, &b, Intent::Register);
    assert!(matches!(b_ctl.next(), Msg::Welcome { .. }));
    let _ = circuit(&mut b_ctl);
    relay.assert_running();
}
