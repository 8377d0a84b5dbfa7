//! Every kind of RPC over POOL behaves as over TCP: unary, client-,
//! server- and bidirectional streaming, deadlines and cancellation; a
//! carrier cut in the middle of a stream loses and repeats nothing; keys
//! are checked before the service sees a request.

mod util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Code;
use util::*;

async fn both(s: &Server) -> Vec<(&'static str, Channel)> {
    vec![
        ("tcp", tcp_channel(s).await),
        ("pool", pool_channel(s, 2).await),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_rpc_answers_alike_on_both_transports() {
    let s = server(&[key(2).public_key()], None).await;
    for (t, ch) in both(&s).await {
        let mut c = EchoClient::new(ch);
        // Unary.
        let r = c
            .say(Message {
                seq: 7,
                text: "hi".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.seq, r.text.as_str()), (7, "hi"), "{t}");
        // Client streaming.
        let msgs = (1..=100).map(|seq| Message {
            seq,
            ..Default::default()
        });
        let total = c.sum(tokio_stream::iter(msgs)).await.unwrap().into_inner();
        assert_eq!((total.count, total.sum), (100, 5050), "{t}");
        // Server streaming.
        let mut st = c
            .count(CountRequest {
                count: 500,
                every_ms: 0,
                pad: 100,
            })
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(m) = st.message().await.unwrap() {
            assert_eq!(m.seq, n, "{t}");
            assert_eq!(m.pad.len(), 100);
            n += 1;
        }
        assert_eq!(n, 500, "{t}");
        // Bidirectional, in lock step: each answer before the next question.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut answers = c
            .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for seq in 0..50 {
            tx.send(Message {
                seq,
                ..Default::default()
            })
            .await
            .unwrap();
            let m = answers.message().await.unwrap().unwrap();
            assert_eq!(m.seq, seq, "{t}");
        }
        drop(tx);
        assert!(answers.message().await.unwrap().is_none(), "{t}");
    }
    // Over POOL the handler saw the caller's key; over TCP, none.
    assert_eq!(*s.seen.last_peer.lock().unwrap(), Some(key(2).public_key()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_behave_as_over_tcp() {
    let s = server(&[key(2).public_key()], None).await;
    let mut expired = Vec::new();
    for (t, ch) in both(&s).await {
        let mut c = EchoClient::new(ch);
        // A deadline shorter than the handler's delay.
        let mut req = tonic::Request::new(Message {
            delay_ms: 2_000,
            ..Default::default()
        });
        req.set_timeout(Duration::from_millis(200));
        let start = std::time::Instant::now();
        let e = c.say(req).await.unwrap_err();
        // tonic's client reports its own timeout as CANCELLED, "Timeout
        // expired" (the server's would be DEADLINE_EXCEEDED).
        assert!(
            matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{t}: {e}"
        );
        assert!(start.elapsed() < Duration::from_millis(1_000), "{t}");
        expired.push((e.code(), e.message().to_string()));

        // Cancellation: the client drops a server stream part-way; the
        // server's sends start failing soon after.
        let before = s.seen.cancelled.load(Ordering::SeqCst);
        let mut st = c
            .count(CountRequest {
                count: 100_000,
                every_ms: 5,
                pad: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for _ in 0..3 {
            st.message().await.unwrap().unwrap();
        }
        let noticed = s.seen.cancelled_note.notified();
        drop(st);
        tokio::time::timeout(Duration::from_secs(5), noticed)
            .await
            .unwrap_or_else(|_| panic!("{t}: the server never saw the cancellation"));
        assert_eq!(s.seen.cancelled.load(Ordering::SeqCst), before + 1, "{t}");

        // The channel is still good afterwards.
        c.say(Message::default()).await.unwrap();
    }
    assert_eq!(
        expired[0], expired[1],
        "a deadline ends differently over TCP and POOL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrier_cut_mid_stream_loses_and_repeats_nothing() {
    let s = server(&[key(2).public_key()], None).await;
    let conn = connector(&s, 2);
    let mut c = EchoClient::new(conn.channel().await.unwrap());
    let mut st = c
        .count(CountRequest {
            count: 400,
            every_ms: 2,
            pad: 2_000,
        })
        .await
        .unwrap()
        .into_inner();
    let session = conn.session().await.unwrap();
    let mut next = 0;
    while let Some(m) = st.message().await.unwrap() {
        assert_eq!(m.seq, next, "message lost or repeated");
        next += 1;
        if next % 100 == 50 {
            // Cut the carrier under the stream (three times in all).
            session.drop_carrier();
        }
    }
    assert_eq!(next, 400);
    let stats = session.stats();
    assert!(
        stats.core.resumes >= 3,
        "the session resumed {} times, not 3",
        stats.core.resumes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_before_the_service() {
    // Keys 2 and 3 are trusted by the endpoint; only 2 passes the
    // interceptor; key 4 is not trusted at all.
    let trusted = [key(2).public_key(), key(3).public_key()];
    let s = server(&trusted, Some(&[key(2).public_key()])).await;

    let mut ok = EchoClient::new(pool_channel(&s, 2).await);
    ok.say(Message::default()).await.unwrap();
    assert_eq!(s.seen.calls.load(Ordering::SeqCst), 1);

    let mut refused = EchoClient::new(pool_channel(&s, 3).await);
    let e = refused.say(Message::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("may not call"), "{e}");
    // Over TCP there is no key: refused too.
    let mut tcp = EchoClient::new(tcp_channel(&s).await);
    let e = tcp.say(Message::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert_eq!(
        s.seen.calls.load(Ordering::SeqCst),
        1,
        "a refused RPC reached the service"
    );

    // An untrusted key does not get a session at all.
    let r = tokio::time::timeout(Duration::from_secs(10), connector(&s, 4).channel()).await;
    assert!(matches!(r, Ok(Err(_))), "an untrusted key connected");
    assert_eq!(s.seen.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_naming_another_service_is_refused() {
    let s = server(&[key(2).public_key()], None).await;
    let conn = connector(&s, 2).service("not-grpc");
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = EchoClient::new(conn.channel().await?);
        c.say(Message::default())
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
    })
    .await
    .expect("a refused stream must fail fast, not hang");
    assert!(r.is_err(), "a stream for another service was served");
    assert_eq!(s.seen.calls.load(Ordering::SeqCst), 0);
}
