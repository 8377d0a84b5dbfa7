//! `pool-bench director`: the director's figures, with real `pool director`
//! and `pool daemon` processes (the `pool` binary beside this one) and the
//! clients in this process.
//!
//! 1. Drain: `--sessions` sessions are placed on one worker (`--busy` of
//!    them with a stream the worker's TCP target writes a 1 KiB chunk to
//!    every millisecond); two more workers join; `pool director drain`
//!    empties the first. Reports the time until every session is on
//!    another worker (seen by the clients) and the largest gap between two
//!    chunks any busy stream saw, every chunk checked by index.
//! 2. Crash: `--crash-clients` placed sessions on a worker that gets
//!    `kill -9`; each client watches its session as `tcp2pool --director`
//!    does. Reports the time from the kill until each has an echo back
//!    through a session on another worker, against the lease.
//! 3. Placement: the time to a first echoed byte for a new client through
//!    the director against dialling the worker directly, both behind
//!    forwarders that add `--rtt-ms` of round trip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, PublicKey, Session};
use pool_node::bridge::Preamble;
use pool_node::director::{control_request, DirectorRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{median_max, ms, protocol, result_with, Opts, Result};
use crate::handoff::delaying_forwarder;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(
        args,
        &[
            "--sessions",
            "--busy",
            "--crash-clients",
            "--rtt-ms",
            "--rounds",
            "--lease",
            "--parallel",
        ],
    )?;
    let p = Params {
        sessions: o.num("--sessions", 1000)?,
        busy: o.num("--busy", 20)?,
        crash_clients: o.num("--crash-clients", 20)?,
        rtt: Duration::from_millis(o.num("--rtt-ms", 20)?),
        rounds: o.num("--rounds", 20)?,
        lease: Duration::from_millis(o.num("--lease", 3000)?),
        parallel: o.num("--parallel", 4)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(p))
}

struct Params {
    sessions: usize,
    busy: usize,
    crash_clients: usize,
    rtt: Duration,
    rounds: usize,
    lease: Duration,
    parallel: usize,
}

/// A child process killed when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pool_bin() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("pool");
    if !p.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release -p pool-cli)",
            p.display()
        )
        .into());
    }
    Ok(p)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Fleet {
    dir: PathBuf,
    pool: PathBuf,
    client: pool_net::SecretKey,
    director_key: PublicKey,
    director_addr: String,
    control: PathBuf,
    kids: Vec<Kid>,
    parallel: usize,
}

fn keygen(pool: &Path, path: &Path) -> Result<PublicKey> {
    let out = Command::new(pool)
        .arg("keygen")
        .arg("--out")
        .arg(path)
        .output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string().into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn log_to(dir: &Path, name: &str) -> Result<(Stdio, Stdio)> {
    let f = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

async fn wait_port(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

impl Fleet {
    /// A director for workers `names` (their keys made here).
    async fn new(
        tag: &str,
        names: &[&str],
        lease: Duration,
        parallel: usize,
    ) -> Result<(Fleet, Vec<PublicKey>)> {
        let dir = std::env::temp_dir().join(format!("pool-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pool = pool_bin()?;
        let mut workers = Vec::new();
        for n in names {
            workers.push(keygen(&pool, &dir.join(format!("{n}.key")))?);
        }
        let client = crate::common::client_key(7);
        let director_key = keygen(&pool, &dir.join("director.key"))?;
        let director_addr = format!("127.0.0.1:{}", free_port()?);
        let control = dir.join("director.sock");
        let mut cmd = Command::new(&pool);
        cmd.arg("director")
            .args(["--listen", &director_addr, "--no-rebalance"])
            .arg("--key")
            .arg(dir.join("director.key"))
            .arg("--control")
            .arg(&control)
            .arg("--state")
            .arg(dir.join("state.json"))
            .args(["--lease", &format!("{}ms", lease.as_millis())])
            .args(["--allow", &client.public_key().to_string()]);
        for w in &workers {
            cmd.args(["--worker", &w.to_string()]);
        }
        let (o, e) = log_to(&dir, "director")?;
        let kid = Kid(cmd.stdout(o).stderr(e).spawn()?);
        wait_port(&director_addr).await?;
        let f = Fleet {
            dir,
            pool,
            client,
            director_key,
            director_addr,
            control,
            kids: vec![kid],
            parallel,
        };
        Ok((f, workers))
    }

    /// Starts worker `name` (on `port`, or a free one), advertising
    /// `advertise` (or its listener).
    async fn worker(
        &self,
        name: &str,
        peers: &[PublicKey],
        target: &str,
        port: Option<u16>,
        advertise: Option<&str>,
    ) -> Result<Child> {
        let listen = format!("127.0.0.1:{}", port.map_or_else(free_port, Ok)?);
        let q = |v: &[String]| {
            v.iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let peers: Vec<String> = peers.iter().map(|k| k.to_string()).collect();
        let mut trusted = peers.clone();
        trusted.push(self.client.public_key().to_string());
        let advertise = advertise.unwrap_or(&listen);
        let text = format!(
            "[node]\nkey = \"{}\"\nlisten = \"{listen}\"\ncontrol = \"{}\"\njournal = \"{}\"\n\n\
             [trust]\nallow = [{}]\n\n[[pool2tcp]]\ntarget = \"{target}\"\nmax_connections = 4096\n\n\
             [handoff]\npeers = [{}]\n\n\
             [director]\naddress = \"{}\"\nkey = \"{}\"\nadvertise = [\"{advertise}\"]\nparallel = {}\n",
            self.dir.join(format!("{name}.key")).display(),
            self.dir.join(format!("{name}.sock")).display(),
            self.dir.join(format!("{name}.journal")).display(),
            q(&trusted),
            q(&peers),
            self.director_addr,
            self.director_key,
            self.parallel,
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        let (o, e) = log_to(&self.dir, name)?;
        let kid = Command::new(&self.pool)
            .arg("daemon")
            .arg("--config")
            .arg(&path)
            .stdout(o)
            .stderr(e)
            .spawn()?;
        wait_port(&listen).await?;
        Ok(kid)
    }

    async fn ask(&self, req: &DirectorRequest) -> Result<serde_json::Value> {
        Ok(control_request(&self.control, req).await?)
    }

    /// Waits until `n` workers are active and connected.
    async fn wait_active(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.ask(&DirectorRequest::Workers).await?;
            let k = v["workers"].as_array().map_or(0, |a| {
                a.iter()
                    .filter(|w| w["state"] == "active" && w["connected"] == true)
                    .count()
            });
            if k == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{k} of {n} workers active: {v}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::client(EndpointConfig::new(self.client.clone()).protocol(protocol(None)))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kids.clear();
        if std::env::var_os("POOL_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The workers' TCP target: a first byte `B` asks for a 1 KiB chunk every
/// millisecond (its index in the first 8 bytes) until the peer closes;
/// anything else is echoed.
async fn serve_target() -> Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                if first[0] == b'B' {
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    let mut chunk = vec![0u8; 1024];
                    for n in 0u64.. {
                        tick.tick().await;
                        chunk[..8].copy_from_slice(&n.to_be_bytes());
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = s.write_all(&first).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    Ok(addr)
}

/// A stream to the worker's default target.
async fn open(session: &Session) -> Result<pool_net::Stream> {
    let mut st = session.open_stream().await?;
    let any: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let pre = Preamble {
        source: any,
        destination: any,
        service: String::new(),
    };
    st.write_all(&pre.encode()).await?;
    Ok(st)
}

/// One echoed byte through `session`.
async fn echo(session: &Session) -> Result<()> {
    let mut st = open(session).await?;
    st.write_all(b"e").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), st.read_exact(&mut b)).await??;
    Ok(())
}

async fn placed(ep: &Endpoint, director: &str, key: PublicKey) -> Result<Session> {
    let mut tries = 0;
    loop {
        match pool_director::client::connect(ep, director, key).await {
            Ok((s, _)) => return Ok(s),
            // Handshakes from one address are rate-limited at the
            // director and the worker (every client here is 127.0.0.1).
            Err(_) if tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn bench(p: Params) -> Result<()> {
    drain(&p).await?;
    crash(&p).await?;
    placement(&p).await
}

async fn drain(p: &Params) -> Result<()> {
    let (mut f, keys) =
        Fleet::new("director-drain", &["w0", "w1", "w2"], p.lease, p.parallel).await?;
    let target = serve_target().await?;
    let peers = |i: usize| -> Vec<PublicKey> {
        keys.iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, k)| *k)
            .collect()
    };
    let w0 = f.worker("w0", &peers(0), &target, None, None).await?;
    f.kids.push(Kid(w0));
    f.wait_active(1).await?;
    let ep = f.endpoint();
    let placing = Instant::now();
    // The busy clients run on a thread and runtime of their own, as if
    // on another machine: the idle clients' resumes (all in this process
    // here, one per machine in a fleet) do not delay their reads.
    let window = Arc::new(AtomicU64::new(0));
    let busy_left = Arc::new(AtomicU64::new(p.busy as u64));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let busy = {
        let (addr, dkey, ckey) = (f.director_addr.clone(), f.director_key, f.client.clone());
        let (window, left, n, from) = (window.clone(), busy_left.clone(), p.busy, keys[0]);
        std::thread::spawn(move || -> std::result::Result<BusyReport, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(busy_clients(
                addr, dkey, ckey, n, from, window, left, ready_tx,
            ))
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the busy clients did not start")??;
    let mut sessions = Vec::with_capacity(p.sessions);
    for _ in p.busy..p.sessions {
        sessions.push(placed(&ep, &f.director_addr, f.director_key).await?);
    }
    let placing = placing.elapsed();
    for (i, n) in ["w1", "w2"].iter().enumerate() {
        let w = f.worker(n, &peers(i + 1), &target, None, None).await?;
        f.kids.push(Kid(w));
    }
    f.wait_active(3).await?;
    // The baseline: as long as the drain will take, with no drain.
    window.store(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    window.store(2, Ordering::Relaxed);
    let started = Instant::now();
    f.ask(&DirectorRequest::Drain {
        worker: keys[0].to_string(),
    })
    .await?;
    let took = loop {
        let left = sessions.iter().filter(|s| s.peer_key() == keys[0]).count()
            + busy_left.load(Ordering::Relaxed) as usize;
        if left == 0 {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("{left} sessions still on w0 after 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    window.store(3, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    window.store(4, Ordering::Relaxed);
    let on1 = sessions.iter().filter(|s| s.peer_key() == keys[1]).count();
    let on2 = sessions.iter().filter(|s| s.peer_key() == keys[2]).count();
    let BusyReport {
        chunks,
        mut base,
        mut during,
        mut after,
    } = busy.join().map_err(|_| "the busy clients panicked")??;
    let p99 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let (bmax, dmax) = (
        base.iter().copied().fold(0.0, f64::max),
        during.iter().copied().fold(0.0, f64::max),
    );
    let (b99, d99, a99) = (p99(&mut base), p99(&mut during), p99(&mut after));
    println!(
        "director drain: {} sessions ({} busy) placed in {:.2} s; `pool director drain` ([director] parallel = {}) emptied the worker in {:.2} s ({on1} idle ones to w1, {on2} to w2)",
        p.sessions,
        p.busy,
        placing.as_secs_f64(),
        p.parallel,
        took.as_secs_f64(),
    );
    println!(
        "  largest chunk gap per busy stream (1 KiB every ms): during the drain p99 {d99:.2} ms, max {dmax:.2} ms; same load before the drain p99 {b99:.2} ms, max {bmax:.2} ms; after it (streams forwarded) p99 {a99:.2} ms (goal < 10 ms: ratio {:.2})",
        d99 / 10.0
    );
    println!("  {chunks} chunks of the busy streams checked by index: 0 lost, 0 repeated");
    let st = f.ask(&DirectorRequest::Status).await?;
    println!(
        "  director: {} sessions moved by {} orders' handoffs, {} handoffs failed (retried)",
        st["sessions_moved"], st["drains"], st["moves_failed"]
    );
    result_with(
        "director_drain_seconds",
        took.as_secs_f64(),
        "s",
        &format!("sessions={}", p.sessions),
    );
    result_with(
        "director_drain_stall_p99_ms",
        d99,
        "ms",
        &format!("goal=10 baseline={b99:.2}"),
    );
    result_with(
        "director_drain_stall_max_ms",
        dmax,
        "ms",
        &format!("baseline={bmax:.2}"),
    );
    Ok(())
}

async fn crash(p: &Params) -> Result<()> {
    let (mut f, keys) = Fleet::new("director-crash", &["w0", "w1"], p.lease, p.parallel).await?;
    let target = serve_target().await?;
    let mut w0 = Kid(f.worker("w0", &[keys[1]], &target, None, None).await?);
    f.wait_active(1).await?;
    let ep = f.endpoint();
    let mut sessions = Vec::new();
    for _ in 0..p.crash_clients {
        sessions.push(placed(&ep, &f.director_addr, f.director_key).await?);
    }
    let w1 = f.worker("w1", &[keys[0]], &target, None, None).await?;
    f.kids.push(Kid(w1));
    f.wait_active(2).await?;
    let killed = Instant::now();
    // SIGKILL, as `kill -9`.
    w0.0.kill()?;
    let mut tasks = Vec::new();
    for s in sessions {
        let (ep, addr, key) = (ep.clone(), f.director_addr.clone(), f.director_key);
        tasks.push(tokio::spawn(async move {
            let next = pool_director::client::watch(&ep, &addr, key, &s).await;
            let (next, _) = next.ok_or("the session closed by itself")?;
            s.close("worker lost").await;
            echo(&next).await?;
            Ok::<_, crate::common::Error>(killed.elapsed())
        }));
    }
    let mut t = Vec::new();
    for task in tasks {
        t.push(ms(
            tokio::time::timeout(Duration::from_secs(30), task).await???
        ));
    }
    let (med, max) = median_max(&mut t);
    let goal = ms(p.lease) + 1000.0;
    println!(
        "director crash: kill -9 of a worker with {} sessions: a working session elsewhere after median {med:.0} ms, max {max:.0} ms (lease {:.0} ms; goal lease + 1 s = {goal:.0} ms: ratio {:.2})",
        p.crash_clients,
        ms(p.lease),
        max / goal
    );
    result_with(
        "director_crash_recovery_ms",
        max,
        "ms",
        &format!("goal={goal:.0}"),
    );
    Ok(())
}

async fn placement(p: &Params) -> Result<()> {
    let (mut f, keys) = Fleet::new("director-place", &["w0"], p.lease, p.parallel).await?;
    let wkey = keys[0];
    let target = serve_target().await?;
    // The worker's port is chosen before it starts, so that it can
    // advertise the delaying forwarder in front of it.
    let wport = free_port()?;
    let wfwd = delaying_forwarder(format!("127.0.0.1:{wport}").parse()?, p.rtt / 2).await?;
    let dfwd = delaying_forwarder(f.director_addr.parse()?, p.rtt / 2).await?;
    let w = f
        .worker("w0", &[], &target, Some(wport), Some(&wfwd.to_string()))
        .await?;
    f.kids.push(Kid(w));
    f.wait_active(1).await?;
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for _ in 0..p.rounds {
        let ep = f.endpoint();
        let t = Instant::now();
        let s = ep.connect(&wfwd.to_string(), wkey).await?;
        echo(&s).await?;
        direct.push(ms(t.elapsed()));
        s.close("done").await;
        let ep = f.endpoint();
        let t = Instant::now();
        let (s, _) = pool_director::client::connect(&ep, &dfwd.to_string(), f.director_key).await?;
        echo(&s).await?;
        via.push(ms(t.elapsed()));
        s.close("done").await;
    }
    let (d, _) = median_max(&mut direct);
    let (v, _) = median_max(&mut via);
    let extra = v - d;
    let rtt = ms(p.rtt);
    // Dialling the worker is two round trips (handshake, echo): half of it
    // is one round trip as measured through these forwarders, whose timer
    // adds about a millisecond each way to the nominal RTT.
    let measured = d / 2.0;
    println!(
        "director placement, {rtt:.0} ms RTT: first echoed byte after {d:.1} ms dialling the worker, {v:.1} ms through the director (median of {}): {extra:.1} ms more = {:.2} measured round trips of {measured:.1} ms ({:.2} nominal RTT; goal <= 1 RTT)",
        p.rounds,
        extra / measured.max(1e-3),
        if rtt > 0.0 { extra / rtt } else { 0.0 }
    );
    result_with(
        "director_placement_extra_ms",
        extra,
        "ms",
        &format!("rtt_ms={rtt:.0}"),
    );
    Ok(())
}

/// What the busy clients saw: chunks checked, and per stream its largest
/// gap before, during and after the drain (ms).
struct BusyReport {
    chunks: u64,
    base: Vec<f64>,
    during: Vec<f64>,
    after: Vec<f64>,
}

/// The busy clients: `n` placed sessions each reading a paced stream,
/// every chunk checked by index. `window` says which gap is being kept (1
/// before, 2 during, 3 after the drain; 4 stops); `left` counts those still
/// on the worker `from`.
#[allow(clippy::too_many_arguments)]
async fn busy_clients(
    director: String,
    key: PublicKey,
    client: pool_net::SecretKey,
    n: usize,
    from: PublicKey,
    window: Arc<AtomicU64>,
    left: Arc<AtomicU64>,
    ready: std::sync::mpsc::Sender<std::result::Result<(), String>>,
) -> std::result::Result<BusyReport, String> {
    let ep = Endpoint::client(EndpointConfig::new(client).protocol(protocol(None)));
    let mut sessions = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let s = match placed(&ep, &director, key).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return Err(e.to_string());
            }
        };
        let mut st = open(&s).await.map_err(|e| e.to_string())?;
        st.write_all(b"B").await.map_err(|e| e.to_string())?;
        let window = window.clone();
        readers.push(tokio::spawn(async move {
            let mut chunk = vec![0u8; 1024];
            let mut want = 0u64;
            let mut last = Instant::now();
            let mut worst = [Duration::ZERO; 4];
            loop {
                let w = window.load(Ordering::Relaxed) as usize;
                if w >= 4 {
                    break;
                }
                if st.read_exact(&mut chunk).await.is_err() {
                    return Err("a busy stream ended".to_string());
                }
                let got = u64::from_be_bytes(chunk[..8].try_into().unwrap_or([0; 8]));
                if got != want {
                    return Err(format!("chunk {got} where {want} was due"));
                }
                want += 1;
                let now = Instant::now();
                worst[w] = worst[w].max(now.duration_since(last));
                last = now;
            }
            st.reset(0);
            Ok((want, worst[1], worst[2], worst[3]))
        }));
        sessions.push(s);
    }
    let _ = ready.send(Ok(()));
    while window.load(Ordering::Relaxed) < 4 {
        let on = sessions.iter().filter(|s| s.peer_key() == from).count();
        left.store(on as u64, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut r = BusyReport {
        chunks: 0,
        base: Vec::new(),
        during: Vec::new(),
        after: Vec::new(),
    };
    for t in readers {
        let (c, b, d, a) = t.await.map_err(|e| e.to_string())??;
        r.chunks += c;
        r.base.push(ms(b));
        r.during.push(ms(d));
        r.after.push(ms(a));
    }
    Ok(r)
}
