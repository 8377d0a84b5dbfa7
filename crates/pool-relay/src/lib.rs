//! # pool-relay: the relay server (POOL-RELAY/1, see [`pool_core::relay`])
//!
//! Nodes that cannot reach each other both connect to a relay over TCP. A
//! node proves that it holds its key before anything else happens; the
//! relay then pairs a `CONNECT` with the peer's `ACCEPT` and splices the
//! two TCP connections byte for byte. What flows through a circuit is a
//! POOL session's sealed records: the relay cannot read or alter them
//! without the session noticing. It does see node keys, addresses, who
//! talks to whom, sizes and timing (see `docs/relay.md`).
//!
//! Isolation: every circuit direction is its own read-then-write loop with
//! its own buffer, so a receiver that stops reading blocks only the writes
//! towards it, which stops the reads from its sender, whose TCP window then
//! closes: back-pressure reaches that sender and nobody else. Control
//! messages to a node go through a small bounded queue per node.
//!
//! Modules, by concern: `config` ([`RelayConfig`], authorized keys,
//! [`RelayServerError`]), `state` (counters, registrations, per-key caps
//! and rate buckets), `server` (the listener, [`RelayServer`],
//! [`RelayHandle`]), `conn` (one connection's handshake and dispatch),
//! `control` (a registered node's control connection), `circuit`
//! (CONNECT / ACCEPT and the splice) and `metrics` (the Prometheus
//! collector). It shares the node's socket helpers and `/metrics`
//! endpoint (`pool_node::net`, `pool_node::metrics`) and writes the
//! `pool-journal` change journal.
//!
//! Peering (relays that enrol each other's keys forward circuits between
//! them): `peering` (enrolments, links, per-peer and per-node accounting
//! and caps), `directory` (which peer has which node), `link` (the
//! peering link: gossip of registrations), `forward` (relay-to-relay
//! handshakes and forwarded circuits) and `admin` (the `--control`
//! socket: enroll, unenroll, status). See `docs/relay.md#peering`.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod admin;
mod circuit;
mod config;
mod conn;
mod control;
mod directory;
mod forward;
mod link;
mod metrics;
mod peering;
mod server;
mod state;

pub use admin::RelayRequest;
pub use config::{load_authorized, PeerConfig, RelayConfig, RelayFile, RelayServerError};
pub use peering::{NodeAccount, PeerStats};
pub use server::{RelayHandle, RelayServer};
pub use state::{NodeStats, RelayStats};
