//! Rotation and series, without I/O: what a sealed file is called, when the
//! writer rotates by itself, and how the files of a series link up.
//!
//! A journal `journal.log` that was rotated is a **series**: the sealed
//! files `journal.log.000001`, `journal.log.000002`, ... (numbered in the
//! order they were sealed; a number never moves to another file) and the
//! live `journal.log`. Each file after the first starts with a
//! `journal_continued` entry whose `seq` is one more than the sealed file's
//! last and whose `prev` is its last `hash`, so the chain runs across the
//! files as if they were one.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Event, VerifyReport};

/// The event of a file's first line when it continues a sealed file.
pub const CONTINUED_EVENT: &str = Event::JournalContinued.name();

/// Digits of a sealed file's number (`journal.log.000001`): names sort in
/// the order the files were sealed.
const INDEX_DIGITS: usize = 6;

/// How a [`Journal`](crate::Journal) is kept: set with the chained setters,
/// pass to [`Journal::open_with`](crate::Journal::open_with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalConfig {
    rotate_bytes: Option<u64>,
}

impl JournalConfig {
    /// Rotate by itself once the live file holds `bytes` or more (0: only
    /// when asked, [`Journal::rotate`](crate::Journal::rotate)).
    #[must_use]
    pub fn rotate_at_bytes(mut self, bytes: u64) -> Self {
        self.rotate_bytes = (bytes > 0).then_some(bytes);
        self
    }

    /// Whether a live file of `len` bytes is due for rotation.
    #[must_use]
    pub fn rotation_due(&self, len: u64) -> bool {
        self.rotate_bytes.is_some_and(|max| len >= max)
    }
}

/// The path of the `index`th sealed file of the live journal `active`:
/// `journal.log` → `journal.log.000001`.
#[must_use]
pub fn sealed_path(active: &Path, index: u32) -> PathBuf {
    let mut name = active.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{index:0INDEX_DIGITS$}"));
    active.with_file_name(name)
}

/// The number of a sealed file of `active_name` (`journal.log.000007` → 7),
/// `None` for any other name.
fn sealed_index(active_name: &str, name: &str) -> Option<u32> {
    let digits = name.strip_prefix(active_name)?.strip_prefix('.')?;
    if digits.len() < INDEX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&i| i > 0)
}

/// The sealed files of `active` among `names` (the file names in its
/// directory), oldest first, with their numbers.
pub(crate) fn sealed_files<I, S>(active: &Path, names: I) -> Vec<(u32, PathBuf)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let Some(active_name) = active.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, PathBuf)> = names
        .into_iter()
        .filter_map(|n| {
            let n = n.as_ref();
            sealed_index(active_name, n).map(|i| (i, active.with_file_name(n)))
        })
        .collect();
    out.sort_unstable_by_key(|(i, _)| *i);
    out
}

/// The number the next sealed file of `active` takes: one more than the
/// highest among `names`, so a number is never reused (even when older
/// files were archived away).
pub(crate) fn next_index<I, S>(active: &Path, names: I) -> u32
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    sealed_files(active, names)
        .last()
        .map_or(1, |(i, _)| i.saturating_add(1))
}

/// What a file's first line says about the file it continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    /// The sealed file's name when it was sealed.
    pub from_file: String,
    /// `seq` of the `journal_continued` line (the sealed file's last + 1).
    pub seq: u64,
    /// Its `prev`: the sealed file's last hash.
    pub prev: String,
}

/// The problem, if any, in the link from file `earlier` to the file right
/// after it in a series, `later`.
pub(crate) fn link_problem(earlier: &VerifyReport, later: &VerifyReport) -> Option<String> {
    let (e, l) = (earlier.path.display(), later.path.display());
    let Some(c) = &later.continues else {
        return Some(format!(
            "{l}: line 1: does not continue {e} (its first line is not a `{CONTINUED_EVENT}` entry: \
             a new journal was started here, or its first lines were removed)"
        ));
    };
    if earlier.last_hash.as_deref() != Some(c.prev.as_str()) {
        return Some(format!(
            "{l}: line 1: does not continue from the last line of {e} (it names {} as its predecessor; \
             lines were cut off the end of {e}, or a file of the series is missing or was replaced)",
            c.from_file
        ));
    }
    if earlier.last_seq.and_then(|s| s.checked_add(1)) != Some(c.seq) {
        return Some(format!(
            "{l}: line 1: seq {} does not follow the last seq of {e}",
            c.seq
        ));
    }
    None
}

/// What [`verify_series`](crate::verify_series) found: each file's report,
/// oldest first, and the problems in the links between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesReport {
    /// One report per file, in series order.
    pub files: Vec<VerifyReport>,
    /// Problems between files (a missing file, a cut end, a new journal).
    pub links: Vec<String>,
}

impl SeriesReport {
    /// Every file is intact and each continues the one before it.
    #[must_use]
    pub fn is_intact(&self) -> bool {
        self.links.is_empty() && self.files.iter().all(VerifyReport::is_intact)
    }

    /// Every problem, each naming its file: `FILE: line N: what`, in series
    /// order.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            let later = self.files.get(i + 1).map(|l| l.path.display().to_string());
            for p in &f.problems {
                out.push(format!("{}: {p}", f.path.display()));
            }
            if let Some(later) = later {
                out.extend(
                    self.links
                        .iter()
                        .filter(|p| p.starts_with(&format!("{later}:")))
                        .cloned(),
                );
            }
        }
        out
    }

    /// The last hash of the last file.
    #[must_use]
    pub fn last_hash(&self) -> Option<&str> {
        self.files.last().and_then(|f| f.last_hash.as_deref())
    }
}

impl fmt::Display for SeriesReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, file) in self.files.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{file}")?;
        }
        if let Some(first) = self.files.first() {
            if let Some(c) = &first.continues {
                write!(
                    f,
                    "\nthe series starts by continuing {} (seq {}), which is not here (archived or deleted): \
                     entries before seq {} are not checked",
                    c.from_file, c.seq, c.seq
                )?;
            }
        }
        let problems = self.problems();
        if problems.is_empty() {
            write!(
                f,
                "\nseries of {} file(s): every file is intact and continues the one before it",
                self.files.len()
            )?;
            if let Some(h) = self.last_hash() {
                write!(f, "; last hash {h}")?;
            }
            return Ok(());
        }
        write!(
            f,
            "\nseries of {} file(s): {} problem(s):",
            self.files.len(),
            problems.len()
        )?;
        for p in problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_names_sort_and_never_reuse_a_number() {
        let active = Path::new("/var/lib/pool/journal.log");
        assert_eq!(
            sealed_path(active, 1),
            Path::new("/var/lib/pool/journal.log.000001")
        );
        assert_eq!(
            sealed_path(active, 1234567),
            Path::new("/var/lib/pool/journal.log.1234567")
        );
        let names = [
            "journal.log",
            "journal.log.key",
            "journal.log.000010",
            "journal.log.000002",
            "journal.log.bad",
            "journal.log.12",
            "journal.log.000000",
            "other.log.000003",
            "journal.log.000003.gz",
        ];
        let found: Vec<u32> = sealed_files(active, names)
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(found, [2, 10]);
        assert_eq!(next_index(active, names), 11);
        assert_eq!(next_index(active, ["journal.log"]), 1);
    }

    #[test]
    fn size_policy() {
        let never = JournalConfig::default();
        assert!(!never.rotation_due(u64::MAX));
        assert!(!JournalConfig::default()
            .rotate_at_bytes(0)
            .rotation_due(1 << 40));
        let c = JournalConfig::default().rotate_at_bytes(1000);
        assert!(!c.rotation_due(999));
        assert!(c.rotation_due(1000));
    }

    fn report(
        path: &str,
        last_seq: u64,
        last_hash: &str,
        continues: Option<(u64, &str)>,
    ) -> VerifyReport {
        VerifyReport {
            path: PathBuf::from(path),
            entries: 3,
            first_seq: Some(1),
            last_seq: Some(last_seq),
            last_hash: Some(last_hash.to_owned()),
            checkpoints: 1,
            signing_key: None,
            key_pinned: false,
            unsigned: Vec::new(),
            problems: Vec::new(),
            continues: continues.map(|(seq, prev)| Continuation {
                from_file: "j.000001".to_owned(),
                seq,
                prev: prev.to_owned(),
            }),
        }
    }

    #[test]
    fn links_name_the_later_file() {
        let a = report("j.000001", 10, "aa", None);
        assert_eq!(
            link_problem(&a, &report("j", 20, "bb", Some((11, "aa")))),
            None
        );
        let fresh = link_problem(&a, &report("j", 20, "bb", None)).unwrap();
        assert!(
            fresh.starts_with("j: line 1: does not continue j.000001"),
            "{fresh}"
        );
        let cut = link_problem(&a, &report("j", 20, "bb", Some((11, "ab")))).unwrap();
        assert!(cut.contains("cut off the end of j.000001"), "{cut}");
        let seq = link_problem(&a, &report("j", 20, "bb", Some((12, "aa")))).unwrap();
        assert!(seq.contains("seq 12"), "{seq}");

        let mut edited = a.clone();
        edited.problems.push("line 7: edited".to_owned());
        let s = SeriesReport {
            files: vec![edited, report("j", 20, "bb", Some((11, "aa")))],
            links: Vec::new(),
        };
        assert!(!s.is_intact());
        assert_eq!(s.problems(), ["j.000001: line 7: edited"]);
    }
}
