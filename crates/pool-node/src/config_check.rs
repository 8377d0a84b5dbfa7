//! The checks of a parsed config against itself: duplicates, conflicts and
//! values that only make sense together. Each problem names its line (found
//! from the section's position in the text) and how to fix it; nothing is
//! skipped, and every problem is reported, not just the first.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::{Config, Problem};

/// The node's own services; other `pool.` names are reserved.
pub const NODE_SERVICES: [&str; 5] = [
    crate::services::DISCARD_SERVICE,
    crate::control::CONTROL_SERVICE,
    crate::handoff_test::HANDOFF_TEST_SERVICE,
    crate::handoff::HANDOFF_SERVICE,
    crate::handoff::FORWARD_SERVICE,
];

/// The line (1-based) of `key` in the `index`-th `header` section of
/// `text` (`header` as written: `[[tcp2pool]]`, `[node]`), or of the
/// header itself when `key` is `None` or not written there.
pub fn line_of(text: &str, header: &str, index: usize, key: Option<&str>) -> Option<usize> {
    let mut seen = 0usize;
    let mut inside = false;
    let mut header_line = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let h: String = line
                .split('#')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            if inside {
                break;
            }
            if h == header {
                if seen == index {
                    inside = true;
                    header_line = Some(n + 1);
                    if key.is_none() {
                        break;
                    }
                }
                seen += 1;
            }
            continue;
        }
        if inside {
            if let Some(k) = key {
                if let Some(rest) = line.strip_prefix(k) {
                    if rest.trim_start().starts_with('=') {
                        return Some(n + 1);
                    }
                }
            }
        }
    }
    header_line
}

struct Problems<'a> {
    text: &'a str,
    out: Vec<Problem>,
}

impl Problems<'_> {
    fn at(&mut self, header: &str, index: usize, key: Option<&str>, message: String) {
        let line = line_of(self.text, header, index, key);
        self.out.push(Problem { line, message });
    }
}

/// Two listen addresses that cannot both be bound: the same port on the
/// same address, or on a wildcard address and any other.
/// Port 0 (any free port) never clashes.
fn clash(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(x), Ok(y)) => {
            x.port() == y.port()
                && x.port() != 0
                && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
        }
        _ => a == b && !a.ends_with(":0"),
    }
}

/// Every problem of `cfg` (parsed from `text`), in file order.
pub fn check(cfg: &Config, text: &str) -> Vec<Problem> {
    let mut p = Problems {
        text,
        out: Vec::new(),
    };
    let mut names: HashMap<&str, usize> = HashMap::new();
    // Listen addresses already taken: (address, what).
    let mut listens: Vec<(String, String)> = Vec::new();
    if !cfg.node.listen.is_empty() {
        listens.push((cfg.node.listen.clone(), "[node] listen".into()));
    }
    if let Some(m) = cfg.node.metrics.as_ref().filter(|m| !m.is_empty()) {
        listens.push((m.clone(), "[node] metrics".into()));
    }
    for (i, b) in cfg.tcp2pool.iter().enumerate() {
        if let Some(first) = names.insert(&b.name, i) {
            p.at(
                "[[tcp2pool]]",
                i,
                Some("name"),
                format!(
                    "two [[tcp2pool]] sections are named `{}` (the other is number {}); give each its own name",
                    b.name,
                    first + 1
                ),
            );
        }
        if b.listen.is_empty() {
            p.at(
                "[[tcp2pool]]",
                i,
                Some("listen"),
                format!(
                    "[[tcp2pool]] `{}` has an empty listen address (write HOST:PORT)",
                    b.name
                ),
            );
        } else if let Some((_, what)) = listens.iter().find(|(l, _)| clash(l, &b.listen)) {
            p.at(
                "[[tcp2pool]]",
                i,
                Some("listen"),
                format!(
                    "[[tcp2pool]] `{}` listens on {}, which {what} already uses; choose another port",
                    b.name, b.listen
                ),
            );
        } else {
            listens.push((b.listen.clone(), format!("[[tcp2pool]] `{}`", b.name)));
        }
        reserved_name(&mut p, "[[tcp2pool]]", i, &b.service, false);
    }
    let mut services: HashMap<&str, usize> = HashMap::new();
    for (i, t) in cfg.pool2tcp.iter().enumerate() {
        if services.insert(&t.service, i).is_some() {
            p.at(
                "[[pool2tcp]]",
                i,
                Some("service"),
                format!(
                    "two [[pool2tcp]] sections have service `{}`; each service needs its own name",
                    t.service
                ),
            );
        }
        reserved_name(&mut p, "[[pool2tcp]]", i, &t.service, true);
        if t.target.is_empty() {
            p.at(
                "[[pool2tcp]]",
                i,
                Some("target"),
                "[[pool2tcp]] target is empty (write HOST:PORT)".into(),
            );
        }
    }
    if let Some(shim) = &cfg.shim {
        if let Some(l) = &shim.listen {
            p.at("[shim]", 0, Some("listen"), format!(
                "[shim] listen = \"{l}\" is gone: the shim now reaches the daemon over the Unix socket `socket` (default /run/pool/shim.sock), which checks who is calling; remove `listen`"
            ));
        }
        if !shim.socket.is_absolute() || shim.socket.as_os_str().len() > 100 {
            p.at(
                "[shim]",
                0,
                Some("socket"),
                format!(
                    "[shim] socket `{}` must be an absolute path of at most 100 bytes",
                    shim.socket.display()
                ),
            );
        }
        if let Err(e) = crate::shim::Allow::resolve_here(shim, 0) {
            p.at("[shim]", 0, None, format!("[shim] {e}"));
        }
    }
    let mut ports = HashMap::new();
    for (i, e) in cfg.expose.iter().enumerate() {
        if e.port == 0 || ports.insert(e.port, i).is_some() {
            p.at(
                "[[expose]]",
                i,
                Some("port"),
                format!("[[expose]] port {} is 0 or listed twice", e.port),
            );
        }
    }
    if !cfg.expose.is_empty() && cfg.node.listen.is_empty() {
        p.at(
            "[[expose]]",
            0,
            None,
            "[[expose]] needs [node] listen (the POOL listener)".into(),
        );
    }
    if !cfg.pool2tcp.is_empty() && cfg.node.listen.is_empty() {
        p.at(
            "[[pool2tcp]]",
            0,
            None,
            "[[pool2tcp]] needs [node] listen (the POOL listener)".into(),
        );
    }
    let has_control = !cfg.control.admins.is_empty() || !cfg.control.readers.is_empty();
    if has_control && cfg.node.listen.is_empty() {
        p.at(
            "[control]",
            0,
            None,
            "[control] needs [node] listen (the POOL listener)".into(),
        );
    }
    if let Some(k) = cfg
        .control
        .admins
        .iter()
        .find(|k| cfg.control.readers.contains(k))
    {
        p.at(
            "[control]",
            0,
            Some("readers"),
            format!("[control] key {k} is listed as both admin and reader; keep it in one list"),
        );
    }
    p.out.sort_by_key(|x| x.line.unwrap_or(usize::MAX));
    p.out
}

/// Names starting with `pool.` belong to the node, and `:` to the shim.
fn reserved_name(p: &mut Problems<'_>, header: &str, i: usize, name: &str, defines: bool) {
    if name.starts_with(':') {
        p.at(header, i, Some("service"), format!(
            "{header} service `{name}`: names starting with `:` are the shim's exposed ports ([[expose]]); choose another name"
        ));
    } else if name.starts_with("pool.") {
        if defines {
            p.at(header, i, Some("service"), format!(
                "{header} service `{name}`: names starting with `pool.` are reserved for the node's own services ({}); choose another name",
                NODE_SERVICES.join(", ")
            ));
        } else if !NODE_SERVICES.contains(&name) {
            p.at(header, i, Some("service"), format!(
                "{header} service `{name}`: there is no such node service (the node's own services are {})",
                NODE_SERVICES.join(", ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_by_section_and_key() {
        let text = "[node]\nlisten = \"x\"\n\n[[tcp2pool]]\nname = \"a\"\n\n[[tcp2pool]] # two\nname = \"b\"\nlisten=\"y\"\n[trust]\n";
        assert_eq!(line_of(text, "[node]", 0, Some("listen")), Some(2));
        assert_eq!(line_of(text, "[[tcp2pool]]", 0, None), Some(4));
        assert_eq!(line_of(text, "[[tcp2pool]]", 1, Some("name")), Some(8));
        assert_eq!(line_of(text, "[[tcp2pool]]", 1, Some("listen")), Some(9));
        assert_eq!(line_of(text, "[[tcp2pool]]", 1, Some("peer")), Some(7));
        assert_eq!(line_of(text, "[[tcp2pool]]", 2, None), None);
    }

    #[test]
    fn clashing_listens() {
        assert!(clash("127.0.0.1:80", "127.0.0.1:80"));
        assert!(clash("[::]:80", "127.0.0.1:80"));
        assert!(clash("0.0.0.0:80", "[::1]:80"));
        assert!(!clash("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
        assert!(clash("localhost:80", "localhost:80"));
        assert!(!clash("127.0.0.1:80", "127.0.0.1:81"));
    }
}
