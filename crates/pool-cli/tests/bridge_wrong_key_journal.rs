//! Refused handshakes end in the journal: a tcp2pool with the wrong
//! `--peer-key` and a client key the pool2tcp end does not trust both get
//! their TCP client closed without a byte, and the pool2tcp journal has a
//! `handshake_refused` entry for each (with the key, when it is known).
//! `pool journal verify` accepts the file, and names the line once one
//! character of it is changed.
mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use util::*;

/// Connects through a tcp2pool and sends a request: the connection must
/// end (reset or closed) without a byte from the target.
fn assert_refused(tcp_addr: &str, what: &str) {
    let mut s = TcpStream::connect(tcp_addr).expect("connect tcp2pool");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let _ = s.write_all(b"hello?");
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => assert!(
            got.is_empty(),
            "{what}: the connection carried {} bytes",
            got.len()
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{what}: the connection was still open 10 s later"
        ),
    }
}

#[test]
fn refused_handshakes_are_journaled_and_journal_detects_edits() {
    let dir = TempDir::new("journal");
    // A target that would answer anything: it must never be reached.
    let target = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let target_addr = target.local_addr().expect("addr").to_string();
    target.set_nonblocking(true).expect("nonblocking");

    let (server_key, server_pub) = keygen(&dir, "server");
    let (client_key, client_pub) = keygen(&dir, "client");
    let (_other_key, other_pub) = keygen(&dir, "other");
    let (stranger_key, stranger_pub) = keygen(&dir, "stranger");
    let journal = dir.join("journal.log");
    let journal_s = journal.to_str().expect("utf-8").to_string();
    let (mut server, pool_addr) = start_pool2tcp(
        &dir,
        "pool2tcp",
        &server_key,
        &target_addr,
        &["--allow", &client_pub, "--journal", &journal_s],
    );

    // 1. The right client key, but the wrong key for the server.
    let (mut wrong, wrong_addr) = start_tcp2pool(
        &dir,
        "tcp2pool-wrong",
        &client_key,
        &pool_addr,
        &other_pub,
        &[],
    );
    assert_refused(&wrong_addr, "wrong --peer-key");
    // The tcp2pool end says why.
    wrong.wait_log("refused the handshake", Duration::from_secs(5));
    let e = wait_journal(
        &journal,
        Duration::from_secs(5),
        "handshake_refused (wrong peer key)",
        |e| e["event"] == "handshake_refused",
    );
    let reason = e["reason"].as_str().unwrap_or("");
    assert!(
        !reason.is_empty(),
        "handshake_refused without a reason: {e}"
    );
    assert!(
        e["from"]
            .as_str()
            .is_some_and(|f| f.starts_with("127.0.0.1:")),
        "handshake_refused without the source address: {e}"
    );
    eprintln!("wrong peer key: {e}");

    // 2. The right server key, but a client key nobody trusts.
    let (mut stranger, stranger_addr) = start_tcp2pool(
        &dir,
        "tcp2pool-stranger",
        &stranger_key,
        &pool_addr,
        &server_pub,
        &[],
    );
    assert_refused(&stranger_addr, "untrusted client key");
    let why = stranger.wait_log("refused the handshake", Duration::from_secs(5));
    assert!(
        why.contains("not trusted") && why.contains(&stranger_pub),
        "tcp2pool should say its key is not trusted: {why}"
    );
    let e = wait_journal(
        &journal,
        Duration::from_secs(5),
        "handshake_refused with the stranger's key",
        |e| e["event"] == "handshake_refused" && e["key"] == stranger_pub.as_str(),
    );
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&stranger_pub)),
        "the reason should name the refused key: {e}"
    );
    let refusals = journal_entries(&journal)
        .iter()
        .filter(|e| e["event"] == "handshake_refused")
        .count();
    assert_eq!(refusals, 2, "handshake_refused entries");
    assert!(
        matches!(target.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused session reached the target"
    );

    // Stop pool2tcp cleanly so the journal is complete.
    server.signal("TERM");
    let st = server.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "pool2tcp exited with {st} on SIGTERM");

    let out = pool_cmd(&["journal", "verify", &journal_s]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "journal verify on an untouched journal: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = journal_entries(&journal);
    assert!(entries.len() >= 4, "too few entries: {entries:?}");
    // A clean stop ends with a signed checkpoint right after node_stopped.
    let n = entries.len();
    assert_eq!(entries[n - 1]["event"], "journal_checkpoint", "{entries:?}");
    assert_eq!(entries[n - 2]["event"], "node_stopped", "{entries:?}");

    // Change one character in the `from` field of the second refusal.
    let original = std::fs::read_to_string(&journal).expect("read journal");
    let mut lines: Vec<String> = original.lines().map(String::from).collect();
    let (idx, line) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.contains(&stranger_pub) && l.contains("\"from\":\"127.0.0.1:"))
        .map(|(i, l)| (i, l.clone()))
        .expect("the stranger's refusal line");
    let at = line.find("\"from\":\"127.0.0.").expect("from field") + "\"from\":\"127.0.0.".len();
    let mut edited = line.clone().into_bytes();
    assert_eq!(edited[at], b'1');
    edited[at] = b'2';
    lines[idx] = String::from_utf8(edited).expect("utf-8");
    let mut tampered = lines.join("\n");
    tampered.push('\n');
    std::fs::write(&journal, tampered).expect("write tampered journal");

    let out = pool_cmd(&["journal", "verify", &journal_s]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "journal verify accepted an edited journal:\n{text}"
    );
    let line_no = idx + 1;
    assert!(
        text.contains(&format!("line {line_no}:")),
        "journal verify should name line {line_no}:\n{text}"
    );
    eprintln!("{text}");
}
