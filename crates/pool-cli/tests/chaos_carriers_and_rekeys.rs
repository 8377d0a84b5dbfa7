//! Chaos at the runtime level, with real processes and real sockets (issue
//! 11): a `pool bridge tcp2pool` and a `pool bridge pool2tcp` in front of an
//! echo server, both rekeying every 100 ms (`POOL_TEST_REKEY_MS=100`), with
//! a TCP forwarder between them that kills the carrier at random moments:
//! every 0.5–3 s (seeded), by a FIN, by a reset, at an arbitrary byte count
//! (mid-record), at the first record of a new epoch (mid-rekey), within the
//! next carrier's first bytes (mid-resume), or with the listener gone for a
//! while so that dials are refused. Meanwhile 50 TCP connections
//! through the bridge (50 streams of one session) each send a distinct
//! deterministic byte stream for the whole run and read it back.
//!
//! At the end every connection must have got back exactly what it sent
//! (byte count and SHA-256, and the echo server saw the same), no
//! connection was reset, both processes still run, the one session was
//! never replaced (dialled once, accepted once, same id), it resumed at
//! least once per kill, data moved again within 20 s of every kill, and
//! its epoch shows the rekeys. The forwarder's events (kills, carriers,
//! progress each second) go to `chaos-events.log` beside the bridges' logs.
//!
//! Budget: `POOL_CHAOS_SECS` (default 15 s, so the default `cargo test` run
//! stays short); `scripts/chaos` runs it for 60 s. `POOL_CHAOS_SEED` picks
//! the kill schedule (default 1); `POOL_CHAOS_LOG` the bridges' `RUST_LOG`
//! (default `debug`; the logs are kept when the test fails).
mod chaos;
mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chaos::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use util::*;

const STREAMS: usize = 50;
const REKEY_MS: &str = "100";
const DEFAULT_SECS: u64 = 15;
/// Each connection writes chunks of 1..=CHUNK_MAX bytes with a pause of
/// 0..=PAUSE_MAX_MS after each: about 0.8 MB/s per connection, 40 MB/s in
/// all, each way (enough to keep records in flight at every kill without
/// taking two shared cores).
const CHUNK_MAX: u64 = 16 << 10;
const PAUSE_MAX_MS: u64 = 20;
/// How long the session may take to carry data again after a kill before
/// the test calls it a stall.
const STALL: Duration = Duration::from_secs(20);

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// splitmix64: small, seeded, good enough for schedules and payloads.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

struct Sha(ring::digest::Context);

impl Sha {
    fn new() -> Sha {
        Sha(ring::digest::Context::new(&ring::digest::SHA256))
    }

    fn hex(self) -> String {
        hex(self.0.finish().as_ref())
    }
}

/// The test's own events (kills, carriers, progress), timestamped like
/// the bridges' logs so that the three files can be read side by side.
struct Events(Mutex<std::fs::File>);

impl Events {
    fn create(path: &std::path::Path) -> Events {
        Events(Mutex::new(
            std::fs::File::create(path).expect("create events log"),
        ))
    }

    fn say(&self, what: std::fmt::Arguments<'_>) {
        use std::io::Write;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (secs, micros) = (now.as_secs(), now.subsec_micros());
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        let line = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z {what}\n",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        );
        let _ = self.0.lock().expect("lock").write_all(line.as_bytes());
    }
}

// ---------------------------------------------------------------- forwarder

/// How a carrier is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kill {
    /// Both sockets closed (FIN both ways).
    Close,
    /// Both sockets reset (RST both ways).
    Reset,
    /// One direction forwarded up to an arbitrary byte count (almost always
    /// in the middle of a record), then both sockets closed.
    MidRecord,
    /// Closed, and the next carrier cut within its first bytes (in the
    /// resume handshake or the first records after it).
    Handshake,
    /// Closed, and the listener gone for 0.1–1.5 s: dials are refused.
    Outage,
    /// Cut in the middle of a rekey: at the first record of a new epoch in
    /// one direction (the record headers are in the clear), right before
    /// it or at a byte inside it.
    Rekey,
}

impl Kill {
    const ALL: [Kill; 6] = [
        Kill::Close,
        Kill::Reset,
        Kill::MidRecord,
        Kill::Handshake,
        Kill::Outage,
        Kill::Rekey,
    ];

    fn pick(rng: &mut Rng) -> Kill {
        match rng.range(0, 99) {
            0..=19 => Kill::Close,
            20..=29 => Kill::Reset,
            30..=54 => Kill::MidRecord,
            55..=64 => Kill::Handshake,
            65..=74 => Kill::Outage,
            _ => Kill::Rekey,
        }
    }
}

/// Follows the records of one direction of a carrier (type and length are
/// in the clear, and so is a DATA record's epoch) to find where a new
/// epoch starts.
#[derive(Default)]
struct Records {
    /// The current record's first bytes (header and, for DATA, epoch).
    head: Vec<u8>,
    /// Bytes of the current record still to skip once its head is known.
    skip: u64,
    epoch: Option<u32>,
}

impl Records {
    /// Feeds the bytes at stream offset `base`; returns where the first
    /// DATA record of a new epoch starts (offset, whole record length,
    /// epoch), if one starts in them.
    fn feed(&mut self, base: u64, mut bytes: &[u8]) -> Option<(u64, u64, u32)> {
        let mut at = base;
        let mut found = None;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let k = bytes
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.skip -= k as u64;
                bytes = &bytes[k..];
                at += k as u64;
                continue;
            }
            let want = if self.head.first() == Some(&0x10) {
                8
            } else {
                4
            };
            let k = (want - self.head.len().min(want)).min(bytes.len());
            self.head.extend_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            at += k as u64;
            let want = if self.head.first() == Some(&0x10) {
                8
            } else {
                4
            };
            if self.head.len() < want {
                continue;
            }
            let body = u64::from(u32::from_be_bytes([
                0,
                self.head[1],
                self.head[2],
                self.head[3],
            ]));
            let start = at - self.head.len() as u64;
            if self.head[0] == 0x10 {
                let epoch = u32::from_be_bytes(self.head[4..8].try_into().expect("4 bytes"));
                if self.epoch.is_some_and(|e| epoch > e) && found.is_none() {
                    found = Some((start, 4 + body, epoch));
                }
                self.epoch = Some(epoch);
            }
            self.skip = (4 + body).saturating_sub(self.head.len() as u64);
            self.head.clear();
        }
        found
    }
}

// ------------------------------------------------------------- echo server

#[derive(Debug, Default)]
struct Seen {
    bytes: u64,
    sha: String,
    error: Option<String>,
}

/// Echoes every connection; records per stream (named by its first 8
/// bytes) what it received.
async fn echo_server() -> (SocketAddr, Arc<Mutex<HashMap<u64, Seen>>>, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    let seen: Arc<Mutex<HashMap<u64, Seen>>> = Arc::default();
    let accepted = Arc::new(AtomicU64::new(0));
    let (seen2, accepted2) = (seen.clone(), accepted.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            accepted2.fetch_add(1, Ordering::Relaxed);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let (id, got) = echo_one(s).await;
                let mut m = seen.lock().expect("lock");
                let slot = m.entry(id).or_default();
                if slot.bytes > 0 || slot.error.is_some() {
                    slot.error = Some(format!("stream {id} arrived twice at the echo server"));
                } else {
                    *slot = got;
                }
            });
        }
    });
    (addr, seen, accepted)
}

async fn echo_one(mut s: TcpStream) -> (u64, Seen) {
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.split();
    let mut sha = Sha::new();
    let mut head = Vec::with_capacity(8);
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let err = loop {
        match r.read(&mut buf).await {
            Ok(0) => break w.shutdown().await.err(),
            Ok(n) => {
                sha.0.update(&buf[..n]);
                bytes += n as u64;
                if head.len() < 8 {
                    let k = (8 - head.len()).min(n);
                    head.extend_from_slice(&buf[..k]);
                }
                if let Err(e) = w.write_all(&buf[..n]).await {
                    break Some(e);
                }
            }
            Err(e) => break Some(e),
        }
    };
    let id = if head.len() == 8 {
        u64::from_be_bytes(head.try_into().expect("8 bytes"))
    } else {
        u64::MAX
    };
    let seen = Seen {
        bytes,
        sha: sha.hex(),
        error: err.map(|e| format!("echo server, stream {id}: {e}")),
    };
    (id, seen)
}

// ----------------------------------------------------------------- clients

#[derive(Debug)]
struct ClientResult {
    sent: u64,
    sent_sha: String,
    received: u64,
    received_sha: String,
}

/// One connection through the bridge: writes stream `id`'s bytes until
/// `stop`, then half-closes and reads the echo to EOF.
async fn connection(
    id: u64,
    addr: String,
    stop: watch::Receiver<bool>,
    received_total: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
) -> Result<ClientResult, String> {
    let mut s = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("stream {id}: connect: {e}"))?;
    let _ = s.set_nodelay(true);
    connected.fetch_add(1, Ordering::Relaxed);
    let (mut r, mut w) = s.split();
    let write = async {
        let mut stop = stop;
        let mut data = Rng::new(1000 + id);
        let mut pace = Rng::new(2000 + id);
        let mut sha = Sha::new();
        let mut sent = 0u64;
        let mut chunk = Vec::with_capacity(CHUNK_MAX as usize + 8);
        let mut first = true;
        while !*stop.borrow() {
            chunk.clear();
            if first {
                chunk.extend_from_slice(&id.to_be_bytes());
                first = false;
            }
            let len = pace.range(1, CHUNK_MAX) as usize;
            while chunk.len() < len {
                chunk.extend_from_slice(&data.next_u64().to_le_bytes());
            }
            w.write_all(&chunk)
                .await
                .map_err(|e| format!("stream {id}: write after {sent} bytes: {e}"))?;
            sha.0.update(&chunk);
            sent += chunk.len() as u64;
            let pause = Duration::from_millis(pace.range(0, PAUSE_MAX_MS));
            let _ = tokio::time::timeout(pause, stop.changed()).await;
        }
        w.shutdown()
            .await
            .map_err(|e| format!("stream {id}: shutdown after {sent} bytes: {e}"))?;
        Ok::<_, String>((sent, sha.hex()))
    };
    let read = async {
        let mut sha = Sha::new();
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = r
                .read(&mut buf)
                .await
                .map_err(|e| format!("stream {id}: read after {received} bytes: {e}"))?;
            if n == 0 {
                return Ok::<_, String>((received, sha.hex()));
            }
            sha.0.update(&buf[..n]);
            received += n as u64;
            received_total.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let ((sent, sent_sha), (received, received_sha)) = tokio::try_join!(write, read)?;
    Ok(ClientResult {
        sent,
        sent_sha,
        received,
        received_sha,
    })
}

// -------------------------------------------------------------- processes

fn bridge(dir: &TempDir, name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(POOL);
    cmd.args(args).env("POOL_TEST_REKEY_MS", REKEY_MS).env(
        "RUST_LOG",
        std::env::var("POOL_CHAOS_LOG").unwrap_or_else(|_| "debug".into()),
    );
    Proc::spawn(name, cmd, dir)
}

fn ctl(what: &str, control: &std::path::Path) -> serde_json::Value {
    let out = pool_cmd(&[
        "ctl",
        what,
        "--json",
        "--control",
        control.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "pool ctl {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl JSON")
}

/// The one session a bridge holds.
fn one_session(who: &str, control: &std::path::Path) -> serde_json::Value {
    let v = ctl("sessions", control);
    let rows = v.as_array().expect("sessions array");
    assert_eq!(rows.len(), 1, "{who} should hold exactly one session: {v}");
    rows[0].clone()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_carrier_kills_and_rekeys() {
    let secs = env_u64("POOL_CHAOS_SECS", DEFAULT_SECS);
    let seed = env_u64("POOL_CHAOS_SEED", 1);
    let setup = Instant::now();
    let dir = TempDir::new("chaos");
    let (server_key, server_pub) = keygen(&dir, "server");
    let (client_key, client_pub) = keygen(&dir, "client");
    let (server_ctl, client_ctl) = (dir.join("server.sock"), dir.join("client.sock"));

    let (echo, seen, echo_accepted) = echo_server().await;
    let echo = echo.to_string();
    let mut server = bridge(
        &dir,
        "pool2tcp",
        &[
            "bridge",
            "pool2tcp",
            "--listen",
            "127.0.0.1:0",
            "--target",
            &echo,
            "--key",
            server_key.to_str().expect("utf-8"),
            "--allow",
            &client_pub,
            "--control",
            server_ctl.to_str().expect("utf-8"),
        ],
    );
    let pool_addr = server.wait_log("POOL listener on ", Duration::from_secs(10));
    let events = Arc::new(Events::create(&dir.join("chaos-events.log")));
    let mut fwd = Forwarder::start(pool_addr.parse().expect("POOL address"), events.clone()).await;
    let fwd_addr = fwd.addr.to_string();
    let mut client = bridge(
        &dir,
        "tcp2pool",
        &[
            "bridge",
            "tcp2pool",
            "--listen",
            "127.0.0.1:0",
            "--peer",
            &fwd_addr,
            "--peer-key",
            &server_pub,
            "--key",
            client_key.to_str().expect("utf-8"),
            "--control",
            client_ctl.to_str().expect("utf-8"),
        ],
    );
    let tcp_addr = client.wait_log("listening on ", Duration::from_secs(10));

    // 50 connections, all through before the first kill.
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..STREAMS as u64)
        .map(|id| {
            tokio::spawn(connection(
                id,
                tcp_addr.clone(),
                stop_rx.clone(),
                received.clone(),
                connected.clone(),
            ))
        })
        .collect();
    let t0 = Instant::now();
    while echo_accepted.load(Ordering::Relaxed) < STREAMS as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "only {} of {STREAMS} connections reached the echo server",
            echo_accepted.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let id0 = one_session("tcp2pool", &client_ctl)["id"].clone();

    // The chaos.
    let mut rng = Rng::new(seed);
    let mut kills: HashMap<Kill, u64> = HashMap::new();
    // How long after each kind of kill data moved again.
    let mut recoveries: HashMap<Kill, Vec<Duration>> = HashMap::new();
    let mut last_kind = None;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let progress = {
        let (events, received, fwd) = (events.clone(), received.clone(), fwd.shared.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let live: Vec<String> = fwd
                    .live
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|c| {
                        format!(
                            "#{} {}/{}",
                            c.n,
                            c.forwarded[0].load(Ordering::Relaxed),
                            c.forwarded[1].load(Ordering::Relaxed)
                        )
                    })
                    .collect();
                events.say(format_args!(
                    "progress: {} bytes echoed back in all; live carriers (bytes each way): [{}]",
                    received.load(Ordering::Relaxed),
                    live.join(", ")
                ));
            }
        })
    };
    // The first carrier predates the chaos.
    let mut last_kill = setup;
    loop {
        // Wait for the session to carry data again, end to end, on a
        // carrier that came after the kill.
        let mark = received.load(Ordering::Relaxed);
        loop {
            server.assert_running();
            client.assert_running();
            let moving = fwd.live().iter().any(|c| {
                c.started >= last_kill
                    && c.forwarded[0].load(Ordering::Relaxed) >= 64 << 10
                    && c.forwarded[1].load(Ordering::Relaxed) >= 64 << 10
            });
            if moving && received.load(Ordering::Relaxed) >= mark + (64 << 10) {
                break;
            }
            if last_kill.elapsed() > STALL {
                events.say(format_args!("STALL"));
                panic!(
                    "stall: no data through the session for {STALL:?} after kill #{} ({kills:?}); \
                     {} carriers accepted so far; logs in {}",
                    kills.values().sum::<u64>(),
                    fwd.shared.accepted.load(Ordering::Relaxed),
                    dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(kind) = last_kind {
            recoveries
                .entry(kind)
                .or_default()
                .push(last_kill.elapsed());
            events.say(format_args!(
                "data moves again, {:?} after the kill",
                last_kill.elapsed()
            ));
        }
        let wait = Duration::from_millis(rng.range(500, 3000));
        if Instant::now() + wait >= end {
            break;
        }
        tokio::time::sleep(wait).await;
        let kind = Kill::pick(&mut rng);
        *kills.entry(kind).or_default() += 1;
        let victims = fwd.live();
        events.say(format_args!(
            "kill #{}: {kind:?} of carriers {:?}",
            kills.values().sum::<u64>(),
            victims.iter().map(|c| c.n).collect::<Vec<_>>()
        ));
        last_kill = Instant::now();
        last_kind = Some(kind);
        match kind {
            Kill::Close => kill(&victims, false),
            Kill::Reset => kill(&victims, true),
            Kill::MidRecord => {
                let d = rng.range(0, 1) as usize;
                let extra = rng.range(1, 256 << 10);
                for c in &victims {
                    let at = c.forwarded[d].load(Ordering::Relaxed) + extra;
                    c.limit[d].store(at, Ordering::Relaxed);
                }
                // Data moves both ways all the time; should that direction
                // fall silent, close after a second anyway.
                if !ended(&victims, Duration::from_secs(1)).await {
                    kill(&victims, false);
                }
            }
            Kill::Rekey => {
                let d = rng.range(0, 1) as usize;
                let r = rng.range(1, u64::MAX - 1);
                for c in &victims {
                    c.rekey_cut[d].store(r, Ordering::Relaxed);
                }
                // Rekeys come every 100 ms; should none come, close.
                if !ended(&victims, Duration::from_secs(2)).await {
                    kill(&victims, false);
                }
            }
            Kill::Handshake => {
                let d = rng.range(0, 1) as usize;
                let at = rng.range(1, 400);
                *fwd.shared.cut_next.lock().expect("lock") = Some((d, at));
                kill(&victims, false);
            }
            Kill::Outage => {
                fwd.stop_listening().await;
                kill(&victims, false);
                let down = rng.range(100, 1500);
                tokio::time::sleep(Duration::from_millis(down)).await;
                fwd.listen();
                events.say(format_args!("listener open again after {down} ms"));
            }
        }
        assert!(
            ended(&victims, Duration::from_secs(5)).await,
            "the forwarder could not end its carriers"
        );
    }
    let chaos = start.elapsed();
    progress.abort();
    events.say(format_args!("chaos over; writers finish"));

    // Finish: every writer half-closes; every echo comes back to EOF.
    let _ = stop_tx.send(true);
    let mut results = Vec::new();
    for (id, t) in tasks.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stream {id} did not finish within 60 s of the end; logs in {}",
                    dir.path().display()
                )
            })
            .expect("client task");
        results.push(r);
    }
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} of {STREAMS} connections failed (kills: {kills:?}; logs in {}):\n{}",
        errors.len(),
        dir.path().display(),
        errors
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The echo server records a stream once its connection ended.
    let t = Instant::now();
    while seen.lock().expect("lock").len() < STREAMS && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    let (mut sent_total, mut back_total) = (0u64, 0u64);
    for (id, r) in results.iter().enumerate() {
        let r = r.as_ref().expect("checked above");
        let s = seen
            .get(&(id as u64))
            .unwrap_or_else(|| panic!("stream {id} never ended at the echo server"));
        assert_eq!(s.error, None, "stream {id}");
        assert_eq!(
            (s.bytes, s.sha.as_str()),
            (r.sent, r.sent_sha.as_str()),
            "stream {id}: what the echo server got (bytes, SHA-256) differs from what was sent"
        );
        assert_eq!(
            (r.received, r.received_sha.as_str()),
            (r.sent, r.sent_sha.as_str()),
            "stream {id}: what came back (bytes, SHA-256) differs from what was sent"
        );
        sent_total += r.sent;
        back_total += r.received;
    }
    assert_eq!(seen.len(), STREAMS, "the echo server saw other streams");
    assert_eq!(echo_accepted.load(Ordering::Relaxed), STREAMS as u64);

    // The processes, the session and its counters.
    server.assert_running();
    client.assert_running();
    let (cs, ss) = (
        one_session("tcp2pool", &client_ctl),
        one_session("pool2tcp", &server_ctl),
    );
    let (cst, sst) = (ctl("status", &client_ctl), ctl("status", &server_ctl));
    assert_eq!(cs["id"], id0, "tcp2pool's session was replaced");
    assert_eq!(ss["id"], id0, "pool2tcp holds another session");
    assert_eq!(
        cst["counters"]["sessions_dialled"], 1,
        "tcp2pool dialled more than one session: {cst}"
    );
    assert_eq!(
        sst["counters"]["sessions_accepted"], 1,
        "pool2tcp accepted more than one session: {sst}"
    );
    for (who, st) in [("tcp2pool", &cst), ("pool2tcp", &sst)] {
        assert_eq!(st["counters"]["bridge_errors"], 0, "{who}: {st}");
        assert_eq!(
            st["counters"]["bridge_connections"], STREAMS as u64,
            "{who}: {st}"
        );
    }
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let killed: u64 = kills.values().sum();
    let (c_resumes, s_resumes) = (n(&cs, "resumes"), n(&ss, "resumes"));
    let (c_epoch, s_epoch) = (n(&cs, "epoch"), n(&ss, "epoch"));
    let mut all: Vec<Duration> = recoveries.values().flatten().copied().collect();
    all.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let by_kind: Vec<String> = Kill::ALL
        .iter()
        .map(|k| {
            let slowest = recoveries.get(k).and_then(|r| r.iter().max());
            format!(
                "{k:?} {} (slowest {:.0} ms)",
                kills.get(k).copied().unwrap_or(0),
                ms(slowest)
            )
        })
        .collect();
    println!(
        "chaos: {:.1} s (seed {seed}), {STREAMS} streams intact, kills {killed} ({}), \
         carriers {} ({} cut at a byte count), resumes {c_resumes}/{s_resumes} (tcp2pool/pool2tcp), \
         epoch {c_epoch}/{s_epoch} (≈ {} rekeys), {:.0} MiB sent and {:.0} MiB echoed back, \
         data moving again after a kill in {:.0} ms median, {:.0} ms at most; \
         drain {:.1} s",
        chaos.as_secs_f64(),
        by_kind.join(", "),
        fwd.shared.accepted.load(Ordering::Relaxed),
        fwd.shared.cuts.load(Ordering::Relaxed),
        c_epoch.saturating_sub(c_resumes),
        mib(sent_total),
        mib(back_total),
        ms(all.get(all.len() / 2)),
        ms(all.last()),
        (start.elapsed() - chaos).as_secs_f64(),
    );
    assert!(
        killed >= (secs / 6).max(2),
        "only {killed} kills in {secs} s"
    );
    assert!(
        c_resumes >= killed && s_resumes >= killed,
        "{killed} kills but only {c_resumes}/{s_resumes} resumes"
    );
    // Nominally 10 rekeys a second; a third of that is the floor.
    let rekeys = c_epoch.saturating_sub(c_resumes);
    assert!(
        rekeys >= secs * 10 / 3,
        "epoch {c_epoch} after {c_resumes} resumes in {secs} s: too few rekeys"
    );
    assert!(sent_total > 0 && back_total == sent_total);
}
