//! The metrics endpoint: OpenMetrics text that matches the daemon's numbers,
//! `/health`, error statuses, and clients that stall.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_node::metrics::{serve, MetricsSource, CONTENT_TYPE};
use pool_node::model::{NodeCounters, SessionRow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PEER_A: &str = "pool1aaaaaaaaaaaaaaaa";
const PEER_B: &str = "pool1bbbbbbbbbbbbbbbb";

struct FakeSource {
    sessions: Mutex<Vec<SessionRow>>,
    counters: NodeCounters,
}

impl MetricsSource for FakeSource {
    fn sessions(&self) -> Vec<SessionRow> {
        self.sessions.lock().unwrap().clone()
    }
    fn counters(&self) -> NodeCounters {
        self.counters.clone()
    }
}

/// Peer A has two sessions (counters summed, RTT maxed); peer B has one
/// with no RTT and no TCP_INFO yet.
fn fake() -> Arc<FakeSource> {
    let a1 = SessionRow {
        id: "a1".into(),
        peer: PEER_A.into(),
        carrier: "tcp".into(),
        streams: 3,
        streams_total: 10,
        bytes_sent: 1_000,
        bytes_received: 2_000,
        rtt_ms: Some(25.0),
        jitter_ms: 2.0,
        tcp_retransmits: Some(4),
        frames_resent: 7,
        resumes: 1,
        ..SessionRow::default()
    };
    let a2 = SessionRow {
        id: "a2".into(),
        peer: PEER_A.into(),
        carrier: "relay".into(),
        streams: 1,
        streams_total: 5,
        bytes_sent: 300,
        bytes_received: 400,
        rtt_ms: Some(80.0),
        jitter_ms: 0.5,
        tcp_retransmits: None,
        frames_resent: 2,
        resumes: 2,
        ..SessionRow::default()
    };
    let b1 = SessionRow {
        id: "b1".into(),
        peer: PEER_B.into(),
        carrier: "tcp".into(),
        streams: 0,
        streams_total: 1,
        bytes_sent: 123_456_789_012,
        bytes_received: 42,
        rtt_ms: None,
        jitter_ms: 0.0,
        tcp_retransmits: None,
        frames_resent: 0,
        resumes: 0,
        ..SessionRow::default()
    };
    Arc::new(FakeSource {
        sessions: Mutex::new(vec![a1, a2, b1]),
        counters: NodeCounters {
            sessions_accepted: 11,
            sessions_dialled: 12,
            handshakes_refused: 13,
            resumes_accepted: 14,
            bridge_connections: 15,
            bridge_errors: 16,
            journal_written: 17,
            journal_failed: 18,
            shim_connections: 19,
            shim_streams: 20,
            shim_failed: 21,
            shim_exposed: 22,
            shim_refused: 23,
            handoffs_started: 24,
            handoffs_committed: 25,
            handoffs_imported: 26,
            handoffs_aborted: [("target_refused".to_string(), 27)].into_iter().collect(),
            journal_rotations: 27,
            config_pending: true,
        },
    })
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `raw` on a fresh connection and reads until the server closes.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\n\r\n");
    exchange(addr, req.as_bytes()).await
}

/// A parsed exposition: family name → (help, type), and sample values by
/// `name{labels}`, labels sorted.
#[derive(Debug, Default)]
struct Exposition {
    help: HashMap<String, String>,
    types: HashMap<String, String>,
    samples: HashMap<String, f64>,
}

impl Exposition {
    fn value(&self, name: &str, peer: Option<&str>) -> Option<f64> {
        let key = match peer {
            Some(p) => format!("{name}{{peer=\"{p}\"}}"),
            None => name.to_string(),
        };
        self.samples.get(&key).copied()
    }
}

/// Parses `key="value",…` with OpenMetrics escapes; returns sorted pairs.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name {key:?} in {s:?}"
        );
        assert_eq!(chars.next(), Some('"'), "label value is quoted in {s:?}");
        let mut value = String::new();
        loop {
            match chars.next().expect("label value is closed") {
                '"' => break,
                '\\' => match chars.next().expect("escape is complete") {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => panic!("bad escape \\{c} in {s:?}"),
                },
                c => value.push(c),
            }
        }
        out.push((key, value));
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(c) => panic!("unexpected {c:?} after a label in {s:?}"),
        }
    }
    out.sort();
    out
}

fn parse_exposition(text: &str) -> Exposition {
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let mut x = Exposition::default();
    let mut sample_names = Vec::new();
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, arg) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            match kind {
                "HELP" => assert!(
                    x.help.insert(name.into(), arg.into()).is_none(),
                    "one HELP for {name}"
                ),
                "TYPE" => assert!(
                    x.types.insert(name.into(), arg.into()).is_none(),
                    "one TYPE for {name}"
                ),
                "UNIT" => assert!(
                    name.ends_with(&format!("_{arg}")),
                    "unit {arg} is in the name {name}"
                ),
                _ => panic!("unknown comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value is not a number in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                (name, parse_labels(inner))
            }
            None => (series, Vec::new()),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<_> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        assert!(
            x.samples.insert(key, value).is_none(),
            "duplicate series in {line:?}"
        );
        sample_names.push(name.to_string());
    }
    for name in sample_names {
        let family = match x.types.get(&name) {
            Some(_) => name.clone(),
            None => {
                let f = name
                    .strip_suffix("_total")
                    .unwrap_or_else(|| panic!("no TYPE for {name}"));
                assert_eq!(
                    x.types.get(f).map(String::as_str),
                    Some("counter"),
                    "{name} is a counter"
                );
                f.to_string()
            }
        };
        assert!(x.help.contains_key(&family), "HELP for {family}");
        if x.types[&family] == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter sample {name} ends in _total"
            );
        }
    }
    x
}

const AGGREGATE_COUNTERS: [&str; 17] = [
    "pool_sessions_accepted",
    "pool_sessions_dialled",
    "pool_handshakes_refused",
    "pool_resumes_accepted",
    "pool_bridge_connections",
    "pool_bridge_errors",
    "pool_journal_entries_written",
    "pool_journal_entries_failed",
    "pool_shim_connections",
    "pool_shim_streams",
    "pool_shim_failed",
    "pool_shim_exposed",
    "pool_shim_refused",
    "pool_handoffs_started",
    "pool_handoffs_committed",
    "pool_handoffs_imported",
    "pool_journal_rotations",
];

const PEER_FAMILIES: [(&str, &str); 9] = [
    ("pool_peer_sent_bytes", "counter"),
    ("pool_peer_received_bytes", "counter"),
    ("pool_peer_streams", "gauge"),
    ("pool_peer_streams_opened", "counter"),
    ("pool_peer_rtt_seconds", "gauge"),
    ("pool_peer_jitter_seconds", "gauge"),
    ("pool_peer_resumes", "counter"),
    ("pool_peer_frames_resent", "counter"),
    ("pool_peer_tcp_retransmits", "counter"),
];

async fn scrape(addr: SocketAddr) -> Exposition {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("Content-Type"), Some(CONTENT_TYPE));
    assert_eq!(r.header("Connection"), Some("close"));
    assert_eq!(
        r.header("Content-Length"),
        Some(r.body.len().to_string().as_str())
    );
    parse_exposition(&r.body)
}

#[tokio::test]
async fn metrics_match_the_source() {
    let (addr, task) = serve("127.0.0.1:0", fake()).await.unwrap();
    let x = scrape(addr).await;

    assert_eq!(x.types["pool_sessions"], "gauge");
    assert_eq!(x.value("pool_sessions", None), Some(3.0));
    for (i, name) in AGGREGATE_COUNTERS.iter().enumerate() {
        assert_eq!(x.types[*name], "counter", "{name}");
        assert_eq!(
            x.value(&format!("{name}_total"), None),
            Some(11.0 + i as f64),
            "{name}"
        );
    }
    assert_eq!(x.types["pool_config_pending"], "gauge");
    assert_eq!(x.value("pool_config_pending", None), Some(1.0));
    assert_eq!(x.types["pool_handoffs_aborted"], "counter");
    assert_eq!(
        x.samples
            .get("pool_handoffs_aborted_total{reason=\"target_refused\"}")
            .copied(),
        Some(27.0)
    );
    for (name, kind) in PEER_FAMILIES {
        assert_eq!(x.types.get(name).map(String::as_str), Some(kind), "{name}");
        assert!(!x.help[name].is_empty(), "{name}");
    }

    let a = Some(PEER_A);
    assert_eq!(x.value("pool_peer_sent_bytes_total", a), Some(1_300.0));
    assert_eq!(x.value("pool_peer_received_bytes_total", a), Some(2_400.0));
    assert_eq!(x.value("pool_peer_streams", a), Some(4.0));
    assert_eq!(x.value("pool_peer_streams_opened_total", a), Some(15.0));
    assert_eq!(x.value("pool_peer_rtt_seconds", a), Some(80.0 / 1000.0));
    assert_eq!(x.value("pool_peer_jitter_seconds", a), Some(2.0 / 1000.0));
    assert_eq!(x.value("pool_peer_resumes_total", a), Some(3.0));
    assert_eq!(x.value("pool_peer_frames_resent_total", a), Some(9.0));
    assert_eq!(x.value("pool_peer_tcp_retransmits_total", a), Some(4.0));

    let b = Some(PEER_B);
    assert_eq!(
        x.value("pool_peer_sent_bytes_total", b),
        Some(123_456_789_012.0)
    );
    assert_eq!(x.value("pool_peer_received_bytes_total", b), Some(42.0));
    assert_eq!(x.value("pool_peer_streams", b), Some(0.0));
    assert_eq!(x.value("pool_peer_streams_opened_total", b), Some(1.0));
    assert_eq!(
        x.value("pool_peer_rtt_seconds", b),
        None,
        "no RTT measured yet"
    );
    assert_eq!(
        x.value("pool_peer_jitter_seconds", b),
        None,
        "no RTT samples, no jitter"
    );
    assert_eq!(x.value("pool_peer_resumes_total", b), Some(0.0));
    assert_eq!(x.value("pool_peer_frames_resent_total", b), Some(0.0));
    assert_eq!(
        x.value("pool_peer_tcp_retransmits_total", b),
        None,
        "TCP_INFO unknown"
    );

    // Sessions by path: the fake sessions have no path yet.
    assert_eq!(
        x.samples
            .get("pool_sessions_on_path{path=\"none\"}")
            .copied(),
        Some(0.0)
    );
    assert_eq!(x.value("pool_session_path_changes", None), Some(0.0));
    // 1 + 3 (by path) + 1 (path changes) + 1 (config pending) + 17
    // aggregate samples, 1 handoff abort reason, 9 + 6 per-peer samples,
    // nothing else.
    assert_eq!(
        x.samples.len(),
        1 + 3 + 1 + 1 + 17 + 1 + 9 + 6,
        "{:?}",
        x.samples.keys()
    );
    task.abort();
}

#[tokio::test]
async fn peer_counters_do_not_fall_when_a_session_ends() {
    let source = fake();
    let (addr, task) = serve("127.0.0.1:0", source.clone()).await.unwrap();
    let before = scrape(addr).await;
    source.sessions.lock().unwrap().retain(|s| s.id != "a1");
    let after = scrape(addr).await;

    let a = Some(PEER_A);
    assert_eq!(after.value("pool_sessions", None), Some(2.0));
    for name in [
        "pool_peer_sent_bytes_total",
        "pool_peer_received_bytes_total",
        "pool_peer_streams_opened_total",
        "pool_peer_resumes_total",
        "pool_peer_frames_resent_total",
        "pool_peer_tcp_retransmits_total",
    ] {
        assert_eq!(after.value(name, a), before.value(name, a), "{name}");
    }
    // Gauges describe the sessions open now.
    assert_eq!(after.value("pool_peer_streams", a), Some(1.0));
    assert_eq!(
        after.value("pool_peer_jitter_seconds", a),
        Some(0.5 / 1000.0)
    );

    // Once every session to the peer is gone its counters remain, its gauges go.
    source.sessions.lock().unwrap().retain(|s| s.peer != PEER_A);
    let gone = scrape(addr).await;
    assert_eq!(gone.value("pool_peer_sent_bytes_total", a), Some(1_300.0));
    assert_eq!(gone.value("pool_peer_streams", a), None);
    assert_eq!(gone.value("pool_peer_rtt_seconds", a), None);
    task.abort();
}

#[tokio::test]
async fn health_says_ok() {
    let (addr, task) = serve("127.0.0.1:0", fake()).await.unwrap();
    let r = get(addr, "/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok\n");
    assert_eq!(r.header("Connection"), Some("close"));
    task.abort();
}

#[tokio::test]
async fn ipv6_loopback_serves() {
    // Dual stack is part of the contract: no silent skip without IPv6.
    let (addr, task) = serve("[::1]:0", fake())
        .await
        .expect("IPv6 loopback [::1] is required for this test");
    assert!(addr.is_ipv6());
    assert_eq!(get(addr, "/health").await.body, "ok\n");
    task.abort();
}

#[tokio::test]
async fn other_requests_get_error_statuses() {
    let (addr, task) = serve("127.0.0.1:0", fake()).await.unwrap();
    assert_eq!(get(addr, "/nope").await.status, 404);
    assert_eq!(get(addr, "/metrics/extra").await.status, 404);
    assert_eq!(get(addr, "/metrics?x=1").await.status, 200);

    let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("Allow"), Some("GET, HEAD"));

    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert!(
        head.header("Content-Length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 0
    );

    for bad in [
        &b"garbage\r\n\r\n"[..],
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n\xff\xfe: x\r\n\r\n",
    ] {
        assert_eq!(
            exchange(addr, bad).await.status,
            400,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }

    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while huge.len() <= 8 * 1024 {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(exchange(addr, &huge).await.status, 431);

    // Still serving after all that.
    assert_eq!(get(addr, "/health").await.status, 200);
    task.abort();
}

#[tokio::test]
async fn stalled_client_is_cut_and_others_are_served() {
    let (addr, task) = serve("127.0.0.1:0", fake()).await.unwrap();
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metr").await.unwrap();

    // Others are served while the slow client sits there.
    for _ in 0..3 {
        assert_eq!(get(addr, "/health").await.status, 200);
        scrape(addr).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served promptly"
    );

    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
        .await
        .expect("the server cuts a client that never finishes its head")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(4_500),
        "cut after the timeout, not before: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(8),
        "cut soon after the timeout: {waited:?}"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );

    assert_eq!(get(addr, "/health").await.body, "ok\n");
    task.abort();
}
