//! A listener's greeting (the director's placement): bytes on a stream the
//! listener opens, sent with its handshake answer, so the client reads
//! them one round trip after its HELLO; the session is accepted as usual
//! once the client's first record confirms its keys. An untrusted client
//! gets no greeting.
mod util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pool_net::{Endpoint, EndpointConfig, Greeting, Trust};
use tokio::io::AsyncReadExt;
use util::key;

#[tokio::test]
async fn the_greeting_arrives_with_the_handshake_and_the_session_is_accepted() {
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    let g = Greeting(Arc::new(move |peer| {
        a.fetch_add(1, Ordering::Relaxed);
        Some(format!("hello {}\n", peer.short()).into_bytes())
    }));
    let server = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(key(2))
            .trust(Trust::new().allow(key(1).public_key()))
            .greeting(g),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let client = Endpoint::client(EndpointConfig::new(key(1)));
    let s = client.connect(&addr, key(2).public_key()).await.unwrap();
    let mut st = tokio::time::timeout(Duration::from_secs(5), s.accept_stream())
        .await
        .unwrap()
        .expect("the greeting's stream");
    let mut text = String::new();
    st.read_to_string(&mut text).await.unwrap();
    assert_eq!(text, format!("hello {}\n", key(1).public_key().short()));
    // The listener accepts the session as usual, and it carries streams.
    let accepted = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.peer_key(), key(1).public_key());
    let mut up = s.open_stream().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut up, b"x")
        .await
        .unwrap();
    let mut down = accepted.accept_stream().await.unwrap();
    let mut b = [0u8; 1];
    down.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"x");
    // An untrusted key is refused before any greeting is made.
    let stranger = Endpoint::client(EndpointConfig::new(key(9)));
    assert!(stranger.connect(&addr, key(2).public_key()).await.is_err());
    assert_eq!(asked.load(Ordering::Relaxed), 1);
}
