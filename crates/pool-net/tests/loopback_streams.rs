//! Real TCP on loopback: one stream end to end, IPv6, and 200 concurrent
//! streams on one session.
mod util;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_ipv4() {
    util::init_tracing();
    let (server, client, _) = util::pair_on("127.0.0.1:0").await;
    let addr = server.local_addr().unwrap().to_string();
    let (c, s) = util::connect(&server, &client, &addr).await;
    let mut out = c.open_stream().await.unwrap();
    let recv = tokio::spawn(async move {
        let mut inc = s.accept_stream().await.unwrap();
        util::recv_all(&mut inc).await
    });
    let sent = util::send_pattern(&mut out, 0, 32 << 20).await;
    let (n, got) = recv.await.unwrap();
    assert_eq!(n, 32 << 20);
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_and_dual_stack() {
    util::init_tracing();
    let (server, client, _) = util::pair_on("[::]:0").await;
    let port = server.local_addr().unwrap().port();
    for addr in [format!("[::1]:{port}"), format!("127.0.0.1:{port}")] {
        let (c, s) = util::connect(&server, &client, &addr).await;
        let mut out = c.open_stream().await.unwrap();
        let recv = tokio::spawn(async move {
            let mut inc = s.accept_stream().await.unwrap();
            let r = util::recv_all(&mut inc).await;
            (r, s)
        });
        let sent = util::send_pattern(&mut out, 1, 1 << 20).await;
        let ((n, got), _s) = recv.await.unwrap();
        assert_eq!((n, got), (1 << 20, sent), "via {addr}");
        let remote = c.stats().remote.unwrap();
        assert_eq!(remote.is_ipv6(), addr.starts_with('['));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams() {
    util::init_tracing();
    let (server, client, _) = util::pair_on("127.0.0.1:0").await;
    let addr = server.local_addr().unwrap().to_string();
    let (c, s) = util::connect(&server, &client, &addr).await;
    // Echo server: every stream echoes what it gets, then FIN.
    let echo = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while let Some(mut st) = s.accept_stream().await {
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut st);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                tokio::io::AsyncWriteExt::shutdown(&mut w).await.unwrap();
            }));
            if tasks.len() == 200 {
                break;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        s
    });
    let mut clients = Vec::new();
    for i in 0..200u64 {
        let st = c.open_stream().await.unwrap();
        clients.push(tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(st);
            let n = 50_000 + i * 997;
            let (sent, got) =
                tokio::join!(util::send_pattern(&mut w, i, n), util::recv_all(&mut r));
            assert_eq!(got, (n, sent), "stream {i}");
        }));
    }
    for t in clients {
        t.await.unwrap();
    }
    let _s = echo.await.unwrap();
    assert!(c.stats().core.streams_opened >= 200);
}
