//! What a bridge pair reports about the traffic it carried: `/metrics`
//! (OpenMetrics text) and `/health` on both ends, and `pool ctl sessions
//! --json` over the control socket, checked against connections and bytes
//! the test sent.
mod util;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use util::*;

const CONNECTIONS: usize = 3;
const PER_CONNECTION: usize = 1 << 20;

/// Parses OpenMetrics text: every sample line as `name{labels}` → value.
/// Fails the test on anything that is not a comment or a sample, or when
/// the text does not end with `# EOF`.
fn parse_openmetrics(text: &str) -> HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text must end with `# EOF`:\n{text}"
    );
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            assert!(
                matches!(kind, "TYPE" | "HELP" | "UNIT" | "EOF"),
                "unknown comment line `{line}`"
            );
            if kind == "TYPE" {
                let name = parts.next().expect("TYPE name");
                let ty = parts.next().expect("TYPE type");
                assert!(
                    matches!(ty, "counter" | "gauge" | "histogram" | "info" | "unknown"),
                    "`{line}`"
                );
                types.insert(name.to_string(), ty.to_string());
            }
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: `{line}`"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in `{line}`"));
        let name = key.split('{').next().unwrap_or(key);
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in `{line}`"
        );
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            types.contains_key(family) || types.contains_key(name),
            "sample `{line}` has no # TYPE line before it"
        );
        samples.insert(key.to_string(), value);
    }
    samples
}

fn metrics(addr: &str) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    parse_openmetrics(&body)
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no `{key}` in the metrics; they have: {:?}", m.keys()))
}

#[test]
fn metrics_and_ctl_count_connections_and_bytes() {
    let dir = TempDir::new("metrics");
    // A sink: reads everything, answers with the byte count.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let target = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes());
            });
        }
    });

    let (server_key, server_pub) = keygen(&dir, "server");
    let (client_key, client_pub) = keygen(&dir, "client");
    let sock = dir.join("control.sock");
    let sock_s = sock.to_str().expect("utf-8").to_string();
    let (mut server, pool_addr) = start_pool2tcp(
        &dir,
        "pool2tcp",
        &server_key,
        &target,
        &[
            "--allow",
            &client_pub,
            "--metrics",
            "127.0.0.1:0",
            "--control",
            &sock_s,
        ],
    );
    let server_metrics = server.wait_log("metrics at http://", Duration::from_secs(5));
    let server_metrics = server_metrics
        .strip_suffix("/metrics")
        .expect("metrics URL")
        .to_string();
    let (mut client, tcp_addr) = start_tcp2pool(
        &dir,
        "tcp2pool",
        &client_key,
        &pool_addr,
        &server_pub,
        &["--metrics", "127.0.0.1:0"],
    );
    let client_metrics = client.wait_log("metrics at http://", Duration::from_secs(5));
    let client_metrics = client_metrics
        .strip_suffix("/metrics")
        .expect("metrics URL")
        .to_string();

    for (addr, who) in [(&server_metrics, "pool2tcp"), (&client_metrics, "tcp2pool")] {
        let (status, body) = http_get(addr, "/health");
        assert_eq!((status, body.trim()), (200, "ok"), "{who} /health");
    }
    let m = metrics(&server_metrics);
    assert_eq!(get(&m, "pool_sessions"), 0.0, "before any connection");
    assert_eq!(get(&m, "pool_bridge_connections_total"), 0.0);

    let sent = CONNECTIONS * PER_CONNECTION;
    for i in 0..CONNECTIONS {
        let mut s = TcpStream::connect(&tcp_addr).expect("connect tcp2pool");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        s.write_all(&pattern(i as u64, PER_CONNECTION))
            .expect("send through the bridge");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).expect("sink's answer");
        assert_eq!(
            answer,
            (PER_CONNECTION as u64).to_be_bytes(),
            "connection {i}: bytes the sink counted"
        );
    }

    let m = metrics(&server_metrics);
    let peer = |name: &str| format!("{name}{{peer=\"{client_pub}\"}}");
    assert_eq!(get(&m, "pool_sessions"), 1.0, "pool2tcp: pool_sessions");
    assert_eq!(get(&m, "pool_sessions_accepted_total"), 1.0);
    assert_eq!(
        get(&m, "pool_bridge_connections_total"),
        CONNECTIONS as f64,
        "pool2tcp: pool_bridge_connections_total"
    );
    assert_eq!(get(&m, "pool_bridge_errors_total"), 0.0);
    assert_eq!(get(&m, "pool_handshakes_refused_total"), 0.0);
    let received = get(&m, &peer("pool_peer_received_bytes_total"));
    assert!(
        received >= sent as f64,
        "pool2tcp: pool_peer_received_bytes_total {received} < {sent} bytes sent"
    );
    assert!(
        received < 1.2 * sent as f64,
        "pool2tcp: pool_peer_received_bytes_total {received} is far over the {sent} bytes sent"
    );
    assert_eq!(
        get(&m, &peer("pool_peer_streams_opened_total")),
        CONNECTIONS as f64
    );

    let m = metrics(&client_metrics);
    let speer = |name: &str| format!("{name}{{peer=\"{server_pub}\"}}");
    assert_eq!(get(&m, "pool_sessions"), 1.0, "tcp2pool: pool_sessions");
    assert_eq!(get(&m, "pool_sessions_dialled_total"), 1.0);
    assert_eq!(
        get(&m, "pool_bridge_connections_total"),
        CONNECTIONS as f64,
        "tcp2pool: pool_bridge_connections_total"
    );
    let sent_m = get(&m, &speer("pool_peer_sent_bytes_total"));
    assert!(
        sent_m >= sent as f64,
        "tcp2pool: pool_peer_sent_bytes_total {sent_m} < {sent}"
    );

    // pool ctl sessions --json
    let out = pool_cmd(&["ctl", "sessions", "--json", "--control", &sock_s]);
    assert!(
        out.status.success(),
        "pool ctl sessions: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pool ctl sessions --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let rows = v.as_array().expect("a JSON array of sessions");
    assert_eq!(rows.len(), 1, "sessions: {v:#}");
    let row = &rows[0];
    assert_eq!(row["peer"], client_pub.as_str(), "{row:#}");
    assert_eq!(row["role"], "responder", "{row:#}");
    let bytes = row["bytes_received"].as_u64().unwrap_or(0);
    assert!(bytes >= sent as u64, "bytes_received {bytes} < {sent}");
    assert_eq!(row["streams_total"].as_u64(), Some(CONNECTIONS as u64));

    // And the human table names the peer.
    let out = pool_cmd(&["ctl", "sessions", "--control", &sock_s]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&client_pub[..12]),
        "the session table should show the peer:\n{table}"
    );

    // ctl status agrees.
    let out = pool_cmd(&["ctl", "status", "--json", "--control", &sock_s]);
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(st["key"], server_pub.as_str());
    assert_eq!(st["sessions"], 1);
    assert_eq!(st["pool2tcp"]["connections"], CONNECTIONS as u64);
    server.assert_running();
    client.assert_running();
}
