//! `pool vault push | pull | ls`: verified, resumable file transfer with a
//! node's vault (docs/vault.md).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use pool_net::{Endpoint, EndpointConfig, Session};
use pool_vault::{Progress, Report};

use crate::cmd::{err, load_key, parse_key, CliError, Result};
use crate::TrustArgs;

/// `pool vault`.
#[derive(Subcommand, Debug)]
pub(crate) enum VaultCmd {
    /// Send files or directories (recursively) to DEST on the node; only what is missing is sent.
    #[command(
        after_help = "EXAMPLE:\n  pool vault push 10.4.4.101 myfile.tar.gz /incoming/myfile.tar.gz --key client.key --peer-key KEY\n  pool vault push node.example:9253 ./photos /incoming/ --seal --key client.key --peer-key KEY"
    )]
    Push {
        /// The node: HOST, HOST:PORT, 1.2.3.4, [::1]:9253 (port 9253 if none).
        #[arg(value_name = "HOST[:PORT]")]
        host: String,
        /// Files or directories, then the destination (a vault path such as /incoming/x).
        #[arg(value_name = "PATH", num_args = 2.., required = true)]
        paths: Vec<String>,
        /// Encrypt every chunk to this client's key before it leaves: the node stores ciphertext only.
        #[arg(long)]
        seal: bool,
        /// At most this many bytes per second (K, M, G suffixes: 1024-based).
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        bwlimit: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Fetch SRC (a file or a directory) from the node into DEST; only what is missing is fetched.
    Pull {
        /// The node: HOST, HOST:PORT, 1.2.3.4, [::1]:9253.
        #[arg(value_name = "HOST[:PORT]")]
        host: String,
        /// The vault path.
        src: String,
        /// A file name, or a directory to put it in.
        dest: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// List a vault directory.
    Ls {
        /// The node: HOST, HOST:PORT, 1.2.3.4, [::1]:9253.
        #[arg(value_name = "HOST[:PORT]")]
        host: String,
        /// The vault path.
        #[arg(default_value = "/")]
        path: String,
        #[command(flatten)]
        common: Common,
    },
}

/// What every vault command takes.
#[derive(Args, Debug)]
pub(crate) struct Common {
    /// This client's key file [default: the daemon's, /var/lib/pool/node.key].
    #[arg(long, value_name = "FILE", default_value = "/var/lib/pool/node.key")]
    key: PathBuf,
    /// The node's public key (`pool pubkey` there); or --tofu.
    #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
    peer_key: Option<String>,
    /// JSON lines on stdout: progress, then the report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    trust: TrustArgs,
}

fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a rate (bytes per second, e.g. 500K, 20M)"))
}

/// `HOST`, `HOST:PORT`, `1.2.3.4`, `::1`, `[::1]:PORT` → something to dial.
pub(crate) fn with_port(host: &str) -> String {
    if host.parse::<std::net::SocketAddr>().is_ok() {
        return host.to_string();
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return std::net::SocketAddr::new(ip, 9253).to_string();
    }
    if host.starts_with('[') && host.ends_with(']') {
        return format!("{host}:9253");
    }
    match host.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => host.to_string(),
        _ => format!("{host}:9253"),
    }
}

async fn session(host: &str, c: &Common) -> Result<(Session, pool_net::SecretKey)> {
    let key = load_key(&c.key)?;
    let trust = crate::cmd::trust(&c.trust)?;
    let addr = with_port(host);
    let peer = match &c.peer_key {
        Some(k) => parse_key(k, "--peer-key")?,
        None if c.trust.tofu => crate::cmd::tofu_peer(&addr, &trust).await?,
        None => {
            return err(
                "the node's public key is needed to authenticate it: add --peer-key KEY \
                 (run `pool pubkey KEYFILE` there), or --tofu to pin it on first use",
            )
        }
    };
    let ep = Endpoint::client(EndpointConfig::new(key.clone()).trust(trust));
    let s = ep
        .connect(&addr, peer)
        .await
        .map_err(|e| CliError(format!("cannot reach the vault at {addr}: {e}")))?;
    Ok((s, key))
}

/// A progress bar on a terminal, JSON lines with `--json`, else nothing.
enum Shown {
    Bar(indicatif::ProgressBar),
    Json {
        done: u64,
        total: u64,
        last: Instant,
    },
    Quiet,
}

impl Shown {
    fn new(json: bool) -> Shown {
        if json {
            return Shown::Json {
                done: 0,
                total: 0,
                last: Instant::now(),
            };
        }
        if !std::io::stderr().is_terminal() {
            return Shown::Quiet;
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Shown::Bar(bar)
    }

    fn finish(&mut self) {
        match self {
            Shown::Bar(b) => b.finish_and_clear(),
            Shown::Json { done, total, .. } => {
                println!(
                    "{}",
                    serde_json::json!({"event": "progress", "bytes": done, "total": total})
                );
            }
            Shown::Quiet => {}
        }
    }
}

impl Progress for Shown {
    fn total(&mut self, bytes: u64) {
        match self {
            Shown::Bar(b) => b.set_length(bytes),
            Shown::Json { total, .. } => *total = bytes,
            Shown::Quiet => {}
        }
    }

    fn file(&mut self, path: &str, size: u64) {
        match self {
            Shown::Bar(b) => {
                b.set_message(path.to_string());
                if b.length() == Some(0) || b.position() >= b.length().unwrap_or(0) {
                    b.inc_length(size);
                }
            }
            Shown::Json { .. } => {
                println!(
                    "{}",
                    serde_json::json!({"event": "file", "path": path, "size": size})
                );
            }
            Shown::Quiet => {}
        }
    }

    fn advance(&mut self, bytes: u64) {
        match self {
            Shown::Bar(b) => b.inc(bytes),
            Shown::Json { done, total, last } => {
                *done += bytes;
                if last.elapsed() >= Duration::from_millis(100) {
                    *last = Instant::now();
                    println!(
                        "{}",
                        serde_json::json!({"event": "progress", "bytes": done, "total": total})
                    );
                }
            }
            Shown::Quiet => {}
        }
    }
}

fn size(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn say(what: &str, r: &Report, wire: u64, took: Duration, json: bool) {
    if json {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["event"] = "done".into();
        v["op"] = what.into();
        v["wire_bytes"] = wire.into();
        v["seconds"] = took.as_secs_f64().into();
        println!("{v}");
        return;
    }
    let rate = r.bytes_sent as f64 / took.as_secs_f64().max(1e-3);
    println!(
        "{what} {} files: {} sent ({} files), {} skipped (already there, {} files), {} verified, in {:.2} s ({}/s){}",
        r.files,
        size(r.bytes_sent),
        r.files_sent,
        size(r.bytes_skipped),
        r.files_skipped,
        r.verified,
        took.as_secs_f64(),
        size(rate as u64),
        if r.links_skipped > 0 {
            format!("; {} symbolic links left out", r.links_skipped)
        } else {
            String::new()
        }
    );
}

fn vault_err(e: pool_vault::VaultError) -> CliError {
    CliError(e.to_string())
}

async fn run(cmd: VaultCmd) -> Result<()> {
    match cmd {
        VaultCmd::Push {
            host,
            mut paths,
            seal,
            bwlimit,
            common,
        } => {
            let dest = paths.pop().unwrap_or_default();
            let sources: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
            for s in &sources {
                if std::fs::symlink_metadata(s).is_err() {
                    return err(format!("{}: no such file or directory", s.display()));
                }
            }
            let (session, key) = session(&host, &common).await?;
            let mut shown = Shown::new(common.json);
            let start = Instant::now();
            let r = pool_vault::client::push(
                &session,
                &sources,
                &dest,
                seal.then_some(&key),
                bwlimit,
                &mut shown,
            )
            .await
            .map_err(vault_err);
            shown.finish();
            let r = r?;
            say(
                "pushed",
                &r,
                session.stats().core.bytes_sent,
                start.elapsed(),
                common.json,
            );
            let _ = session.close("done").await;
            Ok(())
        }
        VaultCmd::Pull {
            host,
            src,
            dest,
            common,
        } => {
            let (session, key) = session(&host, &common).await?;
            let mut shown = Shown::new(common.json);
            let start = Instant::now();
            let r = pool_vault::client::pull(&session, &src, &dest, &key, &mut shown)
                .await
                .map_err(vault_err);
            shown.finish();
            let r = r?;
            say(
                "pulled",
                &r,
                session.stats().core.bytes_received,
                start.elapsed(),
                common.json,
            );
            let _ = session.close("done").await;
            Ok(())
        }
        VaultCmd::Ls { host, path, common } => {
            let (session, _) = session(&host, &common).await?;
            let entries = pool_vault::client::ls(&session, &path)
                .await
                .map_err(vault_err)?;
            if common.json {
                println!("{}", serde_json::to_string(&entries).unwrap_or_default());
            } else {
                for e in entries {
                    let kind = match e.kind.as_str() {
                        "dir" => 'd',
                        "link" => 'l',
                        _ => '-',
                    };
                    println!(
                        "{kind}{:04o} {:>12} {}{}",
                        e.mode,
                        e.size,
                        e.name,
                        if e.sealed { "  (sealed)" } else { "" }
                    );
                }
            }
            let _ = session.close("done").await;
            Ok(())
        }
    }
}

/// Runs a vault command on its own runtime (two threads: file work and
/// the session's crypto side by side).
pub(crate) fn main(cmd: VaultCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(run(cmd))
}

#[cfg(test)]
mod tests {
    use super::with_port;

    #[test]
    fn hosts_get_the_default_port() {
        assert_eq!(with_port("10.4.4.101"), "10.4.4.101:9253");
        assert_eq!(with_port("10.4.4.101:7000"), "10.4.4.101:7000");
        assert_eq!(with_port("::1"), "[::1]:9253");
        assert_eq!(with_port("[::1]:7000"), "[::1]:7000");
        assert_eq!(with_port("[fd00::1]"), "[fd00::1]:9253");
        assert_eq!(with_port("node.example"), "node.example:9253");
        assert_eq!(with_port("node.example:7000"), "node.example:7000");
    }
}
