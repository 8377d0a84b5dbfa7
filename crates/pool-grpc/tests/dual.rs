//! TCP and POOL at once: one router answers on both; a client sends each
//! service over the transport its config prefers, and falls back to TCP
//! (and says so in its metrics) when the peer has no POOL listener.

mod util;

use std::sync::atomic::Ordering;

use pool_grpc::{DualChannel, Mode, PoolConnector, TransportConfig, TransportMetrics};
use pool_net::{Endpoint, EndpointConfig};
use util::*;

const ECHO: &str = "pool.echo.v1.Echo";

fn config(mode: Mode, prefer: &[&str]) -> TransportConfig {
    TransportConfig {
        mode,
        prefer_pool: prefer.iter().map(|s| s.to_string()).collect(),
        fallback_to_tcp: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_service_answers_on_both_at_once() {
    let s = server(&[key(2).public_key()], None).await;
    let mut tcp = EchoClient::new(tcp_channel(&s).await);
    let mut pool = EchoClient::new(pool_channel(&s, 2).await);
    // Requests in flight on both transports together.
    let slow = Message {
        delay_ms: 300,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let (a, b) = tokio::join!(tcp.say(slow.clone()), pool.say(slow));
    a.unwrap();
    b.unwrap();
    assert!(
        start.elapsed().as_millis() < 550,
        "the two were not served at once"
    );
    assert_eq!(s.seen.calls.load(Ordering::SeqCst), 2);

    // A dual channel sends the preferred service over POOL, and records it.
    let metrics = TransportMetrics::default();
    let dual = DualChannel::connect(
        config(Mode::Dual, &["echo"]),
        Some(&format!("http://{}", s.tcp)),
        Some(&connector(&s, 2)),
        metrics.clone(),
    )
    .await
    .unwrap();
    let mut c = EchoClient::new(dual.clone());
    for _ in 0..5 {
        c.say(Message::default()).await.unwrap();
    }
    assert_eq!(metrics.requests("pool", ECHO), 5);
    assert_eq!(metrics.requests("tcp", ECHO), 0);
    assert_eq!(metrics.fallbacks(ECHO), 0);
    assert_eq!(*s.seen.last_peer.lock().unwrap(), Some(key(2).public_key()));

    // Not preferred: over TCP.
    let metrics = TransportMetrics::default();
    let dual = DualChannel::connect(
        config(Mode::Dual, &["health"]),
        Some(&format!("http://{}", s.tcp)),
        Some(&connector(&s, 2)),
        metrics.clone(),
    )
    .await
    .unwrap();
    EchoClient::new(dual).say(Message::default()).await.unwrap();
    assert_eq!(metrics.requests("tcp", ECHO), 1);
    assert_eq!(*s.seen.last_peer.lock().unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_pool_with_no_pool_listener_falls_back_to_tcp() {
    // A server on TCP only.
    let seen = std::sync::Arc::new(Seen::default());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(pb::echo_server::EchoServer::new(EchoService(seen.clone())));
    let task = tokio::spawn(pool_grpc::serve(router, Some(tcp), None));
    // A POOL address where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let conn = PoolConnector::new(
        Endpoint::client(EndpointConfig::new(key(2))),
        &dead_addr,
        key(1).public_key(),
    );

    let metrics = TransportMetrics::default();
    let dual = DualChannel::connect(
        config(Mode::Dual, &["echo"]),
        Some(&format!("http://{tcp_addr}")),
        Some(&conn),
        metrics.clone(),
    )
    .await
    .unwrap();
    let mut c = EchoClient::new(dual.clone());
    for _ in 0..3 {
        c.say(Message::default()).await.unwrap();
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 3);
    assert_eq!(metrics.requests("tcp", ECHO), 3);
    assert_eq!(metrics.requests("pool", ECHO), 0);
    assert_eq!(metrics.fallbacks(ECHO), 3);
    let mut reg = prometheus_client::registry::Registry::default();
    metrics.register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(
        text.contains("grpc_client_fallbacks_total{service=\"pool.echo.v1.Echo\"} 3"),
        "{text}"
    );

    // With fallback off, or in `pool` mode, the missing listener is an error.
    let mut strict = config(Mode::Dual, &["echo"]);
    strict.fallback_to_tcp = false;
    for cfg in [strict, config(Mode::Pool, &[])] {
        let r = DualChannel::connect(
            cfg,
            Some(&format!("http://{tcp_addr}")),
            Some(&conn),
            TransportMetrics::default(),
        )
        .await;
        assert!(r.is_err());
    }
    task.abort();
}
