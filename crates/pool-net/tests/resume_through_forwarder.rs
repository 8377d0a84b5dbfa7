//! A session survives the death of its carrier: the client reaches the
//! listener through a userspace TCP forwarder that the test kills in the
//! middle of a transfer and restarts on the same port. The session resumes
//! by itself; every byte arrives exactly once. If the forwarder never comes
//! back, streams fail with the resume deadline instead of hanging.
mod util;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pool_net::{CloseReason, Endpoint, EndpointConfig, Session, Trust};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A TCP forwarder on 127.0.0.1: every accepted connection is spliced to
/// `target`. `kill` closes the listener and every spliced connection at
/// once (what a crashed relay or NAT box looks like to both ends);
/// `restart` listens again on the same port.
struct Forwarder {
    addr: SocketAddr,
    target: SocketAddr,
    accept_task: Option<JoinHandle<()>>,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accepted: Arc<AtomicU64>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Forwarder {
        let mut f = Forwarder {
            addr: "127.0.0.1:0".parse().unwrap(),
            target,
            accept_task: None,
            conns: Arc::default(),
            accepted: Arc::default(),
        };
        f.listen().await;
        f
    }

    async fn listen(&mut self) {
        let sock = TcpSocket::new_v4().unwrap();
        // The killed connections leave TIME_WAIT entries on our port.
        sock.set_reuseaddr(true).unwrap();
        sock.bind(self.addr).unwrap();
        let listener: TcpListener = sock.listen(1024).unwrap();
        self.addr = listener.local_addr().unwrap();
        let (target, conns, accepted) = (self.target, self.conns.clone(), self.accepted.clone());
        self.accept_task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let task = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                conns.lock().unwrap().push(task);
            }
        }));
    }

    /// Closes the listener and every connection; returns when they are
    /// all gone.
    async fn kill(&mut self) {
        let mut tasks: Vec<JoinHandle<()>> = self.accept_task.take().into_iter().collect();
        tasks.append(&mut self.conns.lock().unwrap());
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn restart(&mut self) {
        assert!(self.accept_task.is_none(), "kill it first");
        self.listen().await;
    }
}

/// Counts the bytes read through it into a shared counter.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

/// A listener (key 2, trusting key 1) and a client (key 1), both with the
/// given protocol configuration.
async fn endpoints(protocol: pool_core::Config) -> (Endpoint, Endpoint) {
    let server = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(util::key(2))
            .trust(Trust::new().allow(util::key(1).public_key()))
            .protocol(protocol.clone()),
    )
    .await
    .expect("bind");
    let client = Endpoint::client(EndpointConfig::new(util::key(1)).protocol(protocol));
    (server, client)
}

async fn connect_via(server: &Endpoint, client: &Endpoint, addr: &str) -> (Session, Session) {
    let (c, s) = tokio::join!(client.connect(addr, server.public_key()), server.accept());
    (c.expect("connect"), s.expect("accept"))
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const STREAMS: u64 = 4;
/// Per stream and direction: 4 streams x 2 directions x 8 MiB = 64 MiB.
const PER_DIRECTION: u64 = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_survives_forwarder_restart() {
    util::init_tracing();
    let (server, client) = endpoints(pool_core::Config::default()).await;
    let mut fwd = Forwarder::start(server.local_addr().unwrap()).await;
    let (c, s) = connect_via(&server, &client, &fwd.addr.to_string()).await;
    let received = Arc::new(AtomicU64::new(0));

    // Server: every stream sends PER_DIRECTION bytes back while reading
    // what the client sends. Results are keyed by stream id.
    let srv_received = received.clone();
    let s_acceptor = s.clone();
    let server_side = tokio::spawn(async move {
        let s = s_acceptor;
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let st = s.accept_stream().await.expect("accept_stream");
            let counter = srv_received.clone();
            tasks.push(tokio::spawn(async move {
                let id = st.id();
                let (r, mut w) = tokio::io::split(st);
                let mut r = Counting { inner: r, counter };
                let (sent, got) = tokio::join!(
                    util::send_pattern(&mut w, 100 + id, PER_DIRECTION),
                    util::recv_all(&mut r)
                );
                (id, sent, got)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let mut client_tasks = Vec::new();
    for _ in 0..STREAMS {
        let st = c.open_stream().await.unwrap();
        let counter = received.clone();
        client_tasks.push(tokio::spawn(async move {
            let id = st.id();
            let (r, mut w) = tokio::io::split(st);
            let mut r = Counting { inner: r, counter };
            let (sent, got) = tokio::join!(
                util::send_pattern(&mut w, id, PER_DIRECTION),
                util::recv_all(&mut r)
            );
            (id, sent, got)
        }));
    }

    let total = 2 * STREAMS * PER_DIRECTION;
    wait_until("20 MiB to arrive", Duration::from_secs(20), || {
        received.load(Ordering::Relaxed) >= 20 << 20
    })
    .await;
    fwd.kill().await;
    let at_kill = received.load(Ordering::Relaxed);
    assert!(
        at_kill < total - (8 << 20),
        "the forwarder should die in the middle of the transfer ({at_kill} of {total} bytes had arrived)"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Both ends noticed the dead carrier; nothing is arriving.
    assert!(
        !c.stats().core.carrier_up,
        "client still thinks it has a carrier"
    );
    assert!(
        !s.stats().core.carrier_up,
        "server still thinks it has a carrier"
    );
    let before_restart = received.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        received.load(Ordering::Relaxed),
        before_restart,
        "bytes arrived while no carrier existed"
    );

    fwd.restart().await;
    let restarted = Instant::now();
    wait_until(
        "the first bytes after the restart",
        Duration::from_secs(10),
        || received.load(Ordering::Relaxed) > before_restart,
    )
    .await;
    let resume_delay = restarted.elapsed();
    println!(
        "forwarder restart -> first new bytes: {resume_delay:?} \
         ({} MiB had arrived at the kill)",
        at_kill >> 20
    );

    let done = tokio::time::timeout(Duration::from_secs(20), async {
        let mut client_results = Vec::new();
        for t in client_tasks {
            client_results.push(t.await.unwrap());
        }
        (client_results, server_side.await.unwrap())
    })
    .await
    .expect("transfer did not complete after the resume");
    let (client_results, server_results) = done;
    for (id, c_sent, (c_n, c_got)) in &client_results {
        let (_, s_sent, (s_n, s_got)) = server_results
            .iter()
            .find(|(sid, _, _)| sid == id)
            .expect("server saw every stream");
        assert_eq!(
            *s_n, PER_DIRECTION,
            "stream {id}: client->server byte count"
        );
        assert_eq!(s_got, c_sent, "stream {id}: client->server hash");
        assert_eq!(
            *c_n, PER_DIRECTION,
            "stream {id}: server->client byte count"
        );
        assert_eq!(c_got, s_sent, "stream {id}: server->client hash");
    }
    assert_eq!(received.load(Ordering::Relaxed), total);
    let (cs, ss) = (c.stats().core, s.stats().core);
    assert!(cs.resumes >= 1, "client resumes: {}", cs.resumes);
    assert!(ss.resumes >= 1, "server resumes: {}", ss.resumes);
    assert!(
        cs.epoch >= 1 && ss.epoch >= 1,
        "a resume starts a new epoch"
    );
    assert!(server.listener_stats().resumed.load(Ordering::Relaxed) >= 1);
    assert!(
        fwd.accepted.load(Ordering::Relaxed) >= 2,
        "the resume used a new carrier"
    );
    assert!(!c.is_closed() && !s.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_fail_at_resume_deadline_when_forwarder_stays_dead() {
    util::init_tracing();
    let deadline = Duration::from_secs(2);
    let mut protocol = pool_core::Config::default();
    protocol.resume_deadline(deadline);
    let (server, client) = endpoints(protocol).await;
    let mut fwd = Forwarder::start(server.local_addr().unwrap()).await;
    let (c, s) = connect_via(&server, &client, &fwd.addr.to_string()).await;

    // One stream: the client writes without end; the server reads what
    // it gets and writes nothing back, so the client's read is blocked.
    let mut st = c.open_stream().await.unwrap();
    st.write_all(b"hello").await.unwrap();
    let mut inc = s.accept_stream().await.unwrap();
    let mut first = [0u8; 5];
    inc.read_exact(&mut first).await.unwrap();
    let (mut c_rd, mut c_wr) = tokio::io::split(st);
    let writer = tokio::spawn(async move {
        let buf = vec![7u8; 64 << 10];
        loop {
            if let Err(e) = c_wr.write_all(&buf).await {
                return e;
            }
        }
    });
    let server_reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match inc.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    fwd.kill().await;
    let killed = Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), c_rd.read(&mut buf))
        .await
        .expect("client read hung after the resume deadline");
    let waited = killed.elapsed();
    println!("forwarder killed -> client read failed: {waited:?}");
    let err = read.expect_err("client read should fail once the session is given up");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
    assert!(err.to_string().contains("resume deadline"), "{err}");
    assert!(
        waited >= deadline - Duration::from_millis(100),
        "gave up after {waited:?}, before the {deadline:?} resume deadline"
    );
    assert!(
        waited < deadline + Duration::from_secs(3),
        "gave up only after {waited:?}"
    );

    let reason = tokio::time::timeout(Duration::from_secs(1), c.closed())
        .await
        .expect("client session not closed");
    assert!(
        matches!(reason, CloseReason::ResumeDeadline { secs: 2 }),
        "client close reason: {reason:?}"
    );
    let werr = tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .expect("client writer hung")
        .unwrap();
    assert!(
        werr.to_string().contains("resume deadline"),
        "client write error: {werr}"
    );
    // The listener gives the session up too (it cannot know the client
    // will never come back) and frees it.
    let reason = tokio::time::timeout(Duration::from_secs(3), s.closed())
        .await
        .expect("server session not closed");
    assert!(
        matches!(reason, CloseReason::ResumeDeadline { .. }),
        "server close reason: {reason:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(1), server_reader)
        .await
        .expect("server read hung")
        .unwrap();
    assert!(r.is_err(), "server read should fail, got EOF");
    wait_until(
        "the listener to forget the session",
        Duration::from_secs(2),
        || server.session_count() == 0,
    )
    .await;
    assert!(fwd.accepted.load(Ordering::Relaxed) == 1);
}
