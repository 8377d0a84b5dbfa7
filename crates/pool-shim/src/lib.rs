//! # pool-shim: `LD_PRELOAD=libpool_shim.so PROGRAM`
//!
//! Carries an unmodified program's outgoing TCP connections through the
//! local POOL daemon (`[shim]` in its config) to the POOL daemon at the
//! destination. The program's descriptor stays a real TCP socket,
//! connected over loopback to the daemon, which it can `poll`, `epoll`,
//! `setsockopt` and `close` as usual. `docs/shim.md` says what is kept of
//! the kernel's semantics and what cannot be covered.
//!
//! The daemon is found through its Unix socket (`POOL_SHIM_SOCKET`), and
//! only after the kernel has said who listens there (`SO_PEERCRED`,
//! checked by [`peer`]); the loopback TCP port the program's socket is
//! then connected to is one the daemon names on that socket, and nothing
//! is sent on it before the kernel (`sock_diag`) or the daemon, on its
//! socket, has confirmed that the far end is the daemon's.
//!
//! This is the only crate with `extern "C"` hooks. Rules kept here:
//! no panic crosses into C (every hook body runs under `catch_unwind` and
//! falls back to the real function), no lock is taken (so `fork` is safe
//! at any moment), the library holds no descriptor of its own, `errno` is
//! restored or set exactly, and the real functions are resolved once at
//! load time with `dlsym(RTLD_NEXT, ..)`.
//!
//! Never call `libc::connect`, `close`, `dup*`, `fcntl` or `getpeername`
//! from this crate: those names resolve to the hooks below. Use [`Real`].

use std::ffi::{c_int, c_uint, c_ulong, c_void};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use libc::{sockaddr, socklen_t};

mod daemon;
pub mod peer;
pub mod settings;
pub mod table;
pub mod wire;

use daemon::{to_daemon, ToDaemon};
use settings::Settings;
use table::{Entry, CONNECTED, IN_PROGRESS};

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type CloseRangeFn = unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
type ClosefromFn = unsafe extern "C" fn(c_int);

/// The real functions, found once with `dlsym(RTLD_NEXT, ..)`. Where the
/// C library lacks one, a direct system call stands in.
#[derive(Clone, Copy)]
pub struct Real {
    connect: ConnectFn,
    getpeername: GetpeernameFn,
    close: CloseFn,
    dup: DupFn,
    dup2: Dup2Fn,
    dup3: Dup3Fn,
    fcntl: Option<FcntlFn>,
    fcntl64: Option<FcntlFn>,
    close_range: CloseRangeFn,
    closefrom: Option<ClosefromFn>,
}

unsafe extern "C" fn sys_connect(fd: c_int, a: *const sockaddr, l: socklen_t) -> c_int {
    // SAFETY: the caller's arguments go to the kernel unchanged; the
    // kernel checks the pointer.
    unsafe { libc::syscall(libc::SYS_connect, fd, a, l) as c_int }
}
unsafe extern "C" fn sys_getpeername(fd: c_int, a: *mut sockaddr, l: *mut socklen_t) -> c_int {
    // SAFETY: as for `sys_connect`.
    unsafe { libc::syscall(libc::SYS_getpeername, fd, a, l) as c_int }
}
unsafe extern "C" fn sys_close(fd: c_int) -> c_int {
    // SAFETY: a plain system call on an integer.
    unsafe { libc::syscall(libc::SYS_close, fd) as c_int }
}
unsafe extern "C" fn sys_dup(fd: c_int) -> c_int {
    // SAFETY: a plain system call on an integer.
    unsafe { libc::syscall(libc::SYS_dup, fd) as c_int }
}
unsafe extern "C" fn sys_dup2(a: c_int, b: c_int) -> c_int {
    if a == b {
        // dup2(fd, fd) checks fd and returns it; dup3 would fail.
        // SAFETY: F_GETFD on an integer has no memory effects.
        let rc = unsafe { libc::syscall(libc::SYS_fcntl, a, libc::F_GETFD) };
        return if rc < 0 { -1 } else { a };
    }
    // SAFETY: a plain system call on integers.
    unsafe { libc::syscall(libc::SYS_dup3, a, b, 0) as c_int }
}
unsafe extern "C" fn sys_dup3(a: c_int, b: c_int, f: c_int) -> c_int {
    // SAFETY: a plain system call on integers.
    unsafe { libc::syscall(libc::SYS_dup3, a, b, f) as c_int }
}
unsafe extern "C" fn sys_close_range(a: c_uint, b: c_uint, f: c_int) -> c_int {
    // SAFETY: a plain system call on integers.
    unsafe { libc::syscall(libc::SYS_close_range, a, b, f) as c_int }
}

/// Looks a symbol up in the libraries after this one.
///
/// # Safety
/// `T` must be the function pointer type of the symbol `name`.
unsafe fn next<T: Copy>(name: &[u8]) -> Option<T> {
    debug_assert!(name.ends_with(b"\0"));
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT is a valid handle.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller says `T` is the symbol's function pointer type,
    // which has the size of a data pointer on every Linux target.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

static REAL: OnceLock<Real> = OnceLock::new();
static SETTINGS: OnceLock<Settings> = OnceLock::new();
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);
/// The process the fd table belongs to. A `vfork` child shares this
/// library's memory with its parent but not its descriptors: it must not
/// touch the table (Python's `subprocess` closes every inherited
/// descriptor in a `vfork` child). `fork` children update it (atfork).
static OWNER: AtomicU32 = AtomicU32::new(0);

extern "C" fn after_fork_in_child() {
    OWNER.store(std::process::id(), Ordering::Relaxed);
}

/// Whether this process owns the table (false in a `vfork` child).
fn owns_table() -> bool {
    let owner = OWNER.load(Ordering::Relaxed);
    owner == 0 || owner == std::process::id()
}

fn resolve() -> Real {
    // SAFETY: each type is that function's C signature in glibc/musl.
    unsafe {
        let fcntl: Option<FcntlFn> = next(b"fcntl\0");
        Real {
            connect: next(b"connect\0").unwrap_or(sys_connect as ConnectFn),
            getpeername: next(b"getpeername\0").unwrap_or(sys_getpeername as GetpeernameFn),
            close: next(b"close\0").unwrap_or(sys_close as CloseFn),
            dup: next(b"dup\0").unwrap_or(sys_dup as DupFn),
            dup2: next(b"dup2\0").unwrap_or(sys_dup2 as Dup2Fn),
            dup3: next(b"dup3\0").unwrap_or(sys_dup3 as Dup3Fn),
            fcntl,
            fcntl64: next(b"fcntl64\0").or(fcntl),
            close_range: next(b"close_range\0").unwrap_or(sys_close_range as CloseRangeFn),
            closefrom: next(b"closefrom\0"),
        }
    }
}

impl Real {
    /// The real `fcntl` with one integer or pointer argument (a system
    /// call where the C library has none).
    fn fcntl(&self, fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
        match self.fcntl {
            // SAFETY: the real fcntl; `arg` is what the caller passes on.
            Some(f) => unsafe { f(fd, cmd, arg) },
            // SAFETY: the same call as a system call.
            None => unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as c_int },
        }
    }
}

/// The real functions (resolved at load time; on first use if a hook runs
/// before this library's constructor).
pub fn real() -> &'static Real {
    REAL.get_or_init(resolve)
}

fn stderr(msg: &str) {
    let line = format!("pool-shim[{}]: {msg}\n", std::process::id());
    // SAFETY: writing a valid buffer to fd 2; a failure is ignored.
    let _ = unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

fn load_settings() -> Settings {
    let (mut s, problems) = Settings::from_lookup(|k| std::env::var(k).ok());
    for p in problems {
        stderr(&p);
    }
    // The daemon never carries its own connections through itself.
    if std::fs::read_to_string("/proc/self/comm").is_ok_and(|c| c.trim_end() == "pool") {
        s.disabled = true;
    }
    s
}

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(load_settings)
}

extern "C" fn init() {
    let _ = catch_unwind(|| {
        real();
        settings();
        OWNER.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: registers a plain function with no state to run in the
        // child after fork; failure only means vfork detection is off.
        let _ = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
}

/// Runs at load time: resolves the real functions and reads the settings
/// before the program (and its threads) start.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

fn errno() -> c_int {
    // SAFETY: errno is thread-local and always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: errno is thread-local and always valid.
    unsafe { *libc::__errno_location() = e }
}

/// A `sockaddr` copied out of the program's memory, in the form and length
/// the kernel's `getpeername` would give it back (`sin_zero` and
/// `sin6_flowinfo` zero, 16 or 28 bytes whatever length was passed).
fn read_sockaddr(addr: *const sockaddr, len: socklen_t) -> Option<(SocketAddr, [u8; 32], u8)> {
    if addr.is_null() {
        return None;
    }
    let len = len as usize;
    if len < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    let mut raw = [0u8; 32];
    let n = len.min(32);
    // SAFETY: the program passed `len` readable bytes at `addr` (the
    // contract of connect); we read at most that many.
    unsafe { std::ptr::copy_nonoverlapping(addr.cast::<u8>(), raw.as_mut_ptr(), n) };
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let canonical = match c_int::from(family) {
        libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
        _ => return None,
    };
    if len < canonical {
        return None;
    }
    raw[canonical..].fill(0);
    if canonical == std::mem::size_of::<libc::sockaddr_in>() {
        raw[8..16].fill(0); // sin_zero
    } else {
        raw[4..8].fill(0); // sin6_flowinfo
    }
    let dest = match c_int::from(family) {
        libc::AF_INET => {
            // SAFETY: `raw` holds at least a sockaddr_in; unaligned read.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: `raw` holds at least a sockaddr_in6; unaligned read.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let ip = match ip.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip),
            };
            SocketAddr::new(ip, u16::from_be(sin6.sin6_port))
        }
        _ => return None,
    };
    Some((dest, raw, canonical as u8))
}

/// A socket address as the kernel takes it, for a socket of `domain`
/// (IPv4 as v4-mapped for an IPv6 socket).
fn to_raw(a: SocketAddr, domain: c_int) -> Option<(libc::sockaddr_storage, socklen_t)> {
    // SAFETY: sockaddr_storage is plain integers; all zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let p: *mut libc::sockaddr_storage = &mut ss;
    match (domain, a) {
        (libc::AF_INET, SocketAddr::V4(v4)) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { p.cast::<libc::sockaddr_in>().write(sin) };
            Some((ss, std::mem::size_of::<libc::sockaddr_in>() as socklen_t))
        }
        (libc::AF_INET6, a) => {
            let (ip, scope) = match a {
                SocketAddr::V4(v4) => (v4.ip().to_ipv6_mapped(), 0),
                SocketAddr::V6(v6) => (*v6.ip(), v6.scope_id()),
            };
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                sin6_scope_id: scope,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { p.cast::<libc::sockaddr_in6>().write(sin6) };
            Some((ss, std::mem::size_of::<libc::sockaddr_in6>() as socklen_t))
        }
        _ => None,
    }
}

fn sockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut l = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: `v` and `l` are valid and `l` is the size of `v`.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut c_int).cast(), &mut l) };
    (rc == 0).then_some(v)
}

/// `TCP_CLOSE` in `tcpi_state`: an unconnected TCP socket.
const TCP_CLOSE: u8 = 7;

/// The kernel's TCP state of a socket; `None` if it is not a TCP socket.
fn tcp_state(fd: c_int) -> Option<u8> {
    // SAFETY: tcp_info is plain integers; all zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut l = std::mem::size_of::<libc::tcp_info>() as socklen_t;
    // SAFETY: `info` and `l` are valid and `l` is the size of `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut l,
        )
    };
    (rc == 0).then_some(info.tcpi_state)
}

fn local_port(fd: c_int) -> Option<u16> {
    local_addr(fd).map(|a| a.port())
}

/// The socket's local address (v4-mapped IPv6 as IPv4).
fn local_addr(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut l = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: `ss` and `l` are valid and `l` is the size of `ss`.
    let rc =
        unsafe { libc::getsockname(fd, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut l) };
    if rc != 0 {
        return None;
    }
    read_sockaddr((&ss as *const libc::sockaddr_storage).cast(), l).map(|(a, _, _)| a)
}

/// Whether a table entry still describes `fd`: the socket is connected to
/// the daemon's data port from the local port it had when the entry was
/// made (the entry is stale if the descriptor was closed behind the
/// shim's back).
fn is_live(r: &Real, fd: c_int, e: &Entry) -> bool {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut l = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: `ss` and `l` are valid and `l` is the size of `ss`.
    let rc =
        unsafe { (r.getpeername)(fd, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut l) };
    rc == 0
        && read_sockaddr((&ss as *const libc::sockaddr_storage).cast(), l).is_some_and(
            |(a, _, _)| a == SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), e.daemon_port),
        )
        && local_port(fd) == Some(e.local_port)
}

enum Outcome {
    /// Call the real function with the program's arguments.
    Pass,
    /// Return this (errno already set).
    Done(c_int),
}

fn shim_connect(r: &Real, fd: c_int, addr: *const sockaddr, len: socklen_t) -> Outcome {
    let saved = errno();
    let s = settings();
    if s.disabled || !owns_table() {
        return Outcome::Pass;
    }
    let Some((dest, raw, raw_len)) = read_sockaddr(addr, len) else {
        return Outcome::Pass;
    };
    // Descriptors beyond the table are still carried (never in clear),
    // only without bookkeeping (`getpeername` shows the daemon).
    if !s.intercepts(dest) || fd < 0 {
        return Outcome::Pass;
    }
    let family = c_int::from(u16::from_ne_bytes([raw[0], raw[1]]));
    // TCP_INFO answers only for TCP sockets (not UDP, SCTP or Unix).
    let Some(state) = tcp_state(fd) else {
        set_errno(saved);
        return Outcome::Pass;
    };
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) != Some(family) {
        set_errno(saved);
        return Outcome::Pass;
    }
    // A second connect on a shimmed socket: what the kernel says once the
    // connection is up (0 the first time after EINPROGRESS, then EISCONN).
    if let Some(e) = table::get(fd) {
        if is_live(r, fd, &e) {
            if e.state == IN_PROGRESS {
                table::set_state(fd, CONNECTED);
                set_errno(saved);
                return Outcome::Done(0);
            }
            set_errno(libc::EISCONN);
            return Outcome::Done(-1);
        }
        table::set(fd, None);
    }
    // Connecting, connected, listening: let the kernel answer.
    if state != TCP_CLOSE {
        set_errno(saved);
        return Outcome::Pass;
    }
    let fl = r.fcntl(fd, libc::F_GETFL, 0);
    if fl < 0 {
        set_errno(saved);
        return Outcome::Pass;
    }
    let nonblocking = fl & libc::O_NONBLOCK != 0;
    if nonblocking {
        r.fcntl(fd, libc::F_SETFL, (fl & !libc::O_NONBLOCK) as c_ulong);
    }
    let res = to_daemon(r, fd, family, dest, !nonblocking);
    if nonblocking {
        r.fcntl(fd, libc::F_SETFL, fl as c_ulong);
    }
    match res {
        ToDaemon::Connected(local_port, daemon_port) => {
            let state = if nonblocking { IN_PROGRESS } else { CONNECTED };
            table::set(
                fd,
                Some(&Entry {
                    state,
                    local_port,
                    daemon_port,
                    len: raw_len,
                    addr: raw,
                }),
            );
            if nonblocking {
                set_errno(libc::EINPROGRESS);
                Outcome::Done(-1)
            } else {
                set_errno(saved);
                Outcome::Done(0)
            }
        }
        ToDaemon::Refused(e) | ToDaemon::Error(e) => {
            set_errno(e);
            Outcome::Done(-1)
        }
        ToDaemon::Unavailable if s.fallback => {
            if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                stderr(&format!(
                    "the POOL daemon is not reachable at {}; POOL_SHIM_FALLBACK=1, so connections go out as plain TCP",
                    s.socket.display()
                ));
            }
            set_errno(saved);
            Outcome::Pass
        }
        ToDaemon::Unavailable => {
            set_errno(libc::ECONNREFUSED);
            Outcome::Done(-1)
        }
    }
}

/// `connect(2)`, through the POOL daemon for selected TCP destinations.
///
/// # Safety
/// The C contract of `connect`: `addr` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let r = real();
    match catch_unwind(AssertUnwindSafe(|| shim_connect(r, fd, addr, len))) {
        Ok(Outcome::Done(rc)) => rc,
        // SAFETY: the program's own arguments, to the real function.
        _ => unsafe { (r.connect)(fd, addr, len) },
    }
}

/// `getpeername(2)`: a shimmed socket answers with the address the
/// program connected to, not the daemon's.
///
/// # Safety
/// The C contract of `getpeername`.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let r = real();
    let cap = if len.is_null() {
        0
    } else {
        // SAFETY: `len` points to a socklen_t (C contract).
        unsafe { *len }
    };
    // SAFETY: the program's own arguments, to the real function.
    let rc = unsafe { (r.getpeername)(fd, addr, len) };
    if rc != 0 || addr.is_null() || len.is_null() {
        return rc;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let saved = errno();
        if let Some(e) = table::get(fd) {
            if is_live(r, fd, &e) {
                let n = (cap as usize).min(usize::from(e.len));
                // SAFETY: the program gave `cap` writable bytes at `addr`
                // and a writable `len`; we write at most `cap` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(e.addr.as_ptr(), addr.cast::<u8>(), n);
                    *len = socklen_t::from(e.len);
                }
            }
        }
        set_errno(saved);
    }));
    rc
}

/// `close(2)`, forgetting the descriptor first.
///
/// # Safety
/// The C contract of `close`.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if owns_table() {
        table::set(fd, None);
    }
    // SAFETY: the program's own argument, to the real function.
    unsafe { (real().close)(fd) }
}

/// `dup(2)`: the copy is shimmed if the original is.
///
/// # Safety
/// The C contract of `dup`.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: the program's own argument, to the real function.
    let n = unsafe { (real().dup)(fd) };
    if n >= 0 && owns_table() {
        table::copy(fd, n);
    }
    n
}

/// `dup2(2)`.
///
/// # Safety
/// The C contract of `dup2`.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: the program's own arguments, to the real function.
    let n = unsafe { (real().dup2)(old, new) };
    if n >= 0 && owns_table() {
        table::copy(old, n);
    }
    n
}

/// `dup3(2)`.
///
/// # Safety
/// The C contract of `dup3`.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: the program's own arguments, to the real function.
    let n = unsafe { (real().dup3)(old, new, flags) };
    if n >= 0 && owns_table() {
        table::copy(old, n);
    }
    n
}

fn after_fcntl(fd: c_int, cmd: c_int, rc: c_int) -> c_int {
    if rc >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) && owns_table() {
        table::copy(fd, rc);
    }
    rc
}

/// `fcntl(2)`: `F_DUPFD` and `F_DUPFD_CLOEXEC` copy the shim's entry.
///
/// Declared with one `unsigned long` argument instead of `...` (stable
/// Rust cannot define variadic functions): on x86-64 and AArch64 Linux the
/// optional argument, an int or a pointer, is passed in the same register.
///
/// # Safety
/// The C contract of `fcntl`.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let rc = real().fcntl(fd, cmd, arg);
    after_fcntl(fd, cmd, rc)
}

/// `fcntl64` (what programs built with 64-bit file offsets call).
///
/// # Safety
/// As [`fcntl`].
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let r = real();
    let rc = match r.fcntl64 {
        // SAFETY: the program's own arguments, to the real function.
        Some(f) => unsafe { f(fd, cmd, arg) },
        None => r.fcntl(fd, cmd, arg),
    };
    after_fcntl(fd, cmd, rc)
}

/// `close_range(2)`.
///
/// # Safety
/// The C contract of `close_range`.
#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    // SAFETY: the program's own arguments, to the real function.
    let rc = unsafe { (real().close_range)(first, last, flags) };
    if rc == 0 && flags & (libc::CLOSE_RANGE_CLOEXEC as c_int) == 0 && owns_table() {
        table::clear_range(first, last);
    }
    rc
}

/// `closefrom(3)`.
///
/// # Safety
/// The C contract of `closefrom`.
#[no_mangle]
pub unsafe extern "C" fn closefrom(low: c_int) {
    let r = real();
    match r.closefrom {
        // SAFETY: the program's own argument, to the real function.
        Some(f) => unsafe { f(low) },
        None => {
            // SAFETY: a plain system call on integers.
            let _ = unsafe { libc::syscall(libc::SYS_close_range, low, c_uint::MAX, 0) };
        }
    }
    if owns_table() {
        table::clear_range(low.max(0) as u32, u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip_and_v4_mapped() {
        for (a, domain) in [
            ("10.1.2.3:80", libc::AF_INET),
            ("[fd00::1]:443", libc::AF_INET6),
            ("10.1.2.3:80", libc::AF_INET6),
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, l) = to_raw(a, domain).unwrap();
            let (back, _, n) =
                read_sockaddr((&ss as *const libc::sockaddr_storage).cast(), l).unwrap();
            assert_eq!(back, a, "v4-mapped unwrapped");
            assert_eq!(socklen_t::from(n), l);
            // Passed with the length of a sockaddr_storage: given back
            // with its own length, as the kernel would.
            let (_, _, n) = read_sockaddr(
                (&ss as *const libc::sockaddr_storage).cast(),
                std::mem::size_of::<libc::sockaddr_storage>() as socklen_t,
            )
            .unwrap();
            assert_eq!(socklen_t::from(n), l);
        }
        assert!(to_raw("[::1]:1".parse().unwrap(), libc::AF_INET).is_none());
        assert!(read_sockaddr(std::ptr::null(), 16).is_none());
    }
}
