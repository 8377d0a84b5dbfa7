//! A control-socket request line (`pool ctl`).
//!
//! The body is `fuzz/harness/control_request.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/control_request.rs"]
mod control_request;

libfuzzer_sys::fuzz_target!(|data: &[u8]| control_request::run(data));
