//! Bad use from C (NULL pointers, a stream used after free, double frees,
//! a handle of the wrong kind or made up, a wrong key string, a key file
//! others can read) returns an error code and a clear pool_last_error(),
//! never a crash. The C program checks each call (tests/c/peer.c `misuse`).

mod util;

use std::process::Command;

use util::*;

#[test]
fn c_bad_use_fails_cleanly() {
    let dir = scratch("misuse");
    let peer = build_peer(&dir, Link::Shared);
    let (key, _) = keygen(&peer, &dir, "k.key");
    let out = Command::new(&peer)
        .arg("misuse")
        .arg(&key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("OK misuse failures=0"), "{stdout}");
    // The messages say what to do.
    for needle in [
        "is not a live handle: it was freed already",
        "is not a POOL public key",
        "chmod 600",
        "expected a pool_stream, got a pool_session",
        "is NULL",
    ] {
        assert!(stdout.contains(needle), "no `{needle}` in:\n{stdout}");
    }
}
