//! The conversation with the local daemon: finding it on its Unix socket
//! (and checking who listens there), asking it for a connection to a
//! destination, and connecting the program's socket to the loopback data
//! port it names, confirmed as the daemon's before anything is sent.

use super::*;

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

pub(crate) enum ToDaemon {
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
pub(crate) fn to_daemon(
    r: &Real,
    fd: c_int,
    domain: c_int,
    dest: SocketAddr,
    blocking: bool,
) -> ToDaemon {
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
