//! `pool`: keys, and a netcat-like pair over encrypted, resumable sessions.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod cmd;
mod demo;

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
echo hello | pool connect 127.0.0.1:9253 --key client.key --peer-key SERVER_PUBKEY\n\n\
Set RUST_LOG=debug for detailed logs."
)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show POOL on this machine: a session whose carrier dies mid-transfer and resumes, checked by hash.
    Demo {
        /// MiB to send.
        #[arg(long, default_value_t = 256)]
        megabytes: u64,
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
        /// Exit after the first stream ends.
        #[arg(long)]
        once: bool,
    },
    /// Open a session to a listener and send stdin over a stream; print the reply to stdout.
    #[command(
        after_help = "EXAMPLE:\n  tar c dir | pool connect host.example:9253 --key my.key --peer-key SERVER_PUBKEY"
    )]
    Connect {
        /// The listener: HOST:9253, 1.2.3.4:9253 or [::1]:9253.
        #[arg(value_name = "HOST:PORT")]
        addr: String,
        /// This node's private key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The listener's public key (as printed by `pool keygen` / `pool pubkey` there).
        #[arg(long, value_name = "KEY")]
        peer_key: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
    },
}

/// Whom to trust. Every command that accepts sessions takes these.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct TrustArgs {
    /// Trust this peer public key (repeatable).
    #[arg(long, value_name = "KEY")]
    allow: Vec<String>,
    /// Trust every key in this file (one key per line, `#` comments).
    #[arg(long, value_name = "FILE")]
    authorized: Option<PathBuf>,
    /// Use this fleet secret; any peer holding it is trusted. All nodes of the fleet need the same file.
    #[arg(long, value_name = "FILE")]
    fleet_secret: Option<PathBuf>,
    /// Trust on first use: pin the first key seen and refuse others later (opt-in).
    #[arg(long)]
    tofu: bool,
    /// Where TOFU pins are kept [default: $POOL_HOME/known_peers or ~/.config/pool/known_peers].
    #[arg(long, value_name = "FILE")]
    known_peers: Option<PathBuf>,
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match cli.command {
        Command::Demo { megabytes } => {
            cmd::runtime().and_then(|rt| rt.block_on(demo::demo(megabytes)))
        }
        Command::Keygen { out } => cmd::keygen(&out),
        Command::Pubkey { key } => cmd::pubkey(&key),
        Command::Listen {
            addr,
            key,
            trust,
            once,
        } => cmd::runtime().and_then(|rt| rt.block_on(cmd::listen(&addr, &key, &trust, once))),
        Command::Connect {
            addr,
            key,
            peer_key,
            trust,
        } => cmd::runtime()
            .and_then(|rt| rt.block_on(cmd::connect(&addr, &key, peer_key.as_deref(), &trust))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pool: error: {e}");
            ExitCode::FAILURE
        }
    }
}
