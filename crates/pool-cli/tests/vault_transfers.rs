//! `pool vault` with the real daemon: a gigabyte pushed (the client killed
//! half-way and run again) and pulled back; the server killed mid-push; a
//! partial file damaged between runs; 10,000 small files pushed twice; two
//! pushes to one destination at once.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, UNIX_EPOCH};

use util::vault::*;
use util::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = MIB;

/// A push of `args` by `who`, running in the background at `rate`.
fn slow_push(v: &VaultNode, name: &str, who: &std::path::Path, args: &[&str], rate: &str) -> Proc {
    let mut a = args.to_vec();
    a.extend(["--bwlimit", rate]);
    Proc::spawn(name, v.command(who, "push", &a), &v.dir)
}

fn wait_progress(p: &mut Proc, at_least: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let b = progress_bytes(p);
        if b >= at_least {
            return b;
        }
        assert!(
            p.exited().is_none(),
            "the push ended before {at_least} bytes:\n{}",
            p.log()
        );
        assert!(
            Instant::now() < deadline,
            "no progress to {at_least} bytes:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_gigabyte_pushed_with_the_client_killed_half_way_then_pulled() {
    let mut v = VaultNode::new("vault-gig");
    v.start();
    let src = v.dir.join("big.bin");
    let size = 1024 * MIB;
    make_file(&src, size, 1);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mtime = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let want = file_sha256(&src);

    // Push at 200 MiB/s and kill the client at about half.
    let mut p = slow_push(
        &v,
        "push-1",
        &v.client.0,
        &[src.to_str().unwrap(), "/incoming/big.bin"],
        "200M",
    );
    wait_progress(&mut p, size / 2, Duration::from_secs(60));
    p.kill9();
    let stored = v.root.join("incoming/big.bin");
    assert!(
        !stored.exists(),
        "a partial file appeared under the final name"
    );
    std::thread::sleep(Duration::from_millis(300));
    let part: u64 = partials(&v.root).iter().map(|(_, n)| n).sum();
    assert!(part >= size / 3, "only {part} bytes stored before the kill");

    // The rerun sends the rest and at most one more chunk.
    let r = v.push(&[src.to_str().unwrap(), "/incoming/big.bin"]);
    let sent = r["bytes_sent"].as_u64().unwrap();
    let skipped = r["bytes_skipped"].as_u64().unwrap();
    assert_eq!(sent + skipped, size, "{r}");
    assert!(
        sent <= size - part + CHUNK,
        "re-sent {sent} bytes with {part} already stored: {r}"
    );
    let wire = r["wire_bytes"].as_u64().unwrap();
    assert!(
        wire <= sent + sent / 50 + 4 * MIB,
        "{wire} bytes on the wire for {sent} of chunks"
    );
    assert_eq!(r["verified"], 1);
    assert_eq!(file_sha256(&stored), want);
    let meta = std::fs::metadata(&stored).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.modified().unwrap(), mtime);
    assert!(
        partials(&v.root).is_empty(),
        "partials left: {:?}",
        partials(&v.root)
    );

    // Pushed again unchanged: nothing sent.
    let r = v.push(&[src.to_str().unwrap(), "/incoming/big.bin"]);
    assert_eq!(r["bytes_sent"], 0, "{r}");
    assert_eq!(r["files_skipped"], 1, "{r}");

    // Pulled back by the reader.
    let back = v.dir.join("back.bin");
    let r = v
        .run(
            &v.reader.0,
            "pull",
            &["/incoming/big.bin", back.to_str().unwrap()],
        )
        .unwrap();
    assert_eq!(r["bytes_sent"].as_u64().unwrap(), size, "{r}");
    assert_eq!(file_sha256(&back), want);
    let meta = std::fs::metadata(&back).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.modified().unwrap(), mtime);
    std::fs::remove_file(&src).unwrap();
    std::fs::remove_file(&back).unwrap();
}

#[test]
fn a_carrier_cut_mid_push_costs_nothing() {
    let mut v = VaultNode::new("vault-cut");
    v.start();
    let fwd = util::fleet::Cuttable::new(&v.listen);
    let src = v.dir.join("f.bin");
    let size = 64 * MIB;
    make_file(&src, size, 6);
    let cmd = v.command_via(
        &fwd.addr,
        &v.client.0,
        "push",
        &[src.to_str().unwrap(), "/incoming/f.bin", "--bwlimit", "32M"],
    );
    let mut p = Proc::spawn("push", cmd, &v.dir);
    wait_progress(&mut p, size / 3, Duration::from_secs(30));
    // Every connection through the forwarder dies; the session resumes on
    // a new one and the push goes on, sending nothing twice.
    fwd.cut();
    std::thread::sleep(Duration::from_millis(100));
    fwd.restore();
    assert!(
        p.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        p.log()
    );
    let report: serde_json::Value = serde_json::from_str(p.log().lines().last().unwrap()).unwrap();
    assert_eq!(report["bytes_sent"].as_u64().unwrap(), size, "{report}");
    assert_eq!(report["bytes_skipped"], 0, "{report}");
    assert_eq!(
        file_sha256(&v.root.join("incoming/f.bin")),
        file_sha256(&src)
    );
}

#[test]
fn the_server_killed_mid_push_and_restarted_lets_the_rerun_complete() {
    let mut v = VaultNode::new("vault-server-kill");
    v.start();
    let src = v.dir.join("f.bin");
    let size = 96 * MIB;
    make_file(&src, size, 2);
    let mut p = slow_push(
        &v,
        "push-1",
        &v.client.0,
        &[src.to_str().unwrap(), "/incoming/f.bin"],
        "40M",
    );
    wait_progress(&mut p, size / 3, Duration::from_secs(60));
    v.daemon.as_mut().unwrap().kill9();
    assert!(!v.root.join("incoming/f.bin").exists());
    // Restarted at once: the client's session cannot resume on it (the
    // state died with the process), so the push fails, and says so.
    v.start();
    let st = p.wait_exit(Duration::from_secs(60));
    assert!(
        !st.success(),
        "the push claimed success with its server dead"
    );
    let r = v.push(&[src.to_str().unwrap(), "/incoming/f.bin"]);
    assert!(
        r["bytes_skipped"].as_u64().unwrap() > 0,
        "nothing was kept: {r}"
    );
    assert_eq!(
        file_sha256(&v.root.join("incoming/f.bin")),
        file_sha256(&src)
    );
}

#[test]
fn a_partial_damaged_between_runs_is_caught_and_its_chunk_sent_again() {
    let mut v = VaultNode::new("vault-damage");
    v.start();
    let src = v.dir.join("f.bin");
    let size = 64 * MIB;
    make_file(&src, size, 3);
    let mut p = slow_push(
        &v,
        "push-1",
        &v.client.0,
        &[src.to_str().unwrap(), "/incoming/f.bin"],
        "40M",
    );
    wait_progress(&mut p, size / 2, Duration::from_secs(60));
    p.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let parts = partials(&v.root);
    assert_eq!(parts.len(), 1, "{parts:?}");
    let (part, len) = parts[0].clone();
    assert!(len > 4 * CHUNK);
    // Flip a byte in the second chunk of what is stored.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&part)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, CHUNK + 12345).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, CHUNK + 12345).unwrap();
    drop(f);
    let r = v.push(&[src.to_str().unwrap(), "/incoming/f.bin"]);
    let full_chunks = len / CHUNK;
    let skipped = r["bytes_skipped"].as_u64().unwrap();
    assert_eq!(
        skipped,
        (full_chunks - 1) * CHUNK,
        "the damaged chunk was kept: {r}"
    );
    assert_eq!(
        file_sha256(&v.root.join("incoming/f.bin")),
        file_sha256(&src)
    );
}

#[test]
fn ten_thousand_small_files_pushed_twice_send_nothing_the_second_time() {
    let mut v = VaultNode::new("vault-small");
    v.start();
    let tree = v.dir.join("tree");
    let mut total = 0u64;
    for d in 0..100 {
        let dir = tree.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..100 {
            let body = format!("file {d}/{i} {}\n", "x".repeat((d * 7 + i * 13) % 900));
            total += body.len() as u64;
            std::fs::write(dir.join(format!("f{i:03}.txt")), body).unwrap();
        }
    }
    let start = Instant::now();
    let r = v.push(&[tree.to_str().unwrap(), "/incoming/"]);
    let first = start.elapsed();
    assert_eq!(r["files"], 10_000, "{r}");
    assert_eq!(r["files_sent"], 10_000, "{r}");
    assert_eq!(r["bytes_sent"].as_u64().unwrap(), total, "{r}");
    assert_eq!(
        std::fs::read_to_string(v.root.join("incoming/tree/d042/f017.txt")).unwrap(),
        std::fs::read_to_string(tree.join("d042/f017.txt")).unwrap()
    );
    let r = v.push(&[tree.to_str().unwrap(), "/incoming/"]);
    assert_eq!(r["files_skipped"], 10_000, "{r}");
    assert_eq!(r["bytes_sent"], 0, "{r}");
    eprintln!("10,000 files: first push {first:?}");
}

#[test]
fn two_pushes_to_one_destination_are_never_interleaved() {
    let mut v = VaultNode::new("vault-busy");
    v.start();
    let a = v.dir.join("a.bin");
    let b = v.dir.join("b.bin");
    make_file(&a, 32 * MIB, 4);
    make_file(&b, 32 * MIB, 5);
    let mut p = slow_push(
        &v,
        "push-a",
        &v.client.0,
        &[a.to_str().unwrap(), "/incoming/same.bin"],
        "16M",
    );
    wait_progress(&mut p, 4 * MIB, Duration::from_secs(30));
    // Another key with write access is refused while it runs...
    let e = v
        .run(
            &v.writer2.0,
            "push",
            &[b.to_str().unwrap(), "/incoming/same.bin"],
        )
        .unwrap_err();
    assert!(e.contains("another push to it is under way"), "{e}");
    assert!(
        p.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        p.log()
    );
    assert_eq!(
        file_sha256(&v.root.join("incoming/same.bin")),
        file_sha256(&a)
    );
    // ...and goes through once it is done.
    v.run(
        &v.writer2.0,
        "push",
        &[b.to_str().unwrap(), "/incoming/same.bin"],
    )
    .unwrap();
    assert_eq!(
        file_sha256(&v.root.join("incoming/same.bin")),
        file_sha256(&b)
    );
    // The same key pushing again takes over: the first push stops (its
    // client may be dead), the second completes, nothing interleaves.
    let mut p = slow_push(
        &v,
        "push-a2",
        &v.client.0,
        &[a.to_str().unwrap(), "/incoming/same.bin"],
        "16M",
    );
    wait_progress(&mut p, 4 * MIB, Duration::from_secs(30));
    v.push(&[a.to_str().unwrap(), "/incoming/same.bin"]);
    assert!(
        !p.wait_exit(Duration::from_secs(30)).success(),
        "the first push was not stopped"
    );
    assert_eq!(
        file_sha256(&v.root.join("incoming/same.bin")),
        file_sha256(&a)
    );
}
