//! Local programs that speak nonsense to the `[shim]` listener — bytes that
//! are not a shim header, a header cut short, a silent client — are
//! dropped without disturbing the daemon: a shimmed `curl` right after
//! works, and the daemon counts them as failed.
mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::shim::*;
use util::*;

#[test]
fn garbage_on_the_shim_listener_is_dropped() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-garbage");
    let (port, _) = http_server("still fine\n");
    let mut nodes = shim_nodes(&dir, &[port]);
    let addr = nodes.shim_addr.clone();

    // Not a header: closed (reset) at once.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0\0")
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
    let mut short = TcpStream::connect(&addr).expect("connect");
    short.write_all(b"PSH1\x01").expect("write");
    let silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();

    // Meanwhile a real program is served.
    let mut curl = shimmed("curl", &addr, &port.to_string());
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
    wait_counter(
        &nodes.source_control,
        "shim_failed",
        52,
        Duration::from_secs(10),
    );
    assert_eq!(counter(&nodes.source_control, "shim_streams"), 1);
    nodes.source.assert_running();
}
