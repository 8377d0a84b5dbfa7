//! Relay peering with real daemons in network namespaces: A reaches only
//! relay R1, B only relay R2, the relays each other, and a direct A–B
//! link the test switches on and off. A third relay R3 (next to R2) peers
//! with R1 too, for the untrusted-key and flood scenarios.
//!
//! ```text
//!   A 10.78.1.1 ── 10.78.1.2 R1 10.78.2.1 ── 10.78.2.2 R2 (and R3 :9256) 10.78.3.2 ── 10.78.3.1 B
//!   A 10.78.4.1 ──────────────────────── (direct) ──────────────────────── 10.78.4.2 B
//! ```
//!
//! Needs root (CI runs as root), `ip` (iproute2) and `python3`.
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::netns::*;
use util::*;

struct Topo {
    ns: [String; 4],
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Topo {
    fn new(tag: &str) -> Topo {
        require_program("ip", "iproute2");
        require_program("python3", "python3");
        let p = format!("mesh{}{tag}", std::process::id());
        let t = Topo {
            ns: ["a", "r1", "r2", "b"].map(|n| format!("{p}{n}")),
        };
        for ns in &t.ns {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let links = [
            (0, "a2r", "10.78.1.1/24", 1, "r2a", "10.78.1.2/24"),
            (1, "r1r2", "10.78.2.1/24", 2, "r2r1", "10.78.2.2/24"),
            (3, "b2r", "10.78.3.1/24", 2, "r2b", "10.78.3.2/24"),
            (0, "a2b", "10.78.4.1/24", 3, "b2a", "10.78.4.2/24"),
        ];
        for (x, dx, ax, y, dy, ay) in links {
            let (nx, ny) = (t.ns[x].as_str(), t.ns[y].as_str());
            ip(&[
                "-n", nx, "link", "add", "name", dx, "type", "veth", "peer", "name", dy, "netns",
                ny,
            ]);
            ip(&["-n", nx, "addr", "add", ax, "dev", dx]);
            ip(&["-n", ny, "addr", "add", ay, "dev", dy]);
            if dx != "a2b" {
                ip(&["-n", nx, "link", "set", dx, "up"]);
                ip(&["-n", ny, "link", "set", dy, "up"]);
            }
        }
        for ns in &t.ns[1..3] {
            let st = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=0",
                ])
                .status()
                .expect("sysctl");
            assert!(st.success());
        }
        t
    }

    fn direct(&self, up: bool) {
        let s = if up { "up" } else { "down" };
        ip(&["-n", &self.ns[0], "link", "set", "a2b", s]);
        ip(&["-n", &self.ns[3], "link", "set", "b2a", s]);
    }

    fn exec(&self, i: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i], program]).args(args);
        c
    }
}

const A: usize = 0;
const R1: usize = 1;
const R2: usize = 2;
const B: usize = 3;

fn relay_status(control: &Path) -> serde_json::Value {
    let out = pool_cmd(&[
        "relay",
        "status",
        "--json",
        "--control",
        control.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn wait_peer_up(control: &Path, peer: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = relay_status(control);
        if let Some(p) = s["peers"].as_array().and_then(|a| {
            a.iter()
                .find(|p| p["key"] == peer && p["up"] == true && p["nodes"].as_u64() > Some(0))
        }) {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "peer {peer} never came up with nodes: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Mesh {
    _r1: Proc,
    r2: Proc,
    _b: Proc,
    _a: Proc,
    source: Proc,
    fetch: Proc,
    a_ctl: PathBuf,
    r1_ctl: PathBuf,
    r2_ctl: PathBuf,
    r1_journal: PathBuf,
    r2_args: Vec<String>,
    r1_pub: String,
    r2_pub: String,
    a_pub: String,
    b_pub: String,
    topo: Topo,
    dir: TempDir,
}

impl Mesh {
    fn start(tag: &str, r1_extra: &[&str]) -> Mesh {
        let topo = Topo::new(tag);
        let dir = TempDir::new(&format!("mesh-{tag}"));
        let (a_key, a_pub) = keygen(&dir, "a");
        let (b_key, b_pub) = keygen(&dir, "b");
        let (r1_key, r1_pub) = keygen(&dir, "r1");
        let (r2_key, r2_pub) = keygen(&dir, "r2");
        let (r1_ctl, r2_ctl) = (dir.join("r1.sock"), dir.join("r2.sock"));
        let r1_journal = dir.join("r1.journal");
        let mut args = vec![
            "relay".to_string(),
            "--listen".into(),
            "0.0.0.0:9255".into(),
            "--key".into(),
            r1_key.to_string_lossy().into(),
            "--control".into(),
            r1_ctl.to_string_lossy().into(),
            "--journal".into(),
            r1_journal.to_string_lossy().into(),
        ];
        args.extend(r1_extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut r1 = Proc::spawn("r1", topo.exec(R1, POOL, &argv), &dir);
        r1.wait_log("relay listening on", Duration::from_secs(10));
        // R2 enrols R1 in its config file; R1 enrols R2 at runtime.
        let r2_cfg = format!(
            "[relay]\nkey = {:?}\ncontrol = {:?}\n\n[[relay.peer]]\naddr = \"10.78.2.1:9255\"\nkey = \"{r1_pub}\"\n",
            r2_key, r2_ctl
        );
        std::fs::write(dir.join("r2.toml"), r2_cfg).unwrap();
        let r2_args: Vec<String> = vec![
            "relay".into(),
            "--listen".into(),
            "0.0.0.0:9255".into(),
            "--config".into(),
            dir.join("r2.toml").to_string_lossy().into(),
        ];
        let argv: Vec<&str> = r2_args.iter().map(String::as_str).collect();
        let mut r2 = Proc::spawn("r2", topo.exec(R2, POOL, &argv), &dir);
        r2.wait_log("relay listening on", Duration::from_secs(10));
        let out = pool_cmd(&[
            "relay",
            "enroll",
            "10.78.2.2:9255",
            "--relay-key",
            &r2_pub,
            "--control",
            r1_ctl.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let (a_ctl, b_ctl) = (dir.join("a.sock"), dir.join("b.sock"));
        let b_cfg = format!(
            "[node]\nkey = {:?}\nlisten = \"0.0.0.0:9253\"\ncontrol = {:?}\n\
             relays = [\"10.78.3.2:9255\"]\ndirect_retry_secs = 2\n\n\
             [trust]\nallow = [\"{a_pub}\"]\n\n[[pool2tcp]]\ntarget = \"127.0.0.1:7100\"\n",
            b_key, b_ctl
        );
        let a_cfg = format!(
            "[node]\nkey = {:?}\nlisten = \"\"\ncontrol = {:?}\n\
             relays = [\"10.78.1.2:9255\"]\ndirect_retry_secs = 2\n\n\
             [trust]\nallow = [\"{b_pub}\"]\n\n\
             [[tcp2pool]]\nname = \"paced\"\nlisten = \"127.0.0.1:7000\"\npeer_key = \"{b_pub}\"\n",
            a_key, a_ctl
        );
        std::fs::write(dir.join("b.toml"), b_cfg).unwrap();
        std::fs::write(dir.join("a.toml"), a_cfg).unwrap();
        let stop = dir.join("stop");
        let mut source = Proc::spawn(
            "source",
            topo.exec(
                B,
                "python3",
                &[
                    &paced_py(),
                    "serve",
                    "127.0.0.1",
                    "7100",
                    "4",
                    stop.to_str().unwrap(),
                ],
            ),
            &dir,
        );
        source.wait_log("listening", Duration::from_secs(10));
        let b_toml = dir.join("b.toml");
        let mut b = Proc::spawn(
            "b",
            topo.exec(
                B,
                POOL,
                &["-v", "daemon", "--config", b_toml.to_str().unwrap()],
            ),
            &dir,
        );
        b.wait_log("registered at relay", Duration::from_secs(15));
        // R1 hears of B through the peering before A dials.
        wait_peer_up(&r1_ctl, &r2_pub, Duration::from_secs(15));
        let a_toml = dir.join("a.toml");
        let mut a = Proc::spawn(
            "a",
            topo.exec(
                A,
                POOL,
                &["-v", "daemon", "--config", a_toml.to_str().unwrap()],
            ),
            &dir,
        );
        a.wait_log("tcp2pool bridge up", Duration::from_secs(15));
        let fetch = Proc::spawn(
            "fetch",
            topo.exec(A, "python3", &[&paced_py(), "fetch", "127.0.0.1", "7000"]),
            &dir,
        );
        Mesh {
            _r1: r1,
            r2,
            _b: b,
            _a: a,
            source,
            fetch,
            a_ctl,
            r1_ctl,
            r2_ctl,
            r1_journal,
            r2_args,
            r1_pub,
            r2_pub,
            a_pub,
            b_pub,
            topo,
            dir,
        }
    }
}

#[test]
fn a_session_through_two_relays_moves_to_direct_falls_back_and_survives_a_relay_restart() {
    let mut m = Mesh::start("1", &[]);
    let first = wait_path(&m.a_ctl, "relay", Duration::from_secs(20));
    assert!(first.address.starts_with("10.78.1.2"), "{first:?}");
    // Both relays on the way, ours first.
    assert_eq!(first.relays.len(), 2, "{first:?}");
    assert!(first.relays[0].starts_with("10.78.1.2:9255"), "{first:?}");
    assert!(first.relays[1].starts_with("10.78.2.2:9255"), "{first:?}");
    let table = pool_cmd(&["ctl", "sessions", "--control", m.a_ctl.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("10.78.1.2:9255 > 10.78.2.2:9255"), "{text}");
    let status = pool_cmd(&["migrate", "status", "--control", m.a_ctl.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("10.78.1.2:9255 > 10.78.2.2:9255"), "{text}");
    std::thread::sleep(Duration::from_secs(1));

    // A direct link appears: the session moves to it.
    m.topo.direct(true);
    let direct = wait_path(&m.a_ctl, "direct", Duration::from_secs(15));
    assert_eq!(direct.id, first.id, "same session");
    assert!(direct.address.starts_with("10.78.4.2"), "{direct:?}");
    assert!(direct.relays.is_empty(), "{direct:?}");
    std::thread::sleep(Duration::from_secs(1));
    // It dies: back through both relays.
    m.topo.direct(false);
    let back = wait_path(&m.a_ctl, "relay", Duration::from_secs(15));
    assert_eq!(back.id, first.id, "same session");
    assert_eq!(back.relays.len(), 2, "{back:?}");
    std::thread::sleep(Duration::from_secs(1));

    // R2 killed mid-transfer and started again: the session resumes
    // through the mesh once R2 and the peering are back.
    m.r2.kill9();
    std::thread::sleep(Duration::from_secs(2));
    let argv: Vec<&str> = m.r2_args.iter().map(String::as_str).collect();
    let mut r2 = Proc::spawn("r2-again", m.topo.exec(R2, POOL, &argv), &m.dir);
    r2.wait_log("relay listening on", Duration::from_secs(10));
    m.r2 = r2;
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        let rows = sessions(&m.a_ctl);
        if let Some(r) = rows
            .iter()
            .find(|r| r.path == "relay" && r.resumes > back.resumes)
        {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "never resumed after R2 restarted: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(resumed.id, first.id, "same session");
    std::thread::sleep(Duration::from_secs(1));
    finish_paced(&m.dir, &mut m.fetch, &m.source);

    // What R1's operator sees: R2 up again, its circuits and bytes, and
    // both node keys accounted; the journal has the enrolment and the
    // link going down and up.
    let p = wait_peer_up(&m.r1_ctl, &m.r2_pub, Duration::from_secs(10));
    assert!(p["circuits_total"].as_u64().unwrap_or(0) >= 2, "{p}");
    assert!(p["bytes_in"].as_u64().unwrap_or(0) > 1 << 20, "{p}");
    let s = relay_status(&m.r1_ctl);
    let accounts = s["accounts"].as_array().unwrap();
    for k in [&m.a_pub, &m.b_pub] {
        assert!(
            accounts
                .iter()
                .any(|a| a["key"] == **k && a["circuits"].as_u64() >= Some(2)),
            "{s:#}"
        );
    }
    let human = pool_cmd(&["relay", "status", "--control", m.r1_ctl.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains(&m.r2_pub) && text.contains("up"), "{text}");
    let j = &m.r1_journal;
    wait_journal(j, Duration::from_secs(1), "relay_peer_enrolled", |e| {
        e["event"] == "relay_peer_enrolled" && e["peer"] == m.r2_pub.as_str()
    });
    wait_journal(j, Duration::from_secs(1), "relay_peer_down", |e| {
        e["event"] == "relay_peer_down"
    });
    assert!(
        journal_entries(j)
            .iter()
            .filter(|e| e["event"] == "relay_peer_up")
            .count()
            >= 2
    );
    assert!(journal_entries(j)
        .iter()
        .any(|e| e["event"] == "circuit_opened" && e["via"] == m.r2_pub.as_str()));
    let _ = &m.r2_ctl;
}

#[test]
fn an_untrusted_relay_is_refused_and_a_peer_relays_flood_leaves_another_pair_alone() {
    let m = Mesh::start("2", &[]);
    let before = wait_path(&m.a_ctl, "relay", Duration::from_secs(20));
    assert_eq!(before.relays.len(), 2, "{before:?}");

    // R3 next to R2 enrols R1, but R1's operator has not enrolled R3:
    // refused and journaled at R1; R3's link stays down.
    let (r3_key, r3_pub) = keygen(&m.dir, "r3");
    let r3_ctl = m.dir.join("r3.sock");
    let mut r3 = Proc::spawn(
        "r3",
        m.topo.exec(
            R2,
            POOL,
            &[
                "relay",
                "--listen",
                "0.0.0.0:9256",
                "--key",
                r3_key.to_str().unwrap(),
                "--control",
                r3_ctl.to_str().unwrap(),
            ],
        ),
        &m.dir,
    );
    r3.wait_log("relay listening on", Duration::from_secs(10));
    let out = pool_cmd(&[
        "relay",
        "enroll",
        "10.78.2.1:9255",
        "--relay-key",
        &m.r1_pub,
        "--control",
        r3_ctl.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_journal(
        &m.r1_journal,
        Duration::from_secs(15),
        "relay_peer_refused",
        |e| e["event"] == "relay_peer_refused" && e["key"] == r3_pub.as_str(),
    );
    let s3 = relay_status(&r3_ctl);
    assert_eq!(s3["peers"][0]["up"], false, "{s3:#}");
    // A node key cannot pose as a relay: A's key, run as a relay, is
    // refused the same way.
    let a_key = m.dir.join("a.key");
    let mut fake = Proc::spawn(
        "fake-relay",
        m.topo.exec(
            A,
            POOL,
            &[
                "relay",
                "--listen",
                "127.0.0.1:9299",
                "--key",
                a_key.to_str().unwrap(),
                "--control",
                m.dir.join("fake.sock").to_str().unwrap(),
            ],
        ),
        &m.dir,
    );
    fake.wait_log("relay listening on", Duration::from_secs(10));
    let out = pool_cmd(&[
        "relay",
        "enroll",
        "10.78.1.2:9255",
        "--relay-key",
        &m.r1_pub,
        "--control",
        m.dir.join("fake.sock").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    wait_journal(
        &m.r1_journal,
        Duration::from_secs(15),
        "relay_peer_refused of a node key",
        |e| e["event"] == "relay_peer_refused" && e["key"] == m.a_pub.as_str(),
    );
    drop(fake);

    // Now R1 enrols R3, capped at 8 MB/s (R2, uncapped, carries the
    // paced pair at ~16 MB/s): C (at R1) and D (at R3) start a flood
    // D -> C while the paced B -> A pair runs through R2.
    let out = pool_cmd(&[
        "relay",
        "enroll",
        "10.78.2.2:9256",
        "--relay-key",
        &r3_pub,
        "--max-rate",
        "8000000",
        "--control",
        m.r1_ctl.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let (c_key, c_pub) = keygen(&m.dir, "c");
    let (d_key, d_pub) = keygen(&m.dir, "d");
    let listen = format!(
        "exec {POOL} listen 0.0.0.0:9300 --key {} --allow {d_pub} --relay 10.78.1.2:9255 > /dev/null",
        c_key.display()
    );
    let mut sink = Proc::spawn("flood-sink", m.topo.exec(A, "sh", &["-c", &listen]), &m.dir);
    std::thread::sleep(Duration::from_secs(1));
    sink.assert_running();
    // R3 learns of C through R1.
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay_status(&r3_ctl)["peers"][0]["nodes"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "R3 never learnt R1's nodes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mb = 48u64;
    let flood = format!(
        "dd if=/dev/zero bs=1M count={mb} status=none | {POOL} connect --relay 10.78.3.2:9256 \
         --relay-only --key {} --peer-key {c_pub}",
        d_key.display()
    );
    let t = Instant::now();
    let out = run(
        m.topo.exec(B, "sh", &["-c", &flood]),
        Duration::from_secs(120),
    );
    let flood_secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "flood failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rate = (mb << 20) as f64 / flood_secs;
    eprintln!(
        "flood: {mb} MiB through R3 -> R1 in {flood_secs:.2} s ({:.1} MB/s)",
        rate / 1e6
    );
    // R1 held R3 to its cap (8 MB/s after one second of burst), and
    // said so: uncapped, 48 MiB take well under a second here.
    let least = ((mb << 20) as f64 - 8e6) / 8e6;
    assert!(
        flood_secs > least * 0.8,
        "the flood was not capped: {:.1} MB/s, {flood_secs:.2} s < {:.2} s",
        rate / 1e6,
        least * 0.8
    );
    wait_journal(
        &m.r1_journal,
        Duration::from_secs(5),
        "relay_peer_cap",
        |e| e["event"] == "relay_peer_cap" && e["peer"] == r3_pub.as_str() && e["cap"] == "rate",
    );
    let s = relay_status(&m.r1_ctl);
    let p3 = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == r3_pub.as_str())
        .cloned()
        .unwrap();
    assert!(p3["bytes_in"].as_u64().unwrap_or(0) >= mb << 20, "{p3}");
    assert!(p3["caps_hit"].as_u64().unwrap_or(0) >= 1, "{p3}");

    // The paced pair through R2 never noticed: same session, no resume,
    // and no chunk waited more than a few tens of milliseconds (a loaded,
    // shared 2-core machine).
    let after = wait_path(&m.a_ctl, "relay", Duration::from_secs(1));
    assert_eq!(after.id, before.id);
    assert_eq!(after.resumes, before.resumes, "{after:?}");
    let mut m = m;
    let got = finish_paced(&m.dir, &mut m.fetch, &m.source);
    let stall = got["stall_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        stall < 100.0,
        "a paced chunk stood still {stall} ms during the flood: {got}"
    );
    drop(r3);
}
