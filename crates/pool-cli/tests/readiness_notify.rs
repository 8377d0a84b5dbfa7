//! systemd readiness (`Type=notify`): the test binds its own datagram
//! socket as `NOTIFY_SOCKET`. `pool daemon` and `pool relay` send
//! `READY=1` only once their listeners accept and the journal is open (a
//! daemon that cannot bind never sends it), then `WATCHDOG=1` pings when
//! `WATCHDOG_USEC` asks for them.
mod util;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use util::*;

fn notify_socket(dir: &TempDir) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    (sock, path)
}

fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv on the notify socket: {e}"),
    }
}

fn daemon_config(dir: &TempDir, key: &Path, listen: &str, client: &str) -> std::path::PathBuf {
    let d = dir.path().display();
    let text = format!(
        "[node]\nkey = \"{}\"\nlisten = \"{listen}\"\ncontrol = \"{d}/control.sock\"\n\
         journal = \"{d}/journal.log\"\ndrain_timeout_secs = 1\n\n[trust]\nallow = [\"{client}\"]\n",
        key.display()
    );
    let path = dir.join("pool.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_notified(
    dir: &TempDir,
    name: &str,
    notify: &Path,
    watchdog_usec: Option<u64>,
    args: &[&str],
) -> Proc {
    let mut cmd = Command::new(POOL);
    cmd.args(args).env("NOTIFY_SOCKET", notify);
    if let Some(us) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", us.to_string());
    }
    Proc::spawn(name, cmd, dir)
}

#[test]
fn daemon_is_ready_only_once_it_accepts_and_pings_the_watchdog() {
    let dir = TempDir::new("notify-daemon");
    let (key, _) = keygen(&dir, "node");
    let (_, client) = keygen(&dir, "client");
    let (sock, notify) = notify_socket(&dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let config = daemon_config(&dir, &key, &listen, &client);
    let started = Instant::now();
    let mut daemon = spawn_notified(
        &dir,
        "daemon",
        &notify,
        Some(300_000),
        &["daemon", "--config", config.to_str().unwrap()],
    );
    let msg = recv(&sock, Duration::from_secs(20)).unwrap_or_else(|| {
        daemon.assert_running();
        panic!("no notification within 20 s")
    });
    // At the moment READY arrives the listener accepts (no retry here) and
    // the journal is open.
    let accepted = TcpStream::connect(&listen);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        msg.lines()
            .any(|l| l == format!("MAINPID={}", daemon.pid())),
        "{msg:?}"
    );
    assert!(
        accepted.is_ok(),
        "READY=1 before the listener accepts: {accepted:?}"
    );
    assert!(
        dir.join("journal.log").exists(),
        "READY=1 before the journal is open"
    );
    assert!(
        dir.join("control.sock").exists(),
        "READY=1 before the control socket"
    );
    eprintln!("ready after {:?}", started.elapsed());

    // WATCHDOG_USEC=300000: a ping about every 150 ms.
    let t = Instant::now();
    let mut pings = 0;
    while t.elapsed() < Duration::from_secs(2) && pings < 4 {
        if recv(&sock, Duration::from_secs(1)).as_deref() == Some("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(pings >= 4, "{pings} watchdog pings in {:?}", t.elapsed());
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn daemon_that_cannot_bind_never_says_ready() {
    let dir = TempDir::new("notify-fail");
    let (key, _) = keygen(&dir, "node");
    let (_, client) = keygen(&dir, "client");
    let (sock, notify) = notify_socket(&dir);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let config = daemon_config(&dir, &key, &listen, &client);
    let mut daemon = spawn_notified(
        &dir,
        "daemon",
        &notify,
        None,
        &["daemon", "--config", config.to_str().unwrap()],
    );
    let st = daemon.wait_exit(Duration::from_secs(20));
    assert!(!st.success(), "the daemon started on a port in use");
    assert_eq!(recv(&sock, Duration::from_millis(300)), None);
}

#[test]
fn relay_is_ready_once_it_accepts() {
    let dir = TempDir::new("notify-relay");
    let (sock, notify) = notify_socket(&dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let journal = dir.join("relay.journal");
    let mut relay = spawn_notified(
        &dir,
        "relay",
        &notify,
        None,
        &[
            "relay",
            "--listen",
            &listen,
            "--journal",
            journal.to_str().unwrap(),
        ],
    );
    let msg = recv(&sock, Duration::from_secs(20)).unwrap_or_else(|| {
        relay.assert_running();
        panic!("no notification within 20 s")
    });
    let accepted = TcpStream::connect(&listen);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        accepted.is_ok(),
        "READY=1 before the relay accepts: {accepted:?}"
    );
    assert!(journal.exists());
    // No WATCHDOG_USEC: no pings.
    assert_eq!(recv(&sock, Duration::from_millis(500)), None);
    relay.signal("TERM");
    assert_eq!(
        recv(&sock, Duration::from_secs(5)).as_deref(),
        Some("STOPPING=1")
    );
    assert!(relay.wait_exit(Duration::from_secs(10)).success());
}
