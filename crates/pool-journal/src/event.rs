//! The events a journal line can record: one closed list, so that a name
//! cannot be misspelt at one call site and every event is documented in
//! one place (`docs/journal.md` lists each one's fields).

use std::fmt;
use std::str::FromStr;

/// What a journal entry records (its `event` key). [`Event::name`] is the
/// string written to the file; [`Event::from_name`] reads it back.
///
/// The last two variants are written by the journal itself and refused by
/// [`Journal::record`](crate::Journal::record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Event {
    /// The daemon started (`node_started`).
    NodeStarted,
    /// The daemon stopped (`node_stopped`).
    NodeStopped,
    /// A configuration was applied, atomically (`config_applied`; `how`:
    /// `reload`, `apply`, `rollback`, `automatic_rollback`).
    ConfigApplied,
    /// A configuration was refused before anything changed; the running one
    /// stays (`config_not_applied`).
    ConfigNotApplied,
    /// A configuration applied with a deadline waits for confirmation (`config_pending`).
    ConfigPending,
    /// The pending configuration was confirmed (`config_confirmed`).
    ConfigConfirmed,
    /// The pending configuration was rolled back, by command or at its
    /// deadline (`config_rolled_back`).
    ConfigRolledBack,
    /// A pending change found at start no longer matched the running
    /// config and was dropped (`config_pending_dropped`).
    ConfigPendingDropped,
    /// A stream named no service, or one its peer may not use; the first
    /// of its kind in a window (`stream_refused`).
    StreamRefused,
    /// The count of further refused streams of one kind in a window (`stream_refusals`).
    StreamRefusals,
    /// The node's own key changed on reload (`key_changed`).
    KeyChanged,
    /// A session was opened (after key confirmation) (`session_opened`).
    SessionOpened,
    /// A session was closed (`session_closed`).
    SessionClosed,
    /// A session moved to a new carrier (`session_resumed`).
    SessionResumed,
    /// A session was closed because its peer is no longer trusted (`session_revoked`).
    SessionRevoked,
    /// This node (the source) started handing a session to another worker (`handoff_started`).
    HandoffStarted,
    /// A session this node handed off committed at the target (`handoff_committed`).
    HandoffCommitted,
    /// A handoff failed before its commit; the session stayed where it was (`handoff_aborted`).
    HandoffAborted,
    /// A session was handed to this node (the target) and committed here (`handoff_imported`).
    HandoffImported,
    /// A session this node dialled moved to another server (`session_moved`).
    SessionMoved,
    /// This node's dialled session declined its server's handoff offer (`handoff_declined`).
    HandoffDeclined,
    /// One refused handshake, journaled at once (`handshake_refused`).
    HandshakeRefused,
    /// The count of refused handshakes of one source and window not
    /// journaled one by one (`handshake_refusals`).
    HandshakeRefusals,
    /// The journal fell behind the listener's events and missed some
    /// (refusals and resumes not journaled) (`listener_events_missed`).
    ListenerEventsMissed,
    /// A peer's shim stream was refused by this node's `[[expose]]` rules (`shim_refused`).
    ShimRefused,
    /// A local process may not use the shim socket (`shim_denied`).
    ShimDenied,
    /// A local shimmed connection could not be carried (`shim_failed`).
    ShimFailed,
    /// A relay server started (`relay_started`).
    RelayStarted,
    /// A relay server stopped (`relay_stopped`).
    RelayStopped,
    /// A node failed to prove its key to the relay (`relay_auth_failed`).
    RelayAuthFailed,
    /// The relay refused a connection or a request (`relay_refused`).
    RelayRefused,
    /// A node registered its control connection at the relay (`node_registered`).
    NodeRegistered,
    /// A node's control connection at the relay ended (`node_unregistered`).
    NodeUnregistered,
    /// The relay spliced a circuit (`circuit_opened`).
    CircuitOpened,
    /// A relay circuit ended (`circuit_closed`).
    CircuitClosed,
    /// A director started serving (after winning the lead, with a shared store). (`director_started`).
    DirectorStarted,
    /// A worker registered with the director. (`worker_registered`).
    WorkerRegistered,
    /// A worker's lease expired: the director declared it lost. (`worker_lost`).
    WorkerLost,
    /// A worker is being drained (by `pool director drain` or its own SIGTERM). (`worker_draining`).
    WorkerDraining,
    /// A draining worker is empty. (`worker_drained`).
    WorkerDrained,
    /// The director placed a client on a worker. (`client_placed`).
    ClientPlaced,
    /// The director ordered sessions moved between workers to even the load. (`sessions_rebalanced`).
    SessionsRebalanced,
    /// The director refused a worker's claim to a session (fencing or conflict). (`claim_refused`).
    ClaimRefused,
    /// A file was stored in the vault (or found already stored) (`vault_write`).
    VaultWrite,
    /// A vault request was refused or failed (`vault_refused`).
    VaultRefused,
    /// Entries were dropped before they reached the file (`journal_entries_lost`).
    /// Written by the journal itself.
    JournalEntriesLost,
    /// A signed checkpoint (`journal_checkpoint`). Written by the journal itself.
    JournalCheckpoint,
    /// The first line of a file that continues a rotated one
    /// (`journal_continued`): its `prev` is the sealed file's last hash.
    /// Written by the journal itself.
    JournalContinued,
}

impl Event {
    /// Every event, in the order `docs/journal.md` lists them.
    pub const ALL: [Event; 48] = [
        Event::NodeStarted,
        Event::NodeStopped,
        Event::ConfigApplied,
        Event::ConfigNotApplied,
        Event::ConfigPending,
        Event::ConfigConfirmed,
        Event::ConfigRolledBack,
        Event::ConfigPendingDropped,
        Event::StreamRefused,
        Event::StreamRefusals,
        Event::KeyChanged,
        Event::SessionOpened,
        Event::SessionClosed,
        Event::SessionResumed,
        Event::SessionRevoked,
        Event::HandoffStarted,
        Event::HandoffCommitted,
        Event::HandoffAborted,
        Event::HandoffImported,
        Event::SessionMoved,
        Event::HandoffDeclined,
        Event::HandshakeRefused,
        Event::HandshakeRefusals,
        Event::ListenerEventsMissed,
        Event::ShimRefused,
        Event::ShimDenied,
        Event::ShimFailed,
        Event::RelayStarted,
        Event::RelayStopped,
        Event::RelayAuthFailed,
        Event::RelayRefused,
        Event::NodeRegistered,
        Event::NodeUnregistered,
        Event::CircuitOpened,
        Event::CircuitClosed,
        Event::DirectorStarted,
        Event::WorkerRegistered,
        Event::WorkerLost,
        Event::WorkerDraining,
        Event::WorkerDrained,
        Event::ClientPlaced,
        Event::SessionsRebalanced,
        Event::ClaimRefused,
        Event::VaultWrite,
        Event::VaultRefused,
        Event::JournalEntriesLost,
        Event::JournalCheckpoint,
        Event::JournalContinued,
    ];

    /// The name written to the file as the entry's `event`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Event::NodeStarted => "node_started",
            Event::NodeStopped => "node_stopped",
            Event::ConfigApplied => "config_applied",
            Event::ConfigNotApplied => "config_not_applied",
            Event::ConfigPending => "config_pending",
            Event::ConfigConfirmed => "config_confirmed",
            Event::ConfigRolledBack => "config_rolled_back",
            Event::ConfigPendingDropped => "config_pending_dropped",
            Event::StreamRefused => "stream_refused",
            Event::StreamRefusals => "stream_refusals",
            Event::KeyChanged => "key_changed",
            Event::SessionOpened => "session_opened",
            Event::SessionClosed => "session_closed",
            Event::SessionResumed => "session_resumed",
            Event::SessionRevoked => "session_revoked",
            Event::HandoffStarted => "handoff_started",
            Event::HandoffCommitted => "handoff_committed",
            Event::HandoffAborted => "handoff_aborted",
            Event::HandoffImported => "handoff_imported",
            Event::SessionMoved => "session_moved",
            Event::HandoffDeclined => "handoff_declined",
            Event::HandshakeRefused => "handshake_refused",
            Event::HandshakeRefusals => "handshake_refusals",
            Event::ListenerEventsMissed => "listener_events_missed",
            Event::ShimRefused => "shim_refused",
            Event::ShimDenied => "shim_denied",
            Event::ShimFailed => "shim_failed",
            Event::RelayStarted => "relay_started",
            Event::RelayStopped => "relay_stopped",
            Event::RelayAuthFailed => "relay_auth_failed",
            Event::RelayRefused => "relay_refused",
            Event::NodeRegistered => "node_registered",
            Event::NodeUnregistered => "node_unregistered",
            Event::CircuitOpened => "circuit_opened",
            Event::CircuitClosed => "circuit_closed",
            Event::DirectorStarted => "director_started",
            Event::WorkerRegistered => "worker_registered",
            Event::WorkerLost => "worker_lost",
            Event::WorkerDraining => "worker_draining",
            Event::WorkerDrained => "worker_drained",
            Event::ClientPlaced => "client_placed",
            Event::SessionsRebalanced => "sessions_rebalanced",
            Event::ClaimRefused => "claim_refused",
            Event::VaultWrite => "vault_write",
            Event::VaultRefused => "vault_refused",
            Event::JournalEntriesLost => "journal_entries_lost",
            Event::JournalCheckpoint => "journal_checkpoint",
            Event::JournalContinued => "journal_continued",
        }
    }

    /// The event a name stands for (`None`: not a journal event).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Written by the journal itself, never by a caller.
    #[must_use]
    pub const fn is_internal(&self) -> bool {
        matches!(
            self,
            Event::JournalEntriesLost | Event::JournalCheckpoint | Event::JournalContinued
        )
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a journal event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a journal event (see docs/journal.md for the list)")]
pub struct UnknownEvent(pub String);

impl FromStr for Event {
    type Err = UnknownEvent;

    fn from_str(s: &str) -> Result<Event, UnknownEvent> {
        Event::from_name(s).ok_or_else(|| UnknownEvent(s.to_owned()))
    }
}

/// Compares with an event name, as it is written in the file.
impl PartialEq<str> for Event {
    fn eq(&self, other: &str) -> bool {
        self.name() == other
    }
}

/// Compares with an event name, as it is written in the file.
impl PartialEq<&str> for Event {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_read_back() {
        let mut names: Vec<&str> = Event::ALL.iter().map(Event::name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Event::ALL.len());
        for e in Event::ALL {
            assert_eq!(Event::from_name(e.name()), Some(e));
            assert_eq!(e.to_string().parse::<Event>(), Ok(e));
            assert!(e == e.name());
        }
        assert_eq!(Event::from_name("session_opend"), None);
        assert!("nope".parse::<Event>().is_err());
    }

    #[test]
    fn only_the_journal_writes_its_own_events() {
        let internal: Vec<Event> = Event::ALL.into_iter().filter(Event::is_internal).collect();
        assert_eq!(
            internal,
            [
                Event::JournalEntriesLost,
                Event::JournalCheckpoint,
                Event::JournalContinued
            ]
        );
    }
}
