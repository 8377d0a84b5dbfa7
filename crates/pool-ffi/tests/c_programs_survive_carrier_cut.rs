//! A C client and a C server, compiled against pool.h and libpool.so,
//! move 64 MiB each way over 4 streams while the test cuts the TCP
//! connection under them: the C programs never see it, and every byte
//! arrives once and in order (each side checks a position-dependent
//! pattern).

mod util;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use util::*;

#[test]
fn c_programs_survive_carrier_cut() {
    let dir = scratch("cut");
    let peer = build_peer(&dir, Link::Shared);
    let (skey, _) = keygen(&peer, &dir, "server.key");
    let (ckey, cpub) = keygen(&peer, &dir, "client.key");
    let streams = 4u64;
    let per_stream = scaled(64 << 20) / streams;
    let mut cmd = Command::new(&peer);
    cmd.arg("server")
        .arg(&skey)
        .arg(&cpub)
        .arg(streams.to_string())
        .arg(per_stream.to_string());
    let mut server = start_server(cmd);
    let fwd = Arc::new(Forwarder::start(&server.addr));
    // Cut when about half of both directions has crossed.
    fwd.cut_after(per_stream * streams);
    let out = Command::new(&peer)
        .arg("client")
        .arg(&ckey)
        .arg(&fwd.addr)
        .arg(&server.key)
        .arg(streams.to_string())
        .arg(per_stream.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OK"), "{stdout}");
    // A panic caught at the boundary is still a bug.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rest = server.rest();
    assert!(server.child.wait().unwrap().success(), "server: {rest}");
    assert!(rest.contains("OK"), "{rest}");
    assert!(
        fwd.accepted.load(Ordering::SeqCst) >= 2,
        "the carrier was never cut"
    );
    let resumes: u64 = stdout
        .split("resumes=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(resumes >= 1, "no resume counted: {stdout}");
    eprintln!("client: {stdout}server: {rest}");
}
