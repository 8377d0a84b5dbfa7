//! Talking to a daemon: over its control socket, or (`--node HOST:PORT
//! --key FILE`) over POOL to its `pool.control` service. The same typed
//! requests either way ([`pool_node::control::Request`]). Also the
//! `pool config` commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use pool_net::{Endpoint, EndpointConfig, KnownPeers, PublicKey};
use pool_node::control::Request;

use crate::cmd::{CliError, Result};

/// Where a `pool ctl` / `pool config` command goes.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct Target {
    /// The control socket [default: $POOL_CONTROL or /run/pool/control.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "node")]
    pub(crate) control: Option<PathBuf>,
    /// A daemon elsewhere: its POOL address. The command runs over POOL, as
    /// --key, which the daemon must list in [control] admins (or readers, to read).
    #[arg(long, value_name = "HOST:PORT", requires = "key")]
    pub(crate) node: Option<String>,
    /// With --node: the key file to authenticate with.
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// With --node: the daemon's public key. Without it the key the daemon
    /// presents is pinned on first use in `known_peers` beside --key.
    #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
    pub(crate) node_key: Option<String>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(crate::node::default_control)
    }
}

/// Sends `req` where `to` says and returns the daemon's answer.
pub(crate) fn request(to: &Target, req: &Request) -> Result<serde_json::Value> {
    match (&to.node, &to.key) {
        (Some(node), Some(key)) => {
            let rt = crate::cmd::runtime()?;
            rt.block_on(remote(node, key, to.node_key.as_deref(), req))
        }
        _ => local(&to.socket(), req),
    }
}

/// Over the control socket at `control`.
pub(crate) fn local(control: &Path, req: &Request) -> Result<serde_json::Value> {
    let mut sock = UnixStream::connect(control).map_err(|e| {
        CliError::msg(format!(
            "cannot reach the daemon's control socket {}: {e} (is `pool daemon` running? set --control or POOL_CONTROL, or --node for a daemon elsewhere)",
            control.display()
        ))
    })?;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(600)));
    let line = serde_json::to_string(req).map_err(|e| CliError::msg(e.to_string()))?;
    writeln!(sock, "{line}")?;
    let mut line = String::new();
    BufReader::new(sock).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| CliError::msg(format!("bad answer from the daemon: {e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(CliError::msg(format!("daemon: {e}")));
    }
    Ok(v)
}

async fn remote(
    node: &str,
    key_file: &Path,
    node_key: Option<&str>,
    req: &Request,
) -> Result<serde_json::Value> {
    let key = crate::cmd::load_key(key_file)?;
    let me = key.public_key();
    let peer: PublicKey = match node_key {
        Some(k) => crate::cmd::parse_key(k, "--node-key")?,
        None => pinned_or_probe(node, key_file).await?,
    };
    let ep = Endpoint::client(EndpointConfig::new(key));
    let session = tokio::time::timeout(Duration::from_secs(15), ep.connect(node, peer))
        .await
        .map_err(|_| CliError::msg(format!("{node}: no session within 15 s")))?
        .map_err(|e| CliError::msg(format!("cannot open a session to {node}: {e}")))?;
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        pool_node::control::request_over(&session, &me, req),
    )
    .await
    .map_err(|_| CliError::msg(format!("{node}: no answer within 60 s")));
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close("done")).await;
    reply?.map_err(|e| CliError::msg(format!("{node}: {e}")))
}

/// The daemon's key pinned for `node` in `known_peers` beside the key
/// file, or the one it presents now, pinned from then on (TOFU).
async fn pinned_or_probe(node: &str, key_file: &Path) -> Result<PublicKey> {
    let dir = key_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let path = dir.join("known_peers");
    let mut store = KnownPeers::load(&path).map_err(CliError::from)?;
    if let Some(k) = store.lookup(node) {
        return Ok(k);
    }
    let k = Endpoint::probe_key(node).await?;
    store.pin(node, k).map_err(CliError::from)?;
    eprintln!(
        "pool: trust on first use: pinned {node} = {k} in {} (pass --node-key to check it instead)",
        path.display()
    );
    Ok(k)
}

fn print_plan(v: &serde_json::Value) {
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (changes, restart) = (list("changes"), list("restart_needed"));
    if changes.is_empty() && restart.is_empty() {
        println!("  no changes");
    }
    for c in changes {
        println!("  {c}");
    }
    for c in restart {
        println!("  {c}");
    }
}

fn read_config(file: &Path) -> Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::msg(format!("cannot read {}: {e}", file.display())))?;
    // Checked here first, so that errors name this file and its lines.
    pool_node::config::Config::parse(&text, file).map_err(|e| CliError::msg(e.to_string()))?;
    Ok(text)
}

/// `pool config check FILE`.
pub(crate) fn check(file: &Path, to: &Target) -> Result<()> {
    let text = read_config(file)?;
    let reachable = to.node.is_some() || to.socket().exists();
    if !reachable {
        println!(
            "{}: valid (no daemon at {} to compare it with; pass --control or --node)",
            file.display(),
            to.socket().display()
        );
        return Ok(());
    }
    let v = request(to, &Request::ConfigCheck { text })?;
    println!("{}: valid; applying it would change:", file.display());
    print_plan(&v);
    Ok(())
}

/// `pool config apply FILE --confirm-within D`.
pub(crate) fn apply(file: &Path, within: Duration, to: &Target) -> Result<()> {
    let text = read_config(file)?;
    let v = request(
        to,
        &Request::ConfigApply {
            text,
            confirm_within_secs: within.as_secs(),
        },
    )?;
    println!("applied {}:", file.display());
    print_plan(&v);
    match v["pending"]["seconds_left"].as_u64() {
        Some(left) => println!(
            "\nRolls back by itself in {} unless you run `pool config confirm` (or `pool config rollback` to go back now).",
            pool_node::types::format_duration(Duration::from_secs(left))
        ),
        None => println!("\nKept (no rollback deadline)."),
    }
    Ok(())
}

/// `pool config confirm`.
pub(crate) fn confirm(to: &Target) -> Result<()> {
    let v = request(to, &Request::ConfigConfirm)?;
    println!(
        "confirmed: config {} is kept",
        v["sha256"]
            .as_str()
            .map(|s| &s[..12.min(s.len())])
            .unwrap_or("?")
    );
    Ok(())
}

/// `pool config rollback`.
pub(crate) fn rollback(to: &Target) -> Result<()> {
    let v = request(to, &Request::ConfigRollback)?;
    println!("rolled back to the previous config:");
    print_plan(&v);
    Ok(())
}

/// `pool ctl handoff SESSION --to HOST:PORT --to-key KEY`.
pub(crate) fn handoff(session: String, to: String, to_key: String, target: &Target) -> Result<()> {
    let v = request(
        target,
        &Request::Handoff {
            session,
            to,
            to_key,
        },
    )?;
    println!(
        "session {} handed to {}: frozen {:.2} ms, {} stream(s) forwarded, {} moved, {} reset, {} bytes of state",
        v["session"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["frozen_ms"].as_f64().unwrap_or(0.0),
        v["forwarded"].as_u64().unwrap_or(0),
        v["moved"].as_u64().unwrap_or(0),
        v["reset"].as_u64().unwrap_or(0),
        v["state_bytes"].as_u64().unwrap_or(0),
    );
    Ok(())
}

/// `pool ctl drain --to HOST:PORT --to-key KEY`.
pub(crate) fn drain(
    to: String,
    to_key: String,
    deadline: Option<Duration>,
    target: &Target,
) -> Result<()> {
    let v = request(
        target,
        &Request::Drain {
            to,
            to_key,
            deadline_secs: deadline.map(|d| d.as_secs().max(1)),
        },
    )?;
    println!(
        "drained: {} of {} session(s) handed over in {:.2} s (longest freeze {:.2} ms)",
        v["handed"].as_u64().unwrap_or(0),
        v["sessions"].as_u64().unwrap_or(0),
        v["seconds"].as_f64().unwrap_or(0.0),
        v["max_frozen_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(a) = v["aborted"].as_object().filter(|a| !a.is_empty()) {
        for (reason, n) in a {
            println!("  stayed here: {n} ({reason})");
        }
    }
    Ok(())
}
