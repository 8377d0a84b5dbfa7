//! `pool journal`: verify a journal (a whole rotated series), print its
//! signing key, rotate a running daemon's journal.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use pool_node::control::Request;

use crate::cmd::CliError;

type Result<T> = std::result::Result<T, CliError>;

#[derive(Subcommand, Debug)]
pub(crate) enum JournalCmd {
    /// Check the hash chain and the signed checkpoints of a journal and of the files rotated out of it: finds edited, removed or reordered lines.
    #[command(
        after_help = "EXAMPLES:\n  pool journal pubkey /var/lib/pool/journal.log      # once; keep the key off this host\n  \
pool journal verify /var/lib/pool/journal.log --key KEY\n  \
pool journal verify journal.log.000007 journal.log.000008 journal.log --key KEY\n\n\
With one FILE, the series is FILE.000001, FILE.000002, ... (the sealed files `pool journal rotate`\n\
left beside it, oldest first) and FILE; with several, exactly those, in the order given. Each file\n\
after the first must continue the one before it. Problems are named by file and line.\n\
Without --key the checkpoints are checked against the key the file itself names, which a file\n\
rewritten from scratch could name too. Entries after the last checkpoint are listed as unsigned."
    )]
    Verify {
        /// The journal file (or the files of a series, oldest first).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The journal's public signing key (hex, from `pool journal pubkey`) that every checkpoint must be signed with.
        #[arg(long, value_name = "PUB")]
        key: Option<String>,
    },
    /// Print the public key that signs a journal's checkpoints (from FILE.key beside it).
    Pubkey {
        /// The journal file.
        file: PathBuf,
    },
    /// Seal a running daemon's journal and start a new file that continues its chain.
    #[command(
        after_help = "The daemon writes every entry recorded before the request, and a checkpoint signing them, to\n\
the sealed file, renames it to the next number (journal.log.000001, .000002, ...; numbers never\n\
move), and continues in a new journal.log whose first line chains to the sealed file's last hash.\n\
Nothing is lost or reordered meanwhile. The same happens on SIGUSR1 (`systemctl kill -s USR1 pool`),\n\
which is also how a running `pool relay` is rotated, and by itself with [node] journal_rotate_bytes."
    )]
    Rotate {
        /// The control socket [default: $POOL_CONTROL or /run/pool/control.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

pub(crate) fn main(cmd: JournalCmd) -> Result<()> {
    match cmd {
        JournalCmd::Verify { files, key } => verify(&files, key.as_deref()),
        JournalCmd::Pubkey { file } => crate::node::journal_pubkey(&file),
        JournalCmd::Rotate { control } => rotate(control),
    }
}

fn verify(files: &[PathBuf], key: Option<&str>) -> Result<()> {
    let err = |e: pool_journal::JournalError| CliError::msg(e.to_string());
    let series = match files {
        [one] => {
            let found = pool_journal::series_files(one).map_err(err)?;
            if found.is_empty() {
                // Let verify name the missing file.
                vec![one.clone()]
            } else {
                found
            }
        }
        many => many.to_vec(),
    };
    let report = pool_journal::verify_series(&series, key).map_err(err)?;
    println!("{report}");
    let problems = report.problems();
    if problems.is_empty() {
        return Ok(());
    }
    let first = problems.first().map(String::as_str).unwrap_or_default();
    Err(CliError::msg(format!(
        "{} problem(s) found, the first: {first}; the journal has been altered",
        problems.len()
    )))
}

fn rotate(control: Option<PathBuf>) -> Result<()> {
    let to = crate::ctl::Target {
        control: Some(control.unwrap_or_else(crate::node::default_control)),
        ..crate::ctl::Target::default()
    };
    let v = crate::ctl::request(&to, &Request::JournalRotate)?;
    match v["sealed"].as_str() {
        Some(p) => {
            println!("sealed {p}");
            if let Some(dir) = Path::new(p).parent() {
                println!(
                    "(verify the series with `pool journal verify` on the live file in {})",
                    dir.display()
                );
            }
        }
        None => println!("the journal is empty; nothing to seal"),
    }
    Ok(())
}
