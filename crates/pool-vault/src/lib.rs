//! # pool-vault: verified, resumable file transfer over POOL
//!
//! A client pushes files to (or pulls them from) a node's vault service
//! (`pool.vault`) on one POOL stream per command. Every file travels as a
//! [`Manifest`]: its size, its chunks' BLAKE3 hashes (1 MiB chunks) and a
//! root hash over those, so the receiving side checks each chunk as it
//! arrives and knows the whole file is right once every chunk is. Files are
//! written to a partial file beside the destination, synced, then renamed
//! ([`partial`]); an interrupted transfer finds its partial again and sends
//! only the chunks that are missing or no longer match. Destinations are
//! confined to the vault's root and to the caller's grants ([`paths`]).
//! With sealing ([`seal`]) the client encrypts every chunk to its own key
//! before it leaves, so the node stores ciphertext only.
//!
//! The protocol is in [`wire`]; the serving side in [`server`]; the
//! commands in [`client`].
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod batch;
pub mod client;
pub mod manifest;
pub mod partial;
pub mod paths;
pub mod seal;
pub mod server;
pub mod wire;

pub use client::{Progress, Report};
pub use manifest::{Manifest, CHUNK};
pub use paths::{Access, Grant, VaultPath};
pub use server::{VaultEvent, VaultServer};

/// The service name a node registers its vault under.
pub const SERVICE: &str = "pool.vault";

/// What can go wrong in a vault operation: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A file-system error on this side, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The other side refused or failed, with its message.
    #[error("{0}")]
    Remote(String),
    /// The other side broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The stream or session failed.
    #[error("connection: {0}")]
    Net(#[from] std::io::Error),
    /// A sealed file that this key cannot open, a bad path, ...
    #[error("{0}")]
    Refused(String),
}

impl VaultError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> VaultError {
        VaultError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
