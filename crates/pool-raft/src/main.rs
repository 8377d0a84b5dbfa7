//! `pool-raft`: a three-node openraft cluster over POOL or plain TCP,
//! with carriers cut on a timer; see the crate docs and docs/raft.md.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pool_raft::bench::{decision, print_table, run, Report, RunOptions};
use pool_raft::Transport;

#[derive(Parser)]
#[command(
    version,
    about = "Raft (openraft) over POOL, measured against plain TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run over one transport.
    Run {
        /// What carries the Raft RPCs.
        #[arg(long, value_enum, default_value_t = Transport::Pool)]
        transport: Transport,
        #[command(flatten)]
        common: Common,
    },
    /// A run over POOL, then one over TCP, side by side, with the decision.
    Compare {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Seconds of writing.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Seconds between cuts of every carrier (0: no cuts).
    #[arg(long, default_value_t = 10.0)]
    cut_every: f64,
    /// Client writes per second.
    #[arg(long, default_value_t = 200)]
    writes_per_sec: u32,
    /// Raft heartbeat interval, ms (election timeout stays 150-300 ms).
    #[arg(long, default_value_t = 50)]
    heartbeat_ms: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

impl Common {
    fn options(&self, transport: Transport) -> RunOptions {
        RunOptions {
            transport,
            duration: Duration::from_secs(self.seconds),
            cut_every: (self.cut_every > 0.0).then(|| Duration::from_secs_f64(self.cut_every)),
            writes_per_sec: self.writes_per_sec,
            heartbeat_ms: self.heartbeat_ms,
        }
    }
}

async fn one(opts: &RunOptions) -> Result<Report, ExitCode> {
    eprintln!(
        "pool-raft: {} for {:?} (cut every {:?})...",
        opts.transport, opts.duration, opts.cut_every
    );
    run(opts).await.map_err(|e| {
        eprintln!("pool-raft: the {} run failed: {e}", opts.transport);
        ExitCode::FAILURE
    })
}

fn verdict(reports: &[Report]) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for r in reports.iter().filter(|r| !r.correct()) {
        eprintln!(
            "pool-raft: CORRECTNESS FAILURE over {}: the state machines do not hold the same acknowledged writes",
            r.transport
        );
        code = ExitCode::FAILURE;
    }
    code
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,openraft=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { transport, common } => {
            let r = match one(&common.options(transport)).await {
                Ok(r) => r,
                Err(code) => return code,
            };
            if common.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print_table(std::slice::from_ref(&r));
            }
            verdict(&[r])
        }
        Cmd::Compare { common } => {
            let mut reports = Vec::new();
            for t in [Transport::Pool, Transport::Tcp] {
                match one(&common.options(t)).await {
                    Ok(r) => reports.push(r),
                    Err(code) => return code,
                }
            }
            let decided = decision(&reports[0]);
            if common.json {
                let v = serde_json::json!({
                    "pool": reports[0],
                    "tcp": reports[1],
                    "decision": decided,
                    "go": reports[0].meets_goals(),
                });
                println!("{v}");
            } else {
                print_table(&reports);
                println!();
                println!("{decided}");
            }
            verdict(&reports)
        }
    }
}
