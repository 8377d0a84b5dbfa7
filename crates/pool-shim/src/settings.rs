//! The shim's settings, read once from the environment when the library
//! is loaded.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The daemon's shim socket when `POOL_SHIM_SOCKET` is unset (the
/// daemon's `[shim] socket` default).
pub const DEFAULT_SOCKET: &str = "/run/pool/shim.sock";

/// Which destination ports are carried over POOL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ports {
    all: bool,
    bits: [u64; 1024],
}

impl Ports {
    /// Every port.
    pub fn all() -> Ports {
        Ports {
            all: true,
            bits: [0; 1024],
        }
    }

    /// `80,443,8000-8100`; empty, `*` or `all` for every port. Entries that
    /// do not parse are returned as errors (and skipped).
    pub fn parse(text: &str) -> (Ports, Vec<String>) {
        let text = text.trim();
        if text.is_empty() || text == "*" || text.eq_ignore_ascii_case("all") {
            return (Ports::all(), Vec::new());
        }
        let mut p = Ports {
            all: false,
            bits: [0; 1024],
        };
        let mut bad = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let range = match item.split_once('-') {
                Some((a, b)) => a
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .zip(b.trim().parse::<u16>().ok()),
                None => item.parse::<u16>().ok().map(|a| (a, a)),
            };
            match range {
                Some((a, b)) if a <= b => {
                    for port in a..=b {
                        p.bits[usize::from(port) / 64] |= 1 << (port % 64);
                    }
                }
                _ => bad.push(item.to_string()),
            }
        }
        (p, bad)
    }

    /// Whether `port` is selected.
    pub fn selected(&self, port: u16) -> bool {
        self.all || self.bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }
}

/// Everything the hooks need to decide.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `POOL_SHIM_DISABLE=1` (or this is the `pool` daemon itself).
    pub disabled: bool,
    /// `POOL_SHIM_FALLBACK=1`: plain TCP when the daemon is down.
    pub fallback: bool,
    /// `POOL_SHIM_PORTS`.
    pub ports: Ports,
    /// `POOL_SHIM_SOCKET`: the daemon's Unix socket.
    pub socket: PathBuf,
    /// `POOL_SHIM_DAEMON_UID`: the only uid (besides root) the daemon may
    /// run as. Unset: the owner of the socket's directory, which must be
    /// safe (see [`crate::peer`]).
    pub daemon_uid: Option<u32>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(
        v.map(str::trim),
        Some("1" | "true" | "yes" | "on" | "TRUE" | "YES" | "ON")
    )
}

impl Settings {
    /// From a lookup function (the environment, or a test's map). Problems
    /// are returned as messages for stderr.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> (Settings, Vec<String>) {
        let mut problems = Vec::new();
        let (ports, bad) = Ports::parse(&get("POOL_SHIM_PORTS").unwrap_or_default());
        for b in bad {
            problems.push(format!(
                "POOL_SHIM_PORTS: `{b}` is not a port or a range (skipped)"
            ));
        }
        let socket = match get("POOL_SHIM_SOCKET") {
            Some(t) if t.trim().starts_with('/') => PathBuf::from(t.trim()),
            Some(t) if !t.trim().is_empty() => {
                problems.push(format!(
                    "POOL_SHIM_SOCKET: `{t}` is not an absolute path; using {DEFAULT_SOCKET}"
                ));
                PathBuf::from(DEFAULT_SOCKET)
            }
            _ => PathBuf::from(DEFAULT_SOCKET),
        };
        if get("POOL_SHIM_DAEMON").is_some_and(|t| !t.trim().is_empty()) {
            problems.push(
                "POOL_SHIM_DAEMON is no longer used: the daemon is reached over its Unix socket (POOL_SHIM_SOCKET)"
                    .to_string(),
            );
        }
        let mut disabled = truthy(get("POOL_SHIM_DISABLE").as_deref());
        let daemon_uid = match get("POOL_SHIM_DAEMON_UID") {
            Some(t) if !t.trim().is_empty() => match t.trim().parse::<u32>() {
                Ok(u) => Some(u),
                Err(_) => {
                    // Never guess who the daemon is: carry nothing.
                    problems.push(format!(
                        "POOL_SHIM_DAEMON_UID: `{t}` is not a numeric uid; the shim is off in this process"
                    ));
                    disabled = true;
                    None
                }
            },
            _ => None,
        };
        let s = Settings {
            disabled,
            fallback: truthy(get("POOL_SHIM_FALLBACK").as_deref()),
            ports,
            socket,
            daemon_uid,
        };
        (s, problems)
    }

    /// Whether a connection to `dest` (v4-mapped addresses already
    /// unwrapped) goes through the daemon.
    pub fn intercepts(&self, dest: SocketAddr) -> bool {
        !self.disabled && dest.port() != 0 && self.ports.selected(dest.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> (Settings, Vec<String>) {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn ports_lists_ranges_and_all() {
        let (p, bad) = Ports::parse("80, 443,8000-8002,x,9-1");
        assert_eq!(bad, vec!["x".to_string(), "9-1".to_string()]);
        for port in [80, 443, 8000, 8001, 8002] {
            assert!(p.selected(port), "{port}");
        }
        for port in [0, 81, 442, 7999, 8003, 65535] {
            assert!(!p.selected(port), "{port}");
        }
        assert!(Ports::parse("").0.selected(12345));
        assert!(Ports::parse("all").0.selected(1));
        assert!(Ports::parse("65535").0.selected(65535));
    }

    #[test]
    fn defaults_and_skips() {
        let (s, problems) = settings(&[]);
        assert!(problems.is_empty());
        assert!(!s.fallback && !s.disabled);
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.daemon_uid, None);
        assert!(s.intercepts("10.0.0.1:80".parse().unwrap()));
        let (s, problems) = settings(&[
            ("POOL_SHIM_PORTS", "80"),
            ("POOL_SHIM_FALLBACK", "1"),
            ("POOL_SHIM_SOCKET", "/run/other/shim.sock"),
            ("POOL_SHIM_DAEMON_UID", "998"),
        ]);
        assert!(problems.is_empty());
        assert!(s.fallback);
        assert_eq!(s.socket, PathBuf::from("/run/other/shim.sock"));
        assert_eq!(s.daemon_uid, Some(998));
        assert!(s.intercepts("[fd00::1]:80".parse().unwrap()));
        assert!(!s.intercepts("10.0.0.1:81".parse().unwrap()));
        let (s, problems) = settings(&[
            ("POOL_SHIM_DISABLE", "1"),
            ("POOL_SHIM_SOCKET", "relative.sock"),
        ]);
        assert_eq!(problems.len(), 1);
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(!s.intercepts("10.0.0.1:80".parse().unwrap()));
        // The old TCP address is gone, and said so; a uid that is not a
        // number turns the shim off rather than trusting anyone.
        let (s, problems) = settings(&[
            ("POOL_SHIM_DAEMON", "127.0.0.1:9256"),
            ("POOL_SHIM_DAEMON_UID", "root"),
        ]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(s.disabled);
    }
}
