//! The relay protocol's message decoder.
//!
//! The body is `fuzz/harness/relay_decoder.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/relay_decoder.rs"]
mod relay_decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_decoder::run(data));
