//! What the shim and the local daemon say to each other: the codec is
//! `pool_shim_wire`, shared with the daemon; here only what needs libc.

pub use pool_shim_wire::*;

/// The errno a blocking `connect` returns for a status byte.
pub fn status_errno(status: u8) -> i32 {
    match status {
        STATUS_TIMED_OUT => libc::ETIMEDOUT,
        STATUS_UNREACHABLE => libc::EHOSTUNREACH,
        _ => libc::ECONNREFUSED,
    }
}
