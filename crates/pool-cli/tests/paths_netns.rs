//! Sessions that change path, in real network namespaces: two nodes (A, B)
//! that reach a relay (R) but not each other, and a direct veth link A–B
//! the tests switch on and off. Every scenario runs a paced, timestamped
//! transfer from B to A through a real bridge pair (`pool daemon` on both
//! ends, `pool relay` in R) and checks it by hash and chunk index at the
//! end: not one byte lost or duplicated.
//!
//! ```text
//!   A 10.77.1.1 ── 10.77.1.254  R  10.77.2.254 ── 10.77.2.2 B
//!   A 10.77.3.1 ───────────── (direct) ───────────── 10.77.3.2 B
//! ```
//!
//! Needs root (CI runs as root) and `ip` (iproute2) and `python3`.
//! Namespaces are removed when a test ends, pass or fail.
mod util;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use util::netns::*;
use util::*;

/// Three namespaces, deleted on drop.
struct Topo {
    a: String,
    r: String,
    b: String,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in [&self.a, &self.r, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Topo {
    fn new(tag: &str) -> Topo {
        require_program("ip", "iproute2");
        require_program("python3", "python3");
        let p = format!("pool{}{tag}", std::process::id());
        let t = Topo {
            a: format!("{p}a"),
            r: format!("{p}r"),
            b: format!("{p}b"),
        };
        for ns in [&t.a, &t.r, &t.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (a, r, b) = (t.a.as_str(), t.r.as_str(), t.b.as_str());
        ip(&[
            "-n", a, "link", "add", "name", "a2r", "type", "veth", "peer", "name", "r2a", "netns",
            r,
        ]);
        ip(&[
            "-n", b, "link", "add", "name", "b2r", "type", "veth", "peer", "name", "r2b", "netns",
            r,
        ]);
        ip(&[
            "-n", a, "link", "add", "name", "a2b", "type", "veth", "peer", "name", "b2a", "netns",
            b,
        ]);
        ip(&["-n", a, "addr", "add", "10.77.1.1/24", "dev", "a2r"]);
        ip(&["-n", r, "addr", "add", "10.77.1.254/24", "dev", "r2a"]);
        ip(&["-n", b, "addr", "add", "10.77.2.2/24", "dev", "b2r"]);
        ip(&["-n", r, "addr", "add", "10.77.2.254/24", "dev", "r2b"]);
        ip(&["-n", a, "addr", "add", "10.77.3.1/24", "dev", "a2b"]);
        ip(&["-n", b, "addr", "add", "10.77.3.2/24", "dev", "b2a"]);
        for (ns, dev) in [(a, "a2r"), (r, "r2a"), (b, "b2r"), (r, "r2b")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        // The relay host does not route between the nodes.
        let st = Command::new("ip")
            .args(["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
            .status()
            .expect("sysctl");
        assert!(st.success());
        t
    }

    fn direct(&self, up: bool) {
        let s = if up { "up" } else { "down" };
        ip(&["-n", &self.a, "link", "set", "a2b", s]);
        ip(&["-n", &self.b, "link", "set", "b2a", s]);
    }

    fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c
    }
}

/// Fields drop in order: the processes go first, then the namespaces, then
/// the files.
struct Nodes {
    relay: Proc,
    _b: Proc,
    _a: Proc,
    _source: Proc,
    fetch: Proc,
    a_ctl: PathBuf,
    b_ctl: PathBuf,
    a_key: PathBuf,
    b_pub: String,
    topo: Topo,
    dir: TempDir,
}

impl Nodes {
    /// Relay, both daemons, a paced source behind B and a fetch at A, with
    /// the direct link `direct_up` at the start.
    fn start(tag: &str, direct_up: bool) -> Nodes {
        let topo = Topo::new(tag);
        topo.direct(direct_up);
        let dir = TempDir::new(&format!("paths-{tag}"));
        let (a_key, a_pub) = keygen(&dir, "a");
        let (b_key, b_pub) = keygen(&dir, "b");
        let mut relay = Proc::spawn(
            "relay",
            topo.exec(&topo.r, POOL, &["relay", "--listen", "0.0.0.0:9255"]),
            &dir,
        );
        relay.wait_log("relay listening on", Duration::from_secs(10));
        let b_ctl = dir.join("b.sock");
        let a_ctl = dir.join("a.sock");
        let a_key_path = a_key.clone();
        let b_cfg = format!(
            "[node]\nkey = {:?}\nlisten = \"0.0.0.0:9253\"\ncontrol = {:?}\njournal = {:?}\n\
             relays = [\"10.77.2.254:9255\"]\ndirect_retry_secs = 2\n\n\
             [trust]\nallow = [\"{a_pub}\"]\n\n[[pool2tcp]]\ntarget = \"127.0.0.1:7100\"\n",
            b_key,
            b_ctl,
            dir.join("b.journal")
        );
        let a_cfg = format!(
            "[node]\nkey = {:?}\nlisten = \"\"\ncontrol = {:?}\n\
             relays = [\"10.77.1.254:9255\"]\ndirect_retry_secs = 2\n\n\
             [trust]\nallow = [\"{b_pub}\"]\n\n\
             [[tcp2pool]]\nname = \"paced\"\nlisten = \"127.0.0.1:7000\"\npeer_key = \"{b_pub}\"\n",
            a_key_path, a_ctl
        );
        std::fs::write(dir.join("b.toml"), b_cfg).unwrap();
        std::fs::write(dir.join("a.toml"), a_cfg).unwrap();
        let b_toml = dir.join("b.toml");
        let a_toml = dir.join("a.toml");
        let mut source = Proc::spawn(
            "source",
            topo.exec(
                &topo.b,
                "python3",
                &[
                    &paced_py(),
                    "serve",
                    "127.0.0.1",
                    "7100",
                    "4",
                    dir.join("stop").to_str().unwrap(),
                ],
            ),
            &dir,
        );
        source.wait_log("listening", Duration::from_secs(10));
        let mut b = Proc::spawn(
            "b",
            topo.exec(
                &topo.b,
                POOL,
                &["-v", "daemon", "--config", b_toml.to_str().unwrap()],
            ),
            &dir,
        );
        b.wait_log("registered at relay", Duration::from_secs(15));
        let mut a = Proc::spawn(
            "a",
            topo.exec(
                &topo.a,
                POOL,
                &["-v", "daemon", "--config", a_toml.to_str().unwrap()],
            ),
            &dir,
        );
        a.wait_log("tcp2pool bridge up", Duration::from_secs(15));
        let fetch = Proc::spawn(
            "fetch",
            topo.exec(
                &topo.a,
                "python3",
                &[&paced_py(), "fetch", "127.0.0.1", "7000"],
            ),
            &dir,
        );
        Nodes {
            topo,
            dir,
            relay,
            _b: b,
            _a: a,
            _source: source,
            fetch,
            a_ctl,
            b_ctl,
            a_key,
            b_pub,
        }
    }

    /// Stops the source and checks the transfer: same hash at both ends,
    /// no chunk lost, duplicated or corrupt. Returns the fetch report.
    fn finish(mut self) -> serde_json::Value {
        finish_paced(&self.dir, &mut self.fetch, &self._source)
    }
}

#[test]
fn starts_on_the_relay_moves_to_direct_and_falls_back_with_zero_loss() {
    let n = Nodes::start("1", false);
    let on_relay = wait_path(&n.a_ctl, "relay", Duration::from_secs(20));
    assert!(on_relay.address.starts_with("10.77.1.254"), "{on_relay:?}");
    std::thread::sleep(Duration::from_secs(1));

    // The direct link appears: the session moves to it by itself.
    n.topo.direct(true);
    let t = Instant::now();
    let direct = wait_path(&n.a_ctl, "direct", Duration::from_secs(15));
    eprintln!("moved to direct after {:?}: {direct:?}", t.elapsed());
    assert_eq!(direct.id, on_relay.id, "same session");
    assert!(direct.address.starts_with("10.77.3.2"), "{direct:?}");
    assert!(direct.path_changes >= 1);
    // B sees the same session on the direct path too.
    let b_rows = sessions(&n.b_ctl);
    assert!(
        b_rows
            .iter()
            .any(|r| r.path == "direct" && r.address.starts_with("10.77.3.1")),
        "{b_rows:?}"
    );
    std::thread::sleep(Duration::from_secs(1));

    // The direct link dies: back to the relay, same session.
    n.topo.direct(false);
    let t = Instant::now();
    let back = wait_path(&n.a_ctl, "relay", Duration::from_secs(15));
    eprintln!("fell back to the relay after {:?}: {back:?}", t.elapsed());
    assert_eq!(back.id, on_relay.id, "same session");
    assert!(back.path_changes >= 2);
    std::thread::sleep(Duration::from_secs(1));
    n.finish();
}

#[test]
fn an_address_change_mid_transfer_keeps_the_session() {
    let n = Nodes::start("2", true);
    let direct = wait_path(&n.a_ctl, "direct", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    // A's address on the direct link changes under the transfer.
    ip(&["-n", &n.topo.a, "addr", "del", "10.77.3.1/24", "dev", "a2b"]);
    ip(&[
        "-n",
        &n.topo.a,
        "addr",
        "add",
        "10.77.3.11/24",
        "dev",
        "a2b",
    ]);
    // B soon carries the same session from A's new address.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = sessions(&n.b_ctl);
        if rows
            .iter()
            .any(|r| r.path == "direct" && r.address.starts_with("10.77.3.11"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never saw the session from 10.77.3.11: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = wait_path(&n.a_ctl, "direct", Duration::from_secs(5));
    assert_eq!(after.id, direct.id, "same session");
    assert!(after.resumes > direct.resumes, "{direct:?} -> {after:?}");
    std::thread::sleep(Duration::from_secs(1));
    n.finish();
}

#[test]
fn killing_and_restarting_the_relay_does_not_touch_a_direct_session() {
    let mut n = Nodes::start("3", true);
    let direct = wait_path(&n.a_ctl, "direct", Duration::from_secs(20));
    n.relay.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let during = wait_path(&n.a_ctl, "direct", Duration::from_secs(1));
    let mut relay = Proc::spawn(
        "relay2",
        n.topo
            .exec(&n.topo.r, POOL, &["relay", "--listen", "0.0.0.0:9255"]),
        &n.dir,
    );
    relay.wait_log("relay listening on", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let after = wait_path(&n.a_ctl, "direct", Duration::from_secs(1));
    for r in [&during, &after] {
        assert_eq!(r.id, direct.id);
        assert_eq!(r.resumes, direct.resumes, "the session never moved: {r:?}");
        assert_eq!(r.path_changes, direct.path_changes, "{r:?}");
    }
    n.relay = relay;

    // `pool migrate status` shows the path; `pool migrate test` checks the
    // direct path by hand (and says why when it does not work).
    let status = pool_cmd(&["migrate", "status", "--control", n.a_ctl.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success() && text.contains("direct"), "{text}");
    let test = |host: &str| {
        run(
            n.topo.exec(
                &n.topo.a,
                POOL,
                &[
                    "migrate",
                    "test",
                    host,
                    "--key",
                    n.a_key.to_str().unwrap(),
                    "--peer-key",
                    &n.b_pub,
                    "--megabytes",
                    "16",
                ],
            ),
            Duration::from_secs(30),
        )
    };
    let ok = test("10.77.3.2");
    let out = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("handshake") && out.contains("Gbit/s") && out.contains("verdict"),
        "{out}"
    );
    let bad = test("10.77.2.2");
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(why.contains("NOT reachable"), "{why}");
    n.finish();
}

fn impostor_py() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib/relay_impostor.py");
    p.to_string_lossy().into_owned()
}

#[test]
fn the_relay_forwards_nothing_for_an_unproven_key_and_a_flood_does_not_slow_another_pair() {
    let n = Nodes::start("4", false);
    let before = wait_path(&n.a_ctl, "relay", Duration::from_secs(20));

    // A node that cannot prove a key: it claims B's (to take over its
    // registration) and A's (to reach B). The relay refuses both with
    // ERR_AUTH (1) and forwards nothing.
    let a_pub = pool_cmd(&["pubkey", n.a_key.to_str().unwrap()]);
    let a_pub = String::from_utf8_lossy(&a_pub.stdout).trim().to_string();
    for (claimed, intent) in [
        (n.b_pub.clone(), "register".to_string()),
        (a_pub.clone(), format!("connect:{}", n.b_pub)),
    ] {
        let out = run(
            n.topo.exec(
                &n.topo.a,
                "python3",
                &[&impostor_py(), "10.77.1.254", "9255", &claimed, &intent],
            ),
            Duration::from_secs(20),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("\"code\": 1"), "{intent}: {text}");
        assert!(text.contains("\"forwarded\": 0"), "{intent}: {text}");
    }

    // A second pair through the same relay floods as fast as it can
    // (the receiver discards), while the paced A<-B stream runs.
    let (c_key, c_pub) = keygen(&n.dir, "c");
    let (d_key, d_pub) = keygen(&n.dir, "d");
    let listen = format!(
        "exec {POOL} listen 0.0.0.0:9300 --key {} --allow {d_pub} --relay 10.77.2.254:9255 > /dev/null",
        c_key.display()
    );
    let mut sink = Proc::spawn(
        "flood-sink",
        n.topo.exec(&n.topo.b, "sh", &["-c", &listen]),
        &n.dir,
    );
    std::thread::sleep(Duration::from_secs(2));
    sink.assert_running();
    let flood = format!(
        "dd if=/dev/zero bs=1M count=1024 status=none | {POOL} connect --relay 10.77.1.254:9255 \
         --relay-only --key {} --peer-key {c_pub}",
        d_key.display()
    );
    let t = Instant::now();
    let out = run(
        n.topo.exec(&n.topo.a, "sh", &["-c", &flood]),
        Duration::from_secs(120),
    );
    let flood_secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "flood failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("flood: 1 GiB through the relay in {flood_secs:.2} s");
    // The other pair never noticed: same session, still on the relay.
    let after = wait_path(&n.a_ctl, "relay", Duration::from_secs(1));
    assert_eq!(after.id, before.id);
    assert_eq!(after.resumes, before.resumes, "{after:?}");
    let got = n.finish();
    // The paced stream kept its pace: no chunk waited long, even while
    // 1 GiB went through the same relay (generous bound for a loaded
    // 2-core machine; a relay that queued one pair behind the other
    // would hold chunks for the whole flood).
    let max = got["max_delay_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        max < 1000.0 && max < flood_secs * 1000.0 / 2.0,
        "a paced chunk waited {max} ms during a {flood_secs:.1} s flood: {got}"
    );
}
