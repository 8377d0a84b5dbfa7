//! # pool-director: a pool of workers behind one address
//!
//! Workers register with the director over POOL and keep a lease alive
//! with heartbeats that carry their load. Clients dial the director and
//! are placed on a worker; the director moves sessions between workers by
//! handoff when one is drained, when load is skewed, and sends clients
//! elsewhere when a worker is lost. See docs/director.md.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod client;
pub mod file_store;
pub mod registry;
pub mod store;
pub mod wire;
