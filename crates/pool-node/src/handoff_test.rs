//! `pool.handoff.test`: a built-in service whose streams *move* with a
//! handed-off session (`StreamPolicy::Move`), for tests and figures. It
//! writes a paced stream of 1 KiB chunks (index u64, then a pattern of the
//! index) every millisecond until the client finishes its side; at a
//! handoff's target it goes on from the byte the source's instance had
//! written, so the client can check every chunk by index and content.

use std::sync::Arc;
use std::time::Duration;

use pool_net::StreamPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::router::{Incoming, ServeFuture, Service};

/// The service's name.
pub const HANDOFF_TEST_SERVICE: &str = "pool.handoff.test";
/// Bytes per chunk.
pub const CHUNK: usize = 1024;

/// Chunk `i`: its index, then bytes that depend on it.
pub fn chunk(i: u64) -> [u8; CHUNK] {
    let mut c = [0u8; CHUNK];
    c[..8].copy_from_slice(&i.to_be_bytes());
    for (j, b) in c.iter_mut().enumerate().skip(8) {
        *b = (i.wrapping_mul(31).wrapping_add(j as u64)) as u8;
    }
    c
}

/// `pool.handoff.test`.
pub struct HandoffTest;

impl HandoffTest {
    async fn run(s: Incoming, written: u64) {
        let (mut recv, mut send) = (s.recv, s.send);
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        // The client's FIN ends the stream.
        tokio::spawn(async move {
            let mut sink = [0u8; 256];
            while let Ok(n) = recv.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
            let _ = stop_tx.send(());
        });
        let mut next = written / CHUNK as u64;
        let partial = (written % CHUNK as u64) as usize;
        if partial != 0 {
            // The source's instance stopped inside a chunk: finish it.
            if send.write_all(&chunk(next)[partial..]).await.is_err() {
                return;
            }
            next += 1;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => break,
            }
            if send.write_all(&chunk(next)).await.is_err() {
                return;
            }
            next += 1;
        }
        let _ = send.shutdown().await;
    }
}

impl Service for HandoffTest {
    fn serve(self: Arc<Self>, s: Incoming) -> ServeFuture {
        Box::pin(HandoffTest::run(s, 0))
    }

    fn handoff_policy(&self) -> StreamPolicy {
        StreamPolicy::Move
    }

    fn import(self: Arc<Self>, s: Incoming, _read: u64, written: u64) -> ServeFuture {
        Box::pin(HandoffTest::run(s, written))
    }
}
