//! An authorized-keys file others can write is refused by the relay, as by
//! the daemon (crates/pool-node/tests/secret_file_permissions.rs): the
//! error names the file and says `chmod go-w FILE`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pool_net::SecretKey;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("pool-perms-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn pubkey(n: u8) -> String {
    SecretKey::from_bytes([n; 32]).public_key().to_string()
}

#[test]
fn writable_authorized_file_is_refused_by_relay() {
    let dir = TempDir::new("authorized");
    let a = dir.0.join("authorized");
    write(&a, &format!("{} alice\n", pubkey(3)), 0o664);
    let err = pool_relay::load_authorized(&a).unwrap_err().to_string();
    assert!(
        err.contains(&format!("chmod go-w {}", a.display())),
        "{err}"
    );

    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(pool_relay::load_authorized(&a).unwrap().len(), 1);
}
