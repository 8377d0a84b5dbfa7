//! `[[expose]]` changes take effect on reload without a restart: a port
//! refused before `pool ctl reload` is served after it, and the refusal
//! before was journaled.
mod util;

use std::time::Duration;

use util::shim::*;
use util::*;

#[test]
fn newly_exposed_port_is_served_after_reload() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-reload");
    let (a, _) = http_server("port a\n");
    let (b, b_accepted) = http_server("port b\n");
    let nodes = shim_nodes(&dir, &[a]);
    let ports = format!("{a},{b}");
    let get = |port: u16| {
        let mut curl = shimmed("curl", &nodes.shim_socket, &ports);
        curl.args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/"),
        ]);
        run(curl, Duration::from_secs(20))
    };
    assert_eq!(String::from_utf8_lossy(&get(a).stdout), "port a\n");
    let out = get(b);
    assert!(!out.status.success(), "port {b} is not exposed yet");
    assert_eq!(b_accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    wait_journal(
        &nodes.dest_journal,
        Duration::from_secs(5),
        "shim_refused",
        |e| e["event"] == "shim_refused" && e["port"] == b,
    );

    let conf = dir.join("dest.toml");
    let text = std::fs::read_to_string(&conf).expect("dest.toml");
    std::fs::write(&conf, format!("{text}\n[[expose]]\nport = {b}\n")).expect("write");
    let out = pool_cmd(&[
        "ctl",
        "reload",
        "--control",
        nodes.dest_control.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&get(b).stdout), "port b\n");
    let ports_now = ctl_status(&nodes.dest_control)["expose"]["ports"].clone();
    assert_eq!(ports_now.as_array().map(Vec::len), Some(2), "{ports_now}");
    assert_eq!(counter(&nodes.dest_control, "shim_exposed"), 2);
    assert_eq!(counter(&nodes.dest_control, "shim_refused"), 1);
}
