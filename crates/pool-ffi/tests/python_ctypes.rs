//! Python's ctypes loads libpool.so and sends a message through the C echo
//! server (and a wrong key string gives an error message, not a crash).

mod util;

use std::process::Command;

use util::*;

#[test]
fn python_ctypes_sends_a_message() {
    let dir = scratch("python");
    let peer = build_peer(&dir, Link::Shared);
    let (skey, _) = keygen(&peer, &dir, "server.key");
    let (ckey, cpub) = keygen(&peer, &dir, "client.key");
    let mut cmd = Command::new(&peer);
    cmd.arg("echo").arg(&skey).arg(&cpub);
    let mut server = start_server(cmd);
    let out = Command::new("python3")
        .arg(crate_dir().join("tests/python/send_message.py"))
        .arg(lib_dir().join("libpool.so"))
        .arg(&ckey)
        .arg(&server.addr)
        .arg(&server.key)
        .output()
        .expect("python3 not found");
    let _ = server.child.kill();
    let _ = server.child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("echoed: hello from python over POOL"),
        "{stdout}"
    );
    assert!(stdout.contains("wrong key: peer_key"), "{stdout}");
    assert!(stdout.ends_with("OK\n"), "{stdout}");
}
