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

use std::sync::{Arc, Weak};
use std::time::Duration;

use pool_net::{PublicKey, Session};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
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
        format!("not a control request ({e}); commands: sessions, status, reload, config_check, config_apply, config_confirm, config_rollback")
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
        }
    }
}
