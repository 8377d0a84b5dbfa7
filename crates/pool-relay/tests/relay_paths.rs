//! The library's path manager against a real relay server, on loopback:
//! `Endpoint::connect_key` reaches a listener by key alone through the
//! relay, and the session moves to the direct path (the listener's
//! loopback candidate) by itself, losing nothing; with `relay_only` it
//! stays on the relay. (Moves in the middle of a transfer, and back, are
//! tested in network namespaces: crates/pool-cli/tests/paths_netns.rs.)
use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, SecretKey, Session, Trust};
use pool_relay::{RelayConfig, RelayHandle, RelayServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(relay_only: bool) -> (RelayHandle, Endpoint, Session) {
    let relay = RelayServer::bind(RelayConfig::new("127.0.0.1:0"))
        .await
        .unwrap()
        .spawn();
    let raddr = relay.local_addr().to_string();
    let kb = SecretKey::from_bytes([21; 32]);
    let ka = SecretKey::from_bytes([22; 32]);
    let b = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(kb.clone())
            .trust(Trust::new().allow(ka.public_key()))
            .relays(vec![raddr.clone()]),
    )
    .await
    .unwrap();
    let t = Instant::now();
    while !b.relay_status().first().is_some_and(|r| r.registered) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?}",
            b.relay_status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let observed = b.relay_status()[0].observed.unwrap();
    assert!(observed.ip().is_loopback(), "{observed}");
    let a = Endpoint::client(
        EndpointConfig::new(ka)
            .relays(vec![raddr])
            .direct_retry(Duration::from_secs(1))
            .relay_only(relay_only),
    );
    let s = a.connect_key(kb.public_key()).await.unwrap();
    // The session starts on the relay (it may already be moving: the
    // listener's candidates arrive right after the handshake).
    assert_eq!(relay.stats().circuits_total, 1);
    // B: echo the SHA-256 of each stream back.
    tokio::spawn(async move {
        let s = b.accept().await.unwrap();
        while let Some(mut st) = s.accept_stream().await {
            tokio::spawn(async move {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = st.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    ctx.update(&buf[..n]);
                }
                st.write_all(ctx.finish().as_ref()).await.unwrap();
                st.shutdown().await.unwrap();
            });
        }
    });
    (relay, a, s)
}

/// Sends `mb` MiB (a pattern) on a new stream, calling `during` halfway;
/// checks the digest the peer computed.
async fn transfer(s: &Session, mb: usize) {
    let mut st = s.open_stream().await.unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let chunk: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..mb * 16 {
        let mut c = chunk.clone();
        c[0] = i as u8;
        ctx.update(&c);
        st.write_all(&c).await.unwrap();
        if i % 64 == 0 {
            // Pace it a little so the path manager has time to act mid-way.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    st.shutdown().await.unwrap();
    let mut back = Vec::new();
    st.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, ctx.finish().as_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reached_by_key_through_the_relay_then_moves_to_direct() {
    let (_relay, _a, s) = setup(false).await;
    let s2 = s.clone();
    let watch = tokio::spawn(async move {
        let t = Instant::now();
        while s2.stats().path != "direct" {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "never moved: {:?}",
                s2.stats().path
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    transfer(&s, 64).await;
    watch.await.unwrap();
    let st = s.stats();
    assert_eq!(st.path, "direct");
    assert!(st.path_changes >= 1 && st.core.resumes >= 1, "{st:?}");
    // And it keeps working on the direct path.
    transfer(&s, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_stays_on_the_relay() {
    let (relay, _a, s) = setup(true).await;
    transfer(&s, 16).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = s.stats();
    assert_eq!(st.path, "relay", "{st:?}");
    assert_eq!(st.path_changes, 0);
    assert!(
        relay.stats().bytes >= 16 << 20,
        "the bytes went through the relay"
    );
}
