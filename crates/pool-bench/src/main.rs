//! `pool-bench`: benchmarks of the POOL runtime on this machine.
//!
//! ```text
//! pool-bench handshakes  [--seconds 5] [--parallel 16]
//! pool-bench idle-memory [--sessions 1000]
//! pool-bench resume      [--rounds 20]
//! pool-bench throughput  [--bytes 1G] [--cipher chacha|aes]
//! pool-bench idle-clients ADDR KEY N      (the child of idle-memory)
//! pool-bench forward LISTEN TARGET         (a bare relay: the floor path of bench-bridge)
//! pool-bench flood       [--opens 200] [--sources 256] [--parallel 64]
//! pool-bench reload      [--bridges 100] [--connections 1000] [--rounds 10]
//! pool-bench scale-clients ADDR KEY [--sessions 2500] [--streams 10]   (scripts/bench-scale)
//! pool-bench client-keys [--first 0] [--count 1]
//! ```
//!
//! Each prints human lines and then `RESULT name=value unit=...` lines,
//! which `scripts/bench-core` collects. Every benchmark turns the
//! per-source handshake rate limit off (all clients come from 127.0.0.1).

mod common;
mod director;
mod drain;
mod flood;
mod forward;
mod handoff;
mod handshakes;
mod idle;
mod reload;
mod resume;
mod scale;
mod throughput;

const USAGE: &str =
    "usage: pool-bench <handshakes|idle-memory|resume|throughput|flood|reload|handoff|drain|director|forward|scale-clients|client-keys> [options]
  handshakes  [--seconds 5] [--parallel 16] [--core-seconds 1.5]
                 sessions/s accepted by a listener on one core, and the
                 core responder handshake rate
  idle-memory [--sessions 1000]
                 listener RSS per idle session (clients in a child process)
  resume      [--rounds 20] [--interval-ms 1] [--spacing-ms 100]
                 data stall when the client's carrier is dropped
  throughput  [--bytes 1G] [--cipher chacha|aes]
                 one stream over loopback
  idle-clients ADDR KEY N
                 (internal) the client process of idle-memory
  flood       [--opens 200] [--sources 256] [--parallel 64]
                 a real client's session-open time under a flood of bad
                 HELLOs from many addresses, against no flood
  reload      [--bridges 100] [--connections 1000] [--rounds 10]
                 config reloads of a daemon with that many bridges and live
                 connections: time to apply, connections failed
  handoff     [--rounds 20] [--interval-ms 1] [--round-ms 300]
                 the stall of a live handoff at a paced stream's receiver,
                 against the same stream without one (every chunk checked)
  drain       [--idle 1000] [--busy 100] [--parallel 32]
                 hand every session of a worker to another: time until
                 the source holds none (busy streams checked by index)
  director    [--sessions 1000] [--busy 20] [--crash-clients 20] [--rtt-ms 20] [--rounds 20] [--lease 3000]
                 with real `pool director` and `pool daemon` processes: a
                 drain's time and largest stall, a crash's recovery time, a
                 placement's extra time to the first byte
  forward LISTEN TARGET
                 a bare TCP relay, no crypto, a thread per direction: two
                 in a row are the floor that bench-bridge measures
  scale-clients ADDR SERVER_KEY [--sessions 2500] [--streams 10] [--first-key 0] [--workers 32] [--service pool.discard]
                 connect that many sessions (keys --first-key.., one per
                 worker, each from its own 127.64.x.y source), open S streams
                 on each naming the service and writing a few bytes, print a
                 READY line with timings, hold until stdin closes
                 (scripts/bench-scale)
  client-keys [--first 0] [--count 1]
                 the public keys scale-clients uses, one a line (for a
                 daemon's [trust] authorized file)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let r = match cmd.as_str() {
        "handshakes" => handshakes::run(rest),
        "idle-memory" => idle::run(rest),
        "idle-clients" => idle::clients(rest),
        "resume" => resume::run(rest),
        "throughput" => throughput::run(rest),
        "forward" => forward::run(rest),
        "flood" => flood::run(rest),
        "reload" => reload::run(rest),
        "handoff" => handoff::run(rest),
        "drain" => drain::run(rest),
        "director" => director::run(rest),
        "scale-clients" => scale::clients(rest),
        "client-keys" => scale::keys(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return;
        }
        other => {
            eprintln!("unknown command {other}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("pool-bench {cmd}: {e}");
        std::process::exit(1);
    }
}
