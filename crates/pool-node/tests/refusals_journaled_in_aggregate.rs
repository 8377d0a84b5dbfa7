//! F8: refused handshakes are journaled in aggregate. 10,000 garbage
//! HELLOs from one address make a handful of journal lines (the first at
//! once, then one count per window), and a real session opened during the
//! flood is journaled: no real entry is dropped because of refusals.
//!
//! Prints `journal lines per 10,000 refused HELLOs: N`
//! (`scripts/bench-refusals`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pool_net::{Endpoint, EndpointConfig, Trust};
use pool_node::config::{Config, NodeSection, TrustSection};
use pool_node::daemon;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FLOOD: u64 = 10_000;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("pool-refusals-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// One garbage HELLO from `source`: a well-framed record whose MAC is
/// wrong (or, past the per-source rate, that is rate limited). Waits for
/// the listener to close the connection. Whether the HELLO was sent (a
/// connect can fail on a loaded machine; that one is no refusal).
async fn garbage_hello(listener: std::net::SocketAddr, source: &str, n: u64) -> bool {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let Ok(mut s) = sock.connect(listener).await else {
        return false;
    };
    let mut rec = vec![0x01, 0, 0, 120];
    rec.extend((0..120u64).map(|i| (i.wrapping_mul(31) ^ n) as u8));
    if s.write_all(&rec).await.is_err() {
        return false;
    }
    let mut sink = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    true
}

fn journal(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_refused_hellos_make_few_lines_and_lose_no_session() {
    let dir = temp_dir();
    let key = dir.0.join("node.key");
    let server = daemon::create_key_file(&key).unwrap().public_key();
    let client = pool_net::SecretKey::from_bytes([9; 32]);
    let jpath = dir.0.join("journal.log");
    let window = 3;
    let cfg = Config {
        node: NodeSection {
            key,
            listen: "127.0.0.1:0".into(),
            journal: Some(jpath.clone()),
            refusal_window_secs: window,
            ..NodeSection::default()
        },
        trust: TrustSection {
            allow: vec![client.public_key()],
            ..TrustSection::default()
        },
        ..Config::default()
    };
    let d = daemon::start(None, cfg, "").await.expect("daemon starts");
    let listener: std::net::SocketAddr = d.status()["listen"].as_str().unwrap().parse().unwrap();

    let t0 = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (sent, delivered) = (sent.clone(), delivered.clone());
        flood.push(tokio::spawn(async move {
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if n >= FLOOD {
                    return;
                }
                if garbage_hello(listener, "127.0.0.2", n).await {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // A real client, from another address, in the middle of the flood.
    while sent.load(Ordering::Relaxed) < FLOOD / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ep = Endpoint::client(EndpointConfig::new(client.clone()).trust(Trust::new()));
    let session = ep
        .connect(&listener.to_string(), server)
        .await
        .expect("the real client gets a session during the flood");
    let during = sent.load(Ordering::Relaxed);
    assert!(during < FLOOD, "the flood was over before the session");
    for f in flood {
        f.await.unwrap();
    }
    let delivered = delivered.load(Ordering::Relaxed);
    assert!(
        delivered >= FLOOD * 99 / 100,
        "only {delivered} HELLOs could be sent"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.counters().handshakes_refused < delivered {
        assert!(Instant::now() < deadline, "refused: {:?}", d.counters());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flood_secs = t0.elapsed().as_secs_f64();
    d.flush_journal().await;

    let entries = journal(&jpath);
    let refusal_lines: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("handshake_refused" | "handshake_refusals")
            )
        })
        .collect();
    let counted: u64 = refusal_lines
        .iter()
        .map(|e| e["count"].as_u64().unwrap_or(1))
        .sum();
    println!(
        "journal lines per 10,000 refused HELLOs: {} ({} refusals counted in them, flood took {flood_secs:.1} s, window {window} s)",
        refusal_lines.len(),
        counted
    );
    assert_eq!(
        counted,
        d.counters().handshakes_refused,
        "{refusal_lines:?}"
    );
    assert!(
        refusal_lines.len() <= 10,
        "{} refusal lines: {:?}",
        refusal_lines.len(),
        &refusal_lines[..refusal_lines.len().min(12)]
    );
    let first = refusal_lines[0];
    assert_eq!(first["event"], "handshake_refused");
    assert_eq!(first["source"], "127.0.0.2");
    assert!(
        first["from"].as_str().unwrap().starts_with("127.0.0.2:"),
        "{first}"
    );
    let summary = refusal_lines
        .iter()
        .find(|e| e["event"] == "handshake_refusals")
        .expect("a summary line");
    assert_eq!(summary["source"], "127.0.0.2");
    assert!(
        !summary["reasons"].as_array().unwrap().is_empty(),
        "{summary}"
    );

    let opened: Vec<&Value> = entries
        .iter()
        .filter(|e| e["event"] == "session_opened")
        .collect();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0]["peer"], client.public_key().to_string());
    assert_eq!(opened[0]["session"], session.id().to_string());
    assert!(
        opened[0]["from"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{}",
        opened[0]
    );
    assert!(pool_journal::verify(&jpath).unwrap().is_intact());
    session.close("done").await;
}
