//! The C programs under AddressSanitizer (linked with libpool.a) and under
//! valgrind (with libpool.so): a transfer with a carrier cut, and the bad
//! use program; no memory error and no leak (the programs call
//! pool_shutdown(), which frees everything libpool holds).
//! tests/valgrind.supp explains its only two entries (ring's assembly).

mod util;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use util::*;

/// One instrumented transfer at a time: together (valgrind takes a core)
/// they starve the session's timers on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs a server and a client (each through `wrap`, e.g. valgrind) with a
/// carrier cut in the middle; returns their outputs.
fn transfer(server_cmd: Command, mut client_cmd: Command, ckey: &Path, streams: u64, bytes: u64) {
    let mut server = start_server(server_cmd);
    let fwd = Arc::new(Forwarder::start(&server.addr));
    fwd.cut_after(bytes * streams);
    let out = client_cmd
        .arg("client")
        .arg(ckey)
        .arg(&fwd.addr)
        .arg(&server.key)
        .arg(streams.to_string())
        .arg(bytes.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client (after {} carriers through the forwarder): {stdout}\n{stderr}",
        fwd.accepted.load(std::sync::atomic::Ordering::SeqCst)
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
}

#[test]
fn c_programs_under_address_sanitizer() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch("asan");
    let peer = build_peer(
        &dir,
        Link::Static(&["-fsanitize=address", "-fno-omit-frame-pointer"]),
    );
    let asan = |c: &mut Command| {
        c.env(
            "ASAN_OPTIONS",
            "detect_leaks=1:abort_on_error=0:exitcode=97",
        );
    };
    let (skey, _) = keygen(&peer, &dir, "server.key");
    let (ckey, cpub) = keygen(&peer, &dir, "client.key");
    let (streams, bytes) = (2u64, scaled(8 << 20));
    let mut s = Command::new(&peer);
    asan(&mut s);
    s.arg("server")
        .arg(&skey)
        .arg(&cpub)
        .arg(streams.to_string())
        .arg(bytes.to_string());
    let mut c = Command::new(&peer);
    asan(&mut c);
    transfer(s, c, &ckey, streams, bytes);

    let mut m = Command::new(&peer);
    asan(&mut m);
    let out = m.arg("misuse").arg(&ckey).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn valgrind() -> Option<Command> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "valgrind is not installed (apt-get install valgrind)"
        );
        eprintln!("SKIP: valgrind is not installed");
        return None;
    }
    let mut v = Command::new("valgrind");
    v.args([
        "-q",
        "--error-exitcode=99",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect,possible",
        "--errors-for-leak-kinds=definite,indirect,possible",
    ])
    .arg(format!(
        "--suppressions={}",
        crate_dir().join("tests/valgrind.supp").display()
    ));
    Some(v)
}

#[test]
fn c_programs_under_valgrind() {
    let Some(mut vc) = valgrind() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch("valgrind");
    let peer = build_peer(&dir, Link::Shared);
    let (skey, _) = keygen(&peer, &dir, "server.key");
    let (ckey, cpub) = keygen(&peer, &dir, "client.key");
    // Valgrind is ~50 times slower: a small transfer, still with a cut.
    let (streams, bytes) = (2u64, 512 << 10);
    let mut s = Command::new(&peer);
    s.arg("server")
        .arg(&skey)
        .arg(&cpub)
        .arg(streams.to_string())
        .arg(bytes.to_string());
    vc.arg(&peer);
    transfer(s, vc, &ckey, streams, bytes);

    let mut vm = valgrind().unwrap();
    let out = vm.arg(&peer).arg("misuse").arg(&ckey).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
