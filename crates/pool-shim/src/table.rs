//! Which descriptors are shimmed sockets, and the address each program
//! asked for: a fixed array of atomics indexed by descriptor, so there is
//! no lock to be held across `fork` and nothing to allocate in a hook.

use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors at or above this are never shimmed (their `connect` goes
/// out as the program asked, plain).
pub const MAX_FD: usize = 1 << 16;

/// No entry.
pub const FREE: u8 = 0;
/// A non-blocking `connect` returned `EINPROGRESS`; the program has not
/// called `connect` again since.
pub const IN_PROGRESS: u8 = 1;
/// Connected (a blocking `connect` returned 0, or a second `connect`
/// completed a non-blocking one).
pub const CONNECTED: u8 = 2;

/// One descriptor's entry. `meta` packs `state u8 | addr_len u8 << 8 |
/// local_port u16 << 16 | daemon_port u16 << 32`; `addr` holds the
/// program's `sockaddr` bytes.
struct Slot {
    meta: AtomicU64,
    addr: [AtomicU64; 4],
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            meta: AtomicU64::new(0),
            addr: [
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
        }
    }
}

static TABLE: [Slot; MAX_FD] = [const { Slot::new() }; MAX_FD];

/// A copy of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// [`IN_PROGRESS`] or [`CONNECTED`].
    pub state: u8,
    /// The socket's local port (to tell a stale entry from a live one).
    pub local_port: u16,
    /// The daemon's loopback data port the socket is connected to.
    pub daemon_port: u16,
    /// Length of the program's address.
    pub len: u8,
    /// The program's `sockaddr`, as it passed it to `connect`.
    pub addr: [u8; 32],
}

fn slot(fd: i32) -> Option<&'static Slot> {
    usize::try_from(fd).ok().and_then(|i| TABLE.get(i))
}

/// The entry of `fd`, if it is a shimmed socket.
pub fn get(fd: i32) -> Option<Entry> {
    let s = slot(fd)?;
    let meta = s.meta.load(Ordering::Acquire);
    if meta & 0xff == u64::from(FREE) {
        return None;
    }
    let mut addr = [0u8; 32];
    for (i, w) in s.addr.iter().enumerate() {
        addr[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
    }
    Some(Entry {
        state: (meta & 0xff) as u8,
        len: ((meta >> 8) & 0xff) as u8,
        local_port: ((meta >> 16) & 0xffff) as u16,
        daemon_port: ((meta >> 32) & 0xffff) as u16,
        addr,
    })
}

/// Sets (or, with `None`, clears) the entry of `fd`.
pub fn set(fd: i32, e: Option<&Entry>) {
    let Some(s) = slot(fd) else { return };
    match e {
        None => s.meta.store(0, Ordering::Release),
        Some(e) => {
            s.meta.store(0, Ordering::Release);
            for (i, w) in s.addr.iter().enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(&e.addr[i * 8..i * 8 + 8]);
                w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
            }
            let meta = u64::from(e.state)
                | u64::from(e.len) << 8
                | u64::from(e.local_port) << 16
                | u64::from(e.daemon_port) << 32;
            s.meta.store(meta, Ordering::Release);
        }
    }
}

/// Changes only the state of a live entry.
pub fn set_state(fd: i32, state: u8) {
    if let Some(s) = slot(fd) {
        let _ = s
            .meta
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                (m & 0xff != 0).then_some((m & !0xff) | u64::from(state))
            });
    }
}

/// `newfd` becomes what `oldfd` is (after `dup`, `dup2`, `F_DUPFD`).
pub fn copy(oldfd: i32, newfd: i32) {
    if oldfd == newfd {
        return;
    }
    let e = get(oldfd);
    set(newfd, e.as_ref());
}

/// Clears `first..=last` (after `close_range`, `closefrom`).
pub fn clear_range(first: u32, last: u32) {
    let end = (last as usize).min(MAX_FD - 1);
    let Some(slots) = TABLE.get(first as usize..=end) else {
        return;
    };
    for s in slots {
        if s.meta.load(Ordering::Relaxed) != 0 {
            s.meta.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_copy_clear() {
        let mut addr = [0u8; 32];
        addr[..4].copy_from_slice(&[2, 0, 0, 80]);
        let e = Entry {
            state: IN_PROGRESS,
            local_port: 40000,
            daemon_port: 41000,
            len: 16,
            addr,
        };
        set(1000, Some(&e));
        assert_eq!(get(1000), Some(e));
        copy(1000, 1001);
        assert_eq!(get(1001), Some(e));
        set_state(1001, CONNECTED);
        assert_eq!(get(1001).map(|e| e.state), Some(CONNECTED));
        assert_eq!(get(1000).map(|e| e.state), Some(IN_PROGRESS));
        copy(1002, 1001); // 1002 is empty: 1001 becomes empty
        assert_eq!(get(1001), None);
        set_state(1001, CONNECTED); // no entry: stays empty
        assert_eq!(get(1001), None);
        clear_range(999, u32::MAX);
        assert_eq!(get(1000), None);
        assert_eq!(get(-1), None);
        assert_eq!(get(MAX_FD as i32), None);
        set(MAX_FD as i32, Some(&e)); // ignored
    }
}
