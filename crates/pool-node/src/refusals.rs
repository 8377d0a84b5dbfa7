//! Refused handshakes, journaled in aggregate per source and window, so
//! that an unauthenticated sender cannot fill the disk or the journal's
//! queue (the daemon feeds it from the listener's events).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pool_journal::Event;
use pool_net::PublicKey;
use serde_json::json;

/// Refusals journaled at once per source and window: the first, and the
/// first of each further distinct key, up to this many.
const REFUSALS_AT_ONCE: usize = 3;
/// Distinct reasons and keys a `handshake_refusals` line lists.
const REFUSALS_LISTED: usize = 4;
/// Refusals journaled at once per window, all sources together.
const REFUSALS_AT_ONCE_TOTAL: usize = 100;
/// Sources tracked per window; refusals from more go to one line for all.
const REFUSAL_SOURCES: usize = 256;

/// Refused handshakes, aggregated per source (an IPv4 address or an IPv6
/// /64) and window, so that an unauthenticated sender cannot fill the
/// disk or the journal's queue. Per source and window: up to
/// [`REFUSALS_AT_ONCE`] `handshake_refused` lines at once (the first
/// refusal, then the first of each new key), then one
/// `handshake_refusals` line with the count of the rest when the window
/// ends. At most [`REFUSAL_SOURCES`] sources are tracked; refusals from
/// others are summed into one line for `"source": "other"`; and at most
/// [`REFUSALS_AT_ONCE_TOTAL`] lines per window are journaled at once, all
/// sources together. So however many addresses send garbage, a window
/// adds at most 100 + 257 lines.
pub(crate) struct RefusalLog {
    window: Duration,
    sources: HashMap<std::net::IpAddr, RefusalWindow>,
    other: RefusalWindow,
    /// Lines that may still be journaled at once in the window that
    /// started at `budget_from`.
    budget: usize,
    budget_from: Option<Instant>,
}

#[derive(Default)]
struct RefusalWindow {
    opened: Option<Instant>,
    /// Keys whose refusal was journaled at once (`None`: no key).
    journaled: Vec<Option<PublicKey>>,
    /// Refusals not journaled one by one.
    count: u64,
    reasons: Vec<String>,
    keys: Vec<String>,
}

impl RefusalWindow {
    fn note(&mut self, key: Option<PublicKey>, reason: &str) {
        self.count += 1;
        if self.reasons.len() < REFUSALS_LISTED && !self.reasons.iter().any(|r| r == reason) {
            self.reasons.push(reason.to_owned());
        }
        if let Some(k) = key.map(|k| k.to_string()) {
            if self.keys.len() < REFUSALS_LISTED && !self.keys.contains(&k) {
                self.keys.push(k);
            }
        }
    }

    fn summary(&self, source: &str, window: Duration) -> serde_json::Value {
        json!({
            "source": source,
            "count": self.count,
            "reasons": self.reasons,
            "keys": self.keys,
            "window_secs": window.as_secs(),
        })
    }
}

impl RefusalLog {
    pub(crate) fn new(window: Duration) -> Self {
        RefusalLog {
            window,
            sources: HashMap::new(),
            other: RefusalWindow::default(),
            budget: REFUSALS_AT_ONCE_TOTAL,
            budget_from: None,
        }
    }

    /// Takes one refusal; the lines to journal now go to `out`.
    pub(crate) fn refused(
        &mut self,
        now: Instant,
        from: std::net::SocketAddr,
        key: Option<PublicKey>,
        reason: &str,
        out: &mut Vec<(Event, serde_json::Value)>,
    ) {
        let source = crate::net::address_bucket(from.ip());
        if self
            .budget_from
            .is_none_or(|t| now.duration_since(t) >= self.window)
        {
            self.budget_from = Some(now);
            self.budget = REFUSALS_AT_ONCE_TOTAL;
        }
        if let Some(w) = self.sources.get(&source) {
            if w.opened
                .is_some_and(|t| now.duration_since(t) >= self.window)
            {
                self.end(source, out);
            }
        }
        if !self.sources.contains_key(&source) && self.sources.len() >= REFUSAL_SOURCES {
            self.other.note(key, reason);
            return;
        }
        let w = self.sources.entry(source).or_default();
        w.opened.get_or_insert(now);
        if self.budget > 0 && w.journaled.len() < REFUSALS_AT_ONCE && !w.journaled.contains(&key) {
            self.budget -= 1;
            w.journaled.push(key);
            out.push((
                Event::HandshakeRefused,
                json!({"from": from.to_string(), "source": source.to_string(), "key": key.map(|k| k.to_string()), "reason": reason}),
            ));
        } else {
            w.note(key, reason);
        }
    }

    fn end(&mut self, source: std::net::IpAddr, out: &mut Vec<(Event, serde_json::Value)>) {
        if let Some(w) = self.sources.remove(&source) {
            if w.count > 0 {
                out.push((
                    Event::HandshakeRefusals,
                    w.summary(&source.to_string(), self.window),
                ));
            }
        }
    }

    /// Ends the windows that are over (all of them with `all`).
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        all: bool,
        out: &mut Vec<(Event, serde_json::Value)>,
    ) {
        let over: Vec<std::net::IpAddr> = self
            .sources
            .iter()
            .filter(|(_, w)| {
                all || w
                    .opened
                    .is_none_or(|t| now.duration_since(t) >= self.window)
            })
            .map(|(s, _)| *s)
            .collect();
        for s in over {
            self.end(s, out);
        }
        if self.other.count > 0 {
            out.push((
                Event::HandshakeRefusals,
                self.other.summary("other", self.window),
            ));
            self.other = RefusalWindow::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        pool_net::SecretKey::from_bytes([n; 32]).public_key()
    }

    #[test]
    fn refusals_are_aggregated_per_source_and_window() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10));
        let mut out = Vec::new();
        let a: std::net::SocketAddr = "[2001:db8:1:2::1]:1000".parse().unwrap();
        let b: std::net::SocketAddr = "[2001:db8:1:2::ffff]:2000".parse().unwrap();
        // No key, then three keys: three lines at once, the rest counted.
        log.refused(t0, a, None, "bad mac", &mut out);
        log.refused(t0, b, None, "bad mac", &mut out);
        log.refused(t0, a, Some(key(1)), "untrusted", &mut out);
        log.refused(t0, a, Some(key(2)), "untrusted", &mut out);
        log.refused(t0, a, Some(key(3)), "untrusted", &mut out);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out
            .iter()
            .all(|(e, v)| *e == "handshake_refused" && v["source"] == "2001:db8:1:2::"));
        out.clear();
        log.expire(t0 + Duration::from_secs(5), false, &mut out);
        assert!(out.is_empty());
        log.expire(t0 + Duration::from_secs(10), false, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let (event, v) = &out[0];
        assert_eq!(*event, "handshake_refusals");
        assert_eq!(v["count"], 2);
        assert_eq!(v["keys"], json!([key(3).to_string()]));
        assert_eq!(v["reasons"], json!(["bad mac", "untrusted"]));
        // A new window starts with a line at once again.
        out.clear();
        log.refused(t0 + Duration::from_secs(11), a, None, "bad mac", &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn sources_past_the_cap_share_one_line() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10));
        let mut out = Vec::new();
        for i in 0..REFUSAL_SOURCES as u32 + 100 {
            let from = std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1));
            log.refused(t0, from, None, "bad mac", &mut out);
        }
        // At once: the global budget, not one per source.
        assert_eq!(out.len(), REFUSALS_AT_ONCE_TOTAL);
        out.clear();
        log.expire(t0, true, &mut out);
        // One summary per tracked source past the budget, one for the rest.
        assert_eq!(
            out.len(),
            REFUSAL_SOURCES - REFUSALS_AT_ONCE_TOTAL + 1,
            "{out:?}"
        );
        let other = out.iter().find(|(_, v)| v["source"] == "other").unwrap();
        assert_eq!(other.1["count"], 100);
    }
}
