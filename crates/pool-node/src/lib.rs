//! # pool-node: a POOL node's services
//!
//! The daemon, the TCP bridge (`tcp2pool` / `pool2tcp`), the shim's
//! daemon side (`[shim]`, `[[route]]`, `[[expose]]`), the control
//! socket behind `pool ctl` and Prometheus metrics. Changes are written to
//! the change journal of `pool-journal`. Everything here uses only
//! `pool-net`'s public API.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod apply;
pub mod bridge;
pub mod config;
pub mod config_check;
pub mod control;
pub mod daemon;
pub mod director;
pub mod handoff;
pub mod handoff_test;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pending;
mod refusals;
pub mod router;
pub mod services;
pub mod shim;
mod splice;
pub mod types;
pub mod vault;
pub mod worker;
