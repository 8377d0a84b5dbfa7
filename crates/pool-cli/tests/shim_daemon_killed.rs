//! A daemon killed (SIGKILL) in the middle of a download by `curl` under
//! the shim: curl fails with an error — it never hangs and never reports
//! success for a cut transfer. With the destination gone (and not
//! restarted, so nothing can prove the session gone), the source's session
//! waits out its resume deadline (15 s in these daemons, 60 s by default):
//! refused dials, which anyone on the path could forge, do not end it. (curl is rate-limited to 2 MB/s, so
//! it takes a few seconds to read what its socket had already buffered
//! before it sees the end.)
mod util;

use std::process::Stdio;
use std::time::{Duration, Instant};

use util::shim::*;
use util::*;

/// Starts a rate-limited download under the shim, kills one daemon once
/// bytes flow, and returns curl's exit code and how long it took to end
/// after the kill.
fn download_and_kill(kill_source: bool) -> (Option<i32>, Duration, u64) {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new(if kill_source {
        "shim-kill-src"
    } else {
        "shim-kill-dst"
    });
    std::fs::create_dir_all(dir.join("www")).expect("mkdir www");
    std::fs::write(dir.join("www/big.bin"), pattern(7, 32 << 20)).expect("write file");
    let port = free_port();
    let _nginx = start_nginx(&dir, port);
    let mut nodes = shim_nodes(&dir, &[port]);
    let out_file = dir.join("partial.bin");
    let mut curl = shimmed("curl", &nodes.shim_socket, &port.to_string());
    curl.args(["-sS", "--limit-rate", "2M", "-o"])
        .arg(&out_file)
        .arg(format!("http://127.0.0.1:{port}/big.bin"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = curl.spawn().expect("start curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&out_file).map(|m| m.len()).unwrap_or(0) < (1 << 20) {
        assert!(Instant::now() < deadline, "the download did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    if kill_source {
        nodes.source.kill9();
    } else {
        nodes.dest.kill9();
    }
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait curl") {
            break st;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("curl hangs 60 s after the daemon was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let got = std::fs::metadata(&out_file).map(|m| m.len()).unwrap_or(0);
    (status.code(), killed.elapsed(), got)
}

#[test]
fn source_daemon_killed_mid_transfer() {
    let (code, took, got) = download_and_kill(true);
    eprintln!("source daemon killed: curl exit {code:?} after {took:?}, {got} bytes");
    assert_ne!(code, Some(0), "curl reported success for a cut transfer");
    assert!(got < 32 << 20, "the whole file arrived");
    assert!(took < Duration::from_secs(15), "curl took {took:?} to fail");
}

#[test]
fn destination_daemon_killed_mid_transfer() {
    let (code, took, got) = download_and_kill(false);
    eprintln!("destination daemon killed: curl exit {code:?} after {took:?}, {got} bytes");
    assert_ne!(code, Some(0), "curl reported success for a cut transfer");
    assert!(got < 32 << 20, "the whole file arrived");
    assert!(took < Duration::from_secs(45), "curl took {took:?} to fail");
}
