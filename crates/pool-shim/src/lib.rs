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

pub mod peer;
pub mod settings;
pub mod table;
pub mod wire;

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

/// Drops a connection attempt so the socket can `connect` again
/// (`connect` with `AF_UNSPEC`).
fn disconnect(r: &Real, fd: c_int) {
    // SAFETY: all-zero sockaddr is valid; family AF_UNSPEC = 0.
    let sa: sockaddr = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sockaddr of its own size.
    let _ = unsafe { (r.connect)(fd, &sa, std::mem::size_of::<sockaddr>() as socklen_t) };
}

/// Waits (up to 3 s) for a connect the kernel reported in progress.
fn wait_connected(fd: c_int) -> c_int {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, 3000) };
        if rc < 0 && errno() == libc::EINTR {
            continue;
        }
        if rc == 0 {
            return libc::ETIMEDOUT;
        }
        if rc < 0 {
            return errno();
        }
        return sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR).unwrap_or(libc::EIO);
    }
}

fn send_all(fd: c_int, mut b: &[u8]) -> bool {
    while !b.is_empty() {
        // SAFETY: `b` is a valid buffer of its length.
        let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return false;
        }
        b = &b[n as usize..];
    }
    true
}

/// How long a blocking `connect` may wait for the destination: about as
/// long as the kernel's own SYN retries (127 s by default).
const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(130);

/// Reads the daemon's status byte for a blocking `connect` (restarting on
/// signals, ignoring the program's `SO_RCVTIMEO`, bounded by
/// [`STATUS_WAIT`]); the errno to return if there is none.
fn wait_status(fd: c_int) -> Result<u8, c_int> {
    let deadline = std::time::Instant::now() + STATUS_WAIT;
    let mut b = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(libc::ETIMEDOUT);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().min(60_000) as c_int) };
        if rc <= 0 {
            continue; // EINTR, or a slice of the wait elapsed
        }
        // SAFETY: one writable byte.
        let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
        if n == 1 {
            return Ok(b[0]);
        }
        if n < 0 && matches!(errno(), libc::EINTR | libc::EAGAIN) {
            continue;
        }
        // The daemon closed or reset the connection without answering.
        return Err(libc::ECONNREFUSED);
    }
}

enum ToDaemon {
    /// Connected to the daemon: the socket's local port, the daemon's
    /// data port.
    Connected(u16, u16),
    /// The daemon is not there (or could not be used, or is not the
    /// daemon).
    Unavailable,
    /// The daemon answered a blocking connect with a refusal.
    Refused(c_int),
    /// The socket could not connect at all (its own state); this errno.
    Error(c_int),
}

/// How long the daemon has to answer on its Unix socket (each exchange
/// needs nothing but the daemon itself, so this only matters if it is
/// stopped or overloaded).
const REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

static UNTRUSTED_LOGGED: AtomicBool = AtomicBool::new(false);
static DENIED_LOGGED: AtomicBool = AtomicBool::new(false);

fn stderr_once(flag: &AtomicBool, msg: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        stderr(msg);
    }
}

/// A descriptor of the shim's own, open only inside one hook call
/// (`SOCK_CLOEXEC`), closed with the real `close`.
struct OwnFd(c_int, CloseFn);

impl Drop for OwnFd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours (made by `unix_connect`) and
        // closed once, here.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// A non-blocking connection to the Unix socket at `path`.
fn unix_connect(r: &Real, path: &std::path::Path) -> Option<OwnFd> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain integers; all zero is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in sun.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: a plain system call on integers.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    let own = OwnFd(fd, r.close);
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `sun` is a valid sockaddr_un and `len` is within it. A
    // non-blocking Unix connect never waits: it succeeds or fails now.
    let rc = unsafe {
        (r.connect)(
            fd,
            (&sun as *const libc::sockaddr_un).cast(),
            len as socklen_t,
        )
    };
    (rc == 0).then_some(own)
}

/// The uid and pid of the process listening at the other end
/// (`SO_PEERCRED`: recorded by the kernel when it called `listen`; it
/// cannot be forged).
fn peer_cred(fd: c_int) -> Option<(u32, i32)> {
    // SAFETY: ucred is plain integers; all zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut l = std::mem::size_of::<libc::ucred>() as socklen_t;
    // SAFETY: `cred` and `l` are valid and `l` is the size of `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut l,
        )
    };
    (rc == 0 && l as usize == std::mem::size_of::<libc::ucred>()).then_some((cred.uid, cred.pid))
}

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// The uid that owns the TCP socket at `local` with `remote` as its peer,
/// as the kernel's `sock_diag` tells it (the owner of a connection a
/// listener accepted is the listener's owner); `None` if it cannot be
/// asked (no `inet_diag` in this kernel, or no such socket).
fn tcp_socket_uid(local: std::net::SocketAddrV4, remote: std::net::SocketAddrV4) -> Option<u32> {
    // nlmsghdr (16) + inet_diag_req_v2 (56), by hand: libc lacks them.
    let mut req = [0u8; 72];
    req[0..4].copy_from_slice(&72u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[16] = libc::AF_INET as u8;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req[24..26].copy_from_slice(&local.port().to_be_bytes());
    req[26..28].copy_from_slice(&remote.port().to_be_bytes());
    req[28..32].copy_from_slice(&local.ip().octets());
    req[44..48].copy_from_slice(&remote.ip().octets());
    req[64..72].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
                                             // SAFETY: a plain system call on integers.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return None;
    }
    let own = OwnFd(fd, real().close);
    // SAFETY: sockaddr_nl is plain integers; all zero is valid.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `to` are valid for their lengths.
    let n = unsafe {
        libc::sendto(
            own.0,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as socklen_t,
        )
    };
    if n != req.len() as isize {
        return None;
    }
    let mut p = libc::pollfd {
        fd: own.0,
        events: libc::POLLIN,
        revents: 0,
    };
    // The kernel answers while handling the request; the wait is a
    // formality, bounded anyway.
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
        return None;
    }
    let mut resp = [0u8; 512];
    // SAFETY: `resp` is a valid writable buffer of its length.
    let n = unsafe {
        libc::recv(
            own.0,
            resp.as_mut_ptr().cast(),
            resp.len(),
            libc::MSG_DONTWAIT,
        )
    };
    // nlmsghdr, then inet_diag_msg: family, state, timer, retrans, the
    // 48-byte id, expires, rqueue, wqueue, uid, inode.
    if n < 88 || u16::from_ne_bytes([resp[4], resp[5]]) != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let same = resp[20..22] == req[24..26]
        && resp[22..24] == req[26..28]
        && resp[24..28] == req[28..32]
        && resp[40..44] == req[44..48];
    // Only an established socket has its owner's uid (a half-open one
    // reports 0): anything else is "cannot tell".
    (same && resp[17] == TCP_ESTABLISHED)
        .then(|| u32::from_ne_bytes([resp[80], resp[81], resp[82], resp[83]]))
}

/// `TCP_ESTABLISHED` in `sock_diag`'s state.
const TCP_ESTABLISHED: u8 = 1;

/// The daemon instance (pid) last seen on the socket, and its data port:
/// `pid << 16 | port`, 0 for none. While the same process listens on the
/// socket, its data port is the same.
static DATA_PORT: AtomicU64 = AtomicU64::new(0);

fn cached_data_port(pid: i32) -> Option<u16> {
    let v = DATA_PORT.load(Ordering::Relaxed);
    (v != 0 && (v >> 16) as i32 == pid).then_some((v & 0xffff) as u16)
}

/// A fresh token from the kernel's random source.
fn token() -> Option<[u8; wire::TOKEN_LEN]> {
    let mut t = [0u8; wire::TOKEN_LEN];
    // SAFETY: `t` is a valid writable buffer of its length.
    let n = unsafe { libc::getrandom(t.as_mut_ptr().cast(), t.len(), 0) };
    (n == t.len() as isize).then_some(t)
}

/// Reads one reply from the daemon's Unix socket before `deadline`.
fn recv_reply(fd: c_int, deadline: std::time::Instant) -> Option<wire::Reply> {
    let mut b = [0u8; wire::REPLY_LEN];
    let mut got = 0;
    while got < b.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as c_int) };
        if rc <= 0 {
            continue; // EINTR, or the time is up (checked above)
        }
        let rest = &mut b[got..];
        // SAFETY: `rest` is a valid writable buffer of its length.
        let n = unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || !matches!(errno(), libc::EINTR | libc::EAGAIN) {
            return None;
        }
    }
    Some(wire::Reply::decode(&b))
}

/// Connects the (now blocking) program socket to the daemon's loopback
/// data port and presents a token the daemon got over its Unix socket —
/// after the kernel has said who listens on that socket, and only to a TCP
/// peer that belongs to the same user; for a blocking socket, waits for the
/// status byte. Nothing of the program's is sent before that.
///
/// The data port is asked for (`GO`) the first time; after that, while the
/// same daemon process is on the socket, it is known and the hook does not
/// wait for the daemon at all: the kernel vouches for the TCP peer
/// (`sock_diag`). Where the kernel cannot be asked, the hook waits for the
/// daemon's `CONNECTED` instead.
fn to_daemon(r: &Real, fd: c_int, domain: c_int, dest: SocketAddr, blocking: bool) -> ToDaemon {
    let s = settings();
    // A directory found safe stays so: only root or its owner could
    // change it, and both are trusted.
    static EXPECT: OnceLock<peer::Expect> = OnceLock::new();
    let found = match EXPECT.get() {
        Some(e) => Ok(e.clone()),
        None => peer::expect_here(&s.socket, s.daemon_uid).inspect(|e| {
            let _ = EXPECT.set(e.clone());
        }),
    };
    let expect = match found {
        Ok(e) => e,
        Err(peer::Refusal::Missing) => return ToDaemon::Unavailable,
        Err(peer::Refusal::Unsafe(why)) => {
            stderr_once(&UNTRUSTED_LOGGED, &why);
            return ToDaemon::Unavailable;
        }
    };
    let Some(unix) = unix_connect(r, &expect.path) else {
        return ToDaemon::Unavailable;
    };
    let (daemon_uid, daemon_pid) = match peer_cred(unix.0) {
        Some((uid, pid)) if expect.uids.contains(&uid) => (uid, pid),
        other => {
            let who =
                other.map_or_else(|| "an unknown uid".to_string(), |(u, _)| format!("uid {u}"));
            stderr_once(
                &UNTRUSTED_LOGGED,
                &format!(
                    "{} is served by {who}, not by the POOL daemon (uid {}): nothing was sent to it",
                    expect.path.display(),
                    expect.uids[0]
                ),
            );
            return ToDaemon::Unavailable;
        }
    };
    let Some(token) = token() else {
        return ToDaemon::Unavailable;
    };
    let flags = if blocking { wire::FLAG_WANT_STATUS } else { 0 };
    let mut request = [0u8; wire::REQUEST_LEN];
    let header = wire::Header {
        destination: dest,
        flags,
        pid: std::process::id(),
    };
    request[..wire::HEADER_LEN].copy_from_slice(&header.encode());
    request[wire::HEADER_LEN..].copy_from_slice(&token);
    let deadline = std::time::Instant::now() + REPLY_WAIT;
    // A daemon that refuses this user answers and closes at once, maybe
    // before the request is written: read its answer anyway.
    let sent = send_all(unix.0, &request);
    let cached = if sent {
        cached_data_port(daemon_pid)
    } else {
        None
    };
    let mut go_read = false;
    let data_port = match cached {
        Some(p) => p,
        None => {
            go_read = true;
            match recv_reply(unix.0, deadline) {
                Some(g) if sent && g.kind == wire::REPLY_GO && g.port != 0 && g.token == token => {
                    let v = (u64::from(daemon_pid as u32) << 16) | u64::from(g.port);
                    DATA_PORT.store(v, Ordering::Relaxed);
                    g.port
                }
                Some(d) if d.kind == wire::REPLY_DENIED => {
                    // SAFETY: getuid has no failure mode.
                    let uid = unsafe { libc::getuid() };
                    stderr_once(
                        &DENIED_LOGGED,
                        &format!(
                            "the POOL daemon does not serve this user (uid {uid}): its [shim] allow_users / allow_groups decide"
                        ),
                    );
                    return ToDaemon::Unavailable;
                }
                _ => return ToDaemon::Unavailable,
            }
        }
    };
    let daemon = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), data_port);
    let Some((ss, sl)) = to_raw(daemon, domain) else {
        return ToDaemon::Unavailable;
    };
    if domain == libc::AF_INET6 {
        let off: c_int = 0;
        // SAFETY: a valid int option of its own size. Failure (socket
        // already bound) shows as a failed connect below.
        let _ = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&off as *const c_int).cast(),
                std::mem::size_of::<c_int>() as socklen_t,
            )
        };
    }
    // SAFETY: `ss` holds a valid address of length `sl`.
    let rc = unsafe { (r.connect)(fd, (&ss as *const libc::sockaddr_storage).cast(), sl) };
    if rc != 0 {
        let e = errno();
        let e = if e == libc::EINTR || e == libc::EINPROGRESS {
            wait_connected(fd)
        } else {
            e
        };
        match e {
            0 => {}
            // The daemon's data port is not reachable from this socket.
            libc::ECONNREFUSED
            | libc::ETIMEDOUT
            | libc::ENETUNREACH
            | libc::EHOSTUNREACH
            | libc::EADDRNOTAVAIL
            | libc::ECONNRESET
            | libc::EACCES
            | libc::EPERM => {
                DATA_PORT.store(0, Ordering::Relaxed);
                disconnect(r, fd);
                return ToDaemon::Unavailable;
            }
            // The socket's own state (EISCONN, EALREADY, EBADF, ...): what
            // the kernel would have said to the program's connect too.
            other => return ToDaemon::Error(other),
        }
    }
    let Some(me) = local_addr(fd) else {
        disconnect(r, fd);
        return ToDaemon::Unavailable;
    };
    let port = me.port();
    let far_end = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, data_port);
    let uid = match me {
        SocketAddr::V4(me) => tcp_socket_uid(far_end, me),
        SocketAddr::V6(_) => None,
    };
    let proven = match uid {
        // The kernel says the far end is the daemon's user's.
        Some(uid) if uid == daemon_uid => send_all(fd, &token),
        // Someone else's (a port taken over after the daemon died).
        Some(_) => false,
        // The kernel cannot be asked: the daemon's word over its socket.
        None => {
            let go_ok = go_read
                || recv_reply(unix.0, deadline)
                    .is_some_and(|g| g.kind == wire::REPLY_GO && g.port == data_port);
            go_ok
                && send_all(fd, &token)
                && recv_reply(unix.0, deadline).is_some_and(|c| {
                    c.kind == wire::REPLY_CONNECTED && c.port == port && c.token == token
                })
        }
    };
    drop(unix);
    if !proven {
        DATA_PORT.store(0, Ordering::Relaxed);
        disconnect(r, fd);
        return ToDaemon::Unavailable;
    }
    if blocking {
        match wait_status(fd) {
            Ok(wire::STATUS_OK) => {}
            Ok(status) => {
                disconnect(r, fd);
                return ToDaemon::Refused(wire::status_errno(status));
            }
            Err(e) => {
                disconnect(r, fd);
                return ToDaemon::Refused(e);
            }
        }
    }
    ToDaemon::Connected(port, data_port)
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
