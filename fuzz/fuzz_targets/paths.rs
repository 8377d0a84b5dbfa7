//! PATHS frames and the 18-byte address form.
//!
//! The body is `fuzz/harness/paths.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/paths.rs"]
mod paths;
#[path = "../../crates/pool-core/tests/util/mod.rs"]
mod util;

libfuzzer_sys::fuzz_target!(|data: &[u8]| paths::run(data));
