//! systemd readiness and the watchdog (`sd_notify(3)`), without a
//! dependency: each message is one datagram to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! `Type=notify` units start their dependents only once [`ready`] is sent:
//! the daemon and the relay send it after their listeners are bound and
//! their journal is open. With `WatchdogSec=` set, systemd passes
//! `WATCHDOG_USEC` and [`ready`] starts a task on the async runtime that
//! sends `WATCHDOG=1` every half of it, so a runtime that stops turning
//! gets the service restarted. Without `$NOTIFY_SOCKET` all of this does
//! nothing.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification; `Ok(false)` when there is no notify socket.
fn send(msg: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), &path)?;
    }
    Ok(true)
}

fn notify(msg: &str) {
    if let Err(e) = send(msg) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is set
/// for this process (`WATCHDOG_PID`, if present, names us).
fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(10)))
}

/// Tells systemd the service is ready, and starts the watchdog pings when
/// asked for. Call from inside the async runtime, once the listeners are
/// bound and the journal is open.
pub(crate) fn ready() {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    if let Some(every) = watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notify("WATCHDOG=1");
            }
        });
    }
}

/// Tells systemd the service is stopping.
pub(crate) fn stopping() {
    notify("STOPPING=1");
}
