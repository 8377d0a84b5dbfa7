//! `pool daemon`, `pool bridge`, `pool ctl`, `pool journal`.

use pool_node::control::Request;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pool_node::config::{Config, NodeSection, Pool2TcpSection, Tcp2PoolSection, TrustSection};
use pool_node::daemon;

use crate::cmd::CliError;
use crate::TrustArgs;

type Result<T> = std::result::Result<T, CliError>;

impl From<daemon::DaemonError> for CliError {
    fn from(e: daemon::DaemonError) -> Self {
        CliError::msg(e.to_string())
    }
}

/// The default control socket: `$POOL_CONTROL`, else `/run/pool/control.sock`.
pub(crate) fn default_control() -> PathBuf {
    std::env::var_os("POOL_CONTROL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/pool/control.sock"))
}

pub(crate) fn trust_section(args: &TrustArgs) -> Result<TrustSection> {
    let allow = args
        .allow
        .iter()
        .map(|k| crate::cmd::parse_key(k, "--allow"))
        .collect::<Result<Vec<_>>>()?;
    Ok(TrustSection {
        allow,
        authorized: args.authorized.clone(),
        fleet_secret: args.fleet_secret.clone(),
        tofu: args.tofu,
        known_peers: Some(crate::cmd::known_peers_path(args)),
    })
}

pub(crate) async fn run_daemon(
    config_path: Option<PathBuf>,
    config: Config,
    text: String,
) -> Result<()> {
    let drain = Duration::from_secs(config.node.drain_timeout_secs);
    let d = daemon::start(config_path, config, &text).await?;
    let st = d.status();
    eprintln!("pool: node {} up", st["key"].as_str().unwrap_or("?"));
    if let Some(l) = st["listen"].as_str() {
        eprintln!("pool: POOL listener on {l}");
    }
    for (name, addr) in d.bridge_addrs() {
        eprintln!("pool: tcp2pool `{name}` listening on {addr}");
    }
    if let Some(addr) = d.shim_addr() {
        eprintln!("pool: shim listener on {addr}");
    }
    if let Some(m) = st["metrics"].as_str() {
        eprintln!("pool: metrics at http://{m}/metrics");
    }
    // Everything is bound and the journal is open: systemd may go on.
    crate::notify::ready();
    daemon::run_until_signal(d, drain).await?;
    Ok(())
}

pub(crate) async fn daemon_cmd(config: Option<PathBuf>) -> Result<()> {
    let (cfg, text, path) = match config {
        Some(p) => {
            let (c, t) = Config::load(&p).map_err(|e| CliError::msg(e.to_string()))?;
            (c, t, Some(p))
        }
        None => {
            let c = Config::default();
            (c, String::new(), None)
        }
    };
    run_daemon(path, cfg, text).await
}

fn require_key(key: &Path) -> Result<()> {
    if !key.exists() {
        return Err(CliError::msg(format!(
            "key file {} does not exist (create one with `pool keygen --out {}`)",
            key.display(),
            key.display()
        )));
    }
    Ok(())
}

pub(crate) struct NodeExtras {
    pub(crate) control: Option<PathBuf>,
    pub(crate) metrics: Option<String>,
    pub(crate) journal: Option<PathBuf>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn tcp2pool(
    listen: String,
    peer: String,
    peer_key: String,
    service: String,
    director: bool,
    key: PathBuf,
    trust: &TrustArgs,
    max_connections: usize,
    extras: NodeExtras,
) -> Result<()> {
    require_key(&key)?;
    let cfg = Config {
        node: NodeSection {
            key,
            listen: String::new(),
            control: extras.control,
            metrics: extras.metrics,
            journal: extras.journal,
            ..NodeSection::default()
        },
        trust: trust_section(trust)?,
        tcp2pool: vec![Tcp2PoolSection {
            name: "tcp2pool".into(),
            listen,
            peer,
            peer_key: crate::cmd::parse_key(&peer_key, "--peer-key")?,
            service,
            max_connections,
            connect_timeout_secs: 10,
            idle_timeout_secs: 3600,
            director,
        }],
        pool2tcp: Vec::new(),
        ..Config::default()
    };
    run_daemon(None, cfg, String::new()).await
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn pool2tcp(
    listen: String,
    target: String,
    proxy_protocol: bool,
    key: PathBuf,
    trust: &TrustArgs,
    max_connections: usize,
    extras: NodeExtras,
) -> Result<()> {
    require_key(&key)?;
    let t = trust_section(trust)?;
    if t.allow.is_empty() && t.authorized.is_none() && t.fleet_secret.is_none() {
        return Err(CliError::msg(
            "no client is trusted, so every connection would be refused; \
             add --allow PEER_PUBKEY, --authorized FILE (see `pool trust add`) or --fleet-secret FILE \
             (--tofu only pins the listeners this node dials)",
        ));
    }
    let cfg = Config {
        node: NodeSection {
            key,
            listen,
            control: extras.control,
            metrics: extras.metrics,
            journal: extras.journal,
            ..NodeSection::default()
        },
        trust: t,
        tcp2pool: Vec::new(),
        pool2tcp: vec![Pool2TcpSection {
            service: String::new(),
            target,
            proxy_protocol,
            allow: Vec::new(),
            max_connections,
            connect_timeout_secs: 10,
            idle_timeout_secs: 3600,
        }],
        ..Config::default()
    };
    run_daemon(None, cfg, String::new()).await
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn human_age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub(crate) fn ctl_sessions(to: &crate::ctl::Target, json: bool) -> Result<()> {
    let v = crate::ctl::request(to, &Request::Sessions)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let rows: Vec<pool_node::model::SessionRow> = serde_json::from_value(v)
        .map_err(|e| CliError::msg(format!("bad answer from the daemon: {e}")))?;
    println!(
        "{:<12} {:<10} {:<22} {:<7} {:>5} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>11} {:>7} {:>6}",
        "PEER",
        "ROLE",
        "ADDRESS",
        "PATH",
        "MOVES",
        "AGE",
        "STREAMS",
        "SENT",
        "RECEIVED",
        "RTT",
        "JITTER",
        "LOSS",
        "RESUMES",
        "SHIM"
    );
    for r in &rows {
        let peer: String = r.peer.chars().take(12).collect();
        let rtt = r.rtt_ms.map_or("-".into(), |m| format!("{m:.2}ms"));
        let loss = format!(
            "{}/{}",
            r.tcp_retransmits.map_or("-".into(), |n| n.to_string()),
            r.frames_resent
        );
        println!(
            "{:<12} {:<10} {:<22} {:<7} {:>5} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>11} {:>7} {:>6}",
            peer,
            r.role,
            r.address.clone().unwrap_or_else(|| "-".into()),
            r.path,
            r.path_changes,
            human_age(r.age_secs),
            r.streams,
            human_bytes(r.bytes_sent),
            human_bytes(r.bytes_received),
            rtt,
            format!("{:.2}ms", r.jitter_ms),
            loss,
            r.resumes,
            r.shim_streams
        );
    }
    if rows.is_empty() {
        println!("(no sessions)");
    } else {
        println!("\nPATH = direct or relay (ADDRESS is then the relay's); MOVES = path changes. LOSS = TCP retransmissions on the carrier / frames resent after resumes. RTT and jitter come from session pings.\nSHIM = streams that carried connections of programs under libpool_shim.so.");
    }
    Ok(())
}

pub(crate) fn ctl_status(to: &crate::ctl::Target, json: bool) -> Result<()> {
    let v = crate::ctl::request(to, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let s = |k: &str| {
        v[k].as_str()
            .map(String::from)
            .unwrap_or_else(|| "-".into())
    };
    println!("node key     {}", s("key"));
    println!(
        "uptime       {}",
        human_age(v["uptime_secs"].as_f64().unwrap_or(0.0))
    );
    println!("POOL listen  {}", s("listen"));
    println!(
        "metrics      {}",
        v["metrics"]
            .as_str()
            .map(|m| format!("http://{m}/metrics"))
            .unwrap_or_else(|| "-".into())
    );
    println!("journal      {}", s("journal"));
    let digest = s("config_sha256");
    match v["pending"].as_object() {
        Some(p) => println!(
            "config       {} PENDING: rolls back in {} s unless `pool config confirm` (applied by {})",
            &digest[..12.min(digest.len())],
            p["seconds_left"],
            p["applied_by"].as_str().unwrap_or("?")
        ),
        None => println!("config       {}", &digest[..12.min(digest.len())]),
    }
    println!("sessions     {}", v["sessions"]);
    if let Some(relays) = v["relays"].as_array() {
        for r in relays {
            let state = if r["registered"].as_bool().unwrap_or(false) {
                format!(
                    "registered, seen as {}",
                    r["observed"].as_str().unwrap_or("?")
                )
            } else {
                format!(
                    "NOT registered: {}",
                    r["error"].as_str().unwrap_or("connecting")
                )
            };
            println!(
                "relay        {} ({state})",
                r["relay"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(bs) = v["tcp2pool"].as_array() {
        for b in bs {
            println!(
                "tcp2pool     {} on {} -> {} (active {}, total {}, errors {})",
                b["name"].as_str().unwrap_or("?"),
                b["listen"].as_str().unwrap_or("?"),
                b["peer"].as_str().unwrap_or("?"),
                b["active"],
                b["connections"],
                b["errors"]
            );
        }
    }
    if let Some(ts) = v["pool2tcp"]["targets"].as_array() {
        for t in ts {
            let svc = t["service"].as_str().unwrap_or("");
            println!(
                "pool2tcp     {} -> {}{}",
                if svc.is_empty() { "(default)" } else { svc },
                t["target"].as_str().unwrap_or("?"),
                if t["proxy_protocol"].as_bool() == Some(true) {
                    " (PROXY v2)"
                } else {
                    ""
                }
            );
        }
        println!(
            "             active {}, total {}, errors {}",
            v["pool2tcp"]["active"], v["pool2tcp"]["connections"], v["pool2tcp"]["errors"]
        );
    }
    if let Some(sh) = v["shim"].as_object() {
        println!(
            "shim         on {} (active {}, connections {}, carried {}, failed {})",
            sh.get("listen").and_then(|l| l.as_str()).unwrap_or("?"),
            sh.get("active").cloned().unwrap_or_default(),
            sh.get("connections").cloned().unwrap_or_default(),
            sh.get("streams").cloned().unwrap_or_default(),
            sh.get("failed").cloned().unwrap_or_default()
        );
    }
    if let Some(ports) = v["expose"]["ports"].as_array() {
        if !ports.is_empty() {
            let list: Vec<String> = ports
                .iter()
                .map(|p| match p["target"].as_str() {
                    Some(t) => format!("{} -> {t}", p["port"]),
                    None => p["port"].to_string(),
                })
                .collect();
            println!(
                "expose       {} (connected {}, refused {})",
                list.join(", "),
                v["expose"]["exposed"],
                v["expose"]["refused"]
            );
        }
    }
    let c = &v["counters"];
    println!(
        "counters     accepted {} dialled {} refused {} resumes {} journal {} written / {} failed",
        c["sessions_accepted"],
        c["sessions_dialled"],
        c["handshakes_refused"],
        c["resumes_accepted"],
        c["journal_written"],
        c["journal_failed"]
    );
    Ok(())
}

pub(crate) fn ctl_reload(to: &crate::ctl::Target) -> Result<()> {
    let v = crate::ctl::request(to, &Request::Reload)?;
    println!("reloaded; changes:");
    for c in v["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(v["restart_needed"].as_array().into_iter().flatten())
    {
        println!("  {}", c.as_str().unwrap_or("?"));
    }
    Ok(())
}

/// `pool shim path`: where `libpool_shim.so` is.
pub(crate) fn shim_path() -> Result<()> {
    const NAME: &str = "libpool_shim.so";
    let mut places = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        places.push(dir.join(NAME));
        places.push(dir.join("../lib").join(NAME));
        places.push(dir.join("../lib/pool").join(NAME));
    }
    places.push(PathBuf::from("/usr/local/lib/pool").join(NAME));
    places.push(PathBuf::from("/usr/lib/pool").join(NAME));
    match places.iter().find(|p| p.is_file()) {
        Some(p) => {
            let p = p.canonicalize().unwrap_or_else(|_| p.clone());
            println!("{}", p.display());
            Ok(())
        }
        None => Err(CliError::msg(format!(
            "{NAME} not found (looked in {}); build it with `cargo build --release -p pool-shim` \
             and install it with `install -m 0644 target/release/{NAME} /usr/local/lib/pool/`",
            places
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub(crate) fn journal_pubkey(file: &Path) -> Result<()> {
    let key = pool_journal::public_key(file).map_err(|e| CliError::msg(e.to_string()))?;
    println!("{key}");
    Ok(())
}
