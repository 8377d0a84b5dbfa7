//! `pool demo`: POOL's first job on one machine, with nothing else
//! installed. A small HTTP server, both bridge ends (`pool2tcp` in front of
//! the server, `tcp2pool` in front of the client), and a client that fetches
//! through them. Between the two bridge ends runs a TCP relay that the demo
//! kills mid-download and starts again: the session resumes by itself and
//! the download is checked by SHA-256. Then it prints the session table,
//! the metrics address and the journal check.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use pool_net::SecretKey;
use pool_node::config::{Config, NodeSection, Pool2TcpSection, Tcp2PoolSection, TrustSection};
use pool_node::daemon;
use ring::digest::{Context, SHA256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cmd::CliError;

fn write_key(path: &Path) -> Result<SecretKey, CliError> {
    Ok(daemon::create_key_file(path)?)
}

/// Deterministic body bytes, so client and server agree without storing them.
fn body_chunk(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *b = (x >> 29) as u8;
    }
}

/// A tiny HTTP/1.1 server: `/` says hello, `/big` sends `size` bytes.
async fn http_server(size: u64) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let big = head.starts_with(b"GET /big ");
                let body_len = if big { size } else { 31 };
                let hdr = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(hdr.as_bytes()).await.is_err() {
                    return;
                }
                if !big {
                    let _ = s.write_all(b"hello from behind POOL bridges\n").await;
                    return;
                }
                let mut buf = vec![0u8; 256 << 10];
                let mut off = 0;
                while off < size {
                    let n = ((size - off) as usize).min(buf.len());
                    body_chunk(off, &mut buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    off += n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

/// A TCP relay that can be killed (its connections die with it).
async fn relay(listen: SocketAddr, target: SocketAddr) -> std::io::Result<JoinHandle<()>> {
    let l = TcpListener::bind(listen).await?;
    Ok(tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut a, _)) = l.accept().await {
            conns.spawn(async move {
                if let Ok(mut b) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    }))
}

/// GET `path` through `addr`; returns the body's length and SHA-256, and
/// calls `progress(bytes)` as the body arrives.
async fn get(
    addr: SocketAddr,
    path: &str,
    mut progress: impl FnMut(u64),
) -> Result<(u64, Vec<u8>, Vec<u8>), CliError> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut body_at = None;
    let mut ctx = Context::new(&SHA256);
    let mut body = 0u64;
    let mut first = Vec::new();
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let chunk = match body_at {
            Some(_) => &buf[..n],
            None => {
                raw.extend_from_slice(&buf[..n]);
                match raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(p) => {
                        body_at = Some(p + 4);
                        let rest = raw[p + 4..].to_vec();
                        ctx.update(&rest);
                        body += rest.len() as u64;
                        first.extend_from_slice(&rest[..rest.len().min(64)]);
                        progress(body);
                        continue;
                    }
                    None => continue,
                }
            }
        };
        ctx.update(chunk);
        if first.len() < 64 {
            let k = (64 - first.len()).min(chunk.len());
            first.extend_from_slice(&chunk[..k]);
        }
        body += n as u64;
        progress(body);
    }
    Ok((body, ctx.finish().as_ref().to_vec(), first))
}

pub(crate) async fn demo(megabytes: u64, keep: bool) -> Result<(), CliError> {
    let size = megabytes << 20;
    let dir = std::env::temp_dir().join(format!("pool-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let server_key = write_key(&dir.join("server.key"))?;
    let client_key = write_key(&dir.join("client.key"))?;
    println!("POOL demo — an HTTP server and its client, unchanged, talking through a POOL bridge pair.\n");

    let (http, _http_task) = http_server(size).await?;
    let server_cfg = Config {
        node: NodeSection {
            key: dir.join("server.key"),
            listen: "127.0.0.1:0".into(),
            control: Some(dir.join("server.sock")),
            metrics: Some("127.0.0.1:0".into()),
            journal: Some(dir.join("server-journal.log")),
            drain_timeout_secs: 2,
            ..NodeSection::default()
        },
        trust: TrustSection {
            allow: vec![client_key.public_key()],
            ..TrustSection::default()
        },
        tcp2pool: Vec::new(),
        pool2tcp: vec![Pool2TcpSection {
            service: String::new(),
            target: http.to_string(),
            proxy_protocol: false,
            allow: Vec::new(),
            max_connections: 64,
            connect_timeout_secs: 5,
            idle_timeout_secs: 60,
        }],
        ..Config::default()
    };
    let server = daemon::start(None, server_cfg, "").await?;
    let server_status = server.status();
    let pool_addr: SocketAddr = server_status["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| CliError::msg("server node has no listener"))?;
    let relay_addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut relay_task = Some(relay(relay_addr, pool_addr).await?);

    let client_cfg = Config {
        node: NodeSection {
            key: dir.join("client.key"),
            listen: String::new(),
            control: Some(dir.join("client.sock")),
            metrics: None,
            journal: None,
            drain_timeout_secs: 2,
            ..NodeSection::default()
        },
        trust: TrustSection::default(),
        tcp2pool: vec![Tcp2PoolSection {
            name: "web".into(),
            listen: "127.0.0.1:0".into(),
            peer: relay_addr.to_string(),
            peer_key: server_key.public_key(),
            service: String::new(),
            max_connections: 64,
            connect_timeout_secs: 5,
            idle_timeout_secs: 60,
            director: false,
        }],
        pool2tcp: Vec::new(),
        ..Config::default()
    };
    let client = daemon::start(None, client_cfg, "").await?;
    let front: SocketAddr = client
        .bridge_addrs()
        .get("web")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| CliError::msg("tcp2pool bridge did not start"))?;
    let metrics = server_status["metrics"].as_str().unwrap_or("-").to_string();

    println!("  HTTP server         http://{http}/");
    println!(
        "  pool2tcp (server)   POOL on {pool_addr}, key {}",
        server_key.public_key()
    );
    println!("  TCP relay           {relay_addr} -> {pool_addr}   (the carrier the demo will cut)");
    println!(
        "  tcp2pool (client)   http://{front}/ -> POOL peer {relay_addr}, key {}",
        client_key.public_key()
    );
    println!();

    let (_, _, hello) = get(front, "/", |_| {}).await?;
    println!(
        "GET http://{front}/  ->  {}",
        String::from_utf8_lossy(&hello).trim()
    );

    let started = Instant::now();
    let mut expected = Context::new(&SHA256);
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        body_chunk(off, &mut buf[..n]);
        expected.update(&buf[..n]);
        off += n as u64;
    }
    let expected = expected.finish().as_ref().to_vec();
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::channel::<()>(1);
    let cut_at = size * 2 / 5;
    let mut signalled = false;
    let fetch = get(front, "/big", |got| {
        if !signalled && got >= cut_at {
            signalled = true;
            let _ = kill_tx.try_send(());
        }
    });
    tokio::pin!(fetch);
    let result = loop {
        tokio::select! {
            r = &mut fetch => break r?,
            Some(()) = kill_rx.recv() => {
                if let Some(t) = relay_task.take() {
                    t.abort();
                    println!("  ... {} MiB in: relay killed, the TCP carrier under the session is gone", cut_at >> 20);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    relay_task = Some(relay(relay_addr, pool_addr).await?);
                    println!("  ... relay back 300 ms later: the session resumes on a new carrier");
                }
            }
        }
    };
    let (got, hash, _) = result;
    let same = got == size && hash == expected;
    println!(
        "GET http://{front}/big ->  {} MiB in {:.2} s, SHA-256 {}",
        got >> 20,
        started.elapsed().as_secs_f64(),
        if same {
            "matches: nothing lost, nothing duplicated"
        } else {
            "DIFFERS"
        }
    );
    println!("\nSessions on the server node (pool ctl sessions):\n");
    let sock = dir.join("server.sock");
    tokio::task::spawn_blocking(move || {
        crate::node::ctl_sessions(
            &crate::ctl::Target {
                control: Some(sock),
                ..Default::default()
            },
            false,
        )
    })
    .await
    .map_err(|e| CliError::msg(e.to_string()))??;
    println!(
        "\nMetrics:  curl http://{metrics}/metrics      Health:  curl http://{metrics}/health"
    );
    let jpath = dir.join("server-journal.log");
    let report = tokio::task::spawn_blocking(move || pool_journal::verify(&jpath))
        .await
        .map_err(|e| CliError::msg(e.to_string()))?;
    if let Ok(r) = report {
        println!(
            "Journal:  {} ({} entries, chain {})",
            dir.join("server-journal.log").display(),
            r.entries,
            if r.problems.is_empty() {
                "intact"
            } else {
                "BROKEN"
            }
        );
    }
    if keep {
        println!(
            "\nStill running (Ctrl-C to stop). Try:\n  curl http://{front}/\n  pool ctl sessions --control {}\n  pool ctl status --control {}",
            dir.join("server.sock").display(),
            dir.join("client.sock").display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(client);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    if !same {
        return Err(CliError::msg(
            "the download differed: this is a bug, please report it",
        ));
    }
    println!("\nNext: the same on two machines with `pool bridge pool2tcp` and `pool bridge tcp2pool` (README).");
    Ok(())
}
