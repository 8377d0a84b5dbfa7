//! The Grafana dashboards (`dist/grafana/`) and the Prometheus alert rules
//! (`dist/prometheus/`) use only metrics that exist: a daemon, a relay and
//! a director are started and their `/metrics` scraped, and every
//! `pool_*` name in a panel or a rule must be among what they serve.
//! `promtool check rules` (Debian: `prometheus`) must accept the rules.
mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no *.{ext} in {dir}");
    v
}

/// Every `pool_...` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("pool_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start + 5;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        if boundary && end > start + 5 {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The names a scrape serves: sample names, and each family's name from
/// its `# TYPE` line (with `_total` for counters), so that a labelled
/// family with no sample yet (per peer, per reason) still counts.
fn served(scrape: &str, into: &mut BTreeSet<String>) {
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            into.insert(name.to_owned());
            match kind {
                "counter" => {
                    into.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        into.insert(format!("{name}{s}"));
                    }
                }
                _ => {}
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            if end > 0 {
                into.insert(line[..end].to_owned());
            }
        }
    }
}

fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{addr}/metrics: {body}");
    body
}

#[test]
fn dashboards_and_alerts_use_only_served_metrics() {
    let dir = TempDir::new("dist-metrics");
    let (key, _) = keygen(&dir, "node");
    let (_, client) = keygen(&dir, "client");
    let d = dir.path().display();
    let node_metrics = format!("127.0.0.1:{}", free_port());
    let cfg = dir.join("pool.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nkey = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"{d}/control.sock\"\n\
             metrics = \"{node_metrics}\"\njournal = \"{d}/journal.log\"\n\n[trust]\nallow = [\"{client}\"]\n",
            key.display()
        ),
    )
    .unwrap();
    let mut daemon = Proc::pool(
        "daemon",
        &["daemon", "--config", cfg.to_str().unwrap()],
        &dir,
    );
    daemon.wait_log("metrics at", Duration::from_secs(20));

    let relay_metrics = format!("127.0.0.1:{}", free_port());
    let relay_journal = dir.join("relay.journal");
    let mut relay = Proc::pool(
        "relay",
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            &relay_metrics,
            "--journal",
            relay_journal.to_str().unwrap(),
        ],
        &dir,
    );
    relay.wait_log("relay listening on", Duration::from_secs(20));

    let director = util::fleet::DirectorNode::new(&dir, "director");
    let director_metrics = format!("127.0.0.1:{}", free_port());
    let (_, worker) = keygen(&dir, "worker");
    let _director = director.start(
        &dir,
        "director",
        &[worker],
        &[client],
        &["--metrics", &director_metrics],
    );
    wait_port(&director_metrics, Duration::from_secs(10));

    let mut names = BTreeSet::new();
    for addr in [&node_metrics, &relay_metrics, &director_metrics] {
        served(&scrape(addr), &mut names);
    }
    daemon.assert_running();
    relay.assert_running();

    let mut missing = Vec::new();
    let mut used = 0;
    for f in files("dist/grafana", "json") {
        let text = std::fs::read_to_string(&f).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let panels = v["panels"].as_array().expect("panels");
        let mut exprs = String::new();
        for p in panels.iter().filter(|p| p["type"] != "row") {
            let targets = p["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert!(
                !targets.is_empty(),
                "{}: panel `{}` has no query",
                f.display(),
                p["title"]
            );
            for t in targets {
                exprs.push_str(t["expr"].as_str().expect("expr"));
                exprs.push('\n');
            }
        }
        for t in v["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(q) = t["query"]["query"].as_str() {
                exprs.push_str(q);
            }
        }
        for m in metric_names(&exprs) {
            used += 1;
            if !names.contains(&m) {
                missing.push(format!("{}: {m}", f.display()));
            }
        }
    }
    let rules = files("dist/prometheus", "yml");
    for f in &rules {
        let text: String = std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for m in metric_names(&text) {
            used += 1;
            if !names.contains(&m) {
                missing.push(format!("{}: {m}", f.display()));
            }
        }
    }
    assert!(
        used > 40,
        "only {used} metric uses found: is the scan broken?"
    );
    assert!(
        missing.is_empty(),
        "metrics used but not served by a daemon, relay or director:\n  {}\nserved: {names:?}",
        missing.join("\n  ")
    );

    require_program("promtool", "prometheus");
    for f in &rules {
        let out = run(
            {
                let mut c = Command::new("promtool");
                c.args(["check", "rules"]).arg(f);
                c
            },
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "promtool check rules {}:\n{}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_name_scan_finds_names_and_only_names() {
    let found = metric_names(
        "sum(rate(pool_a_total[5m])) / pool_b{x=\"pool_not\"} + my_pool_c + pool_ + pool_d_1",
    );
    let want: BTreeSet<String> = ["pool_a_total", "pool_b", "pool_not", "pool_d_1"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
    let mut s = BTreeSet::new();
    served(
        "# TYPE pool_x counter\n# TYPE pool_h histogram\npool_y{a=\"b\"} 1\n# EOF\n",
        &mut s,
    );
    for n in ["pool_x", "pool_x_total", "pool_h_bucket", "pool_y"] {
        assert!(s.contains(n), "{n}: {s:?}");
    }
    assert!(!s.contains("pool_y_total"));
}
