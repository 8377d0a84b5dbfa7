//! A change of server with real programs: two worker daemons (A and B),
//! each with its own nginx (or a shared redis) behind `[[pool2tcp]]`, and a
//! client `pool bridge tcp2pool` dialling A. `pool ctl handoff` moves the
//! client's session from A to B (and back) while programs run through it:
//! the download in flight completes with the right SHA-256 (its stream stays
//! on A and is forwarded through B), new requests are served by B (B's
//! nginx log shows them), and `redis-benchmark` sees no error across ten
//! handoffs A → B → A.
mod util;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use util::workers::*;
use util::*;

#[test]
fn download_survives_a_handoff_and_new_requests_go_to_the_target() {
    require_program("nginx", "nginx");
    require_program("curl", "curl");
    let dir = TempDir::new("handoff-nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    // 1 GiB: one random MiB repeated, each copy stamped with its index.
    let mut block = vec![0u8; 1 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut block).unwrap();
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(www.join("big.bin")).unwrap());
        for i in 0u32..1024 {
            block[..4].copy_from_slice(&i.to_be_bytes());
            f.write_all(&block).unwrap();
            hasher.update(&block);
        }
    }
    let want = hex(hasher.finish().as_ref());
    std::fs::write(www.join("small.txt"), b"hello\n").unwrap();
    let (mut ng_a, addr_a, log_a) = nginx(&dir, "nginx-a", &www);
    let (mut ng_b, addr_b, log_b) = nginx(&dir, "nginx-b", &www);

    let (ckey, cpub) = keygen(&dir, "client");
    let a = Worker::new(&dir, "a");
    let b = Worker::new(&dir, "b");
    let mut pa = a.start(&dir, &cpub, &b.public, &addr_a);
    let mut pb = b.start(&dir, &cpub, &a.public, &addr_b);
    let (mut client, tcp) = start_tcp2pool(&dir, "tcp2pool", &ckey, &a.listen, &a.public, &[]);
    assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");

    // The download, paced so that it is surely in flight at the handoff.
    let out_file = dir.join("fetched.bin");
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--fail",
        "--limit-rate",
        "150M",
        "--max-time",
        "120",
        "-o",
    ])
    .arg(&out_file)
    .arg(format!("http://{tcp}/big.bin"));
    let dl = std::thread::spawn(move || run(curl, Duration::from_secs(150)));
    std::thread::sleep(Duration::from_millis(1500));
    a.handoff(&cpub, &b);
    // New requests, during the download and after the handoff: B serves them.
    for _ in 0..3 {
        assert_eq!(curl_get(&tcp, "/small.txt"), "hello\n");
    }
    let out = dl.join().unwrap();
    assert!(
        out.status.success(),
        "download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&out_file).unwrap();
    assert_eq!(got.len(), 1 << 30, "the whole file arrived");
    assert_eq!(sha256_hex(&got), want, "byte for byte");
    let la = std::fs::read_to_string(&log_a).unwrap();
    let lb = std::fs::read_to_string(&log_b).unwrap();
    assert!(la.contains("/big.bin"), "the download was A's");
    assert_eq!(
        la.matches("/small.txt").count(),
        1,
        "A served only the request before: {la}"
    );
    assert_eq!(
        lb.matches("/small.txt").count(),
        3,
        "B served the requests after: {lb}"
    );
    // All three journals say so.
    wait_journal(
        &a.journal,
        Duration::from_secs(5),
        "handoff_committed",
        |e| e["event"] == "handoff_committed",
    );
    wait_journal(
        &b.journal,
        Duration::from_secs(5),
        "handoff_imported",
        |e| e["event"] == "handoff_imported",
    );
    assert_eq!(a.status()["counters"]["handoffs_committed"], 1);
    assert_eq!(b.status()["counters"]["handoffs_imported"], 1);
    for p in [&mut pa, &mut pb, &mut client, &mut ng_a, &mut ng_b] {
        p.assert_running();
    }
}

#[test]
fn redis_benchmark_runs_through_ten_handoffs() {
    require_program("redis-server", "redis-server");
    require_program("redis-benchmark", "redis-tools");
    let dir = TempDir::new("handoff-redis");
    let (mut redis, target) = util::fleet::redis(&dir);

    let (ckey, cpub) = keygen(&dir, "client");
    let a = Worker::new(&dir, "a");
    let b = Worker::new(&dir, "b");
    let mut pa = a.start(&dir, &cpub, &b.public, &target);
    let mut pb = b.start(&dir, &cpub, &a.public, &target);
    let (mut client, tcp) = start_tcp2pool(&dir, "tcp2pool", &ckey, &a.listen, &a.public, &[]);
    let (host, bport) = tcp.rsplit_once(':').unwrap();
    let mut bench = Command::new("redis-benchmark");
    bench.args([
        "-h", host, "-p", bport, "-t", "set,get", "-n", "200000", "-c", "10", "-q",
    ]);
    let runner = std::thread::spawn(move || run(bench, Duration::from_secs(120)));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..10 {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        from.handoff(&cpub, to);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = runner.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(
        out.status.success(),
        "redis-benchmark failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SET") && text.contains("GET"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    for p in [&mut pa, &mut pb, &mut client, &mut redis] {
        p.assert_running();
    }
}
