//! One real `pool daemon` holds 2,000 sessions of 10 streams each (the CI
//! size of issue 18's 10,000; `scripts/bench-scale` runs the full figure),
//! reports them all through `pool ctl sessions`, and an active session
//! through a real `pool bridge tcp2pool` still answers while they are held.
//! The daemon's RSS per session is printed against the 64 KiB goal, and
//! asserted under twice the goal: a regression guard (a 64 KiB buffer per
//! stream, as `pool.discard` once had, would show as ~700 KiB per
//! session). At 2,000 sessions the fixed growth of the connect burst
//! (about 35 MB: freed handshake buffers the allocator keeps) still adds
//! ~15 KiB per session, so the goal itself is judged at full size by
//! `scripts/bench-scale`.
//!
//! The idle clients run in this test process (the daemon's RSS is its own):
//! 32 workers, each with a key of its own (one key's handshake timestamps
//! must increase, so a worker connects its sessions one after another) and
//! a loopback source address of its own, as a fleet's clients would have:
//! the daemon's per-source handshake limit (200/s) is meant for one host.
mod util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_net::{
    BoxedCarrier, Config, DialFuture, Dialer, Endpoint, EndpointConfig, Error, Preamble, PublicKey,
    SecretKey, Session,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use util::*;

const SESSIONS: usize = 2000;
const STREAMS: usize = 10;
const WORKERS: usize = 32;
/// The goal for the daemon's memory per mostly idle session.
const GOAL_KIB: f64 = 64.0;
/// What this test asserts (see the top of the file).
const GUARD_KIB: f64 = 2.0 * GOAL_KIB;

fn client_key(i: usize) -> SecretKey {
    let mut b = [0xd7u8; 32];
    b[1..9].copy_from_slice(&(i as u64).to_le_bytes());
    SecretKey::from_bytes(b)
}

/// Dials the daemon from 127.64.0.(W+1).
struct SourceDialer {
    to: SocketAddr,
    from: IpAddr,
}

impl Dialer for SourceDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let connect = async {
                let s = TcpSocket::new_v4()?;
                s.bind(SocketAddr::new(self.from, 0))?;
                let s = s.connect(self.to).await?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(s)
            };
            connect
                .await
                .map(|s| Box::new(s) as BoxedCarrier)
                .map_err(|source| Error::Connect {
                    addr: self.to.to_string(),
                    source,
                })
        })
    }

    fn describe(&self) -> String {
        format!("{} from {}", self.to, self.from)
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// (sessions, streams) as `pool ctl sessions --json` reports them.
fn held(control: &str) -> (usize, u64) {
    let out = pool_cmd(&["ctl", "sessions", "--json", "--control", control]);
    assert!(
        out.status.success(),
        "pool ctl sessions failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sessions JSON");
    let rows = v.as_array().expect("a JSON array of sessions");
    let streams = rows
        .iter()
        .map(|r| r["streams"].as_u64().unwrap_or(0))
        .sum();
    (rows.len(), streams)
}

/// `rounds` 64-byte echoes through the bridge; each one's time, sorted.
async fn echo_rounds(addr: &str, rounds: usize) -> Vec<Duration> {
    let mut s = TcpStream::connect(addr).await.expect("connect to tcp2pool");
    s.set_nodelay(true).ok();
    let mut times = Vec::with_capacity(rounds);
    let mut back = [0u8; 64];
    for i in 0..rounds {
        let msg = [i as u8; 64];
        let t = Instant::now();
        s.write_all(&msg).await.expect("write through the bridge");
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .expect("the active session answers within 10 s")
            .expect("read through the bridge");
        times.push(t.elapsed());
        assert_eq!(back, msg, "echo {i} came back wrong");
    }
    times.sort();
    times
}

fn p99(t: &[Duration]) -> Duration {
    t[(t.len() * 99 / 100).min(t.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_holds_two_thousand_sessions_of_ten_streams() {
    // This process holds a socket per session; the daemon (a child) does too.
    let need = (SESSIONS + 512) as u64;
    let limit = pool_sys::raise_open_files_limit(2 * need).expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= need,
        "this test needs {need} open files and the hard limit allows {limit}: raise it (ulimit -Hn)"
    );
    let dir = TempDir::new("scale");

    // The active session's target: an echo server in this process.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let target = echo.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let (node_key, node_pub) = keygen(&dir, "node");
    let (bridge_key, bridge_pub) = keygen(&dir, "bridge");
    let mut authorized = format!("{bridge_pub}\n");
    for k in 0..WORKERS {
        authorized.push_str(&client_key(k).public_key().to_token());
        authorized.push('\n');
    }
    std::fs::write(dir.join("authorized"), authorized).expect("write authorized");
    let control = dir.join("control.sock").to_string_lossy().into_owned();
    let config = format!(
        "[node]\nkey = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"{control}\"\nstate_dir = \"{}\"\n\n\
         [trust]\nauthorized = \"{}\"\n\n[[pool2tcp]]\nservice = \"\"\ntarget = \"{target}\"\n",
        node_key.display(),
        dir.path().display(),
        dir.join("authorized").display(),
    );
    std::fs::write(dir.join("pool.toml"), config).expect("write config");
    let cfg_path = dir.join("pool.toml").to_string_lossy().into_owned();
    let mut daemon = Proc::pool("daemon", &["daemon", "--config", &cfg_path], &dir);
    let node_addr = daemon.wait_log("POOL listener on ", Duration::from_secs(20));
    let (_bridge, front) =
        start_tcp2pool(&dir, "tcp2pool", &bridge_key, &node_addr, &node_pub, &[]);

    let alone = echo_rounds(&front, 500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = vm_rss_kib(daemon.pid());

    // The idle sessions.
    let to: SocketAddr = node_addr.parse().expect("daemon address");
    let server: PublicKey = PublicKey::from_token(&node_pub).expect("daemon key");
    let mut head = Preamble::for_service("pool.discard").encode();
    head.extend_from_slice(b"scale-hi");
    let head = Arc::new(head);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let ep = Endpoint::client(EndpointConfig::new(client_key(w)).protocol(Config::default()));
        let dialer = Arc::new(SourceDialer {
            to,
            from: IpAddr::V4(Ipv4Addr::new(127, 64, 0, w as u8 + 1)),
        });
        let head = head.clone();
        let count = (SESSIONS - w).div_ceil(WORKERS);
        tasks.push(tokio::spawn(async move {
            let mut sessions: Vec<Session> = Vec::with_capacity(count);
            for i in 0..count {
                let s = ep
                    .connect_with(dialer.clone(), server)
                    .await
                    .unwrap_or_else(|e| panic!("worker {w} session {i}: {e}"));
                sessions.push(s);
            }
            let mut streams = Vec::with_capacity(count * STREAMS);
            for s in &sessions {
                for _ in 0..STREAMS {
                    let mut st = s.open_stream().await.expect("open stream");
                    st.write_all(&head).await.expect("write on an idle stream");
                    streams.push(st);
                }
            }
            (ep, sessions, streams)
        }));
    }
    let mut clients = Vec::with_capacity(WORKERS);
    for t in tasks {
        clients.push(t.await.expect("client worker"));
    }
    let connected = t0.elapsed();

    // Every session and stream is held at the daemon.
    let want_streams = (SESSIONS * STREAMS) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (sessions, streams) = loop {
        let (n, s) = held(&control);
        if (n > SESSIONS && s >= want_streams) || Instant::now() > deadline {
            break (n, s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        sessions,
        SESSIONS + 1,
        "the daemon should hold every idle session and the bridge's"
    );
    assert!(
        streams >= want_streams,
        "the daemon holds {streams} streams, expected at least {want_streams}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = vm_rss_kib(daemon.pid());

    // The active session still answers while they are all held.
    let loaded = echo_rounds(&front, 500).await;
    let lost = clients
        .iter()
        .flat_map(|(_, s, _)| s.iter())
        .filter(|s| s.is_closed())
        .count();
    assert_eq!(lost, 0, "idle sessions closed while held");
    daemon.assert_running();

    let per = rss1.saturating_sub(rss0) as f64 / SESSIONS as f64;
    eprintln!(
        "{SESSIONS} sessions x {STREAMS} streams held in {:.2} s ({:.0} sessions/s); daemon RSS \
         {rss0} -> {rss1} KiB: {per:.1} KiB per session (goal {GOAL_KIB}); echo p99 {:?} alone, {:?} with them held",
        connected.as_secs_f64(),
        SESSIONS as f64 / connected.as_secs_f64(),
        p99(&alone),
        p99(&loaded),
    );
    assert!(
        per <= GUARD_KIB,
        "the daemon takes {per:.1} KiB per idle session of {STREAMS} streams, over {GUARD_KIB} KiB \
         (twice the goal): something per session or per stream grew"
    );
    drop(clients);
}
