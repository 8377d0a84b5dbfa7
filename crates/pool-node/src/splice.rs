//! Carrying bytes both ways between a TCP connection and a stream: the
//! data path of every bridge, exposed port and `[[pool2tcp]]` target.
//!
//! Neither direction has a buffer of its own. From the socket, bytes are
//! read straight into the session's replay buffer (one vectored read fills
//! many frames); to the socket, they are written straight from the
//! stream's receive buffer. The socket is driven through an `AsyncFd` so
//! that a short read ends the turn without another read that would only
//! say `EAGAIN` (one system call fewer per message: what a small
//! request-response exchange spends most of its time on).

use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pool_net::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::bridge::BridgeStats;
use crate::router::RESET_TCP;

/// The most one read of a bridged socket puts into the session at once
/// (then the other directions and sessions get their turn).
const UP_BATCH: usize = 256 << 10;

/// Which way one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Fin,
    Reset,
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Abortive close: once the socket is closed the TCP peer sees RST, as if
/// the far end had reset.
pub(crate) fn abort_on_close(s: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Carries bytes both ways between a TCP connection and a stream until
/// both directions end, carrying FIN and reset faithfully.
pub(crate) async fn splice(
    tcp: TcpStream,
    mut rs: RecvStream,
    mut ws: SendStream,
    idle: Option<Duration>,
    stats: &BridgeStats,
) {
    let sock = match tcp.into_std().and_then(pool_sys::async_tcp) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot drive the socket");
            rs.reset(RESET_TCP);
            ws.reset(RESET_TCP);
            return;
        }
    };
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);

    let up = async {
        // The stream waits for flow-control credit before it reads, so a
        // slow peer holds back the socket.
        loop {
            let mut ready = match sock.readable().await {
                Ok(g) => g,
                Err(_) => return End::Reset,
            };
            let mut tcp_err = None;
            let mut short = false;
            let res = ws
                .write_with(UP_BATCH, |rooms| {
                    let room: usize = rooms.iter().map(|r| r.len()).sum();
                    let r = sock.get_ref().read_vectored(rooms);
                    match &r {
                        Ok(n) => short = *n < room,
                        Err(e) => tcp_err = Some(e.kind()),
                    }
                    r
                })
                .await;
            match res {
                Ok(0) if tcp_err.is_none() => {
                    let _ = ws.shutdown().await;
                    return End::Fin;
                }
                Ok(n) => {
                    touch();
                    stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    // The socket is drained (edge-triggered readiness: the
                    // next bytes bring a new event).
                    if short {
                        ready.clear_ready();
                    }
                }
                Err(_) if tcp_err == Some(std::io::ErrorKind::WouldBlock) => ready.clear_ready(),
                Err(_) if tcp_err == Some(std::io::ErrorKind::Interrupted) => {}
                Err(e) if tcp_err.is_some() => {
                    if is_reset(&e) {
                        ws.reset(RESET_TCP);
                    }
                    return End::Reset;
                }
                Err(_) => return End::Reset,
            }
        }
    };
    let down = async {
        // What arrived on the stream goes straight from the session's
        // buffer to the socket; it stays there until the socket takes it,
        // so a slow target holds back the peer through flow control.
        loop {
            let mut ready = match sock.writable().await {
                Ok(g) => g,
                Err(_) => return End::Reset,
            };
            loop {
                let mut tcp_err = None;
                let res = rs
                    .read_with(|a, b| {
                        let r = sock
                            .get_ref()
                            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)]);
                        if let Err(e) = &r {
                            tcp_err = Some(e.kind());
                        }
                        r
                    })
                    .await;
                match res {
                    Ok(0) => {
                        let _ = sock.get_ref().shutdown(Shutdown::Write);
                        return End::Fin;
                    }
                    Ok(n) => {
                        touch();
                        stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) if tcp_err == Some(std::io::ErrorKind::WouldBlock) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(_) if tcp_err == Some(std::io::ErrorKind::Interrupted) => {}
                    Err(e) if tcp_err.is_some() => {
                        if is_reset(&e) {
                            rs.reset(RESET_TCP);
                        }
                        return End::Reset;
                    }
                    Err(_) => {
                        abort_on_close(sock.get_ref());
                        return End::Reset;
                    }
                }
            }
        }
    };
    let idle_watch = async {
        let Some(limit) = idle else {
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::time::sleep(limit / 4).await;
            let quiet = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
            if quiet >= limit.as_millis() as u64 {
                return;
            }
        }
    };
    let reset = {
        tokio::pin!(up, down, idle_watch);
        let (mut up_end, mut down_end) = (None, None);
        loop {
            if up_end.is_some() && down_end.is_some() {
                break false;
            }
            tokio::select! {
                e = &mut up, if up_end.is_none() => {
                    up_end = Some(e);
                    if e == End::Reset { break true; }
                }
                e = &mut down, if down_end.is_none() => {
                    down_end = Some(e);
                    if e == End::Reset { break true; }
                }
                () = &mut idle_watch => {
                    debug!("idle timeout: resetting the connection");
                    break true;
                }
            }
        }
    };
    if reset {
        rs.reset(RESET_TCP);
        abort_on_close(sock.get_ref());
    }
    // Closing the socket: a RST if it was reset (linger 0), else after our
    // FIN and theirs.
    drop(sock);
}
