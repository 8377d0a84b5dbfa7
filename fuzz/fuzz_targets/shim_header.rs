//! The daemon's reader of the shim's 28-byte header.
//!
//! The body is `fuzz/harness/shim_header.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/shim_header.rs"]
mod shim_header;

libfuzzer_sys::fuzz_target!(|data: &[u8]| shim_header::run(data));
