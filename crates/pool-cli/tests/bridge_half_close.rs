//! FIN and RST cross the bridge faithfully. A client that shuts down its
//! write side (like `nc -N`) still gets the whole answer; a target that
//! resets makes the client see a reset at once, and a client that resets
//! makes the target see one.
mod util;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use util::*;

const RESPONSE: usize = 8 << 20;

/// The request a client sends, by connection number.
fn request(i: u64) -> Vec<u8> {
    let mut r = format!("REQUEST {i}\n").into_bytes();
    r.extend_from_slice(&pattern(1000 + i, 100_000));
    r
}

/// A target that reads the request until EOF, checks it, then answers
/// with 8 MiB derived from it and closes.
async fn half_close_target(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut req = Vec::new();
            if s.read_to_end(&mut req).await.is_err() {
                return;
            }
            let seed = ring::digest::digest(&ring::digest::SHA256, &req);
            let seed = u64::from_le_bytes(seed.as_ref()[..8].try_into().expect("8 bytes"));
            let body = pattern(seed, RESPONSE);
            for chunk in body.chunks(1 << 16) {
                if s.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_then_half_close_gets_whole_response() {
    let dir = TempDir::new("halfclose");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let target = l.local_addr().expect("addr").to_string();
    tokio::spawn(half_close_target(l));
    let pair = bridge_pair(&dir, &target, &[]);

    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let addr = pair.tcp_addr.clone();
        tasks.push(tokio::spawn(async move {
            let req = request(i);
            let seed = ring::digest::digest(&ring::digest::SHA256, &req);
            let seed = u64::from_le_bytes(seed.as_ref()[..8].try_into().expect("8 bytes"));
            let want = sha256_hex(&pattern(seed, RESPONSE));
            let mut s = TcpStream::connect(&addr).await.expect("connect tcp2pool");
            s.write_all(&req).await.expect("send request");
            s.shutdown().await.expect("shut down the write side");
            let mut got = Vec::with_capacity(RESPONSE);
            s.read_to_end(&mut got)
                .await
                .unwrap_or_else(|e| panic!("connection {i}: reading the response: {e}"));
            assert_eq!(got.len(), RESPONSE, "connection {i}: response length");
            assert_eq!(sha256_hex(&got), want, "connection {i}: response SHA-256");
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("client task");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("half-closed transfers did not finish within 30 s");
    drop(pair);
}

/// The target resets (SO_LINGER 0, close) after reading part of the
/// request: the client sees a reset, promptly, not a hang and not a
/// clean end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_reaches_client() {
    let dir = TempDir::new("reset");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let target = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(b"partial answer").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = s.set_zero_linger();
                    drop(s);
                }
            });
        }
    });
    let pair = bridge_pair(&dir, &target, &[]);

    let mut s = TcpStream::connect(&pair.tcp_addr)
        .await
        .expect("connect tcp2pool");
    s.write_all(b"hello, and the request goes on")
        .await
        .expect("send");
    let t0 = Instant::now();
    let mut got = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let took = t0.elapsed();
    match res {
        Err(_) => panic!("the client saw nothing 3 s after the target reset its connection"),
        Ok(Ok(())) => panic!(
            "the target reset its connection but the client saw a clean end of stream \
             (after {took:?}, {} bytes): a reset must not look like a complete answer",
            got.len()
        ),
        Ok(Err(e)) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the client should see a reset, got: {e}"
        ),
    }
    eprintln!("client saw the reset {took:?} after sending");
    drop(pair);
}

/// The client resets: the target sees a reset (or at least the end of the
/// connection) promptly, while it is still waiting for more request bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_target() {
    let dir = TempDir::new("clientreset");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let target = l.local_addr().expect("addr").to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut buf = [0u8; 4096];
        let mut n_total = 0;
        let end = loop {
            match s.read(&mut buf).await {
                Ok(0) => break Ok(n_total),
                Ok(n) => n_total += n,
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = tx.send((end, Instant::now()));
    });
    let pair = bridge_pair(&dir, &target, &[]);
    let s = TcpStream::connect(&pair.tcp_addr)
        .await
        .expect("connect tcp2pool");
    let mut s = s;
    s.write_all(b"the start of a request").await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.set_zero_linger().expect("SO_LINGER 0");
    let t0 = Instant::now();
    drop(s);
    let (end, at) = tokio::time::timeout(Duration::from_secs(3), rx)
        .await
        .expect("the target saw nothing 3 s after the client reset")
        .expect("target task");
    eprintln!(
        "target saw {end:?} {:?} after the client reset",
        at.duration_since(t0)
    );
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "the target should see a reset, not a clean end of the request"
    );
    drop(pair);
}
