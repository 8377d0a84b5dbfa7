//! Local programs that speak nonsense to the `[shim]` socket — bytes that
//! are not a shim header, a header cut short, a silent client — and to its
//! loopback data port — no token, a wrong token, a token never presented —
//! are dropped without disturbing the daemon: a shimmed `curl` right after
//! works, and the daemon counts them as failed.
mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use util::shim::*;
use util::*;

#[test]
fn garbage_on_the_shim_listener_is_dropped() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-garbage");
    let (port, _) = http_server("still fine\n");
    let mut nodes = shim_nodes(&dir, &[port]);
    let path = nodes.shim_socket.clone();

    // Not a header: closed at once.
    let mut s = UnixStream::connect(&path).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n\0\0\0\0\0\0")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let r = s.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "garbage got an answer: {r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );

    // A header cut short, and a silent client: held at most 5 s each.
    let mut short = UnixStream::connect(&path).expect("connect");
    short.write_all(b"PSH2\x01").expect("write");
    let silent: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&path).expect("connect"))
        .collect();

    // The data port carries nothing without the token given on the socket:
    // a wrong token is closed at once, and a token never presented
    // expires.
    let dest: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (_unpresented, data_port, token) = ask_for_data_port(&path, dest);
    let mut wrong = TcpStream::connect(("127.0.0.1", data_port)).expect("connect data port");
    let mut bad = token;
    bad[0] ^= 1;
    wrong.write_all(&bad).expect("write");
    wrong.write_all(b"GET / HTTP/1.1\r\n\r\n").ok();
    wrong.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let r = wrong.read(&mut b);
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "a wrong token got an answer: {r:?}"
    );

    // Meanwhile a real program is served.
    let mut curl = shimmed("curl", &path, &port.to_string());
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run(curl, Duration::from_secs(20));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still fine\n");

    short.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let t = Instant::now();
    let r = short.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(7),
        "held {:?}",
        t.elapsed()
    );
    drop(silent);
    // 52 on the socket, as over TCP before; 2 more on the data port.
    wait_counter(
        &nodes.source_control,
        "shim_failed",
        52,
        Duration::from_secs(10),
    );
    wait_counter(
        &nodes.source_control,
        "shim_failed",
        54,
        Duration::from_secs(10),
    );
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 1);
    nodes.source.assert_running();
}
