//! The vault as an attacker and an unlucky user see it: paths that try to
//! leave the root, keys without grants, a full disk, and sealing.

mod util;

use std::process::Command;
use std::time::Duration;

use util::vault::*;
use util::*;

const MIB: u64 = 1 << 20;

#[test]
fn escapes_and_missing_grants_are_refused_and_journaled() {
    let mut v = VaultNode::new("vault-escape");
    let outside = v.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, v.root.join("incoming/out")).unwrap();
    v.start();
    let src = v.dir.join("f.txt");
    std::fs::write(&src, "payload").unwrap();
    let f = src.to_str().unwrap();
    for (dest, says) in [
        ("../escape", "`..` is not allowed"),
        ("/incoming/../../escape", "`..` is not allowed"),
        ("/incoming/out/x", "symbolic link out of the vault"),
        ("/etc/passwd", "no write grant for /etc/passwd"),
        ("/", "no write grant"),
    ] {
        let e = v.run(&v.client.0, "push", &[f, dest]).unwrap_err();
        assert!(e.contains(says), "push to {dest}: {e}");
    }
    // Reads through the link, and by keys without the grant, are refused too.
    let e = v
        .run(
            &v.client.0,
            "pull",
            &["/incoming/out", v.dir.join("o").to_str().unwrap()],
        )
        .unwrap_err();
    assert!(e.contains("symbolic link out of the vault"), "{e}");
    let e = v
        .run(&v.reader.0, "push", &[f, "/incoming/r.txt"])
        .unwrap_err();
    assert!(e.contains("no write grant"), "{e}");
    let e = v.run(&v.stranger.0, "ls", &["/incoming"]).unwrap_err();
    assert!(e.contains("no read grant"), "{e}");
    // Nothing was written outside the root, or anywhere but where allowed.
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!v.dir.join("escape").exists());
    assert!(!v.root.join("etc").exists());
    // A granted push works, and ls shows it.
    v.push(&[f, "/incoming/ok.txt"]);
    let out = run(
        v.command(&v.reader.0, "ls", &["/incoming"]),
        Duration::from_secs(30),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("\"ok.txt\""), "{listing}");
    // The journal has the write and the refusals.
    wait_journal(&v.journal, Duration::from_secs(5), "vault_write", |e| {
        e["event"] == "vault_write" && e["path"] == "/incoming/ok.txt"
    });
    let j = journal_entries(&v.journal);
    let refused: Vec<_> = j.iter().filter(|e| e["event"] == "vault_refused").collect();
    assert!(refused.len() >= 4, "{refused:?}");
    assert!(refused
        .iter()
        .any(|e| e["reason"].as_str().unwrap_or("").contains("symbolic link")));
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l '{}'", self.0.display()));
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_push_resumes_once_there_is_room() {
    let mut v = VaultNode::new("vault-full");
    let mnt = v.dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = sh(&format!(
        "mount -t tmpfs -o size=40m pool-vault-test '{}'",
        mnt.display()
    ));
    assert!(
        out.status.success(),
        "this test needs root to mount a small tmpfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _m = Mount(mnt.clone());
    v.root = mnt.clone();
    std::fs::create_dir_all(v.root.join("incoming")).unwrap();
    v.start();
    let src = v.dir.join("f.bin");
    make_file(&src, 64 * MIB, 9);
    let e = v
        .run(
            &v.client.0,
            "push",
            &[src.to_str().unwrap(), "/incoming/f.bin"],
        )
        .unwrap_err();
    assert!(e.contains("disk is full"), "{e}");
    assert!(!mnt.join("incoming/f.bin").exists());
    let kept: u64 = partials(&mnt).iter().map(|(_, n)| n).sum();
    assert!(kept >= 30 * MIB, "only {kept} bytes kept");
    // Room again: the rerun sends only the rest.
    let out = sh(&format!("mount -o remount,size=200m '{}'", mnt.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = v.push(&[src.to_str().unwrap(), "/incoming/f.bin"]);
    assert!(r["bytes_skipped"].as_u64().unwrap() >= 30 * MIB, "{r}");
    assert_eq!(file_sha256(&mnt.join("incoming/f.bin")), file_sha256(&src));
}

#[test]
fn sealed_files_are_ciphertext_at_rest_and_open_only_with_their_key() {
    let mut v = VaultNode::new("vault-seal");
    v.start();
    let src = v.dir.join("secret.txt");
    let text = "the launch code is 0000\n".repeat(200_000);
    std::fs::write(&src, &text).unwrap();
    let r = v.push(&[src.to_str().unwrap(), "/incoming/secret.txt", "--seal"]);
    assert_eq!(r["verified"], 1, "{r}");
    let stored = std::fs::read(v.root.join("incoming/secret.txt")).unwrap();
    assert!(stored.len() > text.len(), "no tags: {} bytes", stored.len());
    assert!(
        !stored.windows(18).any(|w| w == b"the launch code is"),
        "the node stores plaintext"
    );
    // Pushed again: the same ciphertext, nothing sent.
    let r = v.push(&[src.to_str().unwrap(), "/incoming/secret.txt", "--seal"]);
    assert_eq!(r["bytes_sent"], 0, "{r}");
    // The owner pulls the plaintext back.
    let back = v.dir.join("back.txt");
    v.run(
        &v.client.0,
        "pull",
        &["/incoming/secret.txt", back.to_str().unwrap()],
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(&back).unwrap(), text);
    // Another key that may read the vault cannot open it.
    let other = v.dir.join("other.txt");
    let e = v
        .run(
            &v.reader.0,
            "pull",
            &["/incoming/secret.txt", other.to_str().unwrap()],
        )
        .unwrap_err();
    assert!(e.contains("sealed to key"), "{e}");
    assert!(!other.exists());
}
