//! The shim's settings, read once from the environment when the library
//! is loaded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Where the local daemon's shim listener is when `POOL_SHIM_DAEMON` is unset.
pub const DEFAULT_DAEMON: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9256);

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
    /// `POOL_SHIM_DAEMON`.
    pub daemon: SocketAddr,
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
        let daemon = match get("POOL_SHIM_DAEMON") {
            Some(t) if !t.trim().is_empty() => match t.trim().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    problems.push(format!(
                        "POOL_SHIM_DAEMON: `{t}` is not IP:PORT; using {DEFAULT_DAEMON}"
                    ));
                    DEFAULT_DAEMON
                }
            },
            _ => DEFAULT_DAEMON,
        };
        let s = Settings {
            disabled: truthy(get("POOL_SHIM_DISABLE").as_deref()),
            fallback: truthy(get("POOL_SHIM_FALLBACK").as_deref()),
            ports,
            daemon,
        };
        (s, problems)
    }

    /// Whether a connection to `dest` (v4-mapped addresses already
    /// unwrapped) goes through the daemon.
    pub fn intercepts(&self, dest: SocketAddr) -> bool {
        !self.disabled
            && dest.port() != 0
            && self.ports.selected(dest.port())
            && dest != self.daemon
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
        assert_eq!(s.daemon, DEFAULT_DAEMON);
        assert!(s.intercepts("10.0.0.1:80".parse().unwrap()));
        assert!(!s.intercepts(DEFAULT_DAEMON), "never the daemon itself");
        let (s, problems) = settings(&[
            ("POOL_SHIM_PORTS", "80"),
            ("POOL_SHIM_FALLBACK", "1"),
            ("POOL_SHIM_DAEMON", "[::1]:7000"),
        ]);
        assert!(problems.is_empty());
        assert!(s.fallback);
        assert!(s.intercepts("[fd00::1]:80".parse().unwrap()));
        assert!(!s.intercepts("10.0.0.1:81".parse().unwrap()));
        let (s, problems) = settings(&[("POOL_SHIM_DISABLE", "1"), ("POOL_SHIM_DAEMON", "nope")]);
        assert_eq!(problems.len(), 1);
        assert!(!s.intercepts("10.0.0.1:80".parse().unwrap()));
    }
}
