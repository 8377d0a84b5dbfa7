//! The control socket is private from the moment it exists at its path
//! (never group- or world-accessible, not even between bind and chmod),
//! and whatever is already at the path is never followed or clobbered:
//! a symlink, a regular file or a live daemon's socket are refused; only a
//! stale socket is replaced.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pool_node::control::bind_control;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "pool-control-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn my_uid(dir: &Path) -> u32 {
    let probe = dir.join("uid-probe");
    std::fs::write(&probe, b"").unwrap();
    let uid = std::fs::metadata(&probe).unwrap().uid();
    std::fs::remove_file(&probe).unwrap();
    uid
}

/// A thread watches the path as fast as it can while the socket is bound
/// again and again: it must never see it with group or world bits.
#[tokio::test]
async fn socket_never_exists_with_group_or_world_access() {
    let dir = TempDir::new("mode");
    let path = dir.0.join("control.sock");
    let uid = my_uid(&dir.0);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut seen, mut bad) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    seen += 1;
                    let mode = m.permissions().mode();
                    if mode & 0o077 != 0 || !m.file_type().is_socket() {
                        bad.push(mode);
                    }
                }
            }
            (seen, bad)
        })
    };
    for _ in 0..300 {
        let listener = bind_control(&path).expect("bind control socket");
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(m.uid(), uid);
        drop(listener);
        // Left stale on purpose half the time: the next bind replaces it.
        if rand_bit() {
            std::fs::remove_file(&path).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, bad) = watcher.join().unwrap();
    assert!(seen > 0, "the watcher never saw the socket");
    assert!(
        bad.is_empty(),
        "the socket was seen with these modes: {:?}",
        bad.iter()
            .take(10)
            .map(|m| format!("{m:o}"))
            .collect::<Vec<_>>()
    );
    // No private staging directory is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "control.sock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn rand_bit() -> bool {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 1
        == 0
}

#[tokio::test]
async fn symlink_at_the_path_is_refused_and_not_followed() {
    let dir = TempDir::new("symlink");
    let path = dir.0.join("control.sock");
    let victim = dir.0.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&victim, &path).unwrap();

    let err = bind_control(&path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("symlink") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    assert_eq!(std::fs::read_link(&path).unwrap(), victim);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "the symlink's target was chmodded");

    // A dangling one too (bind would otherwise create its target).
    std::fs::remove_file(&path).unwrap();
    let target = dir.0.join("nowhere.sock");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    assert!(bind_control(&path).is_err());
    assert!(!target.exists());
}

#[tokio::test]
async fn regular_file_at_the_path_is_left_alone() {
    let dir = TempDir::new("file");
    let path = dir.0.join("control.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let msg = bind_control(&path).unwrap_err().to_string();
    assert!(msg.contains("not a socket"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[tokio::test]
async fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = TempDir::new("stale");
    let path = dir.0.join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let live = bind_control(&path).expect("a stale socket is replaced");
    let err = bind_control(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    // The live one still answers.
    let client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (_server, _) = live.accept().await.unwrap();
    drop(client);
}

#[tokio::test]
async fn missing_directory_is_created_private_and_open_ones_are_refused() {
    let dir = TempDir::new("dirs");
    let path = dir.0.join("run/pool/control.sock");
    drop(bind_control(&path).unwrap());
    let mode = std::fs::metadata(dir.0.join("run/pool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let open = dir.0.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let msg = bind_control(&open.join("control.sock"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("writable by other users"), "{msg}");
}
