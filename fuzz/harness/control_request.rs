//! A control-socket request line, as the daemon reads it (`pool ctl`
//! sends `{"cmd": "..."}` and a newline to the owner-only socket).
//!
//! The daemon parses the line inline, in the task `serve_control`
//! (`crates/pool-node/src/daemon.rs`) spawns per connection; dispatching
//! needs a running daemon. No pure function is there to call, so this
//! target runs the smallest pure piece as a copy of those expressions:
//! the line as `BufReader::lines` hands it over, JSON, the `cmd` field,
//! and the reply to an unknown command. Keep [`command`] and [`unknown`]
//! in step with `serve_control` (or move them into pool-node and call them
//! from both).

use serde_json::{json, Value};

/// The command named by a request line (`""` if none), as `serve_control`
/// reads it.
pub(crate) fn command(line: &str) -> String {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get("cmd").and_then(|c| c.as_str()).map(String::from))
        .unwrap_or_default()
}

/// `serve_control`'s reply to a command it does not know.
pub(crate) fn unknown(other: &str) -> Value {
    json!({"error": format!("unknown command `{other}` (try: sessions, status, reload)")})
}

pub(crate) fn run(data: &[u8]) {
    // `next_line` fails on bytes that are not UTF-8 (the task then ends)
    // and strips "\n" or "\r\n".
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let line = text.split('\n').next().unwrap_or("");
    let line = if text.contains('\n') {
        line.strip_suffix('\r').unwrap_or(line)
    } else {
        line
    };
    let cmd = command(line);
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        if let Some(c) = v.get("cmd").and_then(Value::as_str) {
            assert_eq!(cmd, c);
        }
    }
    match cmd.as_str() {
        "sessions" | "status" | "reload" => {}
        other => {
            // One line back, whatever the request held: the client reads
            // up to the first newline.
            let mut reply = unknown(other).to_string();
            assert!(!reply.contains('\n'), "reply spans lines: {reply:?}");
            reply.push('\n');
            let back: Value = serde_json::from_str(&reply).expect("the reply is JSON");
            let msg = back["error"].as_str().expect("an error text");
            assert!(msg.contains(other));
        }
    }
}
