//! `pool director`: run a director, or ask a running one (`workers`,
//! `drain`, `owners`, `status`) over its control socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use pool_director::registry::{Policy, Rules};
use pool_director::store::Store;
use pool_node::director::{control_request, DirectorOptions, DirectorRequest};
use serde_json::Value;

use crate::cmd::CliError;
use crate::TrustArgs;

type Result<T> = std::result::Result<T, CliError>;

/// `pool director`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct DirectorArgs {
    #[command(subcommand)]
    cmd: Option<DirectorCmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// The running director's control socket.
#[derive(Args, Debug, Clone)]
pub(crate) struct ControlArg {
    /// The director's control socket [default: $POOL_DIRECTOR_CONTROL or /run/pool/director.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum DirectorCmd {
    /// The workers: key, address, state (active / draining / drained / lost), load, lease age.
    Workers {
        #[command(flatten)]
        c: ControlArg,
    },
    /// Hand every session of a worker to the others, then mark it drained.
    Drain {
        /// The worker's key (or a unique prefix of it).
        #[arg(allow_hyphen_values = true)]
        worker: String,
        #[command(flatten)]
        c: ControlArg,
    },
    /// Who owns which session, as the director's store says.
    Owners {
        #[command(flatten)]
        c: ControlArg,
    },
    /// The director's counters.
    Status {
        #[command(flatten)]
        c: ControlArg,
    },
}

/// Running a director.
#[derive(Args, Debug)]
struct ServeArgs {
    /// Where workers and clients reach the director.
    #[arg(long, value_name = "ADDR", default_value = "[::]:9260")]
    listen: String,
    /// The director's key file (created if missing).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// A key that may register as a worker (repeatable; trusted too).
    #[arg(long = "worker", value_name = "KEY", allow_hyphen_values = true)]
    worker: Vec<String>,
    /// Keys that may register as workers, one per line (`#` comments).
    #[arg(long, value_name = "FILE")]
    workers: Option<PathBuf>,
    /// Control socket for `pool director workers` / `drain` [default: $POOL_DIRECTOR_CONTROL or /run/pool/director.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Where the fleet's state lives: `etcd://HOST:2379[,HOST:2379...]`; default: embedded (memory and --state).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The embedded store's state file [default: director-state.json beside --key].
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics, /health) here.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Append the change journal to this file.
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
    /// A worker not heard from for this long is lost (heartbeats go every third of it).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = crate::parse_duration)]
    lease: Duration,
    /// Placement: least-sessions, least-load or hash (of the client's key).
    #[arg(long, value_name = "POLICY", default_value = "least-sessions")]
    policy: Policy,
    /// Never move sessions to even the load (drains still move them).
    #[arg(long)]
    no_rebalance: bool,
    /// Rebalance when the busiest worker holds this fraction more than the mean.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.25)]
    skew: f64,
    /// At most this many sessions moved per second by rebalancing.
    #[arg(long, value_name = "N", default_value_t = 50)]
    moves_per_sec: u32,
    #[command(flatten)]
    trust: TrustArgs,
}

fn default_control() -> PathBuf {
    std::env::var_os("POOL_DIRECTOR_CONTROL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/pool/director.sock"))
}

pub(crate) fn main(args: DirectorArgs) -> Result<()> {
    match args.cmd {
        None => crate::cmd::runtime()?.block_on(serve(args.serve)),
        Some(DirectorCmd::Workers { c }) => workers(&c),
        Some(DirectorCmd::Drain { worker, c }) => {
            let v = ask(&c, &DirectorRequest::Drain { worker })?;
            if c.json {
                println!("{v}");
            } else {
                println!(
                    "draining {} ({} sessions): its sessions move to the other workers; `pool director workers` shows it drained when empty",
                    v["worker"].as_str().unwrap_or("?"),
                    v["sessions"]
                );
            }
            Ok(())
        }
        Some(DirectorCmd::Owners { c }) => {
            let v = ask(&c, &DirectorRequest::Owners)?;
            if c.json {
                println!("{v}");
                return Ok(());
            }
            println!("{:<34} {:<46} {:>10}", "SESSION", "OWNER", "REVISION");
            for o in v["owners"].as_array().into_iter().flatten() {
                println!(
                    "{:<34} {:<46} {:>10}",
                    o["session"].as_str().unwrap_or(""),
                    o["owner"].as_str().unwrap_or(""),
                    o["revision"]
                );
            }
            Ok(())
        }
        Some(DirectorCmd::Status { c }) => {
            let v = ask(&c, &DirectorRequest::Status)?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
    }
}

fn ask(c: &ControlArg, req: &DirectorRequest) -> Result<Value> {
    let path = c.control.clone().unwrap_or_else(default_control);
    crate::cmd::runtime()?
        .block_on(control_request(&path, req))
        .map_err(CliError::msg)
}

fn workers(c: &ControlArg) -> Result<()> {
    let v = ask(c, &DirectorRequest::Workers)?;
    if c.json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{:<46} {:<24} {:<9} {:>8} {:>7} {:>10} {:>6} {:>9}",
        "WORKER", "ADDRESS", "STATE", "SESSIONS", "STREAMS", "BYTES/S", "CPU%", "LEASE AGE"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let l = &w["load"];
        let state = w["state"].as_str().unwrap_or("?");
        let state = if w["connected"].as_bool() == Some(false) && state != "lost" {
            format!("{state}*")
        } else {
            state.to_string()
        };
        println!(
            "{:<46} {:<24} {:<9} {:>8} {:>7} {:>10} {:>6.1} {:>8.1}s",
            w["key"].as_str().unwrap_or(""),
            w["address"].as_str().unwrap_or(""),
            state,
            l["sessions"],
            l["streams"],
            l["bytes_per_sec"],
            l["cpu_percent"].as_f64().unwrap_or(0.0),
            w["lease_age_secs"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "(store: {}; * = not connected now)",
        v["store"].as_str().unwrap_or("?")
    );
    Ok(())
}

fn read_keys(file: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::msg(format!("{}: {e}", file.display())))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
        .collect())
}

async fn serve(a: ServeArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let key_path = a.key.clone().ok_or_else(|| {
        CliError::msg("pool director needs --key FILE (its identity; created if missing)")
    })?;
    let key = pool_node::daemon::load_or_create_key(&key_path, true)?;
    let mut names = a.worker.clone();
    if let Some(f) = &a.workers {
        names.extend(read_keys(f)?);
    }
    let workers = names
        .iter()
        .map(|k| crate::cmd::parse_key(k, "--worker"))
        .collect::<Result<Vec<_>>>()?;
    if workers.is_empty() {
        return Err(CliError::msg(
            "no worker may register: name their keys with --worker KEY (repeatable) or --workers FILE",
        ));
    }
    let trust = crate::cmd::trust(&a.trust)?;
    let rules = Rules {
        lease: a.lease.max(Duration::from_millis(300)),
        heartbeat: a.lease.max(Duration::from_millis(300)) / 3,
        policy: a.policy,
        skew_start: a.skew.max(0.01),
        skew_stop: (a.skew * 0.4).max(0.0),
        moves_per_sec: a.moves_per_sec.max(1),
        rebalance: !a.no_rebalance,
        ..Rules::default()
    };
    let store = open_store(&a, &key_path, rules.lease).await?;
    let journal = match &a.journal {
        Some(p) => Some(
            pool_journal::Journal::open(p)
                .await
                .map_err(|e| CliError::msg(format!("journal: {e}")))?,
        ),
        None => None,
    };
    let opts = DirectorOptions {
        listen: a.listen.clone(),
        key,
        trust,
        workers,
        rules,
        control: Some(a.control.clone().unwrap_or_else(default_control)),
        metrics: a.metrics.clone(),
        journal,
    };
    eprintln!(
        "pool: director {} on {} ({} worker keys; store: {})",
        opts.key.public_key(),
        opts.listen,
        opts.workers.len(),
        store.describe()
    );
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pool_node::director::run(opts, store, rx));
    let sig =
        |k| signal(k).map_err(|e| CliError::msg(format!("cannot install a signal handler: {e}")));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let r = tokio::select! {
        r = run => r,
        _ = term.recv() => { let _ = stop.send(true); Ok(Ok(())) }
        _ = int.recv() => { let _ = stop.send(true); Ok(Ok(())) }
    };
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(CliError::msg(format!("the director stopped: {e}"))),
    }
}

async fn open_store(
    a: &ServeArgs,
    key: &std::path::Path,
    lease: Duration,
) -> Result<Arc<dyn Store>> {
    match a.store.as_deref() {
        None | Some("embedded") => {
            let path = a.state.clone().unwrap_or_else(|| {
                key.parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("director-state.json")
            });
            let s = pool_director::file_store::FileStore::open(Some(&path))
                .map_err(|e| CliError::msg(e.to_string()))?;
            Ok(Arc::new(s))
        }
        Some(url) => etcd_store(url, lease).await,
    }
}

async fn etcd_store(url: &str, lease: Duration) -> Result<Arc<dyn Store>> {
    if !(url.starts_with("etcd://") || url.starts_with("http://")) {
        return Err(CliError::msg(format!(
            "--store {url}: use etcd://HOST:2379 (several: etcd://A:2379,B:2379), or leave it out for the embedded store"
        )));
    }
    let s = pool_etcd::EtcdStore::connect(url, "", lease)
        .await
        .map_err(|e| CliError::msg(e.to_string()))?;
    Ok(Arc::new(s))
}
