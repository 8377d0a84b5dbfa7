//! # pool-journal: POOL's change journal
//!
//! The change journal: an append-only, hash-chained log of what an auditor
//! asks about (sessions opened and closed, refused handshakes, config
//! reloads, key changes, resumes).
//!
//! Each line is one JSON object with these keys, plus the event's own fields:
//!
//! - `seq`: 1 for the first entry of a file, then +1 per entry;
//! - `ts`: when the event was recorded, RFC 3339 UTC with milliseconds;
//! - `event`: what happened (`session_opened`, `config_applied`, ...);
//! - `prev`: the previous entry's `hash` (64 zeros for the first entry);
//! - `hash`: hex SHA-256 of the entry's canonical form without `hash`.
//!
//! The canonical form is compact JSON with object keys sorted bytewise at
//! every level, and lines are written in that form, so a line's bytes are
//! fixed by its content. Editing a line breaks its `hash`; editing it and
//! recomputing the hash breaks the next line's `prev`; removing or
//! reordering lines breaks the `seq` run. [`verify`] names the line.
//!
//! The chain has no key: whoever can write the file can edit a line and
//! recompute every later hash. So the writer also appends **signed
//! checkpoints** (`journal_checkpoint` entries, Ed25519): every
//! [`CHECKPOINT_EVERY`] entries, when an entry has waited
//! [`CHECKPOINT_INTERVAL`] without one, and on [`Journal::checkpoint`]
//! (clean shutdown). A checkpoint lists a 128-bit digest of every entry
//! since the previous one (its "leaf": the entry without `prev` and
//! `hash`) and signs that list with the journal's key, kept in a file
//! beside the journal ([`key_path`], mode 0600, created on first open). An
//! edited entry then no longer matches the leaf a checkpoint signed, even
//! after the chain was recomputed, and [`verify_with_key`] names its line.
//!
//! Why a key file of its own and not a key derived from the node key: the
//! relay has no node key; a node key change (`key_changed`) must not change
//! the key mid-file; and the two secrets have different jobs (the node key
//! authenticates sessions and is given to peers by its public half; the
//! journal key only signs an audit log), so a leak of one must not be a
//! leak of the other.
//!
//! What this cannot show: lines cut off the *end* after the last
//! checkpoint (or a tail cut together with its checkpoints), entries
//! written after the last checkpoint (a crash leaves them unsigned;
//! [`VerifyReport::unsigned`] lists them), a whole file deleted, and
//! anything done by someone who holds the key file (root on the node, or
//! the node's user): they can sign what they like. Keep the public key and
//! the last hash that `pool journal verify` prints somewhere else.
//!
//! Writing never holds up traffic: [`Journal::record`] only queues. A
//! writer task appends and fsyncs in batches. If the queue is full or the
//! disk refuses writes (full disk, I/O error), entries are dropped and
//! counted, an error is logged once per burst, and the chain stays valid:
//! dropped entries take no `seq`. Once writes succeed again a
//! `journal_entries_lost` entry records how many were lost.
//!
//! Every event is a variant of [`Event`]; `docs/journal.md` is the schema:
//! the line format, the chain, the checkpoints and each event's fields.
//!
//! Modules, by concern: `record` (one line: its canonical form, hash and
//! leaf), `checkpoint` (the signing key and signed checkpoints), `writer`
//! (the [`Journal`] handle and its writer task), `verify` (checking a
//! file), `canonical` (canonical JSON, hex, timestamps), `event`.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod canonical;
mod checkpoint;
mod error;
mod event;
mod record;
mod series;
mod verify;
mod writer;

pub use canonical::civil_from_days;
pub use checkpoint::{
    key_path, public_key, CHECKPOINT_EVENT, CHECKPOINT_EVERY, CHECKPOINT_INTERVAL,
};
pub use error::JournalError;
pub use event::{Event, UnknownEvent};
pub use series::{sealed_path, Continuation, JournalConfig, SeriesReport, CONTINUED_EVENT};
pub use verify::{series_files, verify, verify_series, verify_with_key, VerifyReport};
pub use writer::{Journal, JournalStats};
