//! `pool`: keys, and a netcat-like pair over encrypted, resumable sessions.
// The doc comments below are the command-line help (clap), where addresses
// like [::]:9253 are meant literally, not as rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod cmd;
mod ctl;
mod demo;
mod director;
mod journal;
mod migrate;
mod node;
mod notify;
mod relay;
mod trust;
mod vault;

/// POOL — encrypted, mutually authenticated sessions that survive a lost
/// connection.
#[derive(Parser, Debug)]
#[command(
    name = "pool",
    version,
    about = "POOL: encrypted, mutually authenticated sessions that survive a lost connection",
    long_about = "POOL (Protected Orchestrated Overlay Link) carries streams between two nodes over an \
encrypted, mutually authenticated session (Noise IK, X25519, ChaCha20-Poly1305 or AES-256-GCM). \
When the TCP connection under a session dies, the session resumes on a new one without losing \
or duplicating a byte.\n\nEvery node has a key pair. Create one with `pool keygen`, give the \
public key to the peers that should trust you, and tell each node whom it trusts.",
    after_help = "EXAMPLES:\n  \
pool keygen --out server.key                 # prints the server's public key\n  \
pool keygen --out client.key                 # prints the client's public key\n  \
pool listen [::]:9253 --key server.key --allow CLIENT_PUBKEY\n  \
echo hello | pool connect 127.0.0.1:9253 --key client.key --peer-key SERVER_PUBKEY\n  \
pool bridge pool2tcp --listen [::]:9253 --target 127.0.0.1:80 --key server.key --allow CLIENT_PUBKEY\n  \
pool bridge tcp2pool --listen 127.0.0.1:8080 --peer SERVER:9253 --peer-key SERVER_PUBKEY --key client.key\n\n\
Set RUST_LOG=debug for detailed logs."
)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// How logs are written to stderr: text, or json (one object a line, one field per value; lines inside a session carry its short id in `span`/`spans`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object a line (for journald, Loki, Elasticsearch, ...).
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show POOL on this machine: an HTTP server and client through a bridge pair whose carrier is cut and resumed.
    Demo {
        /// MiB to download through the bridges.
        #[arg(long, default_value_t = 256)]
        megabytes: u64,
        /// Keep everything running afterwards (Ctrl-C to stop), to try curl and pool ctl.
        #[arg(long)]
        keep: bool,
    },
    /// Create a key pair: writes the private key (mode 0600) and prints the public key.
    #[command(
        after_help = "The private key file is never overwritten. Give the printed public key to peers."
    )]
    Keygen {
        /// Where to write the private key.
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
    },
    /// Run the crypto known-answer tests (also run before any command that opens sessions).
    Selftest,
    /// Print the public key of a private key file.
    Pubkey {
        /// The private key file.
        #[arg(value_name = "FILE")]
        key: PathBuf,
    },
    /// Accept sessions and print what arrives on their streams to stdout.
    #[command(
        after_help = "EXAMPLE:\n  pool listen [::]:9253 --key server.key --allow CLIENT_PUBKEY > received.bin"
    )]
    Listen {
        /// Address to listen on: [::]:9253 (all, IPv6 and IPv4), 0.0.0.0:9253, 127.0.0.1:9253.
        #[arg(value_name = "ADDR", default_value = "[::]:9253")]
        addr: String,
        /// This node's private key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        paths: PathArgs,
        /// Exit after the first stream ends.
        #[arg(long)]
        once: bool,
    },
    /// Open a session to a listener and send stdin over a stream; print the reply to stdout.
    #[command(
        after_help = "EXAMPLES:\n  tar c dir | pool connect host.example:9253 --key my.key --peer-key SERVER_PUBKEY\n  \
pool connect --relay relay.example:9255 --key my.key --peer-key SERVER_PUBKEY   (by key alone; moves to a direct path when one works)"
    )]
    Connect {
        /// The listener: HOST:9253, 1.2.3.4:9253 or [::1]:9253 (optional with --relay).
        #[arg(value_name = "HOST:PORT")]
        addr: Option<String>,
        /// This node's private key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The listener's public key (as printed by `pool keygen` / `pool pubkey` there).
        #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
        peer_key: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        paths: PathArgs,
    },
    /// Run the POOL node: listener, bridges, control socket, metrics, journal.
    #[command(
        after_help = "Without --config: listens on [::]:9253 with key /var/lib/pool/node.key (created if missing).\n\
SIGHUP reloads key, trust and bridges without dropping live connections; SIGTERM drains (drain_timeout_secs).\n\
See docs/pool.example.toml for every setting."
    )]
    Daemon {
        /// The configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a relay: splice sealed sessions between nodes that cannot reach each other.
    #[command(
        after_help = "EXAMPLE:\n  pool relay --listen [::]:9255 --metrics 127.0.0.1:9257 --journal /var/lib/pool-relay/relay.journal\n\n\
Nodes prove they hold their key before anything is forwarded; the relay cannot read what it forwards\n\
(it sees keys, addresses, sizes and timing). SIGTERM or SIGINT stops it. See docs/relay.md."
    )]
    Relay(relay::RelayArgs),
    /// Run a director (a pool of workers behind one address), or ask one: workers, drain, owners, status.
    #[command(
        after_help = "EXAMPLES:\n  pool director --listen [::]:9260 --key director.key --worker WORKER_KEY --allow CLIENT_KEY\n  \
pool director workers\n  pool director drain WORKER_KEY\n\nSee docs/director.md."
    )]
    Director(director::DirectorArgs),
    /// Verified, resumable file transfer with a node's vault: push, pull, ls.
    #[command(subcommand)]
    Vault(vault::VaultCmd),
    /// Carry TCP connections over POOL without changing the programs at either end.
    #[command(subcommand)]
    Bridge(BridgeCmd),
    /// Ask a running daemon (over its control socket, or --node over POOL).
    #[command(subcommand)]
    Ctl(CtlCmd),
    /// Check, apply (with automatic rollback), confirm or roll back a config.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Work with the change journal.
    #[command(subcommand)]
    Journal(journal::JournalCmd),
    /// Paths of sessions: where each runs (direct or relay), and whether a direct path works.
    #[command(subcommand)]
    Migrate(MigrateCmd),
    /// Enrol keys: trust a client (authorized file) or pin a listener (known-peers file).
    #[command(subcommand)]
    Trust(TrustCmd),
    /// The LD_PRELOAD shim (libpool_shim.so): unmodified programs onto POOL.
    #[command(subcommand)]
    Shim(ShimCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for pool and its subcommands into a directory.
    Man {
        /// Where to write them.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum BridgeCmd {
    /// Accept TCP connections and carry each over POOL to a peer running `pool2tcp`.
    #[command(
        after_help = "EXAMPLE:\n  pool bridge tcp2pool --listen 127.0.0.1:8080 --peer 10.4.4.101:9253 --peer-key KEY --key client.key"
    )]
    Tcp2pool {
        /// TCP address that clients connect to.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// The pool2tcp end: HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        peer: String,
        /// The pool2tcp end's public key.
        // Keys are base64url: one in 64 starts with `-`.
        #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
        peer_key: String,
        /// Service at the peer (a `[[pool2tcp]] service` of its daemon config).
        #[arg(long, default_value = "")]
        service: String,
        /// --peer and --peer-key name a `pool director`: ask it for a worker, and go back to it when that worker is lost.
        #[arg(long)]
        director: bool,
        #[command(flatten)]
        common: BridgeCommon,
    },
    /// Accept POOL sessions and connect each stream to a fixed TCP target.
    #[command(
        after_help = "EXAMPLE:\n  pool bridge pool2tcp --listen [::]:9253 --target 127.0.0.1:80 --key server.key --allow CLIENT_KEY"
    )]
    Pool2tcp {
        /// POOL address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "[::]:9253")]
        listen: String,
        /// Where streams go: HOST:PORT. Peers cannot choose another target.
        #[arg(long, value_name = "HOST:PORT")]
        target: String,
        /// Send a PROXY protocol v2 header so the target sees the real client address.
        #[arg(long)]
        proxy_protocol: bool,
        #[command(flatten)]
        common: BridgeCommon,
    },
}

#[derive(Args, Debug)]
struct BridgeCommon {
    /// This node's private key file.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Concurrent connections (more are refused at once).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Serve `pool ctl` on this Unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9254.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Append the change journal to this file.
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Every peer: path (direct / relay), via, RTT, path changes, last change.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The control socket [default: $POOL_CONTROL or /run/pool/control.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Check a direct path to a POOL node: reachability, handshake time, throughput.
    #[command(
        after_help = "EXAMPLE:\n  pool migrate test 10.4.4.101            (port 9253, key /var/lib/pool/node.key)\n\
The peer must trust this node's key. Throughput is measured against the peer daemon's `pool.discard` service."
    )]
    Test {
        /// The node's host name or address.
        host: String,
        /// Its POOL port.
        #[arg(default_value_t = 9253)]
        port: u16,
        /// This node's private key file.
        #[arg(long, value_name = "FILE", default_value = "/var/lib/pool/node.key")]
        key: PathBuf,
        /// The peer's public key (default: ask the listener, unauthenticated, then prove it in the handshake).
        #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
        peer_key: Option<String>,
        /// MiB to send for the throughput figure (0: skip).
        #[arg(long, default_value_t = 64)]
        megabytes: u64,
    },
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// Sessions: peer, address, carrier, age, streams, bytes, RTT, jitter, loss, resumes.
    Sessions {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Node key, listeners, bridges, counts, a pending config change.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Reload the configuration file (like SIGHUP): all of it or nothing.
    Reload {
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Hand a live session to another worker; the client follows, nothing is lost.
    #[command(
        after_help = "EXAMPLE:\n  pool ctl handoff 3fa2c1 --to 10.0.0.2:9253 --to-key KEY\n\n\
SESSION is a session id (or its start) or a peer-key prefix, as `pool ctl sessions` shows them.\n\
Both workers list each other in [handoff] peers. Streams this worker serves stay here and are\n\
forwarded through the target until they end (or [handoff] forward_deadline); new streams go there."
    )]
    Handoff {
        /// The session: an id prefix or a peer-key prefix (which may start with `-`).
        #[arg(allow_hyphen_values = true)]
        session: String,
        /// The target worker's POOL address.
        #[arg(long = "to", value_name = "HOST:PORT")]
        dest: String,
        /// The target worker's public key.
        #[arg(long = "to-key", value_name = "KEY", allow_hyphen_values = true)]
        dest_key: String,
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Hand every session of this worker to another one, then report.
    Drain {
        /// The target worker's POOL address.
        #[arg(long = "to", value_name = "HOST:PORT")]
        dest: String,
        /// The target worker's public key.
        #[arg(long = "to-key", value_name = "KEY", allow_hyphen_values = true)]
        dest_key: String,
        /// How long streams left on this worker are forwarded before they
        /// are reset (code 7) [default: `[handoff] forward_deadline`].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        deadline: Option<std::time::Duration>,
        #[command(flatten)]
        to: ctl::Target,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Check a config file; with a running daemon, say what applying it would change.
    Check {
        /// The config file.
        file: PathBuf,
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Apply a config file now; it rolls back by itself unless confirmed in time.
    #[command(
        after_help = "EXAMPLES:\n  pool config apply /etc/pool/pool.toml --confirm-within 2m\n  pool config confirm\n\n\
The daemon rewrites its config file to FILE and keeps the one it replaces. Unconfirmed at the\n\
deadline it goes back by itself, even if this command's session is gone or the daemon was\n\
restarted meanwhile. --confirm-within 0 keeps the change at once."
    )]
    Apply {
        /// The config file.
        file: PathBuf,
        /// Roll back unless `pool config confirm` comes within this long (90s, 2m, 1h; 0: keep at once).
        #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
        confirm_within: std::time::Duration,
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Keep the pending change.
    Confirm {
        #[command(flatten)]
        to: ctl::Target,
    },
    /// Go back from the pending change now.
    Rollback {
        #[command(flatten)]
        to: ctl::Target,
    },
}

fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    pool_node::types::parse_duration(s)
}

#[derive(Subcommand, Debug)]
enum TrustCmd {
    /// Add a key to an authorized file (clients this node accepts) or pin it in a known-peers file (a listener this node dials).
    #[command(
        after_help = "EXAMPLES:\n  pool trust add CLIENT_KEY --authorized /etc/pool/authorized_keys --comment web-1\n  \
pool trust add SERVER_KEY --known-peers /var/lib/pool/known_peers --peer 10.4.4.101:9253\n\n\
The file is rewritten atomically (a new file renamed over the old one), so a daemon reading it\n\
never sees half a line. A running daemon picks the change up on `pool ctl reload` (or SIGHUP)."
    )]
    Add {
        /// The public key (as `pool keygen` / `pool pubkey` print it).
        #[arg(value_name = "KEY", allow_hyphen_values = true)]
        key: String,
        /// Trust KEY as a client: append it to this authorized-keys file (created if missing).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "known_peers",
            required_unless_present = "known_peers"
        )]
        authorized: Option<PathBuf>,
        /// Pin KEY as the key of the listener at --peer in this known-peers file.
        #[arg(long, value_name = "FILE", requires = "peer")]
        known_peers: Option<PathBuf>,
        /// The listener's address (HOST:PORT, as this node dials it), with --known-peers.
        #[arg(long, value_name = "HOST:PORT")]
        peer: Option<String>,
        /// A note kept on the key's line (who or what it is).
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
}

/// Relays and path changes.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct PathArgs {
    /// A relay (HOST:PORT, port 9255 by default; repeatable): listeners register there and can be reached by key alone; sessions start there when no direct path works and fall back there when it dies.
    #[arg(long = "relay", value_name = "HOST:PORT")]
    pub(crate) relays: Vec<String>,
    /// While on a relay, try direct paths again this often (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub(crate) direct_retry: u64,
    /// A path that leaves data or a ping unanswered this long is dead, and the session moves (milliseconds; at least 4 RTT).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub(crate) probe_timeout_ms: u64,
    /// Stay on the relay: never try direct paths (to measure or debug a relay).
    #[arg(long)]
    pub(crate) relay_only: bool,
}

#[derive(Subcommand, Debug)]
enum ShimCmd {
    /// Print where libpool_shim.so is (for LD_PRELOAD).
    #[command(
        after_help = "Looks next to this `pool` binary, then in ../lib and ../lib/pool beside it, /usr/local/lib/pool and /usr/lib/pool.\n\
Use: LD_PRELOAD=$(pool shim path) POOL_SHIM_PORTS=80,443 curl http://10.0.0.5/\n\
Build it with: cargo build --release -p pool-shim (target/release/libpool_shim.so). See docs/shim.md."
    )]
    Path,
}

/// Whom to trust. Every command that accepts sessions takes these.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct TrustArgs {
    /// Trust this peer public key (repeatable).
    #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
    pub(crate) allow: Vec<String>,
    /// Trust every key in this file (one key per line, `#` comments).
    #[arg(long, value_name = "FILE")]
    pub(crate) authorized: Option<PathBuf>,
    /// Use this fleet secret; any peer holding it is trusted. All nodes of the fleet need the same file.
    #[arg(long, value_name = "FILE")]
    pub(crate) fleet_secret: Option<PathBuf>,
    /// Trust on first use for listeners this node dials: pin the key one presents on first contact and require it later (opt-in). Never makes a listener accept an unknown client.
    #[arg(long)]
    pub(crate) tofu: bool,
    /// Where TOFU pins are kept [default: $POOL_HOME/known_peers or ~/.config/pool/known_peers].
    #[arg(long, value_name = "FILE")]
    pub(crate) known_peers: Option<PathBuf>,
}

async fn bridge(b: BridgeCmd) -> Result<(), cmd::CliError> {
    let extras = |c: &BridgeCommon| node::NodeExtras {
        control: c.control.clone(),
        metrics: c.metrics.clone(),
        journal: c.journal.clone(),
    };
    match b {
        BridgeCmd::Tcp2pool {
            listen,
            peer,
            peer_key,
            service,
            director,
            common,
        } => {
            let ex = extras(&common);
            node::tcp2pool(
                listen,
                peer,
                peer_key,
                service,
                director,
                common.key,
                &common.trust,
                common.max_connections,
                ex,
            )
            .await
        }
        BridgeCmd::Pool2tcp {
            listen,
            target,
            proxy_protocol,
            common,
        } => {
            let ex = extras(&common);
            node::pool2tcp(
                listen,
                target,
                proxy_protocol,
                common.key,
                &common.trust,
                common.max_connections,
                ex,
            )
            .await
        }
    }
}

fn man_pages(dir: &std::path::Path) -> Result<(), cmd::CliError> {
    fn write(cmd: clap::Command, name: &str, dir: &std::path::Path) -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            write(sub.clone(), &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let cmd = <Cli as clap::CommandFactory>::command();
    write(cmd, "pool", dir)?;
    println!("man pages written to {}", dir.display());
    Ok(())
}

/// Whether a command may open sessions (and so first runs the crypto
/// self-test): all but those that only read or write files.
fn needs_selftest(c: &Command) -> bool {
    !matches!(
        c,
        Command::Selftest
            | Command::Keygen { .. }
            | Command::Pubkey { .. }
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::Shim(_)
            | Command::Trust(_)
            | Command::Journal(_)
    )
}

/// A failed known-answer test refuses the start, naming the test.
fn selftest_gate(
    r: Result<pool_core::selftest::Report, pool_core::selftest::SelfTestFailure>,
) -> cmd::Result<()> {
    match r {
        Ok(report) => {
            tracing::debug!(
                micros = report.total.as_micros() as u64,
                "crypto self-test passed"
            );
            Ok(())
        }
        Err(e) => Err(cmd::CliError(e.to_string())),
    }
}

fn selftest_cmd() -> cmd::Result<()> {
    let report = pool_core::selftest::run().map_err(|e| cmd::CliError(e.to_string()))?;
    for t in &report.tests {
        println!("{:<20} pass {:>6} µs", t.name, t.elapsed.as_micros());
    }
    println!("{:<20} pass {:>6} µs", "total", report.total.as_micros());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true)
            .init(),
    }

    if needs_selftest(&cli.command) {
        if let Err(e) = selftest_gate(pool_core::selftest::run()) {
            eprintln!("pool: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Selftest => selftest_cmd(),
        Command::Demo { megabytes, keep } => {
            cmd::runtime().and_then(|rt| rt.block_on(demo::demo(megabytes, keep)))
        }
        Command::Keygen { out } => cmd::keygen(&out),
        Command::Pubkey { key } => cmd::pubkey(&key),
        Command::Listen {
            addr,
            key,
            trust,
            paths,
            once,
        } => cmd::runtime()
            .and_then(|rt| rt.block_on(cmd::listen(&addr, &key, &trust, &paths, once))),
        Command::Daemon { config } => {
            cmd::runtime().and_then(|rt| rt.block_on(node::daemon_cmd(config)))
        }
        Command::Director(a) => director::main(a),
        Command::Vault(v) => vault::main(v),
        Command::Relay(a) => relay::runtime().and_then(|rt| rt.block_on(relay::relay(a))),
        Command::Bridge(b) => cmd::runtime().and_then(|rt| rt.block_on(bridge(b))),
        Command::Ctl(CtlCmd::Sessions { json, to }) => node::ctl_sessions(&to, json),
        Command::Ctl(CtlCmd::Status { json, to }) => node::ctl_status(&to, json),
        Command::Ctl(CtlCmd::Reload { to }) => node::ctl_reload(&to),
        Command::Ctl(CtlCmd::Handoff {
            session,
            dest,
            dest_key,
            to,
        }) => ctl::handoff(session, dest, dest_key, &to),
        Command::Ctl(CtlCmd::Drain {
            dest,
            dest_key,
            deadline,
            to,
        }) => ctl::drain(dest, dest_key, deadline, &to),
        Command::Config(ConfigCmd::Check { file, to }) => ctl::check(&file, &to),
        Command::Config(ConfigCmd::Apply {
            file,
            confirm_within,
            to,
        }) => ctl::apply(&file, confirm_within, &to),
        Command::Config(ConfigCmd::Confirm { to }) => ctl::confirm(&to),
        Command::Config(ConfigCmd::Rollback { to }) => ctl::rollback(&to),
        Command::Journal(j) => journal::main(j),
        Command::Migrate(MigrateCmd::Status { json, control }) => {
            migrate::status(&control.unwrap_or_else(node::default_control), json)
        }
        Command::Migrate(MigrateCmd::Test {
            host,
            port,
            key,
            peer_key,
            megabytes,
        }) => cmd::runtime().and_then(|rt| {
            rt.block_on(migrate::test(
                &host,
                port,
                &key,
                peer_key.as_deref(),
                megabytes,
            ))
        }),
        Command::Shim(ShimCmd::Path) => node::shim_path(),
        Command::Trust(TrustCmd::Add {
            key,
            authorized,
            known_peers,
            peer,
            comment,
        }) => trust::add(
            &key,
            authorized.as_deref(),
            known_peers.as_deref().zip(peer.as_deref()),
            comment.as_deref(),
        ),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "pool", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(&dir),
        Command::Connect {
            addr,
            key,
            peer_key,
            trust,
            paths,
        } => cmd::runtime().and_then(|rt| {
            rt.block_on(cmd::connect(
                addr.as_deref(),
                &key,
                peer_key.as_deref(),
                &trust,
                &paths,
            ))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pool: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broken primitive stops every session-opening command before it
    /// starts, and the message names the primitive.
    #[test]
    fn a_failed_selftest_refuses_to_start() {
        for name in pool_core::selftest::TESTS {
            let err = selftest_gate(pool_core::selftest::run_corrupted(name)).unwrap_err();
            assert!(err.0.contains(name), "{err}");
            assert!(err.0.contains("refusing to start"), "{err}");
        }
        pool_core::selftest::run().unwrap();
        let daemon = Cli::parse_from(["pool", "daemon"]);
        assert!(needs_selftest(&daemon.command));
        let keygen = Cli::parse_from(["pool", "keygen", "--out", "k"]);
        assert!(!needs_selftest(&keygen.command));
    }
}
