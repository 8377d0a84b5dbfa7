//! Rotating a running daemon's journal under load (`pool journal rotate`
//! over the control socket, and SIGUSR1): nothing is lost or reordered,
//! `pool journal verify` accepts the whole series, and an edit in an older
//! file is named by that file and line. Also: `--log-format json` writes
//! one JSON object a line, and lines logged inside a session carry its
//! short id.
mod util;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use util::*;

fn config(dir: &TempDir, key: &Path, client: &str, metrics: &str) -> std::path::PathBuf {
    let d = dir.path().display();
    let text = format!(
        "[node]\nkey = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"{d}/control.sock\"\n\
         metrics = \"{metrics}\"\njournal = \"{d}/journal.log\"\ndrain_timeout_secs = 1\n\n\
         [trust]\nallow = [\"{client}\"]\n",
        key.display()
    );
    let path = dir.join("pool.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn rotate_a_running_daemon_under_load_then_verify_the_series() {
    let dir = TempDir::new("rotate-daemon");
    let (key, spub) = keygen(&dir, "node");
    let (ckey, client) = keygen(&dir, "client");
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = config(&dir, &key, &client, &metrics);
    let mut daemon = Proc::pool(
        "daemon",
        &["daemon", "--config", cfg.to_str().unwrap()],
        &dir,
    );
    let listen = daemon.wait_log("POOL listener on", Duration::from_secs(20));
    let control = dir.join("control.sock");
    let control_s = control.to_str().unwrap().to_owned();
    let journal = dir.join("journal.log");

    // Load: reloads (each journals `config_applied`) from one thread,
    // sessions (`session_opened`, `session_closed`) from another.
    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicU64::new(0));
    let reloader = {
        let (stop, reloads, control_s) = (stop.clone(), reloads.clone(), control_s.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = pool_cmd(&["ctl", "reload", "--control", &control_s]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                reloads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let sessions = Arc::new(AtomicU64::new(0));
    let connector = {
        let (stop, sessions, listen) = (stop.clone(), sessions.clone(), listen.clone());
        let (ckey, spub) = (ckey.clone(), spub.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut cmd = std::process::Command::new(POOL);
                cmd.args(["connect", &listen, "--key"])
                    .arg(&ckey)
                    .args(["--peer-key", &spub]);
                // The daemon serves no stream (it resets it: the session is
                // what counts here), so the exit status is not looked at.
                let _ = run(cmd, Duration::from_secs(20));
                sessions.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut sealed = Vec::new();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        if round == 2 {
            daemon.signal("USR1");
            let want = journal.with_file_name(format!("journal.log.{:06}", round + 1));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !want.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "SIGUSR1 sealed nothing"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            sealed.push(want.display().to_string());
            continue;
        }
        let out = pool_cmd(&["journal", "rotate", "--control", &control_s]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("sealed ")
            .unwrap()
            .to_owned();
        sealed.push(p);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    reloader.join().unwrap();
    connector.join().unwrap();
    let scraped = http_get(&metrics, "/metrics").1;
    assert!(
        scraped.contains("pool_journal_rotations_total 4"),
        "{scraped}"
    );
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());

    for (i, p) in sealed.iter().enumerate() {
        assert_eq!(p, &format!("{}.{:06}", journal.display(), i + 1));
    }
    let out = pool_cmd(&["journal", "verify", journal.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("series of 5 file(s): every file is intact"),
        "{text}"
    );

    // Nothing lost: every reload is in the series, once.
    let mut applied = 0;
    let mut opened = 0;
    for f in sealed
        .iter()
        .map(std::path::PathBuf::from)
        .chain([journal.clone()])
    {
        for e in journal_entries(&f) {
            if e["event"] == "config_applied" && e["how"] == "reload" {
                applied += 1;
            }
            if e["event"] == "session_opened" {
                opened += 1;
            }
        }
    }
    assert_eq!(
        applied,
        reloads.load(Ordering::Relaxed),
        "reloads journaled"
    );
    // Every client's session is journaled as opened.
    assert_eq!(
        opened,
        sessions.load(Ordering::Relaxed),
        "sessions journaled"
    );
    assert!(
        applied >= 10 && opened >= 10,
        "load too light: {applied} reloads, {opened} sessions"
    );
    eprintln!("{applied} reloads and {opened} sessions over 5 files");

    // Edit a line of the second sealed file: named by file and line.
    let older = &sealed[1];
    let text = std::fs::read_to_string(older).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let idx = lines
        .iter()
        .position(|l| l.contains("\"config_applied\""))
        .expect("a config_applied line in the older file");
    lines[idx] = lines[idx].replacen("\"how\":\"reload\"", "\"how\":\"reloaD\"", 1);
    std::fs::write(older, lines.join("\n") + "\n").unwrap();
    let out = pool_cmd(&["journal", "verify", journal.to_str().unwrap()]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    let named = format!("{older}: line {}: edited", idx + 1);
    assert!(all.contains(&named), "verify should say `{named}`:\n{all}");
}

#[test]
fn json_logs_are_one_object_a_line_with_the_session_id() {
    let dir = TempDir::new("json-logs");
    let (skey, spub) = keygen(&dir, "server");
    let (ckey, cpub) = keygen(&dir, "client");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(POOL);
    cmd.args(["--log-format", "json", "-vv", "listen", &listen, "--key"])
        .arg(&skey)
        .args(["--allow", &cpub, "--once"]);
    let mut server = Proc::spawn("listen", cmd, &dir);
    wait_port(&listen, Duration::from_secs(10));
    let mut cmd = std::process::Command::new(POOL);
    cmd.args(["--log-format", "json", "-v", "connect", &listen, "--key"])
        .arg(&ckey)
        .args(["--peer-key", &spub]);
    let out = run(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.wait_exit(Duration::from_secs(10)).success());

    let log = server.log();
    let mut objects = 0;
    let mut session_id = None;
    let mut in_span = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        objects += 1;
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        assert!(v["message"].is_string(), "{line}");
        if v["message"] == "session accepted" {
            // One field per value, not one message string.
            assert_eq!(
                v["from"].as_str().map(|s| s.starts_with("127.0.0.1:")),
                Some(true),
                "{line}"
            );
            assert_eq!(v["peer"], cpub.as_str(), "{line}");
            session_id = v["session"].as_str().map(str::to_owned);
        }
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        if let Some(s) = spans.iter().find(|s| s["name"] == "session") {
            in_span += 1;
            assert_eq!(s["id"].as_str(), session_id.as_deref(), "{line}");
            assert_eq!(s["id"].as_str().map(str::len), Some(12), "{line}");
        }
    }
    assert!(session_id.is_some(), "no `session accepted` line:\n{log}");
    assert!(
        objects >= 3 && in_span >= 1,
        "{objects} lines, {in_span} in a session span:\n{log}"
    );
}
