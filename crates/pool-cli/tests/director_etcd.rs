//! The director with its fleet state in a real etcd (Debian's
//! `etcd-server`, 3.4):
//!
//! - two directors on one etcd: the leader is killed, the other takes the
//!   lead, the workers re-register with it, clients keep working and new
//!   ones are placed; a drain through the new leader never shows a session
//!   live on two workers, and etcd names the right owner at the end;
//! - fencing: a worker cut off from its director (so from etcd) past its
//!   lease cannot take a session by handoff; once back, it can.
mod util;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use util::etcd::*;
use util::fleet::*;
use util::*;

fn keys(v: &[(std::path::PathBuf, String)]) -> Vec<String> {
    v.iter().map(|c| c.1.clone()).collect()
}

fn live_ids(w: &FleetWorker, peers: &[String]) -> HashSet<String> {
    w.sessions(peers)
        .into_iter()
        .filter(|r| r["handing_off"] != true)
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn two_directors_on_etcd_survive_the_leader_and_no_session_has_two_owners() {
    let dir = TempDir::new("director-etcd-two");
    let etcd = start_etcd(&dir);
    let store = etcd.url.replace("http://", "etcd://");
    let (_redis, target) = redis(&dir);
    let a = DirectorNode::new(&dir, "director-a");
    let b = a.sharing(&dir, "director-b");
    let ws = workers(&dir, 2);
    let wkeys: Vec<String> = ws.iter().map(|w| w.public.clone()).collect();
    let clients: Vec<_> = (0..5)
        .map(|i| keygen(&dir, &format!("client{i}")))
        .collect();
    let ckeys = keys(&clients);
    let extra = ["--store", store.as_str(), "--lease", "3s", "--no-rebalance"];
    let mut pa = a.start(&dir, "director-a", &wkeys, &ckeys, &extra);
    let mut pb = b.spawn(&dir, "director-b", &wkeys, &ckeys, &extra);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::net::TcpStream::connect(&b.listen).is_err(),
        "the second director listens while the first leads"
    );
    let both = format!("{},{}", a.listen, b.listen);
    let _w: Vec<Proc> = ws
        .iter()
        .enumerate()
        .map(|(i, w)| w.start_via(&dir, &both, &a.public, &ckeys, &peers_of(&ws, i), &target))
        .collect();
    a.wait("two workers at A", Duration::from_secs(15), |rows| {
        rows.iter().filter(|r| r["connected"] == true).count() == 2
    });
    let mut bridges = Vec::new();
    for (i, (k, _)) in clients.iter().take(4).enumerate() {
        let (p, addr) = start_tcp2pool(
            &dir,
            &format!("client{i}"),
            k,
            &both,
            &a.public,
            &["--director"],
        );
        assert!(redis_ping(&addr));
        bridges.push((p, addr));
    }
    // The leader dies; the other takes the lead once its etcd lease ends.
    let killed = Instant::now();
    pa.kill9();
    b.wait_serving(&mut pb);
    let lead_after = killed.elapsed();
    b.wait("both workers at B", Duration::from_secs(15), |rows| {
        rows.iter()
            .filter(|r| r["connected"] == true && r["state"] == "active")
            .count()
            == 2
    });
    let back_after = killed.elapsed();
    for (_, addr) in &bridges {
        assert!(redis_ping(addr), "a client stopped working with the leader");
    }
    let (_p, addr) = start_tcp2pool(
        &dir,
        "client4",
        &clients[4].0,
        &both,
        &a.public,
        &["--director"],
    );
    assert!(redis_ping(&addr), "no placement by the new leader");
    // Drain w0 through B, watching for a session live on two workers:
    // the target first, then the source (a session seen on both was
    // live on both at once).
    let before: HashSet<String> = live_ids(&ws[0], &wkeys);
    assert!(!before.is_empty());
    b.ask(&["drain", &ws[0].public]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on1 = live_ids(&ws[1], &wkeys);
        let on0 = live_ids(&ws[0], &wkeys);
        let both: Vec<_> = on1.intersection(&on0).collect();
        assert!(both.is_empty(), "live on both workers: {both:?}");
        let owners = b.ask(&["owners"]);
        let mut seen = HashSet::new();
        for o in owners["owners"].as_array().unwrap() {
            assert!(seen.insert(o["session"].as_str().unwrap().to_string()));
            assert!(wkeys.iter().any(|k| o["owner"] == k.as_str()), "{o}");
        }
        if on0.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the drain did not finish");
    }
    // etcd agrees: every session of the clients is w1's.
    let want = live_ids(&ws[1], &wkeys);
    assert_eq!(want.len(), 5);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owners = b.ask(&["owners"]);
        let owned: HashSet<String> = owners["owners"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["owner"] == ws[1].public.as_str())
            .map(|o| o["session"].as_str().unwrap().to_string())
            .collect();
        if owned == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd owners {owners:#} vs {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (_, addr) in &bridges {
        assert!(redis_ping(addr));
    }
    eprintln!("B led {lead_after:?} after the kill; workers back at B after {back_after:?}");
    drop(etcd);
}

#[test]
fn a_worker_cut_off_past_its_lease_cannot_take_a_session() {
    let dir = TempDir::new("director-etcd-fence");
    let etcd = start_etcd(&dir);
    let store = etcd.url.replace("http://", "etcd://");
    let (_redis, target) = redis(&dir);
    let d = DirectorNode::new(&dir, "director");
    let ws = workers(&dir, 2);
    let wkeys: Vec<String> = ws.iter().map(|w| w.public.clone()).collect();
    let (ckey, cpub) = keygen(&dir, "client");
    let ckeys = vec![cpub.clone()];
    let _pd = d.start(
        &dir,
        "director",
        &wkeys,
        &ckeys,
        &["--store", store.as_str(), "--lease", "3s", "--no-rebalance"],
    );
    let _w0 = ws[0].start(&dir, &d, &ckeys, &peers_of(&ws, 0), &target);
    d.wait("w0", Duration::from_secs(10), |r| r.len() == 1);
    let (_c, addr) = placed_client(&dir, "client", &ckey, &d);
    assert!(redis_ping(&addr));
    // w1 reaches the director only through a forwarder we can cut.
    let fwd = Cuttable::new(&d.listen);
    let _w1 = ws[1].start_via(
        &dir,
        &fwd.addr,
        &d.public,
        &ckeys,
        &peers_of(&ws, 1),
        &target,
    );
    d.wait("w1", Duration::from_secs(10), |r| {
        r.iter().filter(|w| w["connected"] == true).count() == 2
    });
    fwd.cut();
    d.wait("w1 lost", Duration::from_secs(6), |r| {
        r.iter()
            .any(|w| w["key"] == ws[1].public.as_str() && w["state"] == "lost")
    });
    let owner = |d: &DirectorNode| {
        d.ask(&["owners"])["owners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["owner"].as_str().unwrap().to_string(),
                    o["revision"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = owner(&d);
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].0, ws[0].public);
    let handoff = || {
        pool_cmd(&[
            "ctl",
            "handoff",
            &cpub[..8],
            "--to",
            &ws[1].listen,
            "--to-key",
            &ws[1].public,
            "--control",
            ws[0].control.to_str().unwrap(),
        ])
    };
    let out = handoff();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a fenced worker took the session: {said}"
    );
    // The source hears of it from the client or the target, whichever is
    // first; the target counts why it refused.
    let status = pool_cmd(&[
        "ctl",
        "status",
        "--json",
        "--control",
        ws[1].control.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        v["counters"]["handoffs_aborted"]["fenced"].as_u64() >= Some(1),
        "the target did not refuse by its claim: {said}\n{v:#}"
    );
    assert!(redis_ping(&addr), "the session broke");
    assert_eq!(owner(&d), before, "etcd changed hands for a fenced claim");
    assert_eq!(ws[0].sessions(&wkeys).len(), 1);
    // Back in touch: it registers again and may take the session.
    fwd.restore();
    d.wait("w1 back", Duration::from_secs(10), |r| {
        r.iter().any(|w| {
            w["key"] == ws[1].public.as_str() && w["state"] == "active" && w["connected"] == true
        })
    });
    ws[1].wait_linked(Duration::from_secs(5));
    let out = handoff();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(redis_ping(&addr));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = owner(&d);
        if now.len() == 1 && now[0].0 == ws[1].public {
            assert!(
                now[0].1 > before[0].1,
                "the revision (fencing epoch) did not rise"
            );
            break;
        }
        assert!(Instant::now() < deadline, "etcd owner {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(etcd);
}
