//! The pool2tcp process dies (SIGKILL) in the middle of a transfer and is
//! started again on the same port: the TCP client learns within seconds
//! that its transfer was cut (a reset, not a hang and not a clean end: the
//! restarted process proves it lost the session), and the same running
//! tcp2pool carries new connections again.
mod util;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool2tcp_killed_mid_transfer_then_restarted() {
    let dir = TempDir::new("killed");
    // The target: answers "ping" with "pong"; anything else gets an
    // endless stream of bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let target = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 4];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                if &first == b"ping" {
                    let _ = s.write_all(b"pong").await;
                    let _ = s.shutdown().await;
                    return;
                }
                let chunk = pattern(3, 64 << 10);
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let mut pair = bridge_pair(&dir, &target, &[]);

    let mut s = TcpStream::connect(&pair.tcp_addr)
        .await
        .expect("connect tcp2pool");
    s.write_all(b"give me everything").await.expect("send");
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0usize;
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        while got < (4 << 20) {
            match s.read(&mut buf).await {
                Ok(0) => panic!("end of stream after {got} bytes, before the kill"),
                Ok(n) => got += n,
                Err(e) => panic!("error after {got} bytes, before the kill: {e}"),
            }
        }
    })
    .await;
    assert!(first.is_ok(), "only {got} bytes in 10 s before the kill");

    pair.server.kill9();
    // pool2tcp again, same key, same port (what a supervisor does). The
    // killed process's sessions are gone: the restarted one proves that
    // with its static key when the client resumes, and only that proof
    // ends the session (refused dials alone, which anyone on the path could
    // forge, do not).
    let client_pub = pair.client_pub.clone();
    let (server, addr) = start_pool2tcp_on(
        &dir,
        "pool2tcp-restarted",
        &pair.server_key,
        &pair.pool_addr,
        &target,
        &["--allow", &client_pub],
    );
    assert_eq!(addr, pair.pool_addr);
    pair.server = server;
    let t0 = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let took = t0.elapsed();
    match end {
        Err(_) => panic!("the client was still waiting 6 s after pool2tcp restarted"),
        Ok(Ok(())) => panic!(
            "pool2tcp was killed mid-transfer but the client saw a clean end of stream \
             after {took:?}: an interrupted transfer must not look complete"
        ),
        Ok(Err(e)) => {
            eprintln!("client saw `{e}` {took:?} after pool2tcp restarted ({got} bytes in all)")
        }
    }
    drop(s);
    pair.client.assert_running();

    let t1 = Instant::now();
    let mut s = TcpStream::connect(&pair.tcp_addr)
        .await
        .expect("connect tcp2pool after the restart");
    s.write_all(b"ping").await.expect("send ping");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer))
        .await
        .expect("no answer 15 s after reconnecting through tcp2pool")
        .expect("read through the restarted bridge");
    assert_eq!(answer, b"pong");
    eprintln!(
        "new connection through the restarted pool2tcp answered in {:?}",
        t1.elapsed()
    );
    pair.server.assert_running();
    pair.client.assert_running();
}
