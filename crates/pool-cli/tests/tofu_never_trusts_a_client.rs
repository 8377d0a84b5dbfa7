//! F3: `--tofu` pins only listeners this node dials. `pool listen --allow A
//! --tofu` used to accept a stranger C and pin it; now C is refused and
//! nothing is pinned. A client is enrolled explicitly with `pool trust
//! add`, which a running daemon picks up on reload.
mod util;

use std::net::TcpListener;
use std::time::Duration;

use util::*;

fn connect(addr: &str, key: &std::path::Path, peer_key: &str) -> std::process::Output {
    pool_cmd(&[
        "connect",
        addr,
        "--key",
        key.to_str().unwrap(),
        "--peer-key",
        peer_key,
    ])
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn listen_allow_tofu_refuses_a_stranger_and_pins_nothing() {
    let dir = TempDir::new("tofu-listen");
    let (server, server_pub) = keygen(&dir, "server");
    let (a, a_pub) = keygen(&dir, "a");
    let (c, _c_pub) = keygen(&dir, "c");
    let known = dir.join("known_peers");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut listener = Proc::pool(
        "listen",
        &[
            "listen",
            &addr,
            "--key",
            server.to_str().unwrap(),
            "--allow",
            &a_pub,
            "--tofu",
            "--known-peers",
            known.to_str().unwrap(),
        ],
        &dir,
    );
    listener.wait_log("listening on", Duration::from_secs(10));

    for attempt in 0..2 {
        let out = connect(&addr, &c, &server_pub);
        assert!(
            !out.status.success(),
            "stranger accepted (attempt {attempt}):\n{}",
            text(&out)
        );
        assert!(text(&out).contains("not trusted"), "{}", text(&out));
    }
    assert!(
        !known.exists() || std::fs::read_to_string(&known).unwrap().trim().is_empty(),
        "something was pinned: {:?}",
        std::fs::read_to_string(&known)
    );
    let out = connect(&addr, &a, &server_pub);
    assert!(out.status.success(), "A refused:\n{}", text(&out));
    listener.assert_running();

    // TOFU alone trusts no client: the listener does not start.
    let out = pool_cmd(&[
        "listen",
        "127.0.0.1:0",
        "--key",
        server.to_str().unwrap(),
        "--tofu",
        "--known-peers",
        known.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no client is trusted"),
        "{}",
        text(&out)
    );
}

#[test]
fn trust_add_enrols_a_client_that_a_reloaded_daemon_accepts() {
    let dir = TempDir::new("trust-add");
    let (server, server_pub) = keygen(&dir, "server");
    let (a, a_pub) = keygen(&dir, "a");
    let (c, c_pub) = keygen(&dir, "c");
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{a_pub} alice\n")).unwrap();
    // A pool2tcp target (so the daemon must trust someone to start); `pool
    // connect` does not speak the bridge's stream header, so its stream is
    // reset once the session is up: the journal says who got a session.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap().to_string();
    let journal = dir.join("journal.log");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = dir.path().display();
    let control = dir.join("control.sock");
    std::fs::write(
        dir.join("pool.toml"),
        format!(
            "[node]\nkey = \"{}\"\nlisten = \"{addr}\"\ncontrol = \"{d}/control.sock\"\njournal = \"{d}/journal.log\"\n\
             [trust]\nauthorized = \"{}\"\ntofu = true\nknown_peers = \"{d}/known_peers\"\n\
             [[pool2tcp]]\ntarget = \"{target_addr}\"\n",
            server.display(),
            authorized.display()
        ),
    )
    .unwrap();
    let mut daemon = Proc::pool(
        "daemon",
        &[
            "daemon",
            "--config",
            dir.join("pool.toml").to_str().unwrap(),
        ],
        &dir,
    );
    wait_port(&addr, Duration::from_secs(10));

    let opened = |key: &str| {
        journal_entries(&journal)
            .iter()
            .filter(|e| e["event"] == "session_opened" && e["peer"] == key)
            .count()
    };
    let out = connect(&addr, &a, &server_pub);
    assert!(
        !text(&out).contains("not trusted"),
        "A refused:\n{}",
        text(&out)
    );
    wait_journal(&journal, Duration::from_secs(5), "A's session", |e| {
        e["event"] == "session_opened" && e["peer"] == a_pub.as_str()
    });
    let out = connect(&addr, &c, &server_pub);
    assert!(!out.status.success(), "C accepted before enrolment");
    assert!(text(&out).contains("not trusted"), "{}", text(&out));

    let out = pool_cmd(&[
        "trust",
        "add",
        &c_pub,
        "--authorized",
        authorized.to_str().unwrap(),
        "--comment",
        "carol's laptop",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pool ctl reload"), "{}", text(&out));
    let file = std::fs::read_to_string(&authorized).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    assert_eq!(lines.len(), 2, "{file}");
    assert_eq!(lines[0], format!("{a_pub} alice"));
    assert!(
        lines[1].starts_with(&format!("{c_pub}  # added ")),
        "{file}"
    );
    assert!(
        lines[1].ends_with("by pool trust add: carol's laptop"),
        "{file}"
    );
    // Again: nothing changes.
    let out = pool_cmd(&[
        "trust",
        "add",
        &c_pub,
        "--authorized",
        authorized.to_str().unwrap(),
    ]);
    assert!(
        out.status.success() && text(&out).contains("already trusted"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&authorized).unwrap(), file);

    // Not before the reload (the daemon reads the file then), then yes.
    let out = connect(&addr, &c, &server_pub);
    assert!(!out.status.success(), "C accepted before the reload");
    let out = pool_cmd(&["ctl", "reload", "--control", control.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(opened(&c_pub), 0);
    let out = connect(&addr, &c, &server_pub);
    assert!(
        !text(&out).contains("not trusted"),
        "C refused after enrolment and reload:\n{}",
        text(&out)
    );
    wait_journal(&journal, Duration::from_secs(5), "C's session", |e| {
        e["event"] == "session_opened" && e["peer"] == c_pub.as_str()
    });
    drop(target);
    // The daemon with tofu = true pinned no client along the way.
    assert!(!dir.join("known_peers").exists(), "a client was pinned");
    daemon.assert_running();
}

#[test]
fn trust_add_pins_a_listener_for_tofu_dialling() {
    let dir = TempDir::new("trust-add-peer");
    let (server, server_pub) = keygen(&dir, "server");
    let (a, a_pub) = keygen(&dir, "a");
    let (_o, other_pub) = keygen(&dir, "other");
    let known = dir.join("known_peers");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut listener = Proc::pool(
        "listen",
        &[
            "listen",
            &addr,
            "--key",
            server.to_str().unwrap(),
            "--allow",
            &a_pub,
        ],
        &dir,
    );
    listener.wait_log("listening on", Duration::from_secs(10));
    let known_s = known.to_str().unwrap();
    let out = pool_cmd(&[
        "trust",
        "add",
        &server_pub,
        "--known-peers",
        known_s,
        "--peer",
        &addr,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&known).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // Dialling with --tofu uses the pin (no probe, no --peer-key).
    let out = pool_cmd(&[
        "connect",
        &addr,
        "--key",
        a.to_str().unwrap(),
        "--tofu",
        "--known-peers",
        known_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("pinned"), "{}", text(&out));
    // Another key for the same listener is refused, the pin stays.
    let before = std::fs::read_to_string(&known).unwrap();
    let out = pool_cmd(&[
        "trust",
        "add",
        &other_pub,
        "--known-peers",
        known_s,
        "--peer",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("pinned to another key"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&known).unwrap(), before);
    // Neither file named: it says which to give.
    let out = pool_cmd(&["trust", "add", &other_pub]);
    assert!(!out.status.success());
}
