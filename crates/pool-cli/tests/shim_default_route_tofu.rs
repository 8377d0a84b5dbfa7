//! No `[[route]]` matches: the source daemon goes to the destination host
//! itself at `default_peer_port`, learns its key on first use (`[trust]
//! tofu`), pins it in `known_peers`, and from then on authenticates it. A
//! port the destination does not expose is refused there with a
//! `shim_refused` journal entry, and the program sees a refused
//! connection (a blocking `connect` fails with `ECONNREFUSED`; curl's
//! non-blocking one sees the connection reset). Without TOFU or a fleet
//! secret, an unknown key is never guessed: the connection fails with a
//! `shim_failed` entry (`EHOSTUNREACH` for a blocking `connect`). With a
//! fleet secret on both nodes the probed key is proven by the handshake.
mod util;

use std::time::Duration;

use util::shim::*;
use util::*;

#[derive(Clone, Copy, PartialEq)]
enum SourceTrust {
    Nothing,
    Tofu,
    Fleet,
}

fn start(dir: &TempDir, trust: SourceTrust, exposed: u16) -> (Proc, Proc, String, String, RunDir) {
    let (skey, spub) = keygen(dir, "source");
    let (dkey, dpub) = keygen(dir, "dest");
    let d = dir.path().display();
    let pool_port = free_port();
    std::fs::write(
        dir.join("fleet.secret"),
        "a fleet secret of more than sixteen characters\n",
    )
    .expect("write fleet secret");
    // A fleet secret others can read is refused, as ssh refuses such keys.
    std::fs::set_permissions(
        dir.join("fleet.secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod fleet secret");
    let dest_trust = if trust == SourceTrust::Fleet {
        format!("fleet_secret = \"{d}/fleet.secret\"")
    } else {
        format!("allow = [\"{spub}\"]")
    };
    std::fs::write(
        dir.join("dest.toml"),
        format!(
            "[node]\nkey = \"{}\"\nlisten = \"127.0.0.1:{pool_port}\"\ncontrol = \"{d}/dest.sock\"\n\
             journal = \"{d}/dest-journal.log\"\n[trust]\n{dest_trust}\n[[expose]]\nport = {exposed}\n",
            dkey.display()
        ),
    )
    .expect("write dest.toml");
    let mut dest = Proc::pool(
        "dest-daemon",
        &[
            "daemon",
            "--config",
            &dir.join("dest.toml").display().to_string(),
        ],
        dir,
    );
    dest.wait_log("POOL listener on ", Duration::from_secs(10));
    let trust = match trust {
        SourceTrust::Tofu => format!("[trust]\ntofu = true\nknown_peers = \"{d}/known_peers\"\n"),
        SourceTrust::Fleet => format!("[trust]\nfleet_secret = \"{d}/fleet.secret\"\n"),
        SourceTrust::Nothing => String::new(),
    };
    let run_dir = RunDir::new(dir);
    std::fs::write(
        dir.join("source.toml"),
        format!(
            "[node]\nkey = \"{}\"\nlisten = \"\"\ncontrol = \"{d}/source.sock\"\n\
             journal = \"{d}/source-journal.log\"\n{trust}[shim]\nsocket = \"{}\"\n\
             default_peer_port = {pool_port}\nconnect_timeout_secs = 3\n",
            skey.display(),
            run_dir.socket()
        ),
    )
    .expect("write source.toml");
    let mut source = Proc::pool(
        "source-daemon",
        &[
            "daemon",
            "--config",
            &dir.join("source.toml").display().to_string(),
        ],
        dir,
    );
    let shim_socket = source.wait_log("shim listener on ", Duration::from_secs(10));
    (source, dest, shim_socket, dpub, run_dir)
}

/// A blocking `connect` under the shim; the errno name (or "0").
fn blocking_connect(shim_socket: &str, port: u16) -> String {
    let py = shimmed("python3", shim_socket, &port.to_string());
    let script = "import errno, socket, sys\ns = socket.socket()\n\
                  print(errno.errorcode.get(s.connect_ex(('127.0.0.1', int(sys.argv[1]))), '0'))";
    python(py, script, &[port.to_string()], Duration::from_secs(20))
        .trim()
        .to_string()
}

#[test]
fn tofu_pins_the_destination_key_and_unexposed_ports_are_refused() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-tofu");
    let (port, _) = http_server("over the default route\n");
    let (other, accepted) = http_server("must not be reached\n");
    let (_source, _dest, shim_socket, dpub, _run) = start(&dir, SourceTrust::Tofu, port);
    let ports = format!("{port},{other}");
    for _ in 0..2 {
        let mut curl = shimmed("curl", &shim_socket, &ports);
        curl.args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/"),
        ]);
        let out = run(curl, Duration::from_secs(20));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "over the default route\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let known = std::fs::read_to_string(dir.join("known_peers")).expect("known_peers written");
    assert!(
        known.contains(&dpub),
        "the destination key is pinned:\n{known}"
    );
    assert_eq!(counter(&dir.join("dest.sock"), "shim_exposed"), 2);

    // Not exposed at the destination: refused there, journaled with the
    // source's key and the port; curl sees a refused connection.
    let mut curl = shimmed("curl", &shim_socket, &ports);
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{other}/"),
    ]);
    let out = run(curl, Duration::from_secs(20));
    assert!(
        matches!(out.status.code(), Some(7 | 56)),
        "curl: couldn't connect / connection reset: {:?}",
        out.status
    );
    assert_eq!(blocking_connect(&shim_socket, other), "ECONNREFUSED");
    let refused = wait_journal(
        &dir.join("dest-journal.log"),
        Duration::from_secs(5),
        "shim_refused",
        |e| e["event"] == "shim_refused",
    );
    assert_eq!(refused["port"], other, "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not exposed"),
        "{refused}"
    );
    let spub = pool_cmd(&["pubkey", dir.join("source.key").to_str().expect("utf-8")]);
    assert_eq!(
        refused["peer"],
        String::from_utf8_lossy(&spub.stdout).trim(),
        "{refused}"
    );
    assert_eq!(counter(&dir.join("dest.sock"), "shim_refused"), 2);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn without_tofu_an_unknown_key_is_not_guessed() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-notofu");
    let (port, accepted) = http_server("must not be reached\n");
    let (_source, _dest, shim_socket, _, _run) = start(&dir, SourceTrust::Nothing, port);
    let mut curl = shimmed("curl", &shim_socket, &port.to_string());
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run(curl, Duration::from_secs(20));
    assert!(
        matches!(out.status.code(), Some(7 | 56)),
        "curl: couldn't connect / connection reset: {:?}",
        out.status
    );
    assert_eq!(blocking_connect(&shim_socket, port), "EHOSTUNREACH");
    let failed = wait_journal(
        &dir.join("source-journal.log"),
        Duration::from_secs(5),
        "shim_failed",
        |e| e["event"] == "shim_failed",
    );
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no key for"),
        "{failed}"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// With a fleet secret on both nodes, the default route asks the
/// destination for its key and the handshake (keyed with the secret)
/// proves it; nothing is pinned.
#[test]
fn fleet_secret_authenticates_the_default_route() {
    require_program("curl", "curl");
    let dir = TempDir::new("shim-fleet");
    let (port, _) = http_server("fleet member\n");
    let (_source, _dest, shim_socket, _, _run) = start(&dir, SourceTrust::Fleet, port);
    let mut curl = shimmed("curl", &shim_socket, &port.to_string());
    curl.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run(curl, Duration::from_secs(20));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "fleet member\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(counter(&dir.join("dest.sock"), "shim_exposed"), 1);
    assert!(!dir.join("known_peers").exists(), "nothing pinned");
}
