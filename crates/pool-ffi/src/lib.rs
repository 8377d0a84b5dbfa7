//! # libpool: POOL's C ABI
//!
//! `libpool.so` / `libpool.a` and `include/pool.h` (generated from this
//! crate by cbindgen; the rules C programmers need are in the header's
//! opening comment and in `docs/c-api.md`). Every entry point:
//!
//! - catches panics (`catch_unwind`): nothing unwinds into C;
//! - checks every pointer for NULL and every handle against a registry, so
//!   a freed or forged handle is an error ([`pool_status::POOL_EBADHANDLE`]),
//!   not undefined behaviour;
//! - on failure returns -1 or NULL, sets `errno`, and records a message for
//!   [`pool_last_error`] on the calling thread.
//!
//! Blocking calls run on a process-wide tokio runtime that the library
//! creates on first use (after the crypto self-test,
//! [`pool_core::selftest`]) and [`pool_shutdown`] stops.

// The C names (pool_stream, ...) are the ABI.
#![allow(non_camel_case_types)]

mod error;
mod handle;
mod objects;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use libc::{size_t, ssize_t};
use pool_net::{EndpointConfig, PublicKey, SecretKey, Trust};

pub use error::pool_status;
use error::{guard, inval, Fail, Res};
use objects::{rt, Endpoint, SessionObj, StreamObj, TrustObj};

/// A bound or client-only endpoint: holds this program's key and trust.
/// Opaque; the pointer is a handle, not an address.
pub struct pool_endpoint {
    _opaque: (),
}

/// A session with one peer; carries streams; survives carrier loss.
/// Opaque; the pointer is a handle, not an address.
pub struct pool_session {
    _opaque: (),
}

/// A bidirectional byte stream inside a session. Opaque handle.
pub struct pool_stream {
    _opaque: (),
}

/// A set of public keys allowed to connect to an endpoint. Opaque handle.
pub struct pool_trust {
    _opaque: (),
}

/// Session counters, filled by `pool_session_stats`.
///
/// Loss: POOL loses nothing end to end (frames lost with a carrier are
/// sent again after the resume), so there is no loss rate; what the path
/// lost shows as `frames_resent` and `carrier_retransmits`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pool_stats {
    /// Smoothed round-trip time, microseconds (0 before the first sample).
    pub rtt_us: u64,
    /// Smallest round-trip time seen, microseconds (0 before a sample).
    pub min_rtt_us: u64,
    /// RTT jitter (RFC 3550 estimator), microseconds.
    pub jitter_us: u64,
    /// Stream payload bytes this side wrote.
    pub stream_bytes_sent: u64,
    /// Stream payload bytes this side received.
    pub stream_bytes_received: u64,
    /// Bytes sent on carriers (records, headers included).
    pub carrier_bytes_sent: u64,
    /// Bytes received on carriers.
    pub carrier_bytes_received: u64,
    /// Resumes completed (the session moved to a new carrier).
    pub resumes: u64,
    /// Carriers lost.
    pub carriers_lost: u64,
    /// Frames sent again after a resume.
    pub frames_resent: u64,
    /// TCP retransmissions on the current carrier, or `UINT64_MAX` when
    /// unknown (no carrier, or not TCP).
    pub carrier_retransmits: u64,
    /// Rekeys completed.
    pub rekeys: u64,
    /// Streams open now.
    pub streams_active: u64,
    /// 1 when a carrier is attached, 0 while resuming.
    pub carrier_up: c_int,
}

/// Length of a public key string (`pool_key_public`), without the NUL.
pub const POOL_PUBLIC_KEY_LEN: usize = 43;

/// Reads a C string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that lives for `'a`.
unsafe fn cstr<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(inval(format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| inval(format!("{what} is not UTF-8")))
}

fn key_error(msg: impl Into<String>) -> Fail {
    Fail::new(pool_status::POOL_EKEY, msg)
}

fn parse_key(text: &str, what: &str) -> Res<PublicKey> {
    text.trim()
        .parse::<PublicKey>()
        .map_err(|e| key_error(format!("{what}: {e}")))
}

/// Loads a private key file, refusing one that others may read (as ssh does).
fn load_key(path: &str) -> Res<SecretKey> {
    let meta = std::fs::metadata(path).map_err(|e| {
        key_error(format!(
            "cannot read key file {path}: {e} (create one with pool_key_generate or `pool keygen --out {path}`)"
        ))
    })?;
    if meta.mode() & 0o077 != 0 {
        return Err(key_error(format!(
            "key file {path} may be read by other users (mode {:o}): run `chmod 600 {path}`",
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| key_error(format!("cannot read key file {path}: {e}")))?;
    SecretKey::from_file_text(&text)
        .map_err(|e| key_error(format!("key file {path}: {e} (is it a POOL private key?)")))
}

fn new_endpoint(ep: pool_net::Endpoint) -> *mut pool_endpoint {
    let public = CString::new(ep.public_key().to_token()).unwrap_or_default();
    let local = ep
        .local_addr()
        .and_then(|a| CString::new(a.to_string()).ok());
    handle::insert(handle::Obj::Endpoint(Arc::new(Endpoint {
        ep,
        public,
        local,
    })))
}

fn new_session(s: pool_net::Session) -> *mut pool_session {
    handle::insert(handle::Obj::Session(Arc::new(SessionObj::new(s))))
}

fn new_stream(s: pool_net::Stream) -> *mut pool_stream {
    handle::insert(handle::Obj::Stream(Arc::new(StreamObj::new(s))))
}

fn null<T>() -> *mut T {
    std::ptr::null_mut()
}

// ---------------------------------------------------------------------------
// Library

/// The library version, e.g. `"0.1.0"`. Static; never free it.
#[no_mangle]
pub extern "C" fn pool_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// What the last failed call on this thread did wrong and what to do,
/// or `""` if none failed yet. Valid until the next failing call on this
/// thread; do not free it.
#[no_mangle]
pub extern "C" fn pool_last_error() -> *const c_char {
    error::last_ptr()
}

/// The code of the last failed call on this thread (`POOL_OK` if none).
#[no_mangle]
pub extern "C" fn pool_last_error_code() -> pool_status {
    error::last_code()
}

/// Runs the crypto known-answer tests (libpool runs them by itself before
/// its first session). Returns the microseconds they took, or -1 and
/// `pool_last_error()` names the failing test.
#[no_mangle]
pub extern "C" fn pool_selftest() -> i64 {
    guard(-1, || {
        pool_core::selftest::run()
            .map(|r| r.total.as_micros() as i64)
            .map_err(|e| Fail::new(pool_status::POOL_EINTERNAL, e.to_string()))
    })
}

/// Frees every object still alive (waiting, as `pool_session_free` does,
/// for the peer to acknowledge what sessions carry) and stops the
/// library's threads; handles
/// become invalid (using one is a `POOL_EBADHANDLE` error). For programs
/// that check for leaks at exit; calling anything afterwards starts afresh.
/// Do not call it while another thread is inside a libpool call.
#[no_mangle]
pub extern "C" fn pool_shutdown() {
    guard((), || {
        let all = handle::drain();
        for o in &all {
            if let handle::Obj::Session(s) = o {
                s.linger();
            }
        }
        drop(all);
        objects::shutdown_runtime();
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Keys

/// Creates a new private key file at `path` (mode 0600; never overwrites
/// an existing file). Returns 0, or -1.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pool_key_generate(path: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: the caller's promise, passed on.
        let path = unsafe { cstr(path, "path") }?;
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        let key = SecretKey::from_bytes(bytes);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                Fail::new(
                    pool_status::POOL_EIO,
                    format!("cannot create key file {path}: {e} (it is never overwritten)"),
                )
            })?;
        f.write_all(key.to_file_text().as_bytes())
            .map_err(|e| Fail::new(pool_status::POOL_EIO, format!("{path}: {e}")))?;
        Ok(0)
    })
}

/// Writes the public key of the private key file `key_file` into `out`
/// (NUL-terminated; `len` must be at least `POOL_PUBLIC_KEY_LEN + 1`).
/// Returns its length (43), or -1.
///
/// # Safety
/// `key_file` is NULL or a NUL-terminated string; `out` is NULL or
/// points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pool_key_public(
    key_file: *const c_char,
    out: *mut c_char,
    len: size_t,
) -> ssize_t {
    guard(-1, || {
        // SAFETY: the caller's promise, passed on.
        let path = unsafe { cstr(key_file, "key_file") }?;
        let token = load_key(path)?.public_key().to_token();
        if out.is_null() || len < token.len() + 1 {
            return Err(inval(format!(
                "out is NULL or len < {}: give a buffer of POOL_PUBLIC_KEY_LEN + 1 bytes",
                token.len() + 1
            )));
        }
        // SAFETY: `out` has `len` >= token.len() + 1 writable bytes
        // (checked above, promised by the caller); the regions are disjoint
        // (`token` is ours).
        unsafe {
            std::ptr::copy_nonoverlapping(token.as_ptr(), out.cast::<u8>(), token.len());
            *out.add(token.len()) = 0;
        }
        Ok(token.len() as ssize_t)
    })
}

// ---------------------------------------------------------------------------
// Trust

/// A new, empty trust set (nobody may connect yet). Free with
/// `pool_trust_free`.
#[no_mangle]
pub extern "C" fn pool_trust_new() -> *mut pool_trust {
    guard(null(), || {
        Ok(handle::insert(handle::Obj::Trust(Arc::new(TrustObj {
            trust: Mutex::new(Trust::new()),
        }))))
    })
}

/// Allows the holder of public key `key` (the 43-character string) to
/// connect. Returns 0, or -1 (`POOL_EKEY` for a malformed key).
///
/// # Safety
/// `key` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pool_trust_allow(t: *mut pool_trust, key: *const c_char) -> c_int {
    guard(-1, || {
        let t = handle::trust(t)?;
        // SAFETY: the caller's promise, passed on.
        let key = parse_key(unsafe { cstr(key, "key") }?, "key")?;
        let mut g = t.trust.lock().unwrap_or_else(|p| p.into_inner());
        *g = std::mem::take(&mut *g).allow(key);
        Ok(0)
    })
}

/// Allows every key in an authorized-keys file (one key a line, `#`
/// comments; refused if others may write it). Returns 0, or -1.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pool_trust_allow_file(t: *mut pool_trust, path: *const c_char) -> c_int {
    guard(-1, || {
        let t = handle::trust(t)?;
        // SAFETY: the caller's promise, passed on.
        let path = unsafe { cstr(path, "path") }?;
        let mut g = t.trust.lock().unwrap_or_else(|p| p.into_inner());
        let next = g.clone().allow_file(Path::new(path)).map_err(|e| {
            let f = Fail::from(e);
            Fail::new(
                f.code,
                format!("cannot use authorized keys file {path}: {}", f.msg),
            )
        })?;
        *g = next;
        Ok(0)
    })
}

/// Frees a trust set. Endpoints bound with it keep their own copy.
/// NULL is ignored; a freed or unknown handle is an error (-1).
#[no_mangle]
pub extern "C" fn pool_trust_free(t: *mut pool_trust) -> c_int {
    if t.is_null() {
        return 0;
    }
    guard(-1, || handle::take_trust(t).map(|_| 0))
}

// ---------------------------------------------------------------------------
// Endpoints

/// Binds an endpoint that accepts sessions on `addr` (`"127.0.0.1:9253"`,
/// `"[::]:0"` for any port) and can also dial. `key_file` is this side's
/// private key (mode 0600); `trust` says who may connect (copied: free it
/// when you like), or NULL for an endpoint that only dials. Blocks while
/// binding. Returns NULL on failure.
///
/// # Safety
/// `addr` and `key_file` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn pool_endpoint_bind(
    addr: *const c_char,
    key_file: *const c_char,
    trust: *const pool_trust,
) -> *mut pool_endpoint {
    guard(null(), || {
        // SAFETY: the caller's promise, passed on.
        let addr = unsafe { cstr(addr, "addr") }?;
        // SAFETY: as above.
        let key = load_key(unsafe { cstr(key_file, "key_file") }?)?;
        let trust = if trust.is_null() {
            Trust::new()
        } else {
            let t = handle::trust(trust)?;
            let g = t.trust.lock().unwrap_or_else(|p| p.into_inner());
            g.clone()
        };
        let rt = rt()?;
        let ep = rt.block_on(pool_net::Endpoint::bind(
            addr,
            EndpointConfig::new(key).trust(trust),
        ))?;
        Ok(new_endpoint(ep))
    })
}

/// An endpoint that only dials (no listening socket). Returns NULL on
/// failure.
///
/// # Safety
/// `key_file` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pool_endpoint_client(key_file: *const c_char) -> *mut pool_endpoint {
    guard(null(), || {
        // SAFETY: the caller's promise, passed on.
        let key = load_key(unsafe { cstr(key_file, "key_file") }?)?;
        let rt = rt()?;
        let _enter = rt.enter();
        Ok(new_endpoint(pool_net::Endpoint::client(
            EndpointConfig::new(key),
        )))
    })
}

/// This endpoint's public key (43 characters), to give to peers. Owned by
/// the endpoint: valid until `pool_endpoint_free`. NULL on a bad handle.
#[no_mangle]
pub extern "C" fn pool_endpoint_public_key(ep: *const pool_endpoint) -> *const c_char {
    guard(std::ptr::null(), || {
        let ep = handle::endpoint(ep)?;
        // The CString lives in the endpoint, which the registry (and so
        // the C program's handle) keeps alive.
        Ok(ep.public.as_ptr())
    })
}

/// The bound address (`"127.0.0.1:40123"`; useful after binding port 0).
/// Owned by the endpoint. NULL for a client-only endpoint or a bad handle.
#[no_mangle]
pub extern "C" fn pool_endpoint_local_addr(ep: *const pool_endpoint) -> *const c_char {
    guard(std::ptr::null(), || {
        let ep = handle::endpoint(ep)?;
        ep.local
            .as_ref()
            .map(|c| c.as_ptr())
            .ok_or_else(|| inval("this endpoint does not listen (made by pool_endpoint_client)"))
    })
}

/// Frees an endpoint. Sessions made by it go on. NULL is ignored; a freed
/// or unknown handle is an error (-1).
#[no_mangle]
pub extern "C" fn pool_endpoint_free(ep: *mut pool_endpoint) -> c_int {
    if ep.is_null() {
        return 0;
    }
    guard(-1, || handle::take_endpoint(ep).map(|_| 0))
}

// ---------------------------------------------------------------------------
// Sessions

/// Opens a session to the POOL endpoint at `addr` whose public key is
/// `peer_key` (the handshake fails unless the peer holds it). Blocks until
/// the handshake is done. If the connection under the session dies later,
/// the session reconnects to `addr` and resumes by itself: the program
/// sees no error and loses no byte. Returns NULL on failure.
///
/// # Safety
/// `addr` and `peer_key` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn pool_connect(
    ep: *mut pool_endpoint,
    addr: *const c_char,
    peer_key: *const c_char,
) -> *mut pool_session {
    guard(null(), || {
        let ep = handle::endpoint(ep)?;
        // SAFETY: the caller's promise, passed on.
        let addr = unsafe { cstr(addr, "addr") }?;
        // SAFETY: as above.
        let peer = parse_key(unsafe { cstr(peer_key, "peer_key") }?, "peer_key")?;
        let rt = rt()?;
        let s = rt.block_on(ep.ep.connect(addr, peer))?;
        Ok(new_session(s))
    })
}

/// Waits for the next session from a trusted peer (bound endpoints only).
/// Returns NULL on failure or when the endpoint stops.
#[no_mangle]
pub extern "C" fn pool_accept(ep: *mut pool_endpoint) -> *mut pool_session {
    guard(null(), || {
        let ep = handle::endpoint(ep)?;
        if ep.local.is_none() {
            return Err(inval(
                "pool_accept on a client-only endpoint: bind one with pool_endpoint_bind",
            ));
        }
        let rt = rt()?;
        rt.block_on(ep.ep.accept())
            .map(new_session)
            .ok_or_else(|| Fail::new(pool_status::POOL_ECLOSED, "the endpoint stopped accepting"))
    })
}

/// Fills `out` with the session's counters. Returns 0, or -1.
///
/// # Safety
/// `out` is NULL or points to a writable `pool_stats`.
#[no_mangle]
pub unsafe extern "C" fn pool_session_stats(s: *mut pool_session, out: *mut pool_stats) -> c_int {
    guard(-1, || {
        let s = handle::session(s)?;
        if out.is_null() {
            return Err(inval("out is NULL: pass a pool_stats to fill"));
        }
        let st = s.session.stats();
        let c = &st.core;
        let us = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_micros() as u64);
        let v = pool_stats {
            rtt_us: us(c.rtt),
            min_rtt_us: us(c.min_rtt),
            jitter_us: c.jitter.as_micros() as u64,
            stream_bytes_sent: c.stream_bytes_sent,
            stream_bytes_received: c.stream_bytes_received,
            carrier_bytes_sent: c.bytes_sent,
            carrier_bytes_received: c.bytes_received,
            resumes: c.resumes,
            carriers_lost: c.carriers_lost,
            frames_resent: c.frames_resent,
            carrier_retransmits: st.tcp_retransmits.unwrap_or(u64::MAX),
            rekeys: c.rekeys,
            streams_active: c.streams_active,
            carrier_up: c_int::from(c.carrier_up),
        };
        // SAFETY: not NULL (checked), and the caller promises a writable
        // `pool_stats`; `write_unaligned` asks nothing of its alignment.
        unsafe { out.write_unaligned(v) };
        Ok(0)
    })
}

/// Switches the session to non-blocking mode and returns a file
/// descriptor that is readable (poll/epoll `POLLIN`/`EPOLLIN`) while an
/// incoming stream waits for `pool_stream_accept` or the session has
/// closed. From then on `pool_stream_accept` never blocks (NULL with
/// `POOL_EAGAIN`). The fd belongs to the session: do not read or close it.
/// Returns -1 on failure.
#[no_mangle]
pub extern "C" fn pool_session_fd(s: *mut pool_session) -> c_int {
    guard(-1, || handle::session(s)?.nonblocking())
}

/// Closes the session's handle. First it waits, up to 10 s, until the
/// peer has acknowledged everything written on the session (through a
/// resume if the carrier is down), as the kernel lingers on a closed TCP
/// socket: a program may exit right after. Streams still open keep the
/// session alive; the session ends when the last of them is freed. NULL is
/// ignored; a freed or unknown handle is an error (-1).
#[no_mangle]
pub extern "C" fn pool_session_free(s: *mut pool_session) -> c_int {
    if s.is_null() {
        return 0;
    }
    guard(-1, || {
        let s = handle::take_session(s)?;
        s.linger();
        Ok(0)
    })
}

// ---------------------------------------------------------------------------
// Streams

/// Opens a new stream to the peer. The stream is raw: a program on the
/// other side using libpool reads exactly these bytes. (A POOL node's
/// daemon expects each stream to start with a preamble naming a service;
/// this call does not write one.) Blocks while the peer's stream limit is
/// reached. Returns NULL on failure.
#[no_mangle]
pub extern "C" fn pool_stream_open(s: *mut pool_session) -> *mut pool_stream {
    guard(null(), || {
        let s = handle::session(s)?;
        let rt = rt()?;
        let st = rt.block_on(s.session.open_stream())?;
        Ok(new_stream(st))
    })
}

/// Waits for the peer's next stream (or, after `pool_session_fd`, returns
/// one if it is there: NULL with `POOL_EAGAIN` if not). Returns NULL with
/// `POOL_ECLOSED` once the session is closed.
#[no_mangle]
pub extern "C" fn pool_stream_accept(s: *mut pool_session) -> *mut pool_stream {
    guard(null(), || {
        let s = handle::session(s)?;
        s.accept_stream().map(new_stream)
    })
}

/// Reads up to `len` bytes. Returns the count (> 0), 0 at end of stream
/// (the peer called `pool_stream_finish`), or -1 (`POOL_ECLOSED` when the
/// stream was reset or the session died; `POOL_EAGAIN` in non-blocking
/// mode when nothing is there yet). Blocking mode waits for at least one
/// byte.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pool_stream_read(
    st: *mut pool_stream,
    buf: *mut c_void,
    len: size_t,
) -> ssize_t {
    guard(-1, || {
        let st = handle::stream(st)?;
        if buf.is_null() {
            return Err(inval("buf is NULL"));
        }
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: not NULL, and the caller promises `len` writable bytes
        // that nothing else touches during the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        st.read(buf).map(|n| n as ssize_t)
    })
}

/// Writes `len` bytes. Blocking mode writes them all (waiting for the
/// peer's flow-control window) and returns `len`; non-blocking mode copies
/// what fits into the stream's buffer and returns that count, or -1 with
/// `POOL_EAGAIN` when it is full (the fd becomes readable when there is
/// room again). -1 with `POOL_ECLOSED` after a finish, a reset or the
/// session's end.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn pool_stream_write(
    st: *mut pool_stream,
    buf: *const c_void,
    len: size_t,
) -> ssize_t {
    guard(-1, || {
        let st = handle::stream(st)?;
        if buf.is_null() {
            return Err(inval("buf is NULL"));
        }
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: not NULL, and the caller promises `len` readable bytes
        // that do not change during the call.
        let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        st.write(buf).map(|n| n as ssize_t)
    })
}

/// Half-close: no more writes from this side; the peer reads end of
/// stream after the last byte. Reading goes on. Returns 0, or -1.
#[no_mangle]
pub extern "C" fn pool_stream_finish(st: *mut pool_stream) -> c_int {
    guard(-1, || handle::stream(st)?.finish().map(|()| 0))
}

/// Switches the stream to non-blocking mode (for good) and returns a file
/// descriptor for poll/epoll: it is readable (`POLLIN`) while
/// `pool_stream_read` has data, end of stream or an error to return, and,
/// after a `pool_stream_write` that could not take everything, once there
/// is room again. Level-triggered. The fd belongs to the stream: do not
/// read or close it. Returns -1 on failure.
#[no_mangle]
pub extern "C" fn pool_stream_set_nonblocking(st: *mut pool_stream) -> c_int {
    guard(-1, || handle::stream(st)?.nonblocking())
}

/// The stream's readiness fd if it is in non-blocking mode, else -1
/// (call `pool_stream_set_nonblocking` first).
#[no_mangle]
pub extern "C" fn pool_stream_fd(st: *mut pool_stream) -> c_int {
    guard(-1, || {
        handle::stream(st)?
            .fd()
            .ok_or_else(|| inval("the stream is blocking: call pool_stream_set_nonblocking"))
    })
}

/// Frees a stream. If this side has not finished, it finishes now (after
/// what was written); unread incoming data is discarded. NULL is ignored;
/// a freed or unknown handle is an error (-1).
#[no_mangle]
pub extern "C" fn pool_stream_free(st: *mut pool_stream) -> c_int {
    if st.is_null() {
        return 0;
    }
    guard(-1, || handle::take_stream(st).map(|_| 0))
}
