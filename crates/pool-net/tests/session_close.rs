//! Ending a session: `Session::close(reason)` reaches the peer with its
//! reason, streams on both sides end (EOF or error, never a hang), and
//! dropping every handle of a session closes it on the other side too.
mod util;

use std::io;
use std::time::Duration;

use pool_net::{CloseCode, CloseReason, Error, Session, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the other side may take to learn of a close on loopback.
const PROMPT: Duration = Duration::from_secs(2);

async fn closed_within(s: &Session, what: &str) -> CloseReason {
    tokio::time::timeout(PROMPT, s.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: closed() did not resolve within {PROMPT:?}"))
}

/// Reads until EOF or an error; returns the bytes read and the end.
async fn read_to_end_or_error(st: &mut Stream, what: &str) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    let end = tokio::time::timeout(PROMPT, async {
        loop {
            match st.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(k) => n += k as u64,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: read hung after the session closed"));
    (n, end)
}

async fn pair() -> (pool_net::Endpoint, Session, Session) {
    let (server, client, _) = util::pair_on("127.0.0.1:0").await;
    let addr = server.local_addr().unwrap().to_string();
    let (c, s) = util::connect(&server, &client, &addr).await;
    (server, c, s)
}

fn assert_aborted(end: &io::Result<()>, what: &str) {
    match end {
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{what}: {e}");
            assert!(e.to_string().contains("done"), "{what}: no reason in {e}");
        }
        Ok(()) => panic!("{what}: clean EOF without a FIN, after the session closed"),
    }
}

fn assert_peer_reason(r: &CloseReason, want: &str) {
    match r {
        CloseReason::Peer { code, reason } => {
            assert_eq!(*code, CloseCode::Normal);
            assert_eq!(reason, want);
        }
        other => panic!("expected CloseReason::Peer({want:?}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_reason_reaches_server() {
    util::init_tracing();
    let (server, c, s) = pair().await;
    let local = tokio::time::timeout(PROMPT, c.close("maintenance window"))
        .await
        .expect("close() did not return");
    assert!(
        matches!(&local, CloseReason::Local { code: CloseCode::Normal, reason } if reason == "maintenance window"),
        "local reason: {local:?}"
    );
    assert_peer_reason(&closed_within(&s, "server").await, "maintenance window");
    assert!(c.is_closed() && s.is_closed());
    assert!(tokio::time::timeout(PROMPT, s.accept_stream())
        .await
        .unwrap()
        .is_none());
    assert!(matches!(c.open_stream().await, Err(Error::Closed(_))));
    assert!(matches!(s.open_stream().await, Err(Error::Closed(_))));
    // The listener forgets it (no resume of a closed session).
    tokio::time::timeout(PROMPT, async {
        while server.session_count() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("listener still holds the closed session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_close_reason_reaches_client() {
    util::init_tracing();
    let (_server, c, s) = pair().await;
    let local = tokio::time::timeout(PROMPT, s.close("server shutting down"))
        .await
        .expect("close() did not return");
    assert!(matches!(local, CloseReason::Local { .. }), "{local:?}");
    assert_peer_reason(&closed_within(&c, "client").await, "server shutting down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_the_session_closes() {
    util::init_tracing();
    let (_server, c, s) = pair().await;
    // Stream A: the client wrote 256 KiB (no FIN) just before closing.
    // Stream B: nothing in flight; both sides are blocked reading.
    let mut a = c.open_stream().await.unwrap();
    let mut b = c.open_stream().await.unwrap();
    let (mut sa, mut sb) = tokio::time::timeout(PROMPT, async {
        let x = s.accept_stream().await.unwrap();
        let y = s.accept_stream().await.unwrap();
        if x.id() == a.id() {
            (x, y)
        } else {
            (y, x)
        }
    })
    .await
    .expect("server did not see both streams");
    assert_eq!((sa.id(), sb.id()), (a.id(), b.id()));
    let blocked_server_read = tokio::spawn(async move {
        let r = read_to_end_or_error(&mut sb, "server stream B").await;
        (r, sb)
    });
    let blocked_client_read = tokio::spawn(async move {
        let r = read_to_end_or_error(&mut b, "client stream B").await;
        (r, b)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    let payload = vec![0x5a; 256 << 10];
    a.write_all(&payload).await.unwrap();
    tokio::time::timeout(PROMPT, c.close("done"))
        .await
        .expect("close() did not return");

    // What was written before close() is delivered, then the stream ends.
    let (n, end) = read_to_end_or_error(&mut sa, "server stream A").await;
    assert_eq!(n, 256 << 10, "bytes written before close() must arrive");
    // No FIN was sent: a clean EOF would pass a truncated stream off as
    // complete. The read fails, and says why.
    assert_aborted(&end, "server stream A");
    let ((n, end_sb), mut sb) = blocked_server_read.await.unwrap();
    assert_eq!(n, 0);
    let ((n, end_b), _b) = blocked_client_read.await.unwrap();
    assert_eq!(n, 0);
    assert_aborted(&end_sb, "server stream B");
    assert_aborted(&end_b, "client stream B");
    // Writes after the close fail instead of vanishing or blocking.
    let w = tokio::time::timeout(PROMPT, sb.write_all(b"too late"))
        .await
        .expect("server write hung after close");
    assert!(w.is_err(), "server write after close succeeded");
    let w = tokio::time::timeout(PROMPT, a.write_all(b"too late"))
        .await
        .expect("client write hung after close");
    assert!(w.is_err(), "client write after close succeeded");
    assert_peer_reason(&closed_within(&s, "server").await, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_client_handle_closes_the_server_side() {
    util::init_tracing();
    let (server, c, s) = pair().await;
    let c2 = c.clone();
    let mut st = c.open_stream().await.unwrap();
    st.write_all(b"hi").await.unwrap();
    let mut inc = s.accept_stream().await.unwrap();
    let mut two = [0u8; 2];
    inc.read_exact(&mut two).await.unwrap();

    // The session handles go, the stream stays: the session lives on.
    drop(c);
    drop(c2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!s.is_closed(), "closed while a stream was still held");
    st.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(PROMPT, inc.read_exact(&mut buf))
        .await
        .expect("stream stalled after the session handles were dropped")
        .unwrap();
    assert_eq!(&buf, b"still here");

    // The last handle goes: the server learns of it promptly.
    drop(st);
    let reason = closed_within(&s, "server after the client dropped everything").await;
    assert!(
        matches!(
            reason,
            CloseReason::Peer {
                code: CloseCode::Normal,
                ..
            }
        ),
        "{reason:?}"
    );
    let (_, end) = read_to_end_or_error(&mut inc, "server stream").await;
    let _ = end; // EOF (the client's FIN on drop) or the close: either ends it.
    tokio::time::timeout(PROMPT, async {
        while server.session_count() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("listener still holds the dropped session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_client_session_without_streams_closes_the_server_side() {
    util::init_tracing();
    let (_server, c, s) = pair().await;
    drop(c);
    let reason = closed_within(&s, "server").await;
    assert!(
        matches!(
            reason,
            CloseReason::Peer {
                code: CloseCode::Normal,
                ..
            }
        ),
        "{reason:?}"
    );
}
