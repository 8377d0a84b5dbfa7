//! Runtime errors: what happened, and what to do about it.

use std::io;

use pool_core::{CloseReason, HandshakeError, KeyError};

/// An error from the POOL runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name or address could not be resolved.
    #[error("cannot resolve `{addr}`: {source} (use HOST:PORT, 1.2.3.4:PORT or [::1]:PORT)")]
    Resolve {
        /// What was given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The handshake failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer's address.
        addr: String,
        /// Why.
        source: HandshakeError,
    },
    /// The peer did not answer in time.
    #[error("no handshake answer from {addr} within {secs} s: is a POOL listener running there?")]
    Timeout {
        /// The peer's address.
        addr: String,
        /// The limit.
        secs: u64,
    },
    /// The carrier closed during the handshake.
    #[error("{addr} closed the connection during the handshake: is it a POOL listener?")]
    HandshakeEof {
        /// The peer's address.
        addr: String,
    },
    /// A key or trust file problem.
    #[error("{path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        source: KeyError,
    },
    /// A trust or key file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The session is over.
    #[error("session closed: {0}")]
    Closed(CloseReason),
    /// The endpoint has no listener (made with [`crate::Endpoint::client`]).
    #[error("this endpoint does not listen")]
    NotListening,
    /// A relay refused or failed.
    #[error("relay {addr}: {message}")]
    Relay {
        /// The relay's address.
        addr: String,
        /// The relay's ERROR code (0 when the failure was local).
        code: u8,
        /// What happened and what to do.
        message: String,
    },
    /// No way to reach the peer: no address and no relay.
    #[error("no path to {peer}: give its address, or a relay where it is registered (--relay HOST:9255)")]
    NoPath {
        /// The peer's key.
        peer: String,
    },
    /// A live handoff did not happen; the session stays where it was
    /// (unless `stage` says otherwise).
    #[error("handoff failed at {stage}: {reason}")]
    Handoff {
        /// Where it stopped: "prepare", "offer", "freeze", "state",
        /// "commit".
        stage: &'static str,
        /// Why, in words.
        reason: String,
        /// The metric label: `target_refused`, `target_unreachable`,
        /// `client_declined`, `token_expired`, `target_lost`, `pending`,
        /// `closed`.
        code: &'static str,
    },
    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}
