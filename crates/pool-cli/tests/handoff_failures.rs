//! A change of server that fails, or loses a party, with real daemons: a
//! target key the source does not trust and a dead target leave the session
//! on the source; a source killed right after the commit loses nothing (the
//! session lives at the target); `pool ctl drain` hands every session over
//! and then refuses new ones.
mod util;

use std::process::Command;
use std::time::Duration;

use util::workers::*;
use util::*;

struct Setup {
    dir: TempDir,
    a: Worker,
    b: Worker,
    pa: Proc,
    pb: Proc,
    cpub: String,
    ckey: std::path::PathBuf,
    log_a: std::path::PathBuf,
    log_b: std::path::PathBuf,
    _nginx: (Proc, Proc),
}

fn setup(tag: &str) -> Setup {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new(tag);
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("small.txt"), b"hello\n").unwrap();
    let (na, addr_a, log_a) = nginx(&dir, "nginx-a", &www);
    let (nb, addr_b, log_b) = nginx(&dir, "nginx-b", &www);
    let (ckey, cpub) = keygen(&dir, "client");
    let a = Worker::new(&dir, "a");
    let b = Worker::new(&dir, "b");
    let pa = a.start(&dir, &cpub, &b.public, &addr_a);
    let pb = b.start(&dir, &cpub, &a.public, &addr_b);
    Setup {
        dir,
        a,
        b,
        pa,
        pb,
        cpub,
        ckey,
        log_a,
        log_b,
        _nginx: (na, nb),
    }
}

fn served(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("/small.txt")
        .count()
}

#[test]
fn untrusted_or_dead_targets_leave_the_session_on_the_source() {
    let mut s = setup("handoff-fail");
    let (mut client, tcp) =
        start_tcp2pool(&s.dir, "tcp2pool", &s.ckey, &s.a.listen, &s.a.public, &[]);
    assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");
    // A target that is not in [handoff] peers (here: the client's own key).
    let out = s.a.try_handoff(&s.cpub, &s.b.listen, &s.cpub);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in [handoff] peers"), "{err}");
    // A target that died.
    s.pb.kill9();
    let out = s.a.try_handoff(&s.cpub, &s.b.listen, &s.b.public);
    assert!(
        !out.status.success(),
        "a handoff to a dead worker cannot succeed"
    );
    wait_journal(
        &s.a.journal,
        Duration::from_secs(5),
        "handoff_aborted",
        |e| e["event"] == "handoff_aborted" && e["reason"] == "target_unreachable",
    );
    // The session is where it was.
    assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");
    assert_eq!(served(&s.log_a), 2);
    assert_eq!(served(&s.log_b), 0);
    s.pa.assert_running();
    client.assert_running();
}

#[test]
fn source_killed_right_after_the_commit_loses_nothing() {
    let mut s = setup("handoff-kill-source");
    let (mut client, tcp) =
        start_tcp2pool(&s.dir, "tcp2pool", &s.ckey, &s.a.listen, &s.a.public, &[]);
    assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");
    s.a.handoff(&s.cpub, &s.b);
    s.pa.kill9();
    for _ in 0..3 {
        assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");
    }
    assert_eq!(served(&s.log_b), 3, "the target serves the session alone");
    wait_journal(
        &s.b.journal,
        Duration::from_secs(5),
        "handoff_imported",
        |e| e["event"] == "handoff_imported",
    );
    s.pb.assert_running();
    client.assert_running();
}

#[test]
fn drain_hands_every_session_over_and_refuses_new_ones() {
    let mut s = setup("handoff-drain");
    let (mut c1, tcp1) =
        start_tcp2pool(&s.dir, "tcp2pool-1", &s.ckey, &s.a.listen, &s.a.public, &[]);
    let (mut c2, tcp2) =
        start_tcp2pool(&s.dir, "tcp2pool-2", &s.ckey, &s.a.listen, &s.a.public, &[]);
    assert_eq!(curl_get(&tcp1, "/small.txt"), "hello\n");
    assert_eq!(curl_get(&tcp2, "/small.txt"), "hello\n");
    let out = pool_cmd(&[
        "ctl",
        "drain",
        "--to",
        &s.b.listen,
        "--to-key",
        &s.b.public,
        "--control",
        s.a.control.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 of 2 session(s) handed over"), "{text}");
    assert_eq!(s.a.status()["draining"], true);
    assert_eq!(curl_get(&tcp1, "/small.txt"), "hello\n");
    assert_eq!(curl_get(&tcp2, "/small.txt"), "hello\n");
    assert_eq!(served(&s.log_b), 2, "both sessions are at B now");
    // A drained worker takes no new session.
    let (mut c3, tcp3) =
        start_tcp2pool(&s.dir, "tcp2pool-3", &s.ckey, &s.a.listen, &s.a.public, &[]);
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail", "--max-time", "5"])
        .arg(format!("http://{tcp3}/small.txt"));
    let out = run(curl, Duration::from_secs(15));
    assert!(!out.status.success(), "a new session at a drained worker");
    c3.wait_log("draining", Duration::from_secs(5));
    assert_eq!(served(&s.log_a), 2);
    for p in [&mut s.pa, &mut s.pb, &mut c1, &mut c2] {
        p.assert_running();
    }
}
