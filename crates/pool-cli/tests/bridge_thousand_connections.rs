//! 1,000 TCP connections at once through one bridge pair (so 1,000
//! streams of one session): every one gets its own 4 KiB back, intact and
//! unmixed.
mod util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use util::*;

const CONNECTIONS: usize = 1000;
const PAYLOAD: usize = 4096;

/// A payload that names its connection, so a mix-up is visible.
fn payload(i: usize) -> Vec<u8> {
    let mut p = pattern(i as u64 + 7, PAYLOAD);
    p[..8].copy_from_slice(&(i as u64).to_be_bytes());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_through_one_bridge() {
    // This process holds both ends of every connection (client and echo
    // target), each bridge process one end of each.
    let need = (2 * CONNECTIONS + 200) as u64;
    let soft = nofile_soft_limit();
    assert!(
        soft >= need,
        "this test needs at least {need} open files, and the soft limit is {soft}: \
         run it after `ulimit -n 4096` (or more)"
    );
    let dir = TempDir::new("thousand");

    // A listen backlog for all of them at once (TcpListener::bind asks for
    // 128: pool2tcp's 1,000 connects would overflow it, and the kernel
    // would reset the ones its SYN cookies cannot complete).
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind echo");
    let l = sock.listen(4096).expect("listen");
    let target = l.local_addr().expect("addr").to_string();
    let echoed = Arc::new(AtomicUsize::new(0));
    let e2 = echoed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                return;
            };
            let e = e2.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    e.fetch_add(1, Ordering::Relaxed);
                }
                let _ = w.shutdown().await;
            });
        }
    });
    let mut pair = bridge_pair(&dir, &target, &[]);

    let t0 = Instant::now();
    let start = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let addr = pair.tcp_addr.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("connection {i}: connect: {e}"))?;
            // All connections open before any sends: 1,000 live at once.
            start.wait().await;
            let want = payload(i);
            let (mut r, mut w) = s.split();
            let send = async {
                w.write_all(&want).await?;
                w.shutdown().await
            };
            let mut got = Vec::with_capacity(PAYLOAD);
            let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
            sent.map_err(|e| format!("connection {i}: send: {e}"))?;
            read.map_err(|e| format!("connection {i}: read: {e}"))?;
            if got != want {
                let from = (got.len() >= 8)
                    .then(|| u64::from_be_bytes(got[..8].try_into().expect("8 bytes")));
                return Err(format!(
                    "connection {i}: got {} bytes back, not its own 4 KiB (first 8 bytes name connection {from:?})",
                    got.len()
                ));
            }
            Ok::<(), String>(())
        }));
    }
    let results = tokio::time::timeout(Duration::from_secs(40), async {
        let mut errors = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.expect("client task") {
                errors.push(e);
            }
        }
        errors
    })
    .await
    .expect("1,000 connections did not all finish within 40 s");
    let took = t0.elapsed();
    assert!(
        results.is_empty(),
        "{} of {CONNECTIONS} connections failed, e.g.:\n{}",
        results.len(),
        results[..results.len().min(10)].join("\n")
    );
    assert_eq!(echoed.load(Ordering::Relaxed), CONNECTIONS);
    eprintln!("{CONNECTIONS} connections x {PAYLOAD} B echoed through the bridge in {took:?}");
    pair.server.assert_running();
    pair.client.assert_running();
}
