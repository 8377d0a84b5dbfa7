//! The daemon's config parser (`pool_node::config::Config::parse`: TOML
//! text to a checked config), then what the daemon derives from a config
//! it accepted. Must never panic.
//!
//! Input: the file's bytes (text that is not UTF-8 cannot be read as a
//! config; `Config::load` fails on it before parsing).
//!
//! Checked: an accepted config holds only what `parse` promises (keys and
//! ranges that print and read back as themselves, non-zero unique exposed
//! ports, unique names and services, no two bridges on one port) and gives
//! sane limits; a refused one says which file, and each of its problems
//! says what is wrong; parsing is deterministic.

use std::path::Path;

use pool_node::config::Config;
use pool_node::shim::Cidr;

pub(crate) fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/pool/fuzz.toml");
    match Config::parse(text, path) {
        Ok(cfg) => {
            let mut names = std::collections::HashSet::new();
            for b in &cfg.tcp2pool {
                assert!(names.insert(&b.name));
                let k = pool_core::PublicKey::from_token(&b.peer_key.to_string());
                assert_eq!(k.ok(), Some(b.peer_key));
                let l = b.limits();
                assert!(l.max_connections >= 1);
                assert!(!l.connect_timeout.is_zero());
            }
            let mut services = std::collections::HashSet::new();
            for t in &cfg.pool2tcp {
                assert!(services.insert(&t.service));
                assert!(!t.target.is_empty());
                assert!(t.limits().max_connections >= 1);
            }
            if let Some(s) = &cfg.shim {
                assert!(s.limits().max_connections >= 1);
            }
            for r in &cfg.route {
                assert_eq!(Cidr::parse(&r.cidr.to_string()), Some(r.cidr));
            }
            let mut ports = std::collections::HashSet::new();
            for e in &cfg.expose {
                assert!(e.port != 0 && ports.insert(e.port));
            }
            let again = Config::parse(text, path).expect("accepted once, accepted again");
            assert_eq!(again.tcp2pool, cfg.tcp2pool);
            assert_eq!(again.route, cfg.route);
            assert_eq!(again.expose, cfg.expose);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("/etc/pool/fuzz.toml"), "{msg}");
            assert!(e.problems().iter().all(|p| !p.message.is_empty()));
            assert!(Config::parse(text, path).is_err());
        }
    }
}
