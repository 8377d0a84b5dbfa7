//! The handshake's readers (HELLO, WELCOME/REFUSE, RESUME id, key info).
//!
//! The body is `fuzz/harness/handshake.rs`, shared with the
//! regression tests.
#![no_main]

#[path = "../harness/handshake.rs"]
mod handshake;

libfuzzer_sys::fuzz_target!(|data: &[u8]| handshake::run(data));
