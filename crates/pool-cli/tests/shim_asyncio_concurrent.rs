//! Python asyncio under the shim: 500 concurrent non-blocking connections
//! (each `connect` returns `EINPROGRESS` and completes through the event
//! loop), an echo over each, `getpeername()` the address asked for, and
//! the loop's lag measured the whole time — it must not stall on the
//! daemon's round trips.
mod util;

use std::time::Duration;

use util::shim::*;
use util::*;

const CONNECTIONS: usize = 500;

/// Prints `{"ok", "peer_ok", "max_lag_ms", "p99_lag_ms", "mean_lag_ms", "secs"}`.
pub const SCRIPT: &str = r#"
import asyncio, json, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
lags = []
async def monitor(stop):
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.001)
        lags.append(loop.time() - t - 0.001)
async def one(i):
    r, w = await asyncio.open_connection('127.0.0.1', port)
    peer = w.get_extra_info('peername')
    msg = b'%08d' % i
    w.write(msg)
    await w.drain()
    got = await r.readexactly(8)
    return w, tuple(peer[:2]) == ('127.0.0.1', port), got == msg
async def main():
    stop = asyncio.Event()
    m = asyncio.create_task(monitor(stop))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    res = await asyncio.gather(*[one(i) for i in range(n)], return_exceptions=True)
    secs = time.monotonic() - t0
    stop.set()
    await m
    errors = [repr(r) for r in res if isinstance(r, BaseException)]
    good = [r for r in res if not isinstance(r, BaseException)]
    for w, _, _ in good:
        w.close()
    lags.sort()
    print(json.dumps({
        "ok": sum(1 for _, _, e in good if e),
        "peer_ok": sum(1 for _, p, _ in good if p),
        "errors": errors[:5],
        "max_lag_ms": lags[-1] * 1e3,
        "p99_lag_ms": lags[int(len(lags) * 0.99)] * 1e3,
        "mean_lag_ms": sum(lags) / len(lags) * 1e3,
        "secs": secs,
    }))
asyncio.run(main())
"#;

#[test]
fn five_hundred_concurrent_asyncio_connections() {
    require_program("python3", "python3");
    let dir = TempDir::new("shim-asyncio");
    let port = echo_server();
    let nodes = shim_nodes(&dir, &[port]);
    let args = [port.to_string(), CONNECTIONS.to_string()];

    let plain = std::process::Command::new("python3");
    let plain: serde_json::Value =
        serde_json::from_str(&python(plain, SCRIPT, &args, Duration::from_secs(60))).expect("JSON");
    let cmd = shimmed("python3", &nodes.shim_socket, &port.to_string());
    let out = python(cmd, SCRIPT, &args, Duration::from_secs(60));
    let shim: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    eprintln!("asyncio, {CONNECTIONS} connections\n  plain: {plain}\n  shim:  {shim}");

    assert_eq!(shim["ok"], CONNECTIONS, "echoes under the shim: {shim}");
    assert_eq!(
        shim["peer_ok"], CONNECTIONS,
        "getpeername under the shim: {shim}"
    );
    assert_eq!(plain["ok"], CONNECTIONS, "{plain}");
    let max = shim["max_lag_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        max < 250.0,
        "the event loop stalled {max:.1} ms under the shim (plain: {:.1} ms)",
        plain["max_lag_ms"].as_f64().unwrap_or(0.0)
    );
    // Every one went through POOL.
    let exposed = wait_counter(
        &nodes.dest_control,
        "shim_exposed",
        CONNECTIONS as u64,
        Duration::from_secs(10),
    );
    assert_eq!(exposed, CONNECTIONS as u64);
    assert_eq!(counter(&nodes.source_control, "shim_failed"), 0);
}
