//! `pool relay`: the relay server.

use std::path::PathBuf;

use clap::Args;
use pool_net::PublicKey;
use pool_relay::{load_authorized, RelayConfig, RelayServer};

use crate::cmd::CliError;

/// `pool relay` flags.
#[derive(Args, Debug)]
pub(crate) struct RelayArgs {
    /// Address to listen on: [::]:9255 (all, IPv6 and IPv4), 0.0.0.0:9255, 127.0.0.1:0 (any free port).
    #[arg(long, value_name = "ADDR", default_value = "[::]:9255")]
    listen: String,
    /// Serve Prometheus metrics (/metrics, /health) here, e.g. 127.0.0.1:9257.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Append the change journal to this file.
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
    /// Seal the journal and start a new file (continuing its chain) once it holds this many bytes (0: only on SIGUSR1).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    journal_rotate_bytes: u64,
    /// Connections open at once, all nodes together (more are refused).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_connections: usize,
    /// Connections open at once per node key (control and circuits).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_per_node: usize,
    /// Bytes per second one node may send through the relay (0: no cap).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    max_rate_per_node: u64,
    /// Connections from one address (IPv6: one /64) that may be open at once before they authenticate (0: no cap).
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_unauthenticated_per_address: usize,
    /// Close a circuit that carries no byte either way for this long (seconds; 0: never). POOL sessions PING every 5 s.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    circuit_idle_timeout: u64,
    /// Close a connection that has not proven its key this long after connecting (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    handshake_timeout: u64,
    /// Serve only this node key (repeatable); without --allow or --authorized, any key that proves it holds its secret.
    #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
    allow: Vec<String>,
    /// Serve only the keys in this file (one key per line, `#` comments).
    #[arg(long, value_name = "FILE")]
    authorized: Option<PathBuf>,
}

fn config(args: RelayArgs) -> Result<RelayConfig, CliError> {
    let mut cfg = RelayConfig::new(args.listen)
        .max_connections(args.max_connections)
        .max_connections_per_node(args.max_per_node)
        .max_rate_per_node(args.max_rate_per_node)
        .max_unauthenticated_per_address(args.max_unauthenticated_per_address)
        .circuit_idle_timeout(
            (args.circuit_idle_timeout > 0)
                .then(|| std::time::Duration::from_secs(args.circuit_idle_timeout)),
        )
        .handshake_timeout(std::time::Duration::from_secs(
            args.handshake_timeout.max(1),
        ));
    for a in &args.allow {
        let key =
            PublicKey::from_token(a).map_err(|e| CliError::msg(format!("--allow {a}: {e}")))?;
        cfg = cfg.allow(key);
    }
    if let Some(file) = &args.authorized {
        let keys = load_authorized(file).map_err(|e| CliError::msg(e.to_string()))?;
        if keys.is_empty() {
            return Err(CliError::msg(format!(
                "--authorized {}: the file holds no key, so every node would be refused; add keys (one per line)",
                file.display()
            )));
        }
        cfg.allow.extend(keys);
    }
    if let Some(j) = args.journal {
        cfg = cfg.journal(j);
    }
    cfg = cfg.journal_rotate_bytes(args.journal_rotate_bytes);
    if let Some(m) = args.metrics {
        cfg = cfg.metrics(m);
    }
    Ok(cfg)
}

/// The relay splices many connections: it runs on every core unless
/// `POOL_THREADS` says otherwise.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    if std::env::var_os("POOL_THREADS").is_some() {
        return crate::cmd::runtime();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::msg(format!("cannot start the async runtime: {e}")))
}

/// The soft limit on open files, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub(crate) async fn relay(args: RelayArgs) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let cfg = config(args)?;
    if let Some(limit) = open_files_limit() {
        let want = cfg.max_connections as u64 + 64;
        if limit < want {
            eprintln!(
                "pool: warning: the open-file limit is {limit}, below --max-connections {} (plus some for the relay itself); \
                 connections will fail before the cap. Raise it (ulimit -n {want}, or LimitNOFILE= in the systemd unit) or lower --max-connections",
                cfg.max_connections
            );
        }
    }
    let allow = cfg.allow.len();
    let server = RelayServer::bind(cfg)
        .await
        .map_err(|e| CliError::msg(e.to_string()))?;
    let sig =
        |k| signal(k).map_err(|e| CliError::msg(format!("cannot install a signal handler: {e}")));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut usr1 = sig(SignalKind::user_defined1())?;
    let journal = server.journal();
    if let Some(m) = server.metrics_addr() {
        eprintln!("pool: metrics at http://{m}/metrics");
    }
    if allow > 0 {
        eprintln!("pool: relay serves {allow} allowed key(s)");
    }
    eprintln!("pool: relay listening on {}", server.local_addr());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(server.run(rx));
    crate::notify::ready();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                if let Some(j) = &journal {
                    match j.rotate().await {
                        Ok(Some(p)) => eprintln!("pool: journal sealed as {}", p.display()),
                        Ok(None) => eprintln!("pool: journal is empty; nothing to seal"),
                        Err(e) => eprintln!("pool: error: {e}"),
                    }
                }
            }
        }
    }
    crate::notify::stopping();
    eprintln!("pool: relay stopping");
    let _ = stop.send(true);
    let _ = run.await;
    Ok(())
}
