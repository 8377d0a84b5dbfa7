//! # pool-core: the POOL/1 protocol, without I/O
//!
//! A deterministic state machine in the style of quinn-proto and str0m: it
//! reads no clock, opens no socket and draws no ambient randomness. Time is
//! passed in as `now`, randomness as a generator, and bytes in and out of
//! caller buffers.
//!
//! - [`Initiator`] / [`Acceptor`]: the Noise `IK` handshake (with an
//!   optional fleet secret), producing a [`Session`].
//! - [`listener`]: a listener's rules (first-record dispatch, handshake
//!   slots, under load, the HELLO gate) as a state machine on `now`; the
//!   Acceptor's steps ([`HelloGate`], [`Admitted`], [`ReplayTable`]) let a
//!   runtime do the Diffie-Hellman outside the listener's lock.
//! - [`Session`]: records, sequence numbers, cumulative acks, the replay
//!   buffer, key epochs (rekey in band, resume on a new carrier), streams
//!   with flow control, keepalive, [`Session::snapshot`] / [`Session::restore`].
//!
//! ## The drain rule
//!
//! After every input (`handle_*`, a stream call, `carrier_lost`), call
//! [`Session::poll_transmit`] until it returns `None` and write what it
//! produced to the carrier, then [`Session::poll_event`] until `None`, then
//! arm a timer for [`Session::poll_timeout`] and call
//! [`Session::handle_timeout`] when it fires.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod acceptor;
mod b64;
mod config;
mod crypto;
mod error;
pub mod handoff;
mod handshake;
mod keys;
pub mod listener;
pub mod relay;
mod rng;
pub mod selftest;
mod session;
pub mod wire;

pub use acceptor::{Acceptor, AcceptorKeys, Admitted, HelloGate, Opened, ReplayTable};
pub use config::Config;
pub use crypto::{aes_hardware, CipherSuite};
pub use error::{CloseCode, CloseReason, HandshakeError, KeyError, StreamError, WireError};
pub use handshake::{
    read_key_info, resume_session_id, write_key_probe, write_refusal, FleetSecret, Initiator,
    VERSION,
};
pub use keys::{PublicKey, SecretKey, KEY_LEN};
pub use rng::{Rng, SeededRng};
pub use session::snapshot::SnapshotError;
pub use session::{
    DebugSizes, Event, HandoffError, HandoffOffer, HeldOp, ReadResult, Role, Session, SessionId,
    Stats,
};
pub use wire::{peek_record, RecordType, MAX_RECORD_LEN};
