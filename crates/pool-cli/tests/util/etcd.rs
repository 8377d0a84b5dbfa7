//! A real etcd for the director tests (Debian's `etcd-server`), on free
//! loopback ports with its own data directory.

use std::time::Duration;

use super::*;

pub struct Etcd {
    pub proc: Proc,
    pub url: String,
}

/// Go's name for this architecture: etcd 3.4 refuses to start on all but
/// amd64 and ppc64le without ETCD_UNSUPPORTED_ARCH.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn start_etcd(dir: &TempDir) -> Etcd {
    require_program("etcd", "etcd-server");
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = std::process::Command::new("etcd");
    cmd.env("ETCD_UNSUPPORTED_ARCH", go_arch())
        .args(["--name", "default", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("default={peer_url}")])
        .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
    let mut proc = Proc::spawn("etcd", cmd, dir);
    wait_port(&format!("127.0.0.1:{client}"), Duration::from_secs(20));
    proc.wait_log("ready to serve client requests", Duration::from_secs(20));
    Etcd { proc, url }
}
