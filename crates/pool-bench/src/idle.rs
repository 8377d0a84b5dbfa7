//! `pool-bench idle-memory`: listener memory per idle session, with the
//! clients in a child process (`pool-bench idle-clients`) so that only the
//! server side counts.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pool_net::{Session, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::common::{self, Opts, Result};

/// Concurrent connecting workers in the client process (one key each).
const WORKERS: usize = 16;
/// What each session's stream carries: a few bytes.
const HELLO: &[u8; 16] = b"idle-session-hi!";

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--sessions"])?;
    let n: usize = o.num("--sessions", 1000)?;
    if n == 0 {
        return Err("--sessions must be positive".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(server(n))
}

async fn server(n: usize) -> Result<()> {
    let ep = common::listener(common::protocol(None), WORKERS).await?;
    let addr = common::addr_of(&ep)?;
    // Let the runtime and the allocator settle, then take the baseline.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = common::rss_kib()?;

    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("idle-clients")
        .arg(&addr)
        .arg(ep.public_key().to_token())
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let child_out = child.stdout.take().ok_or("no child stdout")?;
    // The child's report line, read on a plain thread.
    let (line_tx, mut line_rx) = mpsc::channel::<String>(1);
    std::thread::spawn(move || {
        let mut r = BufReader::new(child_out);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.starts_with("READY") => {
                    let _ = line_tx.blocking_send(line.trim().to_string());
                }
                Ok(_) => print!("  client: {line}"),
            }
        }
    });

    // Accept N sessions; each one's first stream must deliver HELLO.
    let start = Instant::now();
    let (done_tx, mut done_rx) = mpsc::channel::<Result<(Session, Stream)>>(64);
    let accept = async {
        for _ in 0..n {
            let Some(s) = ep.accept().await else { break };
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let r = async {
                    let mut st = s.accept_stream().await.ok_or("session closed")?;
                    let mut buf = [0u8; HELLO.len()];
                    st.read_exact(&mut buf).await?;
                    if &buf != HELLO {
                        return Err("wrong bytes on an idle stream".into());
                    }
                    Ok((s, st))
                }
                .await;
                let _ = tx.send(r).await;
            });
        }
    };
    let mut held = Vec::with_capacity(n);
    let collect = async {
        while held.len() < n {
            match done_rx.recv().await {
                Some(Ok(pair)) => held.push(pair),
                Some(Err(e)) => return Err(e),
                None => return Err("accept loop ended".into()),
            }
        }
        Ok::<_, common::Error>(())
    };
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        let (_, r) = tokio::join!(accept, collect);
        r
    })
    .await;
    match waited {
        Ok(r) => r?,
        Err(_) => {
            let _ = child.kill();
            return Err(format!("only {} of {n} sessions within 60 s", held.len()).into());
        }
    }
    let setup = start.elapsed();
    let report = tokio::time::timeout(Duration::from_secs(30), line_rx.recv())
        .await
        .ok()
        .flatten()
        .ok_or("the client process did not report")?;
    // Both sides are set up; give in-flight acks a moment, then measure.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = common::rss_kib()?;
    let live = ep.session_count();

    // Release the clients: closing their stdin ends the child.
    drop(child.stdin.take());
    let status = child.wait()?;
    drop(held);

    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let client_per = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("per_session_kib="))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    println!(
        "idle-memory: listener process RSS {before} KiB -> {after} KiB with {n} idle sessions \
         ({live} in the registry), each with one open stream that carried {} bytes: \
         {per:.1} KiB per session (server side only; clients in a child process; set up in {:.2} s)",
        HELLO.len(),
        setup.as_secs_f64()
    );
    println!("  client process: {client_per:.1} KiB per session ({report}); child {status}");
    common::result("idle_client_kib_per_session", client_per, "KiB");
    common::result("idle_kib_per_session", per, "KiB");
    Ok(())
}

/// `pool-bench idle-clients ADDR KEY N`: connects N sessions, opens one
/// stream on each and writes a few bytes, prints one `READY` line with its
/// RSS, then holds everything until stdin closes.
pub(crate) fn clients(args: &[String]) -> Result<()> {
    let [addr, key, n] = args else {
        return Err("usage: pool-bench idle-clients ADDR KEY N".into());
    };
    let server_pk = common::parse_key(key)?;
    let n: usize = n.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = common::rss_kib()?;
        let mut tasks = Vec::new();
        for w in 0..WORKERS.min(n) {
            let ep = common::client(common::protocol(None), w);
            let addr = addr.clone();
            // Worker w connects sessions w, w + WORKERS, ... one at a time
            // (one key each: handshake timestamps per key must increase).
            let count = (n - w).div_ceil(WORKERS);
            tasks.push(tokio::spawn(async move {
                let mut held = Vec::with_capacity(count);
                for _ in 0..count {
                    let s = ep.connect(&addr, server_pk).await?;
                    let mut st = s.open_stream().await?;
                    st.write_all(HELLO).await?;
                    held.push((s, st));
                }
                Ok::<_, common::Error>((ep, held))
            }));
        }
        let mut held = Vec::new();
        for t in tasks {
            held.push(t.await??);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = common::rss_kib()?;
        println!(
            "READY sessions={n} rss_before_kib={before} rss_after_kib={after} per_session_kib={:.1}",
            after.saturating_sub(before) as f64 / n as f64
        );
        // Hold until the parent closes our stdin.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let _ = tx.send(());
        });
        let _ = rx.await;
        drop(held);
        Ok(())
    })
}
