//! Status codes, the per-thread last error, and the entry guard that keeps
//! panics from crossing into C.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What went wrong in the last failed call of this thread
/// (`pool_last_error_code()`). Calls that return `int` or `ssize_t` return
/// -1 on failure and those that return a pointer return NULL; `errno` is
/// set as well (shown next to each code).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum pool_status {
    /// No error.
    POOL_OK = 0,
    /// A NULL pointer, a string that is not UTF-8, or a bad argument (`EINVAL`).
    POOL_EINVAL = 1,
    /// The handle is not a live object of the expected kind: freed already,
    /// never returned by libpool, or of another kind (`EBADF`).
    POOL_EBADHANDLE = 2,
    /// A key or key file is wrong, missing, or readable by others (`EINVAL`).
    POOL_EKEY = 3,
    /// Could not resolve, bind, connect, or the handshake failed (`ECONNREFUSED`).
    POOL_ENET = 4,
    /// The session or stream is closed or was reset (`EPIPE`).
    POOL_ECLOSED = 5,
    /// Non-blocking mode: not ready now; wait for the handle's fd (`EAGAIN`).
    POOL_EAGAIN = 6,
    /// A file could not be read or written (`EIO`).
    POOL_EIO = 7,
    /// A bug in libpool (a panic, caught at the boundary) (`EFAULT`).
    POOL_EINTERNAL = 8,
}

impl pool_status {
    fn errno(self) -> i32 {
        match self {
            pool_status::POOL_OK => 0,
            pool_status::POOL_EINVAL | pool_status::POOL_EKEY => libc::EINVAL,
            pool_status::POOL_EBADHANDLE => libc::EBADF,
            pool_status::POOL_ENET => libc::ECONNREFUSED,
            pool_status::POOL_ECLOSED => libc::EPIPE,
            pool_status::POOL_EAGAIN => libc::EAGAIN,
            pool_status::POOL_EIO => libc::EIO,
            pool_status::POOL_EINTERNAL => libc::EFAULT,
        }
    }
}

/// A failure: its code and a message that says what to do.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) code: pool_status,
    pub(crate) msg: String,
}

impl Fail {
    pub(crate) fn new(code: pool_status, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            msg: msg.into(),
        }
    }
}

pub(crate) type Res<T> = Result<T, Fail>;

pub(crate) fn inval(msg: impl Into<String>) -> Fail {
    Fail::new(pool_status::POOL_EINVAL, msg)
}

impl From<pool_net::Error> for Fail {
    fn from(e: pool_net::Error) -> Fail {
        let code = match &e {
            pool_net::Error::KeyFile { .. } => pool_status::POOL_EKEY,
            pool_net::Error::File { .. } => pool_status::POOL_EIO,
            pool_net::Error::Closed(_) => pool_status::POOL_ECLOSED,
            _ => pool_status::POOL_ENET,
        };
        Fail::new(code, e.to_string())
    }
}

thread_local! {
    static LAST: RefCell<(pool_status, CString)> =
        RefCell::new((pool_status::POOL_OK, CString::default()));
}

fn set_errno(v: i32) {
    // SAFETY: `__errno_location` returns this thread's errno slot, valid
    // for the thread's lifetime; writing an int to it is what C does.
    unsafe { *libc::__errno_location() = v };
}

pub(crate) fn record(f: &Fail) {
    let msg = CString::new(f.msg.replace('\0', " ")).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = (f.code, msg));
    set_errno(f.code.errno());
}

pub(crate) fn last_ptr() -> *const c_char {
    LAST.with(|l| l.borrow().1.as_ptr())
}

pub(crate) fn last_code() -> pool_status {
    LAST.with(|l| l.borrow().0)
}

/// Runs one entry point: a failure or a panic is recorded as this thread's
/// last error and turned into `fallback`; nothing unwinds into C.
pub(crate) fn guard<R>(fallback: R, f: impl FnOnce() -> Res<R>) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => r,
        Ok(Err(fail)) => {
            record(&fail);
            fallback
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            record(&Fail::new(
                pool_status::POOL_EINTERNAL,
                format!("internal error in libpool (a bug; please report it): {what}"),
            ));
            fallback
        }
    }
}
