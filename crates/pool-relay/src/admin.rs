//! The relay's control socket (`--control`): `pool relay enroll`,
//! `unenroll` and `status`. One JSON request line per connection, one
//! JSON reply line: `{"cmd": "status"}` → `{...}` or `{"error": "..."}`.
//! The socket is the owner's only (mode 0600, in a private directory).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pool_core::PublicKey;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::warn;

use crate::config::PeerConfig;
use crate::state::Shared;

/// The longest request line.
const MAX_REQUEST: u64 = 64 << 10;

/// One request to a relay's control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum RelayRequest {
    /// Enrol a peer relay (or change its address and caps).
    Enroll {
        /// Where it listens, `HOST:PORT`.
        addr: String,
        /// Its relay key.
        key: String,
        /// Its cap of circuits open at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_circuits: Option<usize>,
        /// Its cap of bytes per second towards us (0: none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rate: Option<u64>,
    },
    /// End the enrolment of a peer relay (it is told, and stops too).
    Unenroll {
        /// Its relay key.
        key: String,
    },
    /// Counters, peers, per-peer and per-node accounting.
    Status,
}

/// Answers one request.
pub(crate) fn execute(shared: &Arc<Shared>, req: RelayRequest) -> serde_json::Value {
    match req {
        RelayRequest::Enroll {
            addr,
            key,
            max_circuits,
            max_rate,
        } => {
            if shared.cfg.key.is_none() {
                return json!({"error": "this relay has no key (start it with --key FILE) so it cannot peer"});
            }
            let key = match PublicKey::from_token(&key) {
                Ok(k) => k,
                Err(e) => return json!({"error": format!("--relay-key {key}: {e}")}),
            };
            if Some(key) == shared.cfg.key.as_ref().map(|k| k.public_key()) {
                return json!({"error": "that is this relay's own key"});
            }
            let p = PeerConfig {
                addr,
                key,
                max_circuits,
                max_rate,
            };
            let new = crate::link::start_peer(shared, &p, "operator");
            json!({"enrolled": key.to_string(), "new": new, "addr": p.addr})
        }
        RelayRequest::Unenroll { key } => {
            let key = match PublicKey::from_token(&key) {
                Ok(k) => k,
                Err(e) => return json!({"error": format!("--relay-key {key}: {e}")}),
            };
            if shared.end_enrolment(&key, "operator", "the operator ended the enrolment") {
                json!({"ended": key.to_string()})
            } else {
                json!({"error": format!("relay {key} is not enrolled here")})
            }
        }
        RelayRequest::Status => shared.status(),
    }
}

/// Serves the control socket until the relay stops.
pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let mut stop = shared.stopping.subscribe();
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        let Ok((sock, _)) = conn else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = sock.into_split();
            let mut line = Vec::new();
            let mut r = BufReader::new(rd).take(MAX_REQUEST + 1);
            let read =
                tokio::time::timeout(Duration::from_secs(10), r.read_until(b'\n', &mut line)).await;
            let reply = match read {
                Ok(Ok(_)) if (line.len() as u64) <= MAX_REQUEST => {
                    match serde_json::from_slice::<RelayRequest>(&line) {
                        Ok(req) => execute(&shared, req),
                        Err(e) => {
                            json!({"error": format!("not a relay control request ({e}); commands: enroll, unenroll, status")})
                        }
                    }
                }
                Ok(Ok(_)) => json!({"error": "request too long"}),
                Ok(Err(e)) => json!({"error": format!("cannot read the request: {e}")}),
                Err(_) => json!({"error": "no request within 10 s"}),
            };
            let mut text = reply.to_string();
            text.push('\n');
            let _ = wr.write_all(text.as_bytes()).await;
        });
    }
}

/// Binds the control socket (owner only), as the daemon does.
pub(crate) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let l = pool_node::control::bind_control(path);
    if let Err(e) = &l {
        warn!(path = %path.display(), error = %e, "relay: cannot bind the control socket");
    }
    l
}
