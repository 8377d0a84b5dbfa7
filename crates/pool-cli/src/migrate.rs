//! `pool migrate`: where every session runs now, and whether a direct path
//! to a peer works.

use std::path::Path;
use std::time::{Duration, Instant};

use pool_net::{Endpoint, EndpointConfig, PublicKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cmd::{err, load_key, parse_key, CliError, Result};

/// `pool migrate status`: every peer with its path, RTT and last change.
pub(crate) fn status(control: &Path, json: bool) -> Result<()> {
    let v = crate::ctl::local(control, &pool_node::control::Request::Sessions)?;
    let rows: Vec<pool_node::model::SessionRow> = serde_json::from_value(v)
        .map_err(|e| CliError(format!("bad answer from the daemon: {e}")))?;
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "peer": r.peer, "role": r.role, "path": r.path, "address": r.address, "relays": r.relays,
                    "rtt_ms": r.rtt_ms, "path_changes": r.path_changes,
                    "last_change_secs_ago": r.last_path_change_secs, "resumes": r.resumes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{:<45} {:<10} {:<7} {:<24} {:>9} {:>7} {:>12}  RELAYS",
        "PEER", "ROLE", "PATH", "VIA", "RTT", "CHANGES", "LAST CHANGE"
    );
    for r in &rows {
        println!(
            "{:<45} {:<10} {:<7} {:<24} {:>9} {:>7} {:>12}  {}",
            r.peer,
            r.role,
            r.path,
            r.address.as_deref().unwrap_or("-"),
            r.rtt_ms.map_or("-".into(), |m| format!("{m:.2}ms")),
            r.path_changes,
            r.last_path_change_secs
                .map_or("never".into(), |s| format!("{s:.0}s ago")),
            crate::node::relays_text(&r.relays),
        );
    }
    if rows.is_empty() {
        println!("(no sessions)");
    } else if rows.iter().any(|r| r.path == "relay") {
        println!(
            "\nSessions on a relay move to a direct path by themselves when one works; \
             `pool migrate test HOST` checks one by hand."
        );
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// `pool migrate test HOST [PORT]`: reachability, handshake time and
/// throughput of a direct path to a POOL node.
pub(crate) async fn test(
    host: &str,
    port: u16,
    key: &Path,
    peer_key: Option<&str>,
    megabytes: u64,
) -> Result<()> {
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let key = load_key(key)?;
    println!("testing a direct path to {addr}");

    // 1. Reachability: a plain TCP connection.
    let t = Instant::now();
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(_)) => println!("  reachable     TCP connect in {}", ms(t.elapsed())),
        Ok(Err(e)) => {
            let hint = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "the host answers but nothing listens there: is `pool daemon` running, on this port?"
                }
                _ => "no route, or filtered: check addresses, routes and firewalls on the way",
            };
            return err(format!("  NOT reachable: {e}\n  {hint}"));
        }
        Err(_) => return err(
            "  NOT reachable: no answer within 5 s (packets dropped: a firewall, or no route back)",
        ),
    }

    // 2. The peer's key, then a full handshake.
    let peer: PublicKey = match peer_key {
        Some(k) => parse_key(k, "--peer-key")?,
        None => {
            let k = Endpoint::probe_key(&addr).await?;
            println!("  peer key      {k} (as the listener says; pass --peer-key to check it)");
            k
        }
    };
    let ep = Endpoint::client(EndpointConfig::new(key.clone()));
    let t = Instant::now();
    let session = match ep.connect(&addr, peer).await {
        Ok(s) => s,
        Err(e) => {
            return err(format!(
                "  handshake FAILED: {e}\n  if the peer does not trust this node, add its key {} to the peer's [trust] allow",
                key.public_key()
            ))
        }
    };
    println!(
        "  handshake     {} (Noise IK, {})",
        ms(t.elapsed()),
        session.stats().core.cipher
    );

    // 3. Throughput to the peer's discard service.
    let bytes = megabytes << 20;
    let mut stream = session.open_stream().await?;
    let pre = pool_node::bridge::Preamble {
        source: "0.0.0.0:0"
            .parse()
            .map_err(|_| CliError("address".into()))?,
        destination: "0.0.0.0:0"
            .parse()
            .map_err(|_| CliError("address".into()))?,
        service: pool_node::bridge::DISCARD_SERVICE.into(),
    };
    let t = Instant::now();
    stream.write_all(&pre.encode()).await?;
    let chunk = vec![0u8; 256 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut answer = [0u8; 8];
    match stream.read_exact(&mut answer).await {
        Ok(_) => {
            let got = u64::from_be_bytes(answer);
            let secs = t.elapsed().as_secs_f64();
            if got != bytes {
                return err(format!("  throughput    the peer counted {got} of {bytes} bytes"));
            }
            println!(
                "  throughput    {megabytes} MiB in {secs:.2} s = {:.2} Gbit/s",
                bytes as f64 * 8.0 / secs / 1e9
            );
        }
        Err(_) => println!(
            "  throughput    not measured: the peer has no `pool.discard` service (a `pool daemon` with a listener serves it)"
        ),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close("migrate test done")).await;
    println!("  verdict       OK: a direct path to {addr} works");
    Ok(())
}
