//! The stream router: 1,000 concurrent streams across four services are
//! each served by the service they name; a stream naming no service is
//! reset with `RESET_NO_SERVICE`, one whose key the service does not allow
//! with `RESET_FORBIDDEN`; both are counted and journaled in aggregate.
//! Real sessions over loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pool_journal::Journal;
use pool_net::{Endpoint, EndpointConfig, SecretKey, Session, Trust};
use pool_node::bridge::Preamble;
use pool_node::control::reset_code;
use pool_node::router::{
    Access, Incoming, Router, ServeFuture, Service, Table, RESET_FORBIDDEN, RESET_NO_SERVICE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers `NAME:` and then what the stream sent, once it has ended.
struct Tag(&'static str);

impl Service for Tag {
    fn serve(self: Arc<Self>, s: Incoming) -> ServeFuture {
        Box::pin(async move {
            let (mut rs, mut ws) = (s.recv, s.send);
            let mut got = Vec::new();
            if rs.read_to_end(&mut got).await.is_err() {
                return;
            }
            let mut out = format!("{}:", self.0).into_bytes();
            out.extend_from_slice(&got);
            let _ = ws.write_all(&out).await;
            let _ = ws.shutdown().await;
        })
    }
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_bytes([n; 32])
}

/// Sends `body` to `service` on a new stream; the answer, or the reset code.
async fn ask(session: &Session, service: &str, body: &[u8]) -> Result<Vec<u8>, Option<u64>> {
    let stream = session.open_stream().await.map_err(|_| None)?;
    let (mut rs, mut ws) = stream.into_split();
    let any = SocketAddr::from(([127, 0, 0, 1], 1));
    let mut msg = Preamble {
        source: any,
        destination: any,
        service: service.into(),
    }
    .encode();
    msg.extend_from_slice(body);
    // The router may reset the stream before our FIN is queued: then the
    // write or the shutdown is what meets the reset and its code.
    ws.write_all(&msg).await.map_err(|e| reset_code(&e))?;
    ws.shutdown().await.map_err(|e| reset_code(&e))?;
    let mut out = Vec::new();
    match rs.read_to_end(&mut out).await {
        Ok(_) => Ok(out),
        Err(e) => Err(reset_code(&e)),
    }
}

fn temp_journal() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("pool-router-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("journal.log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reach_the_service_they_name_and_nothing_else() {
    let (allowed, other) = (key(1), key(2));
    let trust = Trust::new()
        .allow(allowed.public_key())
        .allow(other.public_key());
    let server = Endpoint::bind("127.0.0.1:0", EndpointConfig::new(key(9)).trust(trust))
        .await
        .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let journal_path = temp_journal();
    let journal = Journal::open(&journal_path).await.unwrap();
    let router = Router::new(Some(journal.clone()));
    let mut table = Table::new();
    for name in ["alpha", "beta", "gamma"] {
        table.add(name, Access::Trusted, Arc::new(Tag(name)));
    }
    table.add(
        "delta",
        Access::Keys([allowed.public_key()].into()),
        Arc::new(Tag("delta")),
    );
    router.set_table(table);
    let r = router.clone();
    let server2 = server.clone();
    tokio::spawn(async move {
        while let Some(s) = server2.accept().await {
            tokio::spawn(r.clone().serve_session(s));
        }
    });

    let client = Endpoint::client(EndpointConfig::new(allowed));
    let session = client.connect(&addr, server.public_key()).await.unwrap();
    let names = ["alpha", "beta", "gamma", "delta"];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000usize {
        let s = session.clone();
        tasks.spawn(async move {
            let name = names[i % 4];
            let body = format!("stream {i}");
            let got = ask(&s, name, body.as_bytes()).await;
            assert_eq!(got, Ok(format!("{name}:{body}").into_bytes()), "stream {i}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(router.stats.routed.load(Ordering::Relaxed), 1000);

    // Unknown services, and a key `delta` does not allow.
    for _ in 0..50 {
        assert_eq!(
            ask(&session, "no-such", b"x").await,
            Err(Some(RESET_NO_SERVICE))
        );
    }
    let outsider = Endpoint::client(EndpointConfig::new(other));
    let s2 = outsider.connect(&addr, server.public_key()).await.unwrap();
    assert_eq!(ask(&s2, "delta", b"x").await, Err(Some(RESET_FORBIDDEN)));
    assert_eq!(ask(&s2, "alpha", b"x").await, Ok(b"alpha:x".to_vec()));
    assert_eq!(router.stats.unknown.load(Ordering::Relaxed), 50);
    assert_eq!(router.stats.forbidden.load(Ordering::Relaxed), 1);

    // Journaled in aggregate: one line at once per kind, then one count.
    router.expire();
    journal.flush().await;
    let text = std::fs::read_to_string(&journal_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| {
            e["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("stream_"))
        })
        .collect();
    let refused: Vec<_> = lines
        .iter()
        .filter(|e| e["event"] == "stream_refused")
        .collect();
    assert_eq!(refused.len(), 2, "{lines:?}");
    assert!(refused
        .iter()
        .any(|e| e["reason"] == "forbidden" && e["service"] == "delta"));
    let counts: Vec<_> = lines
        .iter()
        .filter(|e| e["event"] == "stream_refusals")
        .collect();
    assert_eq!(counts.len(), 1, "{lines:?}");
    assert_eq!(counts[0]["count"], 49);
    assert_eq!(counts[0]["reason"], "unknown_service");
    let _ = std::fs::remove_dir_all(journal_path.parent().unwrap());
    tokio::time::timeout(Duration::from_secs(2), session.close("done"))
        .await
        .ok();
}
