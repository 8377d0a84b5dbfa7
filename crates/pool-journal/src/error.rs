//! What can go wrong opening or reading a journal.

use std::io;
use std::path::PathBuf;

/// What went wrong opening or reading a journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file could not be opened or created.
    #[error(
        "journal {}: cannot open: {source} (check that the directory exists and that this user may write to it)",
        path.display()
    )]
    Open {
        /// The journal file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file could not be read.
    #[error("journal {}: cannot read: {source}", path.display())]
    Read {
        /// The journal file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The last line of an existing journal is not an intact entry, so the
    /// chain cannot be continued from it.
    #[error(
        "journal {}: cannot continue the chain: {reason}. Run `pool journal verify {}` to see what changed, then move the file aside so that a new journal can start",
        path.display(),
        path.display()
    )]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// What is wrong with the last line.
        reason: String,
    },
    /// [`verify`](crate::verify) was given something other than a regular file.
    #[error("journal {}: not a regular file", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The journal's signing key file cannot be created, read or used.
    #[error("journal signing key {}: {reason}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The public key given to check checkpoints against is malformed.
    #[error("journal public key `{given}` is not 64 hex digits (print it with `pool journal pubkey JOURNAL`)")]
    BadPublicKey {
        /// What was given.
        given: String,
    },
    /// Rotating the journal failed; it goes on in the same file.
    #[error("journal {}: not rotated: {reason} (it goes on in the same file)", path.display())]
    Rotate {
        /// The live journal file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}
