//! `pool config apply --confirm-within`, `confirm`, `rollback`, the
//! automatic rollback (also across `kill -9` and a restart), the control
//! service over POOL with its roles, and atomic reload: real daemons, real
//! sockets, the real `pool` binary.
mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::*;

struct Node {
    dir: TempDir,
    config: PathBuf,
    journal: PathBuf,
    control: PathBuf,
    listen: String,
    key: PathBuf,
    admin: (PathBuf, String),
    reader: (PathBuf, String),
    stranger: (PathBuf, String),
}

impl Node {
    fn new(tag: &str) -> Node {
        let dir = TempDir::new(tag);
        let key = keygen(&dir, "node").0;
        let admin = keygen(&dir, "admin");
        let reader = keygen(&dir, "reader");
        let stranger = keygen(&dir, "stranger");
        let listen = format!("127.0.0.1:{}", free_port());
        Node {
            config: dir.join("pool.toml"),
            journal: dir.join("journal.log"),
            control: dir.join("control.sock"),
            dir,
            listen,
            key,
            admin,
            reader,
            stranger,
        }
    }

    /// A config trusting `trusted` (public keys), with the admin and the
    /// reader in `[control]`, and `extra` appended.
    fn text(&self, trusted: &[&str], extra: &str) -> String {
        let allow: Vec<String> = trusted.iter().map(|k| format!("\"{k}\"")).collect();
        format!(
            "[node]\nkey = \"{}\"\nlisten = \"{}\"\ncontrol = \"{}\"\njournal = \"{}\"\ndrain_timeout_secs = 1\n\n\
             [trust]\nallow = [{}]\n\n[control]\nadmins = [\"{}\"]\nreaders = [\"{}\"]\n{extra}",
            self.key.display(),
            self.listen,
            self.control.display(),
            self.journal.display(),
            allow.join(", "),
            self.admin.1,
            self.reader.1,
        )
    }

    fn all_trusted(&self) -> String {
        self.text(&[&self.admin.1, &self.reader.1, &self.stranger.1], "")
    }

    fn start(&self) -> Proc {
        let mut p = Proc::pool(
            "daemon",
            &["daemon", "--config", self.config.to_str().expect("utf-8")],
            &self.dir,
        );
        wait_port(&self.listen, Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.control).is_err() {
            assert!(Instant::now() < deadline, "no control socket:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p.assert_running();
        p
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// `pool ARGS --node LISTEN --key KEY`.
    fn remote(&self, key: &Path, args: &[&str]) -> std::process::Output {
        let mut a: Vec<&str> = args.to_vec();
        a.extend([
            "--node",
            &self.listen,
            "--key",
            key.to_str().expect("utf-8"),
        ]);
        pool_cmd(&a)
    }

    fn local(&self, args: &[&str]) -> std::process::Output {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--control", self.control.to_str().expect("utf-8")]);
        pool_cmd(&a)
    }

    fn events(&self, name: &str) -> Vec<serde_json::Value> {
        journal_entries(&self.journal)
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "command succeeded but should not have:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_admin_who_locks_themselves_out_gets_back_in_at_the_deadline() {
    let n = Node::new("rollback-lockout");
    std::fs::write(&n.config, n.all_trusted()).expect("write config");
    let mut daemon = n.start();
    ok(&n.remote(&n.admin.0, &["ctl", "sessions"]));

    // Drops the admin's own key from [trust].
    let locked_text = n.text(&[&n.reader.1, &n.stranger.1], "");
    let locked = n.write("locked.toml", &locked_text);
    let t0 = Instant::now();
    // The answer may or may not get out before the session it travels on
    // is revoked; what counts is what the node does next.
    let _ = n.remote(
        &n.admin.0,
        &[
            "config",
            "apply",
            locked.to_str().expect("utf-8"),
            "--confirm-within",
            "5s",
        ],
    );
    wait_journal(&n.journal, Duration::from_secs(5), "config_pending", |e| {
        e["event"] == "config_pending"
    });
    let err = fails(&n.remote(&n.admin.0, &["ctl", "status"]));
    assert!(err.contains("not trusted"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&n.config).expect("config"),
        locked_text,
        "the config file holds the applied config while it is pending"
    );
    let e = wait_journal(
        &n.journal,
        Duration::from_secs(10),
        "config_rolled_back",
        |e| e["event"] == "config_rolled_back",
    );
    assert_eq!(e["how"], "automatic_rollback");
    assert!(
        t0.elapsed() >= Duration::from_millis(4500),
        "rolled back early: {:?}",
        t0.elapsed()
    );
    ok(&n.remote(&n.admin.0, &["ctl", "sessions"]));
    assert_eq!(
        std::fs::read_to_string(&n.config).expect("config"),
        n.all_trusted(),
        "the config file is the old one again"
    );
    assert!(n
        .events("session_revoked")
        .iter()
        .any(|e| !e["peer"].is_null()));
    daemon.assert_running();
}

#[test]
fn a_change_confirmed_in_time_stays() {
    let n = Node::new("rollback-confirmed");
    std::fs::write(&n.config, n.all_trusted()).expect("write config");
    let mut daemon = n.start();
    // The stranger loses its trust; the admin applies over POOL and confirms.
    let next_text = n.text(&[&n.admin.1, &n.reader.1], "");
    let next = n.write("next.toml", &next_text);
    let out = ok(&n.remote(
        &n.admin.0,
        &[
            "config",
            "apply",
            next.to_str().expect("utf-8"),
            "--confirm-within",
            "5s",
        ],
    ));
    assert!(out.contains("[trust] allow: removes"), "{out}");
    assert!(out.contains("Rolls back by itself in 5s"), "{out}");
    let status = ok(&n.local(&["ctl", "status"]));
    assert!(status.contains("PENDING"), "{status}");
    let out = ok(&n.remote(&n.admin.0, &["config", "confirm"]));
    assert!(out.contains("confirmed"), "{out}");
    std::thread::sleep(Duration::from_secs(6));
    assert!(n.events("config_rolled_back").is_empty());
    assert_eq!(n.events("config_confirmed").len(), 1);
    assert_eq!(
        std::fs::read_to_string(&n.config).expect("config"),
        next_text
    );
    let err = fails(&n.remote(&n.stranger.0, &["ctl", "status"]));
    assert!(err.contains("not trusted"), "{err}");
    // Nothing pending any more.
    let err = fails(&n.local(&["config", "rollback"]));
    assert!(err.contains("no change is pending"), "{err}");
    daemon.assert_running();
}

#[test]
fn a_pending_change_rolls_back_at_its_deadline_after_kill_9_and_restart() {
    let n = Node::new("rollback-kill9");
    std::fs::write(&n.config, n.all_trusted()).expect("write config");
    let mut daemon = n.start();
    let next = n.write("next.toml", &n.text(&[&n.admin.1], ""));
    let t0 = Instant::now();
    ok(&n.local(&[
        "config",
        "apply",
        next.to_str().expect("utf-8"),
        "--confirm-within",
        "6s",
    ]));
    daemon.kill9();
    std::thread::sleep(Duration::from_millis(500));
    // The restarted daemon runs the pending config (the file holds it) and
    // remembers the deadline.
    let mut daemon = n.start();
    assert!(fails(&n.remote(&n.reader.0, &["ctl", "status"])).contains("not trusted"));
    let status = ok(&n.local(&["ctl", "status"]));
    assert!(status.contains("PENDING"), "{status}");
    let e = wait_journal(
        &n.journal,
        Duration::from_secs(12),
        "config_rolled_back",
        |e| e["event"] == "config_rolled_back",
    );
    let at = t0.elapsed();
    assert_eq!(e["how"], "automatic_rollback");
    assert!(
        at >= Duration::from_millis(5500) && at < Duration::from_secs(10),
        "rolled back after {at:?}, the deadline was 6 s"
    );
    ok(&n.remote(&n.reader.0, &["ctl", "status"]));
    assert_eq!(
        std::fs::read_to_string(&n.config).expect("config"),
        n.all_trusted()
    );
    daemon.assert_running();
}

#[test]
fn control_roles_over_pool() {
    let n = Node::new("control-roles");
    std::fs::write(&n.config, n.all_trusted()).expect("write config");
    let mut daemon = n.start();
    let same = n.write("same.toml", &n.all_trusted());
    // A reader reads...
    let out = ok(&n.remote(&n.reader.0, &["ctl", "sessions"]));
    assert!(out.contains("PEER"), "{out}");
    ok(&n.remote(
        &n.reader.0,
        &["config", "check", same.to_str().expect("utf-8")],
    ));
    // ... and changes nothing.
    let err = fails(&n.remote(
        &n.reader.0,
        &["config", "apply", same.to_str().expect("utf-8")],
    ));
    assert!(
        err.contains("may only read") && err.contains("[control] admins"),
        "{err}"
    );
    let err = fails(&n.remote(&n.reader.0, &["ctl", "reload"]));
    assert!(err.contains("may only read"), "{err}");
    // A trusted key that is in neither list is refused by the service.
    let err = fails(&n.remote(&n.stranger.0, &["ctl", "status"]));
    assert!(
        err.contains("not in the node's [control] admins or readers")
            && err.contains(&n.stranger.1),
        "{err}"
    );
    // A key the node does not trust gets no session at all.
    let outsider = keygen(&n.dir, "outsider");
    let err = fails(&n.remote(&outsider.0, &["ctl", "status"]));
    assert!(err.contains("not trusted"), "{err}");
    assert!(n
        .events("config_applied")
        .iter()
        .all(|e| e["how"] != "apply"));
    let refused = n.events("stream_refused");
    assert!(
        refused
            .iter()
            .any(|e| e["reason"] == "forbidden" && e["service"] == "pool.control"),
        "{refused:?}"
    );
    daemon.assert_running();
}

#[test]
fn a_reload_that_cannot_bind_changes_nothing() {
    let n = Node::new("reload-atomic");
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
    let target_addr = target.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for s in target.incoming().flatten() {
            use std::io::Write;
            let mut s = s;
            let _ = s.write_all(b"hello from the target");
        }
    });
    let node_key = pool_cmd(&["pubkey", n.key.to_str().expect("utf-8")]);
    let node_key = String::from_utf8_lossy(&node_key.stdout).trim().to_string();
    let bridge = |name: &str, port: u16| {
        format!(
            "\n[[tcp2pool]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\npeer = \"{}\"\npeer_key = \"{node_key}\"\n",
            n.listen
        )
    };
    let (p1, p2) = (free_port(), free_port());
    let pool2tcp = format!("\n[[pool2tcp]]\ntarget = \"{target_addr}\"\n");
    // The node trusts its own key so that its bridge can reach its own
    // pool2tcp end.
    let trusted = [
        n.admin.1.as_str(),
        n.reader.1.as_str(),
        n.stranger.1.as_str(),
        node_key.as_str(),
    ];
    let before = n.text(&trusted, &format!("{pool2tcp}{}", bridge("a", p1)));
    std::fs::write(&n.config, &before).expect("write config");
    let mut daemon = n.start();
    let fetch = |port: u16| {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect bridge");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf
    };
    assert_eq!(fetch(p1), "hello from the target");

    // The new config drops the stranger's trust, changes bridge `a`'s
    // port and adds bridge `b` on a port someone else holds.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", p2)).expect("take p2");
    let p3 = free_port();
    let after = n.text(
        &[n.admin.1.as_str(), n.reader.1.as_str(), node_key.as_str()],
        &format!("{pool2tcp}{}{}", bridge("a", p3), bridge("b", p2)),
    );
    std::fs::write(&n.config, &after).expect("write config");
    daemon.signal("HUP");
    let e = wait_journal(
        &n.journal,
        Duration::from_secs(5),
        "config_not_applied",
        |e| e["event"] == "config_not_applied",
    );
    assert_eq!(e["how"], "reload");
    let why = e["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!("127.0.0.1:{p2}")) && why.contains("`b`"),
        "{e}"
    );
    daemon.wait_log("NOT applied", Duration::from_secs(5));
    // Old bridges serve, new ones do not exist, old trust holds.
    assert_eq!(fetch(p1), "hello from the target");
    assert!(std::net::TcpStream::connect(("127.0.0.1", p3)).is_err());
    // The stranger still gets a session (and is then refused by the control
    // service, which it was never allowed to use).
    let err = fails(&n.remote(&n.stranger.0, &["ctl", "status"]));
    assert!(err.contains("[control] admins or readers"), "{err}");
    let err = fails(&n.local(&["ctl", "reload"]));
    assert!(
        err.contains("not applied, the running config is unchanged"),
        "{err}"
    );
    assert!(n
        .events("config_applied")
        .iter()
        .all(|e| e["how"] != "reload"));

    // Once the port is free the same reload goes in whole.
    drop(squatter);
    let out = ok(&n.local(&["ctl", "reload"]));
    assert!(out.contains("`b`: added"), "{out}");
    assert_eq!(fetch(p3), "hello from the target");
    assert_eq!(fetch(p2), "hello from the target");
    assert!(std::net::TcpStream::connect(("127.0.0.1", p1)).is_err());
    let err = fails(&n.remote(&n.stranger.0, &["ctl", "status"]));
    assert!(err.contains("not trusted"), "{err}");
    daemon.assert_running();
}
