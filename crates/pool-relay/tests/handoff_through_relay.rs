//! A live handoff of a client that reaches its servers only through a
//! relay: both workers register at a real relay server, the client dials
//! the source by key through it (`relay_only`), and the handoff names no
//! address for the target, so the client reaches the target by key through
//! the relay too. The relay splices bytes only; the KKpsk0 resume runs end
//! to end. The stream served by the source goes on, forwarded; a new stream
//! is served by the target.
use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, HandoffOptions, SecretKey, Stream, TaggedLink, Trust};
use pool_relay::{RelayConfig, RelayServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes 64-byte records with `mark` in front of each answer.
async fn echo(mut st: Stream, mark: u8) {
    let mut rec = [0u8; 64];
    while st.read_exact(&mut rec).await.is_ok() {
        if st.write_all(&[mark]).await.is_err() || st.write_all(&rec).await.is_err() {
            return;
        }
    }
}

fn serve(ep: Endpoint, mark: u8) {
    tokio::spawn(async move {
        while let Some(session) = ep.accept().await {
            let ep = ep.clone();
            tokio::spawn(async move {
                while let Some(st) = session.accept_stream().await {
                    let (ep, peer) = (ep.clone(), session.peer_key());
                    tokio::spawn(async move {
                        if let Ok(Some(st)) = ep.serve_tagged(st, peer).await {
                            echo(st, mark).await;
                        }
                    });
                }
            });
        }
    });
}

async fn exchange(st: &mut Stream, from: u8, n: u8, mark: u8) {
    let mut reply = [0u8; 65];
    for i in from..from + n {
        st.write_all(&[i; 64]).await.unwrap();
        st.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], mark, "record {i} answered by the wrong server");
        assert_eq!(reply[1..], [i; 64], "record {i} changed");
    }
}

async fn registered(ep: &Endpoint) {
    let t = Instant::now();
    while !ep.relay_status().first().is_some_and(|r| r.registered) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?}",
            ep.relay_status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_client_follows_a_handoff_through_the_relay() {
    let relay = RelayServer::bind(RelayConfig::new("127.0.0.1:0"))
        .await
        .unwrap()
        .spawn();
    let raddr = relay.local_addr().to_string();
    let (kc, ks, kt) = (
        SecretKey::from_bytes([31; 32]),
        SecretKey::from_bytes([32; 32]),
        SecretKey::from_bytes([33; 32]),
    );
    let source = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(ks.clone())
            .trust(Trust::new().allow(kc.public_key()))
            .relays(vec![raddr.clone()]),
    )
    .await
    .unwrap();
    let target = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(kt.clone())
            .trust(Trust::new().allow(kc.public_key()).allow(ks.public_key()))
            .relays(vec![raddr.clone()]),
    )
    .await
    .unwrap();
    registered(&source).await;
    registered(&target).await;
    serve(target.clone(), b'T');
    let client = Endpoint::client(EndpointConfig::new(kc).relays(vec![raddr]).relay_only(true));
    let (c, s) = tokio::join!(client.connect_key(ks.public_key()), source.accept());
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.stats().path, "relay");
    let s2 = s.clone();
    tokio::spawn(async move {
        while let Some(mut st) = s2.accept_stream().await {
            tokio::spawn(async move {
                let mut tag = [0u8; 1];
                if st.read_exact(&mut tag).await.is_ok() {
                    echo(st, b'S').await;
                }
            });
        }
    });
    let mut x = c.open_stream().await.unwrap();
    x.write_all(&[0]).await.unwrap();
    exchange(&mut x, 0, 10, b'S').await;
    let circuits = relay.stats().circuits_total;

    let link = TaggedLink(
        source
            .connect(&target.local_addr().unwrap().to_string(), kt.public_key())
            .await
            .unwrap(),
    );
    // No address: the client reaches the target by key, through its relay.
    let report = s
        .handoff_to(&link, kt.public_key(), vec![], HandoffOptions::default())
        .await
        .expect("handoff through the relay");
    assert_eq!(report.forwarded, 1);
    assert_eq!(c.peer_key(), kt.public_key());
    assert_eq!(
        c.stats().path,
        "relay",
        "the client still reaches it through the relay"
    );
    assert!(
        relay.stats().circuits_total > circuits,
        "a new circuit, to the target"
    );
    exchange(&mut x, 10, 10, b'S').await;
    let mut y = c.open_stream().await.unwrap();
    y.write_all(&[0]).await.unwrap();
    exchange(&mut y, 0, 10, b'T').await;
}
