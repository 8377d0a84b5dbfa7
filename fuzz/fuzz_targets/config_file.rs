//! The daemon's config parser (TOML text to a checked config).
//!
//! The body is `fuzz/harness/config_file.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/config_file.rs"]
mod config_file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config_file::run(data));
