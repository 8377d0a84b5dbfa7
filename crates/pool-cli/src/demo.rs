//! `pool demo`: POOL's promise on one machine, with nothing else installed.
//!
//! Two nodes with fresh keys; the client reaches the listener through a
//! small TCP relay in this process, which the demo kills in the middle of a
//! transfer and starts again. The session resumes by itself; the demo
//! checks that every byte arrived once (SHA-256) and prints both sides'
//! counters.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, SecretKey, Trust};
use ring::digest::{Context, SHA256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cmd::CliError;

fn fresh_key() -> SecretKey {
    let mut b = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    SecretKey::from_bytes(b)
}

/// A TCP forwarder that can be killed (all its connections die with it).
struct Forwarder {
    task: JoinHandle<()>,
}

impl Forwarder {
    async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Forwarder> {
        let l = TcpListener::bind(listen).await?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut a, _)) = l.accept().await {
                conns.spawn(async move {
                    if let Ok(mut b) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        });
        Ok(Forwarder { task })
    }
    fn kill(self) {
        // Aborting the task drops the listener and the JoinSet, which
        // aborts every connection: both carriers see a reset.
        self.task.abort();
    }
}

pub(crate) async fn demo(megabytes: u64) -> Result<(), CliError> {
    let total = megabytes << 20;
    let server_key = fresh_key();
    let client_key = fresh_key();
    println!(
        "POOL demo: two nodes on this machine, one session, a carrier that dies mid-transfer.\n"
    );
    println!("  listener key  {}", server_key.public_key());
    println!("  client key    {}", client_key.public_key());

    let server = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(server_key).trust(Trust::new().allow(client_key.public_key())),
    )
    .await?;
    let server_addr = server
        .local_addr()
        .ok_or_else(|| CliError::msg("listener has no address"))?;
    // Find a free port for the relay, then run it there.
    let relay_addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let relay = Forwarder::start(relay_addr, server_addr).await?;
    println!("  listener      {server_addr}");
    println!("  TCP relay     {relay_addr} -> {server_addr} (killed at 40%)\n");

    let client = Endpoint::client(EndpointConfig::new(client_key));
    let relay_str = relay_addr.to_string();
    let (c, s) = tokio::join!(
        client.connect(&relay_str, server.public_key()),
        server.accept()
    );
    let c = c?;
    let s = s.ok_or_else(|| CliError::msg("listener stopped"))?;
    println!(
        "session {} up: Noise IK, {}, {} MiB to send",
        c.id(),
        c.stats().core.cipher,
        megabytes
    );

    let receiver = tokio::spawn(async move {
        let mut st = s.accept_stream().await?;
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = st.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            got += n as u64;
        }
        st.shutdown().await.ok()?;
        Some((got, ctx.finish(), s))
    });

    let mut stream = c.open_stream().await?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0u64;
    let mut relay = Some(relay);
    let mut _restarted = None;
    let started = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while sent < total {
        let n = ((total - sent) as usize).min(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let b = seed.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        stream.write_all(&buf[..n]).await?;
        ctx.update(&buf[..n]);
        sent += n as u64;
        if sent >= total * 2 / 5 {
            if let Some(r) = relay.take() {
                r.kill();
                println!(
                    "  ... relay killed after {} MiB: the carrier is gone",
                    sent >> 20
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
                _restarted = Some(Forwarder::start(relay_addr, server_addr).await?);
                println!("  ... relay back after 300 ms: the session resumes by itself");
            }
        }
    }
    stream.shutdown().await?;
    let mut sink = Vec::new();
    stream.read_to_end(&mut sink).await?;
    let (got, hash, s) = receiver
        .await
        .ok()
        .flatten()
        .ok_or_else(|| CliError::msg("receiver failed"))?;
    let elapsed = started.elapsed();
    let sent_hash = ctx.finish();
    let same = sent_hash.as_ref() == hash.as_ref() && got == sent;
    println!(
        "\n{} MiB sent, {} MiB received in {:.2} s; SHA-256 {}",
        sent >> 20,
        got >> 20,
        elapsed.as_secs_f64(),
        if same {
            "identical: nothing lost, nothing duplicated"
        } else {
            "DIFFERENT"
        }
    );
    let cs = c.stats().core;
    let ss = s.stats().core;
    println!("\n{:<24}{:>16}{:>16}", "", "client", "listener");
    let row = |name: &str, a: String, b: String| println!("{name:<24}{a:>16}{b:>16}");
    row(
        "carrier resumes",
        cs.resumes.to_string(),
        ss.resumes.to_string(),
    );
    row("key epoch", cs.epoch.to_string(), ss.epoch.to_string());
    row(
        "frames resent",
        cs.frames_resent.to_string(),
        ss.frames_resent.to_string(),
    );
    row(
        "duplicates dropped",
        cs.duplicates_dropped.to_string(),
        ss.duplicates_dropped.to_string(),
    );
    row(
        "records sent",
        cs.records_sent.to_string(),
        ss.records_sent.to_string(),
    );
    row(
        "bytes on the wire out",
        cs.bytes_sent.to_string(),
        ss.bytes_sent.to_string(),
    );
    let rtt = |r: Option<Duration>| {
        r.map_or("-".to_string(), |d| {
            format!("{:.0} µs", d.as_secs_f64() * 1e6)
        })
    };
    row("RTT", rtt(cs.rtt), rtt(ss.rtt));
    c.close("demo done").await;
    if !same {
        return Err(CliError::msg(
            "the data differed: this is a bug, please report it",
        ));
    }
    println!("\nNext: `pool keygen`, `pool listen` and `pool connect` between two machines (see README).");
    Ok(())
}
