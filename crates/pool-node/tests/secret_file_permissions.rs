//! Secret files others can read are refused, as ssh refuses such a private
//! key: the fleet secret and the node key (the error names the file and
//! says `chmod 600 FILE`). Trust files others can write are refused too:
//! the known-peers (TOFU pin) file and authorized-keys files, for the
//! daemon (the relay's side is
//! crates/pool-relay/tests/authorized_file_permissions.rs). Pins are
//! written mode 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pool_net::{KnownPeers, SecretKey};
use pool_node::config::TrustSection;
use pool_node::daemon::{build_trust, load_or_create_key};

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
fn readable_fleet_secret_is_refused_with_the_fix() {
    let dir = TempDir::new("fleet");
    let f = dir.0.join("fleet.secret");
    let kp = dir.0.join("known_peers");
    let section = TrustSection {
        fleet_secret: Some(f.clone()),
        ..TrustSection::default()
    };
    for mode in [0o644, 0o640, 0o604, 0o660] {
        write(&f, "a fleet secret of more than sixteen characters\n", mode);
        let err = build_trust(&section, &kp).unwrap_err().to_string();
        assert!(
            err.contains(&format!("chmod 600 {}", f.display())),
            "mode {mode:o}: {err}"
        );
        assert!(
            err.contains(&format!("fleet secret {}", f.display())),
            "{err}"
        );
    }
    write(
        &f,
        "a fleet secret of more than sixteen characters\n",
        0o600,
    );
    assert!(build_trust(&section, &kp).is_ok());
    write(
        &f,
        "a fleet secret of more than sixteen characters\n",
        0o400,
    );
    assert!(build_trust(&section, &kp).is_ok());
}

#[test]
fn readable_node_key_is_refused_with_the_fix() {
    let dir = TempDir::new("key");
    let k = dir.0.join("node.key");
    let text = SecretKey::from_bytes([7; 32]).to_file_text();
    write(&k, &text, 0o644);
    let err = load_or_create_key(&k, false).unwrap_err().to_string();
    assert!(err.contains(&format!("chmod 600 {}", k.display())), "{err}");
    // Even with `create`: an existing key is never replaced.
    assert!(load_or_create_key(&k, true).is_err());
    assert_eq!(std::fs::read_to_string(&k).unwrap(), text);
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load_or_create_key(&k, false).is_ok());
    // A key made by the daemon is private.
    let fresh = dir.0.join("fresh.key");
    load_or_create_key(&fresh, true).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn writable_known_peers_file_is_refused() {
    let dir = TempDir::new("known");
    let kp = dir.0.join("known_peers");
    let section = TrustSection {
        tofu: true,
        known_peers: Some(kp.clone()),
        ..TrustSection::default()
    };
    write(&kp, &format!("host.example:9253 {}\n", pubkey(1)), 0o666);
    let err = build_trust(&section, &kp).unwrap_err().to_string();
    assert!(
        err.contains(&format!("chmod go-w {}", kp.display())),
        "{err}"
    );
    for mode in [0o620, 0o602] {
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(build_trust(&section, &kp).is_err(), "mode {mode:o}");
    }
    // Readable by others is fine (public keys); writable is not.
    std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(build_trust(&section, &kp).is_ok());

    // A new pin file is created 0600.
    let fresh = dir.0.join("fresh_known_peers");
    let mut store = KnownPeers::load(&fresh).unwrap();
    store
        .pin(
            "host.example:9253",
            SecretKey::from_bytes([2; 32]).public_key(),
        )
        .unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn writable_authorized_file_is_refused_by_daemon() {
    let dir = TempDir::new("authorized");
    let a = dir.0.join("authorized");
    write(&a, &format!("{} alice\n", pubkey(3)), 0o664);
    let section = TrustSection {
        authorized: Some(a.clone()),
        ..TrustSection::default()
    };
    let err = build_trust(&section, &dir.0.join("kp"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("chmod go-w {}", a.display())),
        "{err}"
    );

    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    let trust = build_trust(&section, &dir.0.join("kp")).unwrap();
    assert_eq!(trust.key_count(), 1);
}
