//! An established session's carrier input.
//!
//! The body is `fuzz/harness/session_input.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/session_input.rs"]
mod session_input;
#[path = "../../crates/pool-core/tests/util/mod.rs"]
mod util;

libfuzzer_sys::fuzz_target!(|data: &[u8]| session_input::run(data));
