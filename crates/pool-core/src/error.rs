//! Errors, one enum per concern. Peer misbehaviour is kept apart from local
//! misuse; every message says what happened and, where it can, what to do.

use crate::keys::PublicKey;

/// A key token or key file could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Not a 43-character base64url public key.
    #[error("`{token}` is not a POOL public key (expected 43 characters of base64url, as printed by `pool keygen` or `pool pubkey`)")]
    BadToken {
        /// What was given (shortened).
        token: String,
    },
    /// The key file has no key line.
    #[error("the key file holds no key (create one with `pool keygen --out FILE`)")]
    EmptyKeyFile,
    /// The key line is not 32 bytes of base64url.
    #[error("the key file's key line is not a POOL private key (create one with `pool keygen --out FILE`)")]
    BadKeyFile,
}

/// Bytes on a carrier that do not follow the POOL/1 format.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// An unknown record type byte.
    #[error("unknown record type 0x{0:02x} (is the peer speaking POOL/1?)")]
    UnknownRecordType(u8),
    /// A record header announced a body over the limit.
    #[error("record of {len} bytes exceeds the limit of {max}")]
    RecordTooLong {
        /// Announced length.
        len: usize,
        /// Limit for that record type.
        max: usize,
    },
    /// A record or frame ended early.
    #[error("truncated record or frame")]
    Truncated,
    /// A length field over its limit.
    #[error("a length field exceeds its limit")]
    FieldTooLong,
    /// An unknown frame type inside an authenticated record.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
}

/// Why a handshake (new session, resume or key probe) failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The message does not parse.
    #[error("malformed handshake: {0}")]
    Malformed(#[from] WireError),
    /// The first message's MAC does not match our key: the initiator does
    /// not know our public key (or the message was corrupted).
    #[error("handshake MAC does not match this node's key: the peer was given a different public key for this node")]
    BadMac,
    /// Protocol version not spoken here.
    #[error("peer speaks POOL version {got}, this node speaks {want}")]
    Version {
        /// Peer's version.
        got: u8,
        /// Ours.
        want: u8,
    },
    /// One side uses a fleet secret and the other does not.
    #[error("fleet secret mismatch: this node {ours} a fleet secret, the peer {theirs}")]
    FleetSecretMismatch {
        /// "requires" / "does not use".
        ours: &'static str,
        /// "sent none" / "sent one".
        theirs: &'static str,
    },
    /// Noise decryption failed: wrong keys or fleet secret, or tampering.
    #[error(
        "handshake authentication failed (wrong key or fleet secret, or the message was altered)"
    )]
    Crypto,
    /// The initiator's key is not trusted here.
    #[error("key {key} is not trusted by this listener; to trust it, start the listener with --allow {key} or add the key to its authorized keys file")]
    Untrusted {
        /// The key the peer presented.
        key: PublicKey,
    },
    /// A handshake message seen before (or older than one seen before).
    #[error("replayed handshake from {key} refused (its timestamp is not newer than the last one accepted)")]
    Replayed {
        /// The key in the replayed message.
        key: PublicKey,
    },
    /// The timestamp is too far from our clock.
    #[error("handshake timestamp is {skew_secs} s away from this node's clock (limit {limit_secs} s): check both clocks")]
    ClockSkew {
        /// Absolute difference.
        skew_secs: u64,
        /// Allowed difference.
        limit_secs: u64,
    },
    /// The listener is under load and answered with a cookie: start again
    /// with [`crate::Initiator::start_with_cookie`].
    #[error("the listener is under load and asked for a cookie round trip")]
    CookieReply {
        /// The cookie to put in the next HELLO's `mac2`.
        cookie: [u8; 16],
    },
    /// (Listener side) under load, the HELLO had no valid cookie: the
    /// COOKIE record was written to the output instead of an answer.
    #[error("under load: answered with a cookie")]
    CookieRequired,
    /// Too many handshakes from this source.
    #[error("too many handshakes from this source; try again shortly")]
    RateLimited,
    /// No cipher both sides support (cannot happen: ChaCha20 is mandatory).
    #[error("no common cipher")]
    NoCommonCipher,
    /// The listener refused us and said why (unauthenticated notice).
    #[error("the listener refused the handshake: {reason}")]
    Refused {
        /// Refusal code.
        code: u8,
        /// The listener's words.
        reason: String,
    },
    /// The peer answered with a key other than the one we expected.
    #[error("the listener answered with a different record than expected ({0})")]
    Unexpected(&'static str),
    /// Resume for a session this node does not know.
    #[error("unknown session (it may have expired); start a new session")]
    UnknownSession,
    /// Resume for an epoch not newer than the current one.
    #[error("stale resume for epoch {got}, session is at epoch {current}")]
    StaleResume {
        /// Epoch in the message.
        got: u32,
        /// Session's epoch.
        current: u32,
    },
    /// The peer proved (with its static key) that it no longer knows the
    /// session: it restarted or dropped it. Resuming cannot work.
    #[error(
        "the peer no longer knows this session (it restarted or dropped it); start a new session"
    )]
    SessionGone,
    /// The session is closed.
    #[error("session is closed")]
    Closed,
    /// The session is being handed to another server and is frozen here
    /// for the moment: try again shortly (refusal code 10).
    #[error("a handoff of this session is under way here; try again shortly")]
    HandoffPending,
    /// A resume at a handoff's target showed a token that is not good
    /// here (refusal code 11).
    #[error("handoff token refused: {0}")]
    HandoffToken(String),
    /// This server handed the session to another one (refusal code 12).
    #[error("this server handed the session to another one")]
    SessionMoved,
    /// The listener is draining (its sessions move to other workers) and
    /// takes no new session (refusal code 13).
    #[error("this node is draining and takes no new sessions; connect to another one")]
    Draining,
}

impl HandshakeError {
    /// The text sent to the peer in a refusal: like the message, but never
    /// with the initiator's static key (it would undo the identity hiding
    /// of Noise IK for anyone watching the wire); the listener logs the key
    /// locally instead.
    pub fn refusal_text(&self) -> String {
        match self {
            HandshakeError::Untrusted { .. } => "your key is not trusted by this listener; its operator finds the key in the listener's log and can trust it".into(),
            HandshakeError::Replayed { .. } => "replayed handshake refused (its timestamp is not newer than the last one accepted)".into(),
            other => other.to_string(),
        }
    }

    /// The refusal code sent to the peer for this error.
    pub fn refuse_code(&self) -> u8 {
        match self {
            HandshakeError::Malformed(_) | HandshakeError::Version { .. } => 1,
            HandshakeError::BadMac => 2,
            HandshakeError::Crypto | HandshakeError::FleetSecretMismatch { .. } => 3,
            HandshakeError::Untrusted { .. } => 4,
            HandshakeError::Replayed { .. } | HandshakeError::ClockSkew { .. } => 5,
            HandshakeError::RateLimited => 6,
            HandshakeError::UnknownSession | HandshakeError::SessionGone => 7,
            HandshakeError::StaleResume { .. } => 9,
            HandshakeError::HandoffPending => 10,
            HandshakeError::HandoffToken(_) => 11,
            HandshakeError::SessionMoved => 12,
            HandshakeError::Draining => 13,
            _ => 8,
        }
    }
}

/// Codes carried in a CLOSE frame and reported in [`crate::CloseReason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// Normal close by the application.
    Normal,
    /// The peer broke the protocol.
    Protocol,
    /// A record failed authentication.
    Auth,
    /// The peer overran a flow-control window or stream limit.
    FlowControl,
    /// The node is shutting down.
    Shutdown,
    /// Any other code.
    Other(u64),
}

impl CloseCode {
    /// Numeric form.
    pub fn to_u64(self) -> u64 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::Protocol => 1,
            CloseCode::Auth => 2,
            CloseCode::FlowControl => 3,
            CloseCode::Shutdown => 4,
            CloseCode::Other(n) => n,
        }
    }
    /// From the numeric form.
    pub fn from_u64(n: u64) -> Self {
        match n {
            0 => CloseCode::Normal,
            1 => CloseCode::Protocol,
            2 => CloseCode::Auth,
            3 => CloseCode::FlowControl,
            4 => CloseCode::Shutdown,
            n => CloseCode::Other(n),
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// This side closed it.
    #[error("closed locally: {reason}")]
    Local {
        /// Code.
        code: CloseCode,
        /// Reason.
        reason: String,
    },
    /// The peer closed it.
    #[error("closed by peer ({code:?}): {reason}")]
    Peer {
        /// Code.
        code: CloseCode,
        /// Reason.
        reason: String,
    },
    /// The peer sent something that breaks the protocol.
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    /// A record failed authentication (tampering or corruption).
    #[error("a record failed authentication (tampered or corrupted in transit); session closed")]
    AuthFailed,
    /// No carrier could be re-established before the deadline.
    #[error("peer unreachable: no carrier for {secs} s (resume deadline)")]
    ResumeDeadline {
        /// The deadline in seconds.
        secs: u64,
    },
    /// This server handed the session to another one (the live handoff);
    /// the session goes on there.
    #[error("handed off to {to}")]
    HandedOff {
        /// The server that holds the session now.
        to: PublicKey,
    },
}

/// A stream operation that cannot proceed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// No such stream (never opened, or already closed and forgotten).
    #[error("unknown stream {0}")]
    Unknown(u64),
    /// Would exceed a window or buffer: wait for `StreamWritable`.
    #[error("blocked by flow control")]
    Blocked,
    /// The stream was reset with this code.
    #[error("stream reset with code {0}")]
    Reset(u64),
    /// Writing after `finish`.
    #[error("stream already finished")]
    Finished,
    /// The peer's stream limit is reached: wait for `StreamsAvailable`.
    #[error("stream limit reached")]
    Limit,
    /// The session is closed.
    #[error("session closed: {0}")]
    SessionClosed(CloseReason),
}

/// Cuts `s` to at most `max` bytes, on a character boundary (a plain
/// `String::truncate` panics inside a multi-byte character).
pub(crate) fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}
