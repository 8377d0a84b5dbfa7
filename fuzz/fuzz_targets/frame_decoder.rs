//! Frames and the record peeker on arbitrary bytes.
//!
//! The body is `fuzz/harness/frame_decoder.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/frame_decoder.rs"]
mod frame_decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| frame_decoder::run(data));
