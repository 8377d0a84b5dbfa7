//! Checking a journal file: the chain, the `seq` run, and every signed
//! checkpoint (what `pool journal verify` prints).

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::canonical::{hex, unhex32};
use crate::record::{parse_line, Parsed};
use crate::series::{link_problem, sealed_files, Continuation, SeriesReport, CONTINUED_EVENT};
use crate::JournalError;

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The file checked.
    pub path: PathBuf,
    /// Lines that parsed as entries (intact or not), checkpoints included.
    pub entries: u64,
    /// `seq` of the first entry line, if any.
    pub first_seq: Option<u64>,
    /// `seq` of the last entry line, if any.
    pub last_seq: Option<u64>,
    /// `hash` of the last entry line. Keep it elsewhere: lines cut off the
    /// end of the file can only be detected against it.
    pub last_hash: Option<String>,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The hex key the checkpoints are signed with (the one given to
    /// [`verify_with_key`], or else the one the first checkpoint names).
    pub signing_key: Option<String>,
    /// Whether `signing_key` was given by the caller (pinned) rather than
    /// read from the file itself.
    pub key_pinned: bool,
    /// Entries no valid checkpoint signs, as line ranges with the reason,
    /// e.g. `lines 130-141: after the last checkpoint`. Only the unkeyed
    /// chain protects them. Not problems: a running node always has some.
    pub unsigned: Vec<String>,
    /// Every problem found, in line order, one per line at most, e.g.
    /// `line 7: edited (hash does not match its content)`. Empty when the
    /// chain is intact.
    pub problems: Vec<String>,
    /// Set when the file continues a rotated one (its first line is a
    /// `journal_continued` entry): whom it names, and where the chain
    /// picks up. [`verify_series`] checks the link.
    pub continues: Option<Continuation>,
}

impl VerifyReport {
    /// No problems were found.
    #[must_use]
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.path.display())?;
        match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => write!(f, "{} entries, seq {a} to {b}", self.entries)?,
            _ => write!(f, "no entries")?,
        }
        if let Some(c) = &self.continues {
            write!(f, " (continues {})", c.from_file)?;
        }
        match &self.signing_key {
            Some(k) => write!(
                f,
                "\n{} signed checkpoint(s), key {k}{}",
                self.checkpoints,
                if self.key_pinned {
                    " (as given)"
                } else {
                    " (named by the file itself: pass --key with the key you kept to rule out a forged file)"
                }
            )?,
            None => write!(
                f,
                "\nno signed checkpoint: only the unkeyed hash chain protects this file"
            )?,
        }
        for u in &self.unsigned {
            write!(f, "\n  unsigned: {u}")?;
        }
        if self.problems.is_empty() {
            write!(f, "\nthe chain and its checkpoints are intact")?;
            if let Some(h) = &self.last_hash {
                write!(
                    f,
                    "\nlast hash {h}\n(keep it elsewhere: lines removed from the end can only be detected against it)"
                )?;
            }
            return Ok(());
        }
        write!(f, "\n{} problem(s):", self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        write!(
            f,
            "\nThese lines were edited, removed or reordered after they were written, or a write was cut short. \
             Keep this file as evidence and compare it with your backups; to start a new journal, move it aside and restart the node."
        )
    }
}

/// [`verify_with_key`] without a pinned key: checkpoints are checked
/// against the key the file's first checkpoint names.
///
/// # Errors
///
/// As [`verify_with_key`].
pub fn verify(path: &Path) -> Result<VerifyReport, JournalError> {
    verify_with_key(path, None)
}

/// Checks a journal file: every line is an entry, every hash matches its
/// line, `seq` rises by exactly 1, every `prev` is the previous entry's
/// hash, every checkpoint's signature verifies under `key` (hex Ed25519,
/// from `pool journal pubkey`; `None`: the key the first checkpoint names)
/// and every entry a checkpoint signed still matches it. Problems are
/// reported, not returned as errors; `Err` only when the file cannot be
/// read or `key` is malformed.
///
/// With a key given, a file with entries but no checkpoint signed by it
/// is a problem (a file rewritten from scratch has none).
///
/// # Errors
///
/// [`JournalError::Read`] when the file cannot be read,
/// [`JournalError::NotAFile`] when `path` is not a regular file,
/// [`JournalError::BadPublicKey`] when `key` is not 64 hex digits.
pub fn verify_with_key(path: &Path, key: Option<&str>) -> Result<VerifyReport, JournalError> {
    use std::collections::btree_map::{BTreeMap, Entry};

    let pinned = match key {
        Some(k) => Some(unhex32(k.trim()).ok_or_else(|| JournalError::BadPublicKey {
            given: k.to_owned(),
        })?),
        None => None,
    };
    let read_err = |source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(JournalError::NotAFile {
            path: path.to_path_buf(),
        });
    }

    // Pass 1: parse every line; note where each seq first appears.
    let mut lines: Vec<Result<Parsed, String>> = Vec::new();
    let mut by_seq: BTreeMap<u64, (usize, [u8; 32])> = BTreeMap::new();
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(read_err)? == 0 {
            break;
        }
        let whole = buf.last() == Some(&b'\n');
        if whole {
            buf.pop();
        }
        let n = lines.len() + 1;
        let parsed = match parse_line(&buf) {
            Ok(_) if !whole => Err("incomplete (the file does not end with a newline)".to_owned()),
            Ok(p) => {
                if let Entry::Vacant(v) = by_seq.entry(p.seq) {
                    v.insert((n, p.hash));
                }
                Ok(p)
            }
            Err(r) => Err(format!("not a journal entry ({r})")),
        };
        lines.push(parsed);
    }

    // Pass 2: walk the entries in file order.
    let mut report = VerifyReport {
        path: path.to_path_buf(),
        entries: 0,
        first_seq: None,
        last_seq: None,
        last_hash: None,
        checkpoints: 0,
        signing_key: pinned.map(|k| hex(&k)),
        key_pinned: pinned.is_some(),
        unsigned: Vec::new(),
        problems: Vec::new(),
        continues: None,
    };
    // A file that continues a rotated one starts where the sealed file
    // ended: its first `seq` and `prev` are the continuation's.
    if let Some(Ok(first)) = lines.first() {
        if let Some(from_file) = &first.continues {
            report.continues = Some(Continuation {
                from_file: from_file.clone(),
                seq: first.seq,
                prev: hex(&first.prev),
            });
        }
    }
    let start_seq = report.continues.as_ref().map_or(1, |c| c.seq);
    // At most one problem per line, the first found.
    let mut problems: BTreeMap<usize, String> = BTreeMap::new();
    let mut max_seq: Option<u64> = None;
    let mut prev_seq: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let p = match line {
            Ok(p) => p,
            Err(r) => {
                problems.insert(n, r.clone());
                continue;
            }
        };
        report.entries += 1;
        report.first_seq.get_or_insert(p.seq);
        report.last_seq = Some(p.seq);
        report.last_hash = Some(hex(&p.hash));
        let s = p.seq;
        let problem = if !p.content_ok {
            Some("edited (hash does not match its content)".to_owned())
        } else if p.continues.is_some() && n != 1 {
            Some(format!(
                "a `{CONTINUED_EVENT}` entry not on the first line (files joined, or lines moved)"
            ))
        } else if !p.canonical_ok {
            Some("edited (reformatted; its content still matches its hash)".to_owned())
        } else if let Some(&(m, _)) = by_seq.get(&s).filter(|(m, _)| *m != n) {
            Some(format!("duplicate (seq {s} is also on line {m})"))
        } else {
            let expected = max_seq.map_or(start_seq, |m| m.saturating_add(1));
            let after = prev_seq.map_or_else(|| "the start".to_owned(), |t| t.to_string());
            if s == expected {
                if s == 1 {
                    (p.prev != [0u8; 32])
                        .then(|| "chain broken (the first entry's prev is not zero)".to_owned())
                } else {
                    match by_seq.get(&(s - 1)) {
                        Some((m, h)) if *h != p.prev => {
                            Some(format!("chain broken (prev does not match line {m})"))
                        }
                        _ => None,
                    }
                }
            } else if s > expected {
                if by_seq.range(expected..s).next().is_some() {
                    Some(format!("out of order (seq {s} after {after})"))
                } else if s - expected == 1 {
                    Some(format!("entry seq {expected} missing before it (removed?)"))
                } else {
                    Some(format!(
                        "entries seq {expected} to {} missing before it (removed?)",
                        s - 1
                    ))
                }
            } else {
                Some(format!("out of order (seq {s} after {after})"))
            }
        };
        if let Some(problem) = problem {
            problems.insert(n, problem);
        }
        max_seq = Some(max_seq.map_or(s, |m| m.max(s)));
        prev_seq = Some(s);
    }

    // Pass 3: checkpoints. The first line of each seq is the one checked.
    let mut key = pinned;
    let line_of = |seq: u64| by_seq.get(&seq).map(|(m, _)| *m);
    // seq -> whether a valid checkpoint signed it.
    let mut signed: std::collections::HashSet<u64> = std::collections::HashSet::new();
    // Line numbers of checkpoints whose signature and range are good.
    let mut valid: std::collections::HashSet<usize> = std::collections::HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let Ok(p) = line else { continue };
        let Some(cp) = &p.checkpoint else { continue };
        let cp = match cp {
            Ok(cp) => cp,
            Err(r) => {
                problems
                    .entry(n)
                    .or_insert_with(|| format!("checkpoint malformed ({r})"));
                continue;
            }
        };
        let want = *key.get_or_insert(cp.key);
        let problem = if cp.key != want {
            Some(if pinned.is_some() {
                format!(
                    "checkpoint signed by key {}, not by the key given",
                    hex(&cp.key)
                )
            } else {
                format!(
                    "checkpoint signed by key {}, earlier ones by {} (was the key file replaced?)",
                    hex(&cp.key),
                    hex(&want)
                )
            })
        } else if !cp.signature_ok {
            Some(
                "checkpoint signature does not verify (the checkpoint was forged or edited)"
                    .to_owned(),
            )
        } else if cp.to_seq.checked_add(1) != Some(p.seq)
            || cp.to_seq.saturating_add(1).saturating_sub(cp.from_seq) != cp.leaves.len() as u64
            || cp.from_seq > p.seq
        {
            Some(
                "checkpoint malformed (its range does not match its place or its leaves)"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(problem) = problem {
            problems.entry(n).or_insert(problem);
            continue;
        }
        report.checkpoints += 1;
        valid.insert(n);
        for (j, leaf) in cp.leaves.iter().enumerate() {
            let s = cp.from_seq + j as u64;
            signed.insert(s);
            let Some(m) = line_of(s) else { continue };
            if let Some(Ok(e)) = lines.get(m - 1) {
                if e.leaf != *leaf {
                    problems.entry(m).or_insert_with(|| {
                        format!("edited (does not match what the checkpoint on line {n} signed)")
                    });
                }
            }
        }
    }
    report.signing_key = key.map(|k| hex(&k));
    let any_checkpoint = lines
        .iter()
        .any(|l| matches!(l, Ok(p) if p.checkpoint.is_some()));
    if pinned.is_some() && report.entries > 0 && !any_checkpoint {
        problems.entry(1).or_insert_with(|| {
            "no checkpoint signed by the key given in the whole file (rewritten from scratch? \
             a journal younger than a minute may have none yet)"
                .to_owned()
        });
    }

    // Unsigned ranges: entries (not checkpoints) no valid checkpoint signed.
    let checkpoint_lines: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, Ok(p) if p.checkpoint.is_some()))
        .map(|(i, _)| i + 1)
        .collect();
    let mut run: Option<(usize, usize)> = None;
    let mut runs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let unsigned = matches!(line, Ok(p) if p.checkpoint.is_none() && !signed.contains(&p.seq));
        match (unsigned, run) {
            (true, Some((a, b))) if b + 1 == n => run = Some((a, n)),
            (true, _) => {
                if let Some(r) = run.take() {
                    runs.push(r);
                }
                run = Some((n, n));
            }
            (false, _) => {
                if let Some(r) = run.take() {
                    runs.push(r);
                }
            }
        }
    }
    runs.extend(run);
    for (a, b) in runs {
        let lines = if a == b {
            format!("line {a}")
        } else {
            format!("lines {a}-{b}")
        };
        let why = match checkpoint_lines.iter().find(|&&c| c > b) {
            None => "after the last checkpoint (recent, or the node stopped without one)".to_owned(),
            Some(c) if valid.contains(c) => {
                "before a checkpoint that does not sign them (the node restarted without a clean stop)"
                    .to_owned()
            }
            Some(c) => format!("the checkpoint on line {c} that follows them is not valid"),
        };
        report.unsigned.push(format!("{lines}: {why}"));
    }
    report.problems = problems
        .into_iter()
        .map(|(n, p)| format!("line {n}: {p}"))
        .collect();
    Ok(report)
}

/// The files of the series whose live file is `active`: its sealed files
/// (`active.000001`, ...) oldest first, then `active` itself if it exists.
///
/// # Errors
///
/// [`JournalError::Read`] when the directory cannot be listed.
pub fn series_files(active: &Path) -> Result<Vec<PathBuf>, JournalError> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let read_err = |source| JournalError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        if let Some(n) = entry.map_err(read_err)?.file_name().to_str() {
            names.push(n.to_owned());
        }
    }
    let mut out: Vec<PathBuf> = sealed_files(active, &names)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if active.exists() {
        out.push(active.to_path_buf());
    }
    Ok(out)
}

/// Checks a series of journal files, oldest first: each file as
/// [`verify_with_key`] does, and that each file after the first starts
/// with a `journal_continued` entry chaining to the last hash of the file
/// before it (so a file missing from the middle, lines cut off the end of
/// a sealed file, or a journal started afresh are named).
///
/// # Errors
///
/// As [`verify_with_key`], for any of the files.
pub fn verify_series(files: &[PathBuf], key: Option<&str>) -> Result<SeriesReport, JournalError> {
    let mut reports: Vec<VerifyReport> = Vec::with_capacity(files.len());
    let mut links = Vec::new();
    for path in files {
        let r = verify_with_key(path, key)?;
        if let Some(earlier) = reports.last() {
            links.extend(link_problem(earlier, &r));
        }
        reports.push(r);
    }
    Ok(SeriesReport {
        files: reports,
        links,
    })
}
