//! The event trace of one schedule: the last lines (for a report), all of
//! them on request, and a SHA-256 over every line (so two runs of a seed
//! can be compared without keeping everything).

use std::collections::VecDeque;

use ring::digest::{Context, SHA256};

/// Lines kept for a report.
pub const TRACE_TAIL: usize = 40;

/// What happened in one schedule, line by line.
pub struct Trace {
    keep_all: bool,
    all: Vec<String>,
    tail: VecDeque<String>,
    lines: u64,
    digest: Context,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trace({} lines)", self.lines)
    }
}

impl Trace {
    /// A trace keeping the last [`TRACE_TAIL`] lines, or all with `keep_all`.
    pub fn new(keep_all: bool) -> Self {
        Trace {
            keep_all,
            all: Vec::new(),
            tail: VecDeque::with_capacity(TRACE_TAIL + 1),
            lines: 0,
            digest: Context::new(&SHA256),
        }
    }

    /// Appends a line.
    pub fn push(&mut self, line: String) {
        self.lines += 1;
        self.digest.update(line.as_bytes());
        self.digest.update(b"\n");
        if self.keep_all {
            self.all.push(line.clone());
        }
        if self.tail.len() == TRACE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// Lines pushed so far.
    pub fn len(&self) -> u64 {
        self.lines
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// SHA-256 of every line so far, hex.
    pub fn fingerprint(&self) -> String {
        let d = self.digest.clone().finish();
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The last lines (all of them if the trace keeps all).
    pub fn lines(&self) -> Vec<&str> {
        if self.keep_all {
            self.all.iter().map(String::as_str).collect()
        } else {
            self.tail.iter().map(String::as_str).collect()
        }
    }

    /// The last [`TRACE_TAIL`] lines, one per line, with a note of how many
    /// came before.
    pub fn render_tail(&self) -> String {
        let mut out = String::new();
        let skipped = self.lines.saturating_sub(self.tail.len() as u64);
        if skipped > 0 {
            out.push_str(&format!("  ... {skipped} earlier events\n"));
        }
        for l in &self.tail {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}
