//! What the network-namespace tests share: `ip`, the paced transfer's
//! script, and reading a daemon's sessions.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{pool_cmd, Proc, TempDir};

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn paced_py() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib/paced.py");
    p.to_string_lossy().into_owned()
}

/// One session's row from `pool ctl sessions --json`.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub path: String,
    pub address: String,
    pub path_changes: u64,
    pub resumes: u64,
    /// The relays the session goes through (ours first).
    pub relays: Vec<String>,
}

pub fn sessions(control: &Path) -> Vec<Row> {
    let out = pool_cmd(&[
        "ctl",
        "sessions",
        "--json",
        "--control",
        control.to_str().unwrap(),
    ]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| Row {
                    id: r["id"].as_str().unwrap_or("").into(),
                    path: r["path"].as_str().unwrap_or("").into(),
                    address: r["address"].as_str().unwrap_or("-").into(),
                    path_changes: r["path_changes"].as_u64().unwrap_or(0),
                    resumes: r["resumes"].as_u64().unwrap_or(0),
                    relays: r["relays"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until node A's one session is on `path`; returns its row.
pub fn wait_path(control: &Path, path: &str, timeout: Duration) -> Row {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = sessions(control);
        if let Some(r) = rows.iter().find(|r| r.path == path) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "session did not reach path `{path}` within {timeout:?}: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the paced source and checks the transfer: same hash at both
/// ends, no chunk lost, duplicated or corrupt. Returns the fetch report.
pub fn finish_paced(dir: &TempDir, fetch: &mut Proc, source: &Proc) -> serde_json::Value {
    std::fs::write(dir.join("stop"), b"").unwrap();
    let st = fetch.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "fetch failed:\n{}", fetch.log());
    let got: serde_json::Value =
        serde_json::from_str(fetch.log().lines().last().unwrap_or("{}")).expect("fetch report");
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = loop {
        let log = source.log();
        if let Some(l) = log.lines().find(|l| l.contains("sha256")) {
            break serde_json::from_str::<serde_json::Value>(l).expect("source report");
        }
        assert!(Instant::now() < deadline, "source never finished: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("sent {sent}\nreceived {got}");
    assert_eq!(got["lost"], 0, "{got}");
    assert_eq!(got["duplicated"], 0, "{got}");
    assert_eq!(got["corrupt"], 0, "{got}");
    assert_eq!(got["chunks"], sent["chunks"], "{got} vs {sent}");
    assert_eq!(got["sha256"], sent["sha256"], "{got} vs {sent}");
    assert!(got["chunks"].as_u64().unwrap_or(0) > 100, "{got}");
    got
}
