//! The control protocol: what `pool ctl` and `pool config` ask a daemon,
//! typed on both ends. One request per connection, one JSON line each way:
//! `{"cmd": "status"}` → `{...}` or `{"error": "..."}`.
//!
//! Two ways in, one set of commands ([`Daemon::execute`]):
//! - the control socket (`[node] control`, owner-only Unix socket): the
//!   node's own operator, every command;
//! - the `pool.control` service over POOL, for the keys listed in
//!   `[control]`: `admins` run every command, `readers` only those that
//!   change nothing ([`Request::changes_anything`]). Other keys are refused
//!   by the router with [`RESET_FORBIDDEN`](crate::router::RESET_FORBIDDEN).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use pool_net::{PublicKey, Session};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::warn;

use crate::bridge::Preamble;
use crate::daemon::Daemon;
use crate::router::{Incoming, ServeFuture, Service};

/// The control service's name on POOL streams.
pub const CONTROL_SERVICE: &str = "pool.control";

/// The longest request line (a config file travels in one).
pub const MAX_REQUEST: usize = 1 << 20;

/// How long a client has to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// One command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The live sessions.
    Sessions,
    /// Key, listeners, bridges, counters, the pending change.
    Status,
    /// Re-read the config file and apply it (like SIGHUP).
    Reload,
    /// Check a config text and say what applying it would change.
    ConfigCheck {
        /// The whole config file.
        text: String,
    },
    /// Apply a config text; unless confirmed within the time given, the
    /// daemon goes back to the config it replaced.
    ConfigApply {
        /// The whole config file.
        text: String,
        /// Seconds until the automatic rollback; 0: keep it at once.
        confirm_within_secs: u64,
    },
    /// Keep the pending change.
    ConfigConfirm,
    /// Go back from the pending change now.
    ConfigRollback,
    /// Seal the journal and start a new file that continues its chain.
    JournalRotate,
    /// Hand one accepted session to another worker.
    Handoff {
        /// A session id (prefix) or peer-key prefix from `ctl sessions`.
        session: String,
        /// The target worker's POOL address, `HOST:PORT`.
        to: String,
        /// The target worker's key (it must be in `[handoff] peers`).
        to_key: String,
    },
    /// Hand every accepted session to another worker, then report.
    Drain {
        /// The target worker's POOL address, `HOST:PORT`.
        to: String,
        /// The target worker's key (it must be in `[handoff] peers`).
        to_key: String,
        /// How long streams left here are forwarded (default: `[handoff]
        /// forward_deadline`).
        #[serde(default)]
        deadline_secs: Option<u64>,
    },
}

impl Request {
    /// Whether the command changes the node (needs an admin over POOL).
    pub fn changes_anything(&self) -> bool {
        !matches!(
            self,
            Request::Sessions | Request::Status | Request::ConfigCheck { .. }
        )
    }

    /// The command's name as `pool` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Sessions => "ctl sessions",
            Request::Status => "ctl status",
            Request::Reload => "ctl reload",
            Request::ConfigCheck { .. } => "config check",
            Request::ConfigApply { .. } => "config apply",
            Request::ConfigConfirm => "config confirm",
            Request::ConfigRollback => "config rollback",
            Request::JournalRotate => "journal rotate",
            Request::Handoff { .. } => "ctl handoff",
            Request::Drain { .. } => "ctl drain",
        }
    }
}

/// Who is asking: the local operator, or a key over POOL.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The control socket.
    Local,
    /// A peer over the control service.
    Remote(PublicKey),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Local => f.write_str("control socket"),
            Caller::Remote(k) => write!(f, "{k}"),
        }
    }
}

/// An error reply.
pub fn error_reply(msg: impl std::fmt::Display) -> serde_json::Value {
    json!({ "error": msg.to_string() })
}

/// Reads one request line (at most [`MAX_REQUEST`] bytes) from `r`.
///
/// # Errors
///
/// A message for the reply when the line is too long, late, or not a
/// request.
pub async fn read_request<R: AsyncRead + Unpin>(r: R) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut r = BufReader::new(r).take(MAX_REQUEST as u64 + 1);
    match tokio::time::timeout(REQUEST_WAIT, r.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("no request within 10 s".into()),
        Ok(Err(e)) => return Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| {
        format!("not a control request ({e}); commands: sessions, status, reload, config_check, config_apply, config_confirm, config_rollback, handoff, drain")
    })
}

/// Writes one reply line.
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, v: &serde_json::Value) {
    let mut text = v.to_string();
    text.push('\n');
    let _ = w.write_all(text.as_bytes()).await;
    let _ = w.flush().await;
}

/// The reset code of a stream read error (`stream reset by peer (code N)`).
pub fn reset_code(e: &std::io::Error) -> Option<u64> {
    if e.kind() != std::io::ErrorKind::ConnectionReset {
        return None;
    }
    let text = e.to_string();
    let at = text.rfind("(code ")? + 6;
    text[at..].trim_end_matches(')').parse().ok()
}

/// Sends `req` on a new stream of `session` (to the peer's control
/// service) and returns the reply. Used by `pool ctl --node`.
///
/// # Errors
///
/// The daemon's `error`, or why the stream failed; a reset is explained.
pub async fn request_over(
    session: &Session,
    me: &PublicKey,
    req: &Request,
) -> Result<serde_json::Value, String> {
    let stream = session
        .open_stream()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let (rs, mut ws) = stream.into_split();
    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let pre = Preamble {
        source: unspecified,
        destination: unspecified,
        service: CONTROL_SERVICE.into(),
    };
    let mut out = pre.encode();
    out.extend_from_slice(&serde_json::to_vec(req).map_err(|e| e.to_string())?);
    out.push(b'\n');
    ws.write_all(&out)
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut line = Vec::new();
    let mut r = BufReader::new(rs);
    match r.read_until(b'\n', &mut line).await {
        Ok(_) if !line.is_empty() => {}
        Ok(_) => return Err("the node closed the stream without an answer".into()),
        Err(e) => {
            let code = reset_code(&e);
            return Err(match code {
                Some(crate::router::RESET_FORBIDDEN) => format!(
                    "the node refuses this key ({}) for its control service: it is not in the node's [control] admins or readers",
                    me
                ),
                Some(crate::router::RESET_NO_SERVICE) => {
                    "the node has no control service (no [control] admins or readers in its config)".to_string()
                }
                _ => format!("the node reset the stream: {e}"),
            });
        }
    }
    let v: serde_json::Value =
        serde_json::from_slice(&line).map_err(|e| format!("bad answer from the node: {e}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(e.to_string());
    }
    Ok(v)
}

/// The control service on POOL streams: roles from `[control]`.
pub struct ControlService {
    daemon: Weak<Daemon>,
    admins: Vec<PublicKey>,
}

impl ControlService {
    /// A service for `daemon` in which `admins` may change things and
    /// every other key the router lets in may only read.
    pub fn new(daemon: Weak<Daemon>, admins: Vec<PublicKey>) -> Arc<Self> {
        Arc::new(ControlService { daemon, admins })
    }
}

impl Service for ControlService {
    /// A command runs against this node: it does not move with a handoff.
    fn handoff_policy(&self) -> pool_net::StreamPolicy {
        pool_net::StreamPolicy::Reset
    }

    fn serve(self: Arc<Self>, s: Incoming) -> ServeFuture {
        Box::pin(async move {
            let mut ws = s.send;
            let reply = match read_request(s.recv).await {
                Err(e) => error_reply(e),
                Ok(req) if req.changes_anything() && !self.admins.contains(&s.peer) => {
                    warn!(peer = %s.peer, cmd = req.name(), "control: a reader asked to change the node; refused");
                    error_reply(format!(
                        "key {} may only read on this node ([control] readers); `pool {}` needs a key in [control] admins",
                        s.peer,
                        req.name()
                    ))
                }
                Ok(req) => match self.daemon.upgrade() {
                    Some(d) => d.execute(req, Caller::Remote(s.peer)).await,
                    None => error_reply("the daemon is stopping"),
                },
            };
            write_reply(&mut ws, &reply).await;
            let _ = ws.shutdown().await;
        })
    }
}

fn plan_reply(plan: &crate::apply::Plan) -> serde_json::Value {
    json!({"ok": true, "changes": plan.changes, "restart_needed": plan.restart_needed})
}

impl Daemon {
    /// Runs one control command for `caller` (its role already checked).
    pub async fn execute(self: &Arc<Self>, req: Request, caller: Caller) -> serde_json::Value {
        let by = caller.to_string();
        let source = || {
            self.config_path
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("<config>"))
        };
        match req {
            Request::Sessions => serde_json::to_value(self.sessions()).unwrap_or_default(),
            Request::Status => self.status(),
            Request::JournalRotate => match self.rotate_journal().await {
                Ok(Some(p)) => json!({"sealed": p.display().to_string()}),
                Ok(None) => json!({"sealed": null}),
                Err(e) => error_reply(e),
            },
            Request::Reload => match self.reload().await {
                Ok(plan) => plan_reply(&plan),
                Err(e) => error_reply(format!("not applied, the running config is unchanged: {e}")),
            },
            Request::ConfigCheck { text } => match self.check_text(&text, &source()) {
                Ok(plan) => plan_reply(&plan),
                Err(e) => error_reply(e),
            },
            Request::ConfigApply {
                text,
                confirm_within_secs,
            } => {
                let within =
                    (confirm_within_secs > 0).then(|| Duration::from_secs(confirm_within_secs));
                match self.apply_confirmed(&text, within, &by).await {
                    Ok((plan, pending)) => {
                        let mut v = plan_reply(&plan);
                        v["pending"] = json!(pending.map(|p| json!({
                            "sha256": p.sha256, "seconds_left": p.seconds_left(),
                        })));
                        v
                    }
                    Err(e) => {
                        error_reply(format!("not applied, the running config is unchanged: {e}"))
                    }
                }
            }
            Request::ConfigConfirm => match self.confirm(&by) {
                Ok(p) => json!({"ok": true, "sha256": p.sha256}),
                Err(e) => error_reply(e),
            },
            Request::ConfigRollback => match self.rollback("rollback").await {
                Ok(plan) => plan_reply(&plan),
                Err(e) => error_reply(e),
            },
            Request::Handoff {
                session,
                to,
                to_key,
            } => self.ctl_handoff(&session, &to, &to_key).await,
            Request::Drain {
                to,
                to_key,
                deadline_secs,
            } => {
                self.ctl_drain(&to, &to_key, deadline_secs.map(Duration::from_secs))
                    .await
            }
        }
    }
}

/// Binds the control socket at `path` so that it is private (mode 0600,
/// owned by this user) from the moment it exists there.
///
/// Binding at `path` and then `chmod`-ing it would leave a moment in which
/// the socket has the umask's mode, and `chmod` follows a symlink swapped
/// in meanwhile. Setting the umask instead is process-wide, so it would
/// race with the runtime's other threads. So the socket is bound inside a
/// fresh directory of mode 0700 beside `path` (nobody else can enter it),
/// made 0600 there, and renamed onto `path`: `rename` replaces what is at
/// `path` and never follows a symlink.
///
/// What may already be at `path`: nothing, or a stale socket (no daemon
/// answers on it), which is replaced. A socket a daemon answers on, a
/// symlink, or any other file is refused and left alone. A missing parent
/// directory is created with mode 0700; one that others may write to
/// (without the sticky bit) is refused, since they could replace the socket.
///
/// # Errors
///
/// As above, or when the operating system refuses a step; the message names
/// the path and what to do.
pub fn bind_control(path: &Path) -> std::io::Result<UnixListener> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let at = |what: String| format!("control socket {}: {what}", path.display());
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, at("not a file path".into())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let dmode = std::fs::metadata(dir)?.permissions().mode();
    if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            at(format!(
                "its directory {} is writable by other users (mode {:o}) without the sticky bit, so they could replace the socket;                  use a private directory (e.g. /run/pool, mode 0755 or 0700)",
                dir.display(),
                dmode & 0o7777
            )),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    at("a running daemon answers on it; stop that one first, or choose another [node] control path".into()),
                ));
            }
            // Stale: the rename below replaces it.
        }
        Ok(m) => {
            let kind = if m.file_type().is_symlink() {
                "a symlink"
            } else if m.is_dir() {
                "a directory"
            } else {
                "a file that is not a socket"
            };
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                at(format!(
                    "{kind} is in the way; refusing to replace or follow it (remove it if it is not needed)"
                )),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let private = dir.join(format!(
        ".{}.{}.{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        u64::from_le_bytes(nonce)
    ));
    // mkdir never follows or reuses anything at `private`.
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("sock");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Removes the control socket at shutdown: only a socket, never what
/// someone put in its place.
pub(crate) fn remove_control(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves `pool ctl` on a Unix socket, readable and writable by the owner only.
pub(crate) fn serve_control(path: &Path, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let listener = bind_control(path)?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let d = daemon.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let reply = match read_request(r).await {
                    Ok(req) => d.execute(req, Caller::Local).await,
                    Err(e) => error_reply(e),
                };
                write_reply(&mut w, &reply).await;
            });
        }
    });
    Ok(())
}
