//! The responder's RESUME handling on a restored session.
//!
//! The body is `fuzz/harness/resume.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/resume.rs"]
mod resume;
#[path = "../../crates/pool-core/tests/util/mod.rs"]
mod util;

libfuzzer_sys::fuzz_target!(|data: &[u8]| resume::run(data));
