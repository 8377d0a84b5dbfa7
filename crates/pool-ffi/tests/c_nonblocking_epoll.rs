//! A non-blocking C client drives 100 streams from one epoll loop on one
//! thread (no thread per stream): each stream's readiness fd wakes the
//! loop, reads and writes return EAGAIN instead of blocking, and every
//! stream's bytes arrive complete and in order both ways.

mod util;

use std::process::Command;

use util::*;

#[test]
fn c_nonblocking_epoll_100_streams() {
    let dir = scratch("epoll");
    let peer = build_peer(&dir, Link::Shared);
    let (skey, _) = keygen(&peer, &dir, "server.key");
    let (ckey, cpub) = keygen(&peer, &dir, "client.key");
    let (streams, bytes) = (100, scaled(1 << 20));
    let mut cmd = Command::new(&peer);
    cmd.arg("server")
        .arg(&skey)
        .arg(&cpub)
        .arg(streams.to_string())
        .arg(bytes.to_string());
    let mut server = start_server(cmd);
    let out = Command::new(&peer)
        .arg("nbclient")
        .arg(&ckey)
        .arg(&server.addr)
        .arg(&server.key)
        .arg(streams.to_string())
        .arg(bytes.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("NB streams=100") && stdout.contains("OK"),
        "{stdout}"
    );
    let rest = server.rest();
    assert!(server.child.wait().unwrap().success(), "server: {rest}");
}
