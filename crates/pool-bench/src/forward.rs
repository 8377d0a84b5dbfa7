//! `pool-bench forward LISTEN TARGET`: the cheapest user-space TCP relay,
//! as a floor for what any bridge pair can reach.
//!
//! No crypto, no framing, no event loop: each accepted connection gets a
//! connection to TARGET and two threads, each blocked in `read` and then
//! `write`ing what it got (`TCP_NODELAY` on both sockets). A message thus
//! costs one wake-up and two system calls per hop, the least a relay in
//! another process can do. `scripts/bench-bridge` runs two of them in a
//! row (the "floor" path) so that a bridge pair's added latency can be
//! compared with what two bare process hops cost on the same machine.
//!
//! A read of 0 bytes (EOF) is passed on as a half-close; an error closes
//! both directions. Not for production use: there is no limit on
//! connections.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use crate::common::Result;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let [listen, target] = args else {
        return Err("usage: pool-bench forward LISTEN_ADDR TARGET_ADDR".into());
    };
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    loop {
        let (client, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pool-bench forward: accept: {e}");
                continue;
            }
        };
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pool-bench forward: connect {target}: {e}");
                continue;
            }
        };
        if let Err(e) = start_pumps(client, server) {
            eprintln!("pool-bench forward: {e}");
        }
    }
}

fn start_pumps(client: TcpStream, server: TcpStream) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    thread::spawn(move || pump(client, server));
    thread::spawn(move || pump(s2, c2));
    Ok(())
}

/// Copies `from` to `to` until EOF (then half-closes `to`) or an error
/// (then closes both).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
