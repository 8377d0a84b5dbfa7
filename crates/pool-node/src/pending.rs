//! `pool config apply --confirm-within`: a change that undoes itself.
//!
//! Applying with a deadline writes the previous config text to
//! `STATE_DIR/pending-config.json` (with the deadline as wall-clock time),
//! then the new text to the config file, then swaps the new config in.
//! `pool config confirm` deletes the pending file; `pool config rollback`,
//! or the deadline passing, applies the previous text again and writes it
//! back to the config file. A daemon that starts and finds a pending file
//! (it was killed, or the host rebooted) arms the rollback for the original
//! deadline, or rolls back at once if it has passed. One change may be
//! pending at a time.
//!
//! The default deadline, 2 minutes, is long enough to check a change over a
//! slow link and type `pool config confirm`, and short enough that an
//! operator who cut themselves off waits little to get back in (Junos uses
//! 10 minutes; a fleet's control plane should recover faster than that).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pool_journal::Event;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{error, info, warn};

use crate::apply::Plan;
use crate::daemon::{Daemon, DaemonError};
use crate::keys::sha256_hex;

/// The deadline `pool config apply` uses when none is given.
pub const DEFAULT_CONFIRM_WITHIN: Duration = Duration::from_secs(120);

/// A failed automatic rollback is tried again after this long.
const RETRY: Duration = Duration::from_secs(10);

/// A change applied with a deadline, not yet confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChange {
    /// The config text to go back to.
    pub previous_text: String,
    /// Its SHA-256.
    pub previous_sha256: String,
    /// The SHA-256 of the config applied.
    pub sha256: String,
    /// When it rolls back: milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
    /// Who applied it.
    pub applied_by: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PendingChange {
    /// Time left until the automatic rollback.
    pub fn time_left(&self) -> Duration {
        Duration::from_millis(self.deadline_unix_ms.saturating_sub(now_ms()))
    }

    /// Whole seconds left, rounded up (what people are told).
    pub fn seconds_left(&self) -> u64 {
        self.time_left().as_millis().div_ceil(1000) as u64
    }
}

/// Writes `text` to `path` atomically: a new file beside it, fsynced, then
/// renamed over it, so a crash leaves the old file or the new, never half.
pub fn write_atomic(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

impl Daemon {
    fn pending_path(&self) -> PathBuf {
        self.state_dir.join("pending-config.json")
    }

    /// The pending change, if one is.
    pub fn pending(&self) -> Option<PendingChange> {
        self.pending.lock().ok()?.clone()
    }

    fn set_pending(&self, p: Option<PendingChange>) {
        if let Ok(mut g) = self.pending.lock() {
            *g = p;
        }
    }

    /// `pool config apply`: applies `text`; with a deadline, arms the
    /// automatic rollback. The config file (when the daemon has one) is
    /// rewritten to `text`, so a reload or restart keeps what runs.
    pub async fn apply_confirmed(
        self: &Arc<Self>,
        text: &str,
        within: Option<Duration>,
        by: &str,
    ) -> Result<(Plan, Option<PendingChange>), DaemonError> {
        if let Some(p) = self.pending() {
            return Err(DaemonError::Pending(format!(
                "a change applied by {} is pending (rolls back in {} s): run `pool config confirm` or `pool config rollback` first",
                p.applied_by,
                p.seconds_left()
            )));
        }
        let source = self
            .config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("<applied config>"));
        // Checked before anything is written.
        crate::config::Config::parse(text, &source)?;
        let (_, previous) = self.running_config();
        let pending = within.map(|w| PendingChange {
            previous_sha256: sha256_hex(&previous),
            previous_text: previous.clone(),
            sha256: sha256_hex(text),
            deadline_unix_ms: now_ms() + w.as_millis() as u64,
            applied_by: by.to_owned(),
        });
        if let Some(p) = &pending {
            let json = serde_json::to_string_pretty(p).unwrap_or_default();
            std::fs::create_dir_all(&self.state_dir)
                .and_then(|()| write_atomic(&self.pending_path(), &json, 0o600))
                .map_err(|e| {
                    DaemonError::State(format!(
                        "cannot write {}: {e}; nothing was applied",
                        self.pending_path().display()
                    ))
                })?;
        }
        let undo_files = |me: &Daemon| {
            let _ = std::fs::remove_file(me.pending_path());
            if let Some(path) = &me.config_path {
                let _ = write_atomic(path, &previous, 0o600);
            }
        };
        if let Some(path) = &self.config_path {
            if let Err(e) = write_atomic(path, text, 0o600) {
                undo_files(self);
                return Err(DaemonError::State(format!(
                    "cannot write the config file {}: {e}; nothing was applied",
                    path.display()
                )));
            }
        }
        let plan = match self.apply_text(text, &source, "apply").await {
            Ok(p) => p,
            Err(e) => {
                undo_files(self);
                return Err(e);
            }
        };
        if let Some(p) = &pending {
            self.journal(
                Event::ConfigPending,
                json!({"sha256": p.sha256, "previous_sha256": p.previous_sha256,
                       "confirm_within_secs": within.map(|w| w.as_secs()), "by": by}),
            );
            self.set_pending(Some(p.clone()));
            self.arm_rollback(p.clone());
        }
        Ok((plan, pending))
    }

    /// `pool config confirm`: keeps the pending change.
    pub fn confirm(&self, by: &str) -> Result<PendingChange, DaemonError> {
        let Some(p) = self.pending() else {
            return Err(DaemonError::Pending("no change is pending".into()));
        };
        std::fs::remove_file(self.pending_path()).map_err(|e| {
            DaemonError::State(format!(
                "cannot remove {}: {e}; the change is still pending",
                self.pending_path().display()
            ))
        })?;
        self.set_pending(None);
        info!(sha256 = %p.sha256, "pending configuration confirmed");
        self.journal(
            Event::ConfigConfirmed,
            json!({"sha256": p.sha256, "by": by, "seconds_left": p.seconds_left()}),
        );
        Ok(p)
    }

    /// `pool config rollback` (`how` = `rollback`) or the deadline
    /// (`automatic_rollback`): goes back to the config the pending change
    /// replaced.
    pub async fn rollback(self: &Arc<Self>, how: &str) -> Result<Plan, DaemonError> {
        let Some(p) = self.pending() else {
            return Err(DaemonError::Pending("no change is pending".into()));
        };
        let source = self
            .config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("<previous config>"));
        let plan = self.apply_text(&p.previous_text, &source, how).await?;
        if let Some(path) = &self.config_path {
            if let Err(e) = write_atomic(path, &p.previous_text, 0o600) {
                error!(file = %path.display(), "rolled back, but cannot write the config file: {e}");
            }
        }
        let _ = std::fs::remove_file(self.pending_path());
        self.set_pending(None);
        warn!(how, to = %p.previous_sha256, "configuration rolled back");
        self.journal(
            Event::ConfigRolledBack,
            json!({"how": how, "from_sha256": p.sha256, "to_sha256": p.previous_sha256,
                   "applied_by": p.applied_by}),
        );
        Ok(plan)
    }

    /// Rolls `p` back at its deadline unless it is confirmed, rolled back
    /// or replaced first.
    fn arm_rollback(self: &Arc<Self>, p: PendingChange) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut wait = p.time_left();
            loop {
                tokio::time::sleep(wait).await;
                let Some(d) = me.upgrade() else { return };
                if d.pending().as_ref() != Some(&p) {
                    return;
                }
                match d.rollback("automatic_rollback").await {
                    Ok(_) => return,
                    Err(e) => {
                        error!(
                            "automatic rollback failed, trying again in {} s: {e}",
                            RETRY.as_secs()
                        );
                        wait = RETRY;
                    }
                }
            }
        });
    }

    /// At start: a change left pending by a daemon that was killed or
    /// restarted rolls back at its original deadline.
    pub(crate) fn resume_pending(self: &Arc<Self>) -> Result<(), DaemonError> {
        let path = self.pending_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(DaemonError::State(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let p: PendingChange = serde_json::from_str(&text).map_err(|e| {
            DaemonError::State(format!(
                "{} is not a pending change ({e}); remove it if the change it held is not wanted back",
                path.display()
            ))
        })?;
        let running = sha256_hex(&self.running_config().1);
        if running != p.sha256 {
            // The config file was changed by hand since: the pending change
            // no longer describes what runs, and rolling back would undo
            // an edit nobody asked to undo.
            warn!(
                file = %path.display(),
                "a pending configuration change does not match the running config (edited since?); dropping it, nothing is rolled back"
            );
            self.journal(
                Event::ConfigPendingDropped,
                json!({"sha256": p.sha256, "running_sha256": running}),
            );
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        warn!(
            seconds_left = p.seconds_left(),
            "a configuration change is pending from before the restart; it rolls back at its deadline unless confirmed"
        );
        self.set_pending(Some(p.clone()));
        self.arm_rollback(p);
        Ok(())
    }
}
