//! Rotation: the live file is sealed and a new one continues its chain;
//! under load no entry is lost or reordered, the series verifies, and an
//! edit (or a cut end, or a missing file) is named by file and line.

mod util;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pool_journal::{
    public_key, sealed_path, series_files, verify_series, Event, Journal, JournalConfig,
    CONTINUED_EVENT,
};
use serde_json::{json, Value};
use util::TempDir;

fn lines(path: &Path) -> Vec<String> {
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

async fn record_n(j: &Journal, writer: u64, n: u64) {
    for i in 0..n {
        j.record(
            Event::SessionOpened,
            json!({"peer": format!("w{writer}"), "session": i}),
        );
    }
    j.flush().await;
}

fn key_of(path: &Path) -> String {
    public_key(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_under_load_loses_and_reorders_nothing() {
    let dir = TempDir::new("load");
    let path = dir.file();
    let j = Journal::open(&path).await.unwrap();
    const WRITERS: u64 = 4;
    const EACH: u64 = 3000;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let j = j.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in 0..EACH / 100 {
                for i in chunk * 100..(chunk + 1) * 100 {
                    j.record(
                        Event::SessionOpened,
                        json!({"peer": format!("w{w}"), "session": i}),
                    );
                }
                // Keeps the queue (4096) from filling: this test is about
                // rotation, not about shedding.
                j.flush().await;
            }
        }));
    }
    let mut sealed = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        if let Some(p) = j.rotate().await.unwrap() {
            sealed.push(p);
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    j.flush().await;
    let stats = j.stats();
    assert_eq!(stats.dropped, 0, "{stats:?}");
    assert_eq!(stats.written, WRITERS * EACH);
    assert_eq!(stats.rotations, sealed.len() as u64);
    assert!(sealed.len() >= 3, "rotated {} times", sealed.len());
    for (i, p) in sealed.iter().enumerate() {
        assert_eq!(p, &sealed_path(&path, i as u32 + 1));
    }

    let files = series_files(&path).unwrap();
    assert_eq!(files.len(), sealed.len() + 1);
    assert_eq!(files.last(), Some(&path));
    let report = verify_series(&files, Some(&key_of(&path))).unwrap();
    assert!(report.is_intact(), "{report}");
    // Every sealed file ends signed: nothing is left unsigned but the tail
    // of the live file.
    for f in &report.files[..report.files.len() - 1] {
        assert!(f.unsigned.is_empty(), "{f}");
    }

    // Every writer's entries are all there, once each, in order, across
    // the files; every file after the first starts with a continuation.
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut seq = 0;
    for (k, f) in files.iter().enumerate() {
        for (n, line) in lines(f).iter().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap();
            let s = v["seq"].as_u64().unwrap();
            assert_eq!(s, seq + 1, "{} line {}", f.display(), n + 1);
            seq = s;
            if n == 0 && k > 0 {
                assert_eq!(v["event"], CONTINUED_EVENT);
                let prev_file = files[k - 1].file_name().unwrap().to_str().unwrap();
                assert_eq!(v["from_file"], prev_file);
            }
            if v["event"] != "session_opened" {
                continue;
            }
            let w = v["peer"].as_str().unwrap().to_owned();
            let i = v["session"].as_u64().unwrap();
            let want = next.entry(w.clone()).or_default();
            assert_eq!(i, *want, "writer {w} out of order in {}", f.display());
            *want += 1;
        }
    }
    assert_eq!(next.len() as u64, WRITERS);
    assert!(next.values().all(|&n| n == EACH), "{next:?}");

    // An edit in an older file is named by that file and line.
    let older = &files[1];
    let mut text = lines(older);
    let victim = text
        .iter()
        .position(|l| l.contains("\"session_opened\""))
        .unwrap();
    text[victim] = text[victim].replacen("\"peer\":\"w", "\"peer\":\"x", 1);
    write_lines(older, &text);
    let report = verify_series(&files, Some(&key_of(&path))).unwrap();
    assert!(!report.is_intact());
    let problems = report.problems();
    assert_eq!(
        problems,
        [format!(
            "{}: line {}: edited (hash does not match its content)",
            older.display(),
            victim + 1
        )],
        "{report}"
    );
    assert!(report.to_string().contains(&problems[0]));
}

#[tokio::test]
async fn size_setting_rotates_by_itself() {
    let dir = TempDir::new("size");
    let path = dir.file();
    let j = Journal::open_with(&path, JournalConfig::default().rotate_at_bytes(8 * 1024))
        .await
        .unwrap();
    for round in 0..10 {
        record_n(&j, round, 40).await;
    }
    let rotations = j.stats().rotations;
    assert!(rotations >= 3, "{:?}", j.stats());
    let files = series_files(&path).unwrap();
    assert_eq!(files.len() as u64, rotations + 1);
    for f in &files[..files.len() - 1] {
        let len = std::fs::metadata(f).unwrap().len();
        // A file is sealed after the batch that crossed the size.
        assert!(len >= 8 * 1024, "{}: {len}", f.display());
    }
    let report = verify_series(&files, Some(&key_of(&path))).unwrap();
    assert!(report.is_intact(), "{report}");
}

/// Verifying the live file alone accepts its continuation; a series with
/// lines cut off the end of a sealed file, or a file missing, is named.
#[tokio::test]
async fn cut_end_and_missing_file_are_named() {
    let dir = TempDir::new("cut");
    let path = dir.file();
    let j = Journal::open(&path).await.unwrap();
    for round in 0..3 {
        record_n(&j, round, 10).await;
        j.rotate().await.unwrap().unwrap();
    }
    record_n(&j, 9, 10).await;
    j.checkpoint().await;
    drop(j);
    let key = key_of(&path);
    let files = series_files(&path).unwrap();
    assert_eq!(files.len(), 4);
    let alone = verify_series(&files[3..], Some(&key)).unwrap();
    assert!(alone.is_intact(), "{alone}");
    assert!(
        alone.to_string().contains("starts by continuing"),
        "{alone}"
    );

    // Cut the last line (its closing checkpoint) off the first file.
    let mut first = lines(&files[0]);
    first.pop();
    write_lines(&files[0], &first);
    let report = verify_series(&files, Some(&key)).unwrap();
    let problems = report.problems();
    // The first file lost its only checkpoint (a problem of its own), and
    // the second no longer continues it.
    assert_eq!(problems.len(), 2, "{report}");
    assert!(problems[0].starts_with(&format!("{}: line 1: no checkpoint", files[0].display())));
    assert!(
        problems[1].starts_with(&format!(
            "{}: line 1: does not continue from the last line of {}",
            files[1].display(),
            files[0].display()
        )),
        "{report}"
    );

    // A file missing from the middle.
    let without: Vec<PathBuf> = [&files[1], &files[3]].into_iter().cloned().collect();
    let report = verify_series(&without, Some(&key)).unwrap();
    assert_eq!(report.problems().len(), 1, "{report}");
    assert!(report.problems()[0].starts_with(&format!("{}: line 1:", files[3].display())));
}

/// A rotation cut short (by a crash) is finished or undone at the next open.
#[tokio::test]
async fn interrupted_rotation_is_repaired_at_open() {
    let dir = TempDir::new("crash");
    let path = dir.file();
    let j = Journal::open(&path).await.unwrap();
    record_n(&j, 0, 10).await;
    j.rotate().await.unwrap().unwrap();
    record_n(&j, 1, 10).await;
    j.checkpoint().await;
    drop(j);
    // Crash after the link, before the new file: both names on one file.
    let half = sealed_path(&path, 2);
    std::fs::hard_link(&path, &half).unwrap();
    let j = Journal::open(&path).await.unwrap();
    assert!(!half.exists(), "the unfinished seal was undone");
    record_n(&j, 2, 5).await;
    j.checkpoint().await;
    drop(j);
    let key = key_of(&path);
    let report = verify_series(&series_files(&path).unwrap(), Some(&key)).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.files.len(), 2);

    // The live file gone after it was sealed: the next open continues.
    std::fs::rename(&path, sealed_path(&path, 2)).unwrap();
    let j = Journal::open(&path).await.unwrap();
    record_n(&j, 3, 5).await;
    j.checkpoint().await;
    drop(j);
    let report = verify_series(&series_files(&path).unwrap(), Some(&key)).unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.files.len(), 3);
    let first = lines(&path).remove(0);
    assert!(first.contains(CONTINUED_EVENT), "{first}");
}
