//! A live session handed from one server endpoint to another on real
//! loopback sockets: the client (key 1) talks to the source (key 2); the
//! source hands the session to the target (key 3) over a worker session
//! while a stream carries data both ways. The stream the source serves is
//! forwarded through the target, byte for byte; new streams are served by
//! the target; the client's peer is the target from then on. A handoff the
//! client refuses, or whose target is gone, leaves the session where it was.
mod util;

use std::sync::Arc;
use std::time::Duration;

use pool_net::{
    Endpoint, EndpointConfig, HandoffOptions, HandoffPolicy, Session, Stream, TaggedLink, Trust,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::key;

/// Serves every session of `ep`: worker streams go to the handoff, app
/// streams are echoed with `mark` prefixed to each reply line.
fn serve(ep: Endpoint, mark: &'static [u8]) {
    tokio::spawn(async move {
        while let Some(session) = ep.accept().await {
            let ep = ep.clone();
            tokio::spawn(async move {
                while let Some(st) = session.accept_stream().await {
                    let ep = ep.clone();
                    let peer = session.peer_key();
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

/// The source's app: the client's streams (tag 0 first), echoed with "S".
fn serve_source(s: &Session) {
    let s = s.clone();
    tokio::spawn(async move {
        while let Some(mut st) = s.accept_stream().await {
            tokio::spawn(async move {
                let mut tag = [0u8; 1];
                if st.read_exact(&mut tag).await.is_ok() {
                    echo(st, b"S").await;
                }
            });
        }
    });
}

/// Echoes fixed 1 KiB records, each answered with `mark` + the record.
async fn echo(mut st: Stream, mark: &[u8]) {
    let mut buf = [0u8; 1024];
    loop {
        if st.read_exact(&mut buf).await.is_err() {
            let _ = st.shutdown().await;
            return;
        }
        if st.write_all(mark).await.is_err() || st.write_all(&buf).await.is_err() {
            return;
        }
    }
}

async fn setup(policy: HandoffPolicy) -> (Endpoint, Endpoint, Endpoint, Session, Session) {
    let (k1, k2, k3) = (key(1), key(2), key(3));
    let source = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(k2.clone()).trust(Trust::new().allow(k1.public_key())),
    )
    .await
    .unwrap();
    let target = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(k3.clone())
            .trust(Trust::new().allow(k1.public_key()).allow(k2.public_key())),
    )
    .await
    .unwrap();
    let client = Endpoint::client(EndpointConfig::new(k1).handoff(policy));
    let saddr = source.local_addr().unwrap().to_string();
    let (c, s) = tokio::join!(client.connect(&saddr, k2.public_key()), source.accept());
    (source, target, client, c.unwrap(), s.unwrap())
}

fn record(i: u32) -> [u8; 1024] {
    let mut r = [0u8; 1024];
    for (j, b) in r.iter_mut().enumerate() {
        *b = (i as usize * 31 + j) as u8;
    }
    r[..4].copy_from_slice(&i.to_be_bytes());
    r
}

/// Sends `n` records from `from` and checks each echo.
async fn exchange(st: &mut Stream, from: u32, n: u32, mark: &[u8]) {
    let mut reply = vec![0u8; mark.len() + 1024];
    for i in from..from + n {
        st.write_all(&record(i)).await.unwrap();
        st.read_exact(&mut reply).await.unwrap();
        assert_eq!(
            &reply[..mark.len()],
            mark,
            "record {i} answered by the wrong server"
        );
        assert_eq!(&reply[mark.len()..], &record(i)[..], "record {i} changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_moves_the_session_and_forwards_its_streams() {
    util::init_tracing();
    let (source, target, client, c, s) = setup(HandoffPolicy::Any).await;
    serve(target.clone(), b"T");
    // The source serves the client's streams itself (this test's app).
    serve_source(&s);
    let mut x = c.open_stream().await.unwrap();
    x.write_all(&[0]).await.unwrap();
    exchange(&mut x, 0, 200, b"S").await;

    // Records in flight both ways while the session moves.
    let taddr = target.local_addr().unwrap();
    let worker = source
        .connect(&taddr.to_string(), key(3).public_key())
        .await
        .unwrap();
    let link = TaggedLink(worker);
    let pumping = tokio::spawn(async move {
        exchange(&mut x, 200, 3000, b"S").await;
        x
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = s
        .handoff_to(
            &link,
            key(3).public_key(),
            vec![taddr],
            HandoffOptions::default(),
        )
        .await
        .expect("handoff");
    assert_eq!(report.forwarded, 1, "the open stream is forwarded");
    assert!(report.frozen < Duration::from_secs(1));
    let mut x = tokio::time::timeout(Duration::from_secs(30), pumping)
        .await
        .expect("the stream goes on")
        .unwrap();
    assert_eq!(
        c.peer_key(),
        key(3).public_key(),
        "the client's peer is the target"
    );
    assert_eq!(c.stats().moved_from, Some(key(2).public_key()));
    assert!(s.is_closed(), "the source is fenced");
    assert_eq!(source.session_count(), 0);
    // The old stream is still served by the source's app, through T.
    exchange(&mut x, 3200, 50, b"S").await;
    // A new stream goes to the target.
    let mut y = c.open_stream().await.unwrap();
    y.write_all(&[0]).await.unwrap();
    exchange(&mut y, 0, 50, b"T").await;
    // Losing the carrier now resumes at the target.
    c.drop_carrier();
    exchange(&mut y, 50, 50, b"T").await;
    exchange(&mut x, 3250, 50, b"S").await;
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_failed_handoff_leaves_the_session_in_place() {
    util::init_tracing();
    let (source, target, _client, c, s) = setup(HandoffPolicy::Refuse).await;
    serve(target.clone(), b"T");
    serve_source(&s);
    let mut x = c.open_stream().await.unwrap();
    x.write_all(&[0]).await.unwrap();
    exchange(&mut x, 0, 10, b"S").await;
    let taddr = target.local_addr().unwrap();
    let link = TaggedLink(
        source
            .connect(&taddr.to_string(), key(3).public_key())
            .await
            .unwrap(),
    );
    // The client follows no handoffs: it declines, the source aborts.
    let err = s
        .handoff_to(
            &link,
            key(3).public_key(),
            vec![taddr],
            HandoffOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            pool_net::Error::Handoff {
                code: "client_declined",
                ..
            }
        ),
        "{err}"
    );
    exchange(&mut x, 10, 10, b"S").await;
    // A target that is not running: the client cannot get there; the
    // token's life bounds the attempt and nothing moves.
    drop(target);
    let opts = HandoffOptions::default().token_lifetime(Duration::from_millis(500));
    let err = s
        .handoff_to(&link, key(3).public_key(), vec![taddr], opts)
        .await
        .unwrap_err();
    assert!(matches!(err, pool_net::Error::Handoff { .. }), "{err}");
    exchange(&mut x, 20, 10, b"S").await;
    assert_eq!(c.peer_key(), key(2).public_key());
    let _ = Arc::new(());
}

/// A TCP forwarder that keeps the first bytes of each connection it carries.
async fn recording_forwarder(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let Ok(mut out) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let mut first = vec![0u8; 4096];
                let n = inbound.read(&mut first).await.unwrap_or(0);
                first.truncate(n);
                keep.lock().unwrap().push(first.clone());
                if out.write_all(&first).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            });
        }
    });
    (addr, seen)
}

/// Sends `bytes` as the first record of a new carrier to `addr` and returns
/// the REFUSE code of the answer.
async fn refusal_code(addr: std::net::SocketAddr, bytes: &[u8]) -> u8 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("an answer")
        .expect("an answer");
    assert_eq!(head[0], pool_core::RecordType::Refuse as u8, "refused");
    head[4]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_forged_handoff_resumes_are_refused_and_harm_nothing() {
    util::init_tracing();
    let (source, target, _client, c, s) = setup(HandoffPolicy::Any).await;
    serve(target.clone(), b"T");
    let taddr = target.local_addr().unwrap();
    // The client reaches the target through a forwarder that records what
    // it sends: its RESUME_HANDOFF, as an on-path attacker would see it.
    let (faddr, seen) = recording_forwarder(taddr).await;
    let link = TaggedLink(
        source
            .connect(&taddr.to_string(), key(3).public_key())
            .await
            .unwrap(),
    );
    s.handoff_to(
        &link,
        key(3).public_key(),
        vec![faddr],
        HandoffOptions::default(),
    )
    .await
    .expect("handoff");
    let captured = seen.lock().unwrap()[0].clone();
    assert_eq!(captured[0], pool_core::RecordType::ResumeHandoff as u8);
    let len = 4
        + (usize::from(captured[1]) << 16
            | usize::from(captured[2]) << 8
            | usize::from(captured[3]));
    let record = captured[..len].to_vec();
    // Replayed after the commit: the token is spent (code 11), checked
    // before any key exchange; at the source, which prepared no import,
    // the token is no good either (11).
    assert_eq!(refusal_code(taddr, &record).await, 11);
    assert_eq!(
        refusal_code(source.local_addr().unwrap(), &record).await,
        11
    );
    // Forged: a flipped token bit, and garbage of the right shape.
    let mut forged = record.clone();
    forged[4 + 16 + 4 + 36 + 40] ^= 1;
    assert_eq!(refusal_code(taddr, &forged).await, 11);
    // The session is unharmed, at the target.
    let mut y = c.open_stream().await.unwrap();
    y.write_all(&[0]).await.unwrap();
    exchange(&mut y, 0, 20, b"T").await;
    assert_eq!(c.peer_key(), key(3).public_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_services_that_opt_out_are_reset_with_code_6() {
    util::init_tracing();
    let (source, target, _client, c, s) = setup(HandoffPolicy::Any).await;
    serve(target.clone(), b"T");
    serve_source(&s);
    let mut kept = c.open_stream().await.unwrap();
    kept.write_all(&[0]).await.unwrap();
    exchange(&mut kept, 0, 5, b"S").await;
    let mut dropped = c.open_stream().await.unwrap();
    dropped.write_all(&[0]).await.unwrap();
    exchange(&mut dropped, 0, 5, b"S").await;
    let taddr = target.local_addr().unwrap();
    let link = TaggedLink(
        source
            .connect(&taddr.to_string(), key(3).public_key())
            .await
            .unwrap(),
    );
    let policies = [(
        dropped.id(),
        (pool_net::StreamPolicy::Reset, "measure".to_string()),
    )]
    .into_iter()
    .collect();
    let report = s
        .handoff_to(
            &link,
            key(3).public_key(),
            vec![taddr],
            HandoffOptions::default().policies(policies),
        )
        .await
        .expect("handoff");
    assert_eq!((report.forwarded, report.reset), (1, 1));
    // The opted-out stream reads a reset with the documented code...
    let mut buf = [0u8; 16];
    let err = dropped.read(&mut buf).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("code {}", pool_net::RESET_HANDOFF)),
        "{err}"
    );
    // ...and the forwarded one goes on.
    exchange(&mut kept, 5, 5, b"S").await;
}
