//! The change journal: entries chain, survive a restart, and `verify` names
//! the line that was edited, removed or reordered. A full disk is counted
//! and logged, and never blocks the caller.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pool_journal::{
    key_path, public_key, verify, verify_with_key, Event, Journal, JournalError, CHECKPOINT_EVENT,
    CHECKPOINT_EVERY,
};
use serde_json::{json, Value};
use util::TempDir;

async fn flush(j: &Journal) {
    tokio::time::timeout(Duration::from_secs(10), j.flush())
        .await
        .expect("flush finished");
}

/// Opens `path` and records `n` entries, numbered from `from`.
async fn write_entries(path: &Path, from: u64, n: u64) -> Journal {
    let j = Journal::open(path).await.unwrap();
    for i in from..from + n {
        j.record(
            Event::SessionOpened,
            json!({"peer": format!("pk-{i}"), "session": i, "from": "192.0.2.1:4000"}),
        );
    }
    flush(&j).await;
    j
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A journal of 20 entries, closed.
async fn twenty(dir: &TempDir) -> PathBuf {
    let path = dir.file();
    drop(write_entries(&path, 1, 20).await);
    assert!(verify(&path).unwrap().is_intact());
    path
}

#[tokio::test]
async fn thousand_entries_verify() {
    let dir = TempDir::new("thousand");
    let path = dir.file();
    let j = write_entries(&path, 1, 1000).await;
    assert_eq!(j.stats().written, 1000);
    assert_eq!(j.stats().dropped, 0);
    assert_eq!(j.stats().failed, 0);

    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A signed checkpoint every CHECKPOINT_EVERY entries.
    let checkpoints = (1000 / CHECKPOINT_EVERY) as u64;
    assert_eq!(j.stats().checkpoints, checkpoints);
    let all = read_lines(&path);
    assert_eq!(all.len() as u64, 1000 + checkpoints);
    let cp: Value = serde_json::from_str(&all[CHECKPOINT_EVERY]).unwrap();
    assert_eq!(cp["event"], CHECKPOINT_EVENT);
    assert_eq!(cp["from_seq"], 1);
    assert_eq!(cp["to_seq"], CHECKPOINT_EVERY as u64);
    assert_eq!(cp["key"], j.public_key().unwrap());
    let lines: Vec<String> = all
        .iter()
        .filter(|l| !l.contains(CHECKPOINT_EVENT))
        .cloned()
        .collect();
    assert_eq!(lines.len(), 1000);
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["event"], "session_opened");
    assert_eq!(first["peer"], "pk-1");
    assert_eq!(first["prev"], "0".repeat(64));
    let ts = first["ts"].as_str().unwrap();
    assert_eq!(ts.len(), "2024-02-29T12:34:56.789Z".len(), "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    let second: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["prev"], first["hash"]);

    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.entries, 1000 + checkpoints);
    assert_eq!(report.checkpoints, checkpoints);
    assert_eq!(report.first_seq, Some(1));
    assert_eq!(report.last_seq, Some(1000 + checkpoints));
    let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!(report.last_hash.as_deref(), last["hash"].as_str());
    assert!(report.to_string().contains("intact"), "{report}");
}

#[tokio::test]
async fn reopen_continues_the_chain() {
    let dir = TempDir::new("reopen");
    let path = dir.file();
    drop(write_entries(&path, 1, 10).await);
    let j = write_entries(&path, 11, 5).await;
    assert_eq!(j.stats().written, 5);
    let lines = read_lines(&path);
    let eleventh: Value = serde_json::from_str(&lines[10]).unwrap();
    assert_eq!(eleventh["seq"], 11);
    assert_eq!(eleventh["peer"], "pk-11");

    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!((report.entries, report.last_seq), (15, Some(15)));
}

#[tokio::test]
async fn edited_line_is_named() {
    let dir = TempDir::new("edited");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    let mut v: Value = serde_json::from_str(&lines[6]).unwrap();
    v["peer"] = json!("pk-evil");
    lines[6] = serde_json::to_string(&v).unwrap();
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 7: edited (hash does not match its content)"],
        "{report}"
    );
    assert!(report.to_string().contains("line 7: edited"), "{report}");
}

#[tokio::test]
async fn edited_line_with_new_hash_breaks_the_next_link() {
    let dir = TempDir::new("forged");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    let mut v: Value = serde_json::from_str(&lines[6]).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.insert("peer".into(), json!("pk-evil"));
    obj.remove("hash");
    // serde_json without `preserve_order` writes keys sorted: canonical.
    let hash = sha256_hex(serde_json::to_string(&obj).unwrap().as_bytes());
    obj.insert("hash".into(), json!(hash));
    lines[6] = serde_json::to_string(&v).unwrap();
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 8: chain broken (prev does not match line 7)"],
        "{report}"
    );
}

/// Rewrites lines `from..` (0-based) so that the chain is intact again:
/// each `prev` is the line before's hash and each `hash` is recomputed,
/// as anyone who can write the file can do.
fn recompute_chain(lines: &mut [String], from: usize) {
    for i in from..lines.len() {
        let mut v: Value = serde_json::from_str(&lines[i]).unwrap();
        let obj = v.as_object_mut().unwrap();
        if i > 0 {
            let before: Value = serde_json::from_str(&lines[i - 1]).unwrap();
            obj.insert("prev".into(), before["hash"].clone());
        }
        obj.remove("hash");
        let hash = sha256_hex(serde_json::to_string(&obj).unwrap().as_bytes());
        obj.insert("hash".into(), json!(hash));
        lines[i] = serde_json::to_string(&v).unwrap();
    }
}

/// Twenty entries and a checkpoint signing them (line 21).
async fn twenty_signed(dir: &TempDir) -> (PathBuf, String) {
    let path = dir.file();
    let j = write_entries(&path, 1, 20).await;
    j.checkpoint().await;
    let key = j.public_key().unwrap().to_owned();
    assert_eq!(j.stats().checkpoints, 1);
    drop(j);
    let report = verify_with_key(&path, Some(&key)).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.checkpoints, 1);
    assert!(report.unsigned.is_empty(), "{report}");
    (path, key)
}

/// F11: without a key, an edit with the chain recomputed passed `verify`.
/// The signed checkpoint still names the edited line.
#[tokio::test]
async fn edit_with_recomputed_chain_is_named_by_the_checkpoint() {
    let dir = TempDir::new("recomputed");
    let (path, key) = twenty_signed(&dir).await;
    let mut lines = read_lines(&path);
    assert_eq!(lines.len(), 21);
    let mut v: Value = serde_json::from_str(&lines[6]).unwrap();
    v["peer"] = json!("pk-evil");
    lines[6] = serde_json::to_string(&v).unwrap();
    recompute_chain(&mut lines, 6);
    write_lines(&path, &lines);

    let expected = ["line 7: edited (does not match what the checkpoint on line 21 signed)"];
    for k in [None, Some(key.as_str())] {
        let report = verify_with_key(&path, k).unwrap();
        assert_eq!(report.problems, expected, "{report}");
        assert!(!report.is_intact());
    }
}

#[tokio::test]
async fn forged_checkpoint_and_foreign_key_are_named() {
    let dir = TempDir::new("forged-cp");
    let (path, key) = twenty_signed(&dir).await;
    let pristine = read_lines(&path);

    // Editing the signed list itself breaks the signature.
    let mut lines = pristine.clone();
    let mut v: Value = serde_json::from_str(&lines[20]).unwrap();
    v["leaves"][6] = json!("00".repeat(16));
    lines[20] = serde_json::to_string(&v).unwrap();
    recompute_chain(&mut lines, 20);
    write_lines(&path, &lines);
    let report = verify_with_key(&path, Some(&key)).unwrap();
    assert_eq!(
        report.problems,
        ["line 21: checkpoint signature does not verify (the checkpoint was forged or edited)"],
        "{report}"
    );

    // A whole journal made elsewhere (another key) put in its place.
    let other = TempDir::new("forged-cp-other");
    let (other_path, other_key) = twenty_signed(&other).await;
    assert_ne!(key, other_key);
    std::fs::copy(&other_path, &path).unwrap();
    assert!(
        verify(&path).unwrap().is_intact(),
        "unpinned: self-consistent"
    );
    let report = verify_with_key(&path, Some(&key)).unwrap();
    assert_eq!(
        report.problems,
        [format!(
            "line 21: checkpoint signed by key {other_key}, not by the key given"
        )],
        "{report}"
    );

    // The same without any checkpoint: nothing signed by the key at all.
    write_lines(&path, &read_lines(&other_path)[..20]);
    let report = verify_with_key(&path, Some(&key)).unwrap();
    assert_eq!(report.problems.len(), 1, "{report}");
    assert!(
        report.problems[0].starts_with("line 1: no checkpoint signed by the key given"),
        "{report}"
    );

    let err = verify_with_key(&path, Some("not-a-key")).unwrap_err();
    assert!(matches!(err, JournalError::BadPublicKey { .. }), "{err}");
}

#[tokio::test]
async fn entries_after_the_last_checkpoint_are_reported_unsigned() {
    let dir = TempDir::new("unsigned");
    let (path, key) = twenty_signed(&dir).await;
    drop(write_entries(&path, 21, 3).await);
    let report = verify_with_key(&path, Some(&key)).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.unsigned.len(), 1, "{report}");
    assert!(
        report.unsigned[0].starts_with("lines 22-24: after the last checkpoint"),
        "{report}"
    );
    // Restarted, the node signs only what it wrote itself.
    let j = write_entries(&path, 24, 2).await;
    j.checkpoint().await;
    drop(j);
    let report = verify_with_key(&path, Some(&key)).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.checkpoints, 2);
    assert_eq!(report.unsigned.len(), 1, "{report}");
    assert!(
        report.unsigned[0].starts_with("lines 22-24: before a checkpoint that does not sign them"),
        "{report}"
    );
    assert!(
        report.to_string().contains("unsigned: lines 22-24"),
        "{report}"
    );
}

#[tokio::test]
async fn signing_key_file_is_private_and_checked() {
    let dir = TempDir::new("keyfile");
    let path = dir.file();
    let j = write_entries(&path, 1, 1).await;
    let pubkey = j.public_key().unwrap().to_owned();
    drop(j);
    let kp = key_path(&path);
    assert_eq!(kp, dir.0.join("journal.log.key"));
    let mode = std::fs::metadata(&kp).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(public_key(&path).unwrap(), pubkey);
    // Reopened: the same key.
    let j = Journal::open(&path).await.unwrap();
    assert_eq!(j.public_key(), Some(pubkey.as_str()));
    drop(j);

    std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = Journal::open(&path).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("chmod 600 {}", kp.display())),
        "{msg}"
    );
    std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A symlink in its place is refused, not followed.
    let real = dir.0.join("elsewhere.key");
    std::fs::rename(&kp, &real).unwrap();
    std::os::unix::fs::symlink(&real, &kp).unwrap();
    let err = Journal::open(&path).await.unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[tokio::test]
async fn reformatted_line_is_named() {
    let dir = TempDir::new("reformatted");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    lines[2] = lines[2].replacen(",\"", ", \"", 1);
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 3: edited (reformatted; its content still matches its hash)"],
        "{report}"
    );
}

#[tokio::test]
async fn removed_line_is_named() {
    let dir = TempDir::new("removed");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    lines.remove(9);
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 10: entry seq 10 missing before it (removed?)"],
        "{report}"
    );
    assert_eq!(report.entries, 19);
}

#[tokio::test]
async fn removed_first_lines_are_named() {
    let dir = TempDir::new("removed-first");
    let path = twenty(&dir).await;
    let lines = read_lines(&path);
    write_lines(&path, &lines[3..]);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 1: entries seq 1 to 3 missing before it (removed?)"],
        "{report}"
    );
}

#[tokio::test]
async fn swapped_lines_are_named() {
    let dir = TempDir::new("swapped");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    lines.swap(4, 5);
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        [
            "line 5: out of order (seq 6 after 4)",
            "line 6: out of order (seq 5 after 6)"
        ],
        "{report}"
    );
}

#[tokio::test]
async fn duplicated_line_is_named() {
    let dir = TempDir::new("duplicated");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    let copy = lines[3].clone();
    lines.insert(12, copy);
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 13: duplicate (seq 4 is also on line 4)"],
        "{report}"
    );
}

#[tokio::test]
async fn appended_garbage_is_named_and_blocks_reopening() {
    let dir = TempDir::new("garbage");
    let path = twenty(&dir).await;
    let mut lines = read_lines(&path);
    lines.push("this is not a journal entry".into());
    write_lines(&path, &lines);

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 21: not a journal entry (invalid JSON)"],
        "{report}"
    );

    let err = Journal::open(&path).await.unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("pool journal verify"), "{msg}");
    assert!(msg.contains("move the file aside"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[tokio::test]
async fn cut_short_last_line_blocks_reopening() {
    let dir = TempDir::new("torn");
    let path = twenty(&dir).await;
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 10]).unwrap();

    let report = verify(&path).unwrap();
    assert_eq!(
        report.problems,
        ["line 20: not a journal entry (invalid JSON)"],
        "{report}"
    );
    let err = Journal::open(&path).await.unwrap_err();
    assert!(err.to_string().contains("incomplete"), "{err}");
}

#[tokio::test]
async fn full_queue_drops_and_records_the_loss() {
    let dir = TempDir::new("flood");
    let path = dir.file();
    let j = Journal::open(&path).await.unwrap();
    // On this single-threaded runtime the writer cannot run until we
    // await, so the queue fills and the rest is dropped.
    for i in 0..10_000u64 {
        j.record(Event::SessionOpened, json!({ "i": i }));
    }
    flush(&j).await;
    let s = j.stats();
    assert!(s.dropped > 0, "{s:?}");
    assert_eq!(s.failed, 0);
    // Everything not dropped, plus one entry recording the loss.
    assert_eq!(s.written, 10_000 - s.dropped + 1, "{s:?}");

    let lines = read_lines(&path);
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["event"], "journal_entries_lost");
    assert_eq!(first["dropped"], s.dropped);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.entries, s.written + s.checkpoints);
}

/// Error events seen by the global subscriber, as `field=value` text.
fn captured_errors() -> Arc<Mutex<Vec<String>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::set_global_default(Capture(logs.clone()))
            .expect("no other global subscriber in this test binary");
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<String>>>);

struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut text = Text(String::new());
            event.record(&mut text);
            self.0.lock().unwrap().push(text.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn full_disk_is_counted_logged_and_never_blocks() {
    // Linux always has /dev/full (every write fails with ENOSPC).
    let full = Path::new("/dev/full");
    assert!(full.exists(), "this test needs /dev/full");
    let logs = captured_errors();
    let j = Journal::open(full).await.unwrap();

    let started = Instant::now();
    for i in 0..100u64 {
        j.record(Event::SessionOpened, json!({ "i": i }));
    }
    assert!(started.elapsed() < Duration::from_secs(1), "record blocked");
    flush(&j).await;
    let s = j.stats();
    assert_eq!(s.written, 0);
    assert!(s.failed > 0, "{s:?}");
    assert_eq!(s.failed + s.dropped, 100, "{s:?}");

    // Still failing: counted again, but the burst is logged only once.
    for i in 0..50u64 {
        j.record(Event::SessionClosed, json!({ "i": i }));
    }
    flush(&j).await;
    let s = j.stats();
    assert_eq!(s.failed + s.dropped, 150, "{s:?}");

    let errors: Vec<String> = logs
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.contains("/dev/full") && e.contains("journal write failed"))
        .cloned()
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("free disk space"), "{errors:?}");
}
