//! `pool relay`: the relay server.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use pool_net::PublicKey;
use pool_relay::{load_authorized, RelayConfig, RelayFile, RelayRequest, RelayServer};

use crate::cmd::CliError;

/// The control socket's default path.
const DEFAULT_CONTROL: &str = "/run/pool/relay.sock";

/// `pool relay`: run one, or ask a running one (enroll, unenroll, status).
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct RelayArgs {
    #[command(subcommand)]
    cmd: Option<RelayCmd>,
    #[command(flatten)]
    run: RunArgs,
}

/// Commands to a running relay, over its control socket.
#[derive(Subcommand, Debug)]
enum RelayCmd {
    /// Enrol a peer relay: circuits to nodes registered there are forwarded to it. It must enrol this relay too.
    #[command(
        after_help = "EXAMPLE:\n  pool relay enroll r2.example:9255 --relay-key R2_KEY --control /run/pool/relay.sock\n\n\
Enrolment is mutual: R2's operator runs the same with this relay's address and key (`pool relay status` shows it).\n\
Runtime enrolments are forgotten on restart; list peers in [[relay.peer]] (--config) to keep them."
    )]
    Enroll {
        /// The peer relay: HOST:PORT (port 9255 by default).
        addr: String,
        /// The peer relay's key (its `pool relay status`, or `pool pubkey` of its key file).
        #[arg(long = "relay-key", value_name = "KEY", allow_hyphen_values = true)]
        relay_key: String,
        /// The relay's control socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// Circuits open at once through this peer (default: --max-circuits-per-peer).
        #[arg(long, value_name = "N")]
        max_circuits: Option<usize>,
        /// Bytes per second this peer may send us (default: --max-rate-per-peer; 0: no cap).
        #[arg(long, value_name = "BYTES")]
        max_rate: Option<u64>,
    },
    /// End the enrolment of a peer relay (it is told and ends it too).
    Unenroll {
        /// The peer relay's key.
        #[arg(long = "relay-key", value_name = "KEY", allow_hyphen_values = true)]
        relay_key: String,
        /// The relay's control socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// The relay's key, counters, peer relays and per-node accounting.
    Status {
        /// The relay's control socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `pool relay` flags (running a relay).
#[derive(Args, Debug)]
struct RunArgs {
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
    /// The relay's own key file (created if missing): peer relays enrol it by its public key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Serve `pool relay enroll / unenroll / status` on this Unix socket (owner only).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// A config file: [relay] key, control, listen, and [[relay.peer]] addr, key, max_circuits, max_rate.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Circuits open at once through one peer relay.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_circuits_per_peer: usize,
    /// Bytes per second one peer relay may send us through its circuits (0: no cap).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    max_rate_per_peer: u64,
    /// Bytes per second all peer relays together may send us, shared equally among those with open circuits (0: no total).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    peer_fair_share: u64,
    /// Also publish per-node-key series on /metrics (they show who uses the relay).
    #[arg(long)]
    metrics_per_node: bool,
}

fn config(args: RunArgs) -> Result<RelayConfig, CliError> {
    let file = match &args.config {
        Some(p) => RelayFile::load(p).map_err(|e| CliError::msg(e.to_string()))?,
        None => RelayFile::default(),
    };
    let listen = match (&file.listen, args.listen.as_str()) {
        (Some(l), "[::]:9255") => l.clone(),
        _ => args.listen.clone(),
    };
    let mut cfg = RelayConfig::new(listen)
        .max_circuits_per_peer(args.max_circuits_per_peer)
        .max_rate_per_peer(args.max_rate_per_peer)
        .peer_fair_share(args.peer_fair_share)
        .metrics_per_node(args.metrics_per_node)
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
    if let Some(k) = args.key.or(file.key) {
        cfg = cfg.key(crate::cmd::load_key(&k)?);
    }
    if let Some(c) = args.control.or(file.control) {
        cfg = cfg.control(c);
    }
    for p in file.peers {
        cfg = cfg.peer(p);
    }
    Ok(cfg)
}

/// One request to a running relay's control socket.
fn ask(control: &std::path::Path, req: &RelayRequest) -> Result<serde_json::Value, CliError> {
    use std::io::{BufRead, BufReader, Write};
    let mut sock = std::os::unix::net::UnixStream::connect(control).map_err(|e| {
        CliError::msg(format!(
            "cannot reach the relay's control socket {}: {e} (is `pool relay --control {}` running? set --control)",
            control.display(),
            control.display()
        ))
    })?;
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let line = serde_json::to_string(req).map_err(|e| CliError::msg(e.to_string()))?;
    writeln!(sock, "{line}").map_err(|e| CliError::msg(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(sock)
        .read_line(&mut line)
        .map_err(|e| CliError::msg(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| CliError::msg(format!("bad answer from the relay: {e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(CliError::msg(format!("relay: {e}")));
    }
    Ok(v)
}

fn command(cmd: RelayCmd) -> Result<(), CliError> {
    match cmd {
        RelayCmd::Enroll {
            addr,
            relay_key,
            control,
            max_circuits,
            max_rate,
        } => {
            let addr = if addr
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                addr
            } else {
                format!("{addr}:{}", pool_core::relay::DEFAULT_PORT)
            };
            PublicKey::from_token(&relay_key)
                .map_err(|e| CliError::msg(format!("--relay-key {relay_key}: {e}")))?;
            let v = ask(
                &control,
                &RelayRequest::Enroll {
                    addr: addr.clone(),
                    key: relay_key.clone(),
                    max_circuits,
                    max_rate,
                },
            )?;
            let again = if v["new"] == false {
                " (already enrolled: address and caps updated)"
            } else {
                ""
            };
            println!("enrolled relay {relay_key} at {addr}{again}; the link comes up once it enrols this relay too (pool relay status)");
            Ok(())
        }
        RelayCmd::Unenroll { relay_key, control } => {
            ask(
                &control,
                &RelayRequest::Unenroll {
                    key: relay_key.clone(),
                },
            )?;
            println!("ended the enrolment of relay {relay_key}");
            Ok(())
        }
        RelayCmd::Status { control, json } => {
            let v = ask(&control, &RelayRequest::Status)?;
            if json {
                println!("{v:#}");
                return Ok(());
            }
            print_status(&v);
            Ok(())
        }
    }
}

fn print_status(v: &serde_json::Value) {
    let s = &v["stats"];
    println!(
        "key        {}",
        v["key"].as_str().unwrap_or("- (no --key: does not peer)")
    );
    println!(
        "nodes      {} registered, {} circuits open, {} since start, {} bytes forwarded",
        s["nodes"], s["circuits"], s["circuits_total"], s["bytes"]
    );
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    println!("\npeer relays ({})", peers.len());
    if !peers.is_empty() {
        println!(
            "  {:<46} {:<22} {:<5} {:>6} {:>8} {:>8} {:>14} {:>14} {:>5}",
            "KEY", "ADDRESS", "LINK", "NODES", "OPEN", "CIRCUITS", "BYTES IN", "BYTES OUT", "CAPS"
        );
    }
    for p in &peers {
        println!(
            "  {:<46} {:<22} {:<5} {:>6} {:>8} {:>8} {:>14} {:>14} {:>5}",
            p["key"].as_str().unwrap_or("-"),
            p["addr"].as_str().unwrap_or("-"),
            if p["up"] == true { "up" } else { "down" },
            p["nodes"],
            p["circuits_open"],
            p["circuits_total"],
            p["bytes_in"],
            p["bytes_out"],
            p["caps_hit"],
        );
    }
    let accounts = v["accounts"].as_array().cloned().unwrap_or_default();
    println!("\nnode keys ({})", accounts.len());
    if !accounts.is_empty() {
        println!(
            "  {:<46} {:>8} {:>14} {:>14}",
            "KEY", "CIRCUITS", "SENT", "RECEIVED"
        );
    }
    for a in &accounts {
        println!(
            "  {:<46} {:>8} {:>14} {:>14}",
            a["key"].as_str().unwrap_or("-"),
            a["circuits"],
            a["sent"],
            a["received"]
        );
    }
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
    if let Some(cmd) = args.cmd {
        return tokio::task::spawn_blocking(move || command(cmd))
            .await
            .map_err(|e| CliError::msg(e.to_string()))?;
    }
    let cfg = config(args.run)?;
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
    let key = cfg.key.as_ref().map(|k| k.public_key());
    let peers = cfg.peers.len();
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
    if let Some(k) = &key {
        eprintln!("pool: relay key {k}");
    }
    if peers > 0 {
        eprintln!("pool: relay enrols {peers} peer relay(s) from its config");
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
