//! One journal line: how an entry is rendered (canonical form, `hash`,
//! the leaf a checkpoint signs) and parsed back.

use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::canonical::{canonical_object, format_ts, hex, unhex32, write_object};
use crate::checkpoint::{parse_checkpoint, Checkpoint, CHECKPOINT_EVENT};
use crate::series::CONTINUED_EVENT;

/// `prev` of the first entry.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Keys the journal sets itself; an event field with one of these names is
/// stored with a leading underscore instead.
const RESERVED: [&str; 5] = ["seq", "ts", "event", "prev", "hash"];
/// Bytes of an entry's digest listed in a checkpoint (128 bits: a second
/// preimage stays out of reach).
pub(crate) const LEAF_LEN: usize = 16;
/// Keys left out of an entry's leaf: they depend on the lines before it.
const NOT_IN_LEAF: [&str; 2] = ["prev", "hash"];

/// An entry waiting for the writer.
pub(crate) struct Pending {
    /// The event's name ([`Event::name`](crate::Event::name)).
    pub(crate) event: &'static str,
    pub(crate) fields: Value,
    pub(crate) at: SystemTime,
}

/// Renders one entry: its line in canonical form, its hash and its leaf.
pub(crate) fn render(seq: u64, prev: String, p: Pending) -> (String, String, [u8; LEAF_LEN]) {
    let mut obj = Map::new();
    match p.fields {
        Value::Object(fields) => {
            for (k, v) in fields {
                let k = if RESERVED.contains(&k.as_str()) {
                    format!("_{k}")
                } else {
                    k
                };
                obj.insert(k, v);
            }
        }
        Value::Null => {}
        other => {
            obj.insert("value".to_owned(), other);
        }
    }
    obj.insert("seq".to_owned(), Value::from(seq));
    obj.insert("ts".to_owned(), Value::String(format_ts(p.at)));
    obj.insert("event".to_owned(), Value::String(p.event.to_owned()));
    let leaf = leaf_of(&obj);
    obj.insert("prev".to_owned(), Value::String(prev));
    let hash = hex(&content_hash(&obj));
    obj.insert("hash".to_owned(), Value::String(hash.clone()));
    let mut line = String::new();
    canonical_object(&obj, &mut line);
    (line, hash, leaf)
}

/// An entry's leaf: SHA-256 of its canonical form without `prev` and
/// `hash`, cut to [`LEAF_LEN`] bytes.
pub(crate) fn leaf_of(obj: &Map<String, Value>) -> [u8; LEAF_LEN] {
    let mut s = String::new();
    write_object(
        obj.iter()
            .filter(|(k, _)| !NOT_IN_LEAF.contains(&k.as_str())),
        &mut s,
    );
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; LEAF_LEN];
    out.copy_from_slice(&d.as_ref()[..LEAF_LEN]);
    out
}

/// SHA-256 over the canonical form of `obj` without its `hash` key.
pub(crate) fn content_hash(obj: &Map<String, Value>) -> [u8; 32] {
    let mut s = String::new();
    write_object(obj.iter().filter(|(k, _)| k.as_str() != "hash"), &mut s);
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One line that parsed as an entry.
pub(crate) struct Parsed {
    pub(crate) seq: u64,
    pub(crate) prev: [u8; 32],
    pub(crate) hash: [u8; 32],
    /// `hash` matches the content.
    pub(crate) content_ok: bool,
    /// The line's bytes are the canonical form of its content.
    pub(crate) canonical_ok: bool,
    /// The entry's digest as a checkpoint lists it.
    pub(crate) leaf: [u8; LEAF_LEN],
    /// Set when the entry is a checkpoint: what it signs, or why it is
    /// malformed.
    pub(crate) checkpoint: Option<Result<Checkpoint, &'static str>>,
    /// Set when the entry is a `journal_continued` line: the file it names
    /// as its predecessor.
    pub(crate) continues: Option<String>,
}

/// Parses one line (without its newline); `Err` says why it is not an entry.
pub(crate) fn parse_line(line: &[u8]) -> Result<Parsed, &'static str> {
    if line.is_empty() {
        return Err("empty line");
    }
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8")?;
    let value: Value = serde_json::from_str(text).map_err(|_| "invalid JSON")?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object");
    };
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("no \"seq\" number")?;
    if !obj.get("ts").is_some_and(Value::is_string) {
        return Err("no \"ts\" string");
    }
    let Some(event) = obj.get("event").and_then(Value::as_str) else {
        return Err("no \"event\" string");
    };
    let digest = |key| obj.get(key).and_then(Value::as_str).and_then(unhex32);
    let prev = digest("prev").ok_or("no \"prev\" SHA-256")?;
    let hash = digest("hash").ok_or("no \"hash\" SHA-256")?;
    let content_ok = content_hash(&obj) == hash;
    let mut again = String::with_capacity(text.len());
    canonical_object(&obj, &mut again);
    let checkpoint = (event == CHECKPOINT_EVENT).then(|| parse_checkpoint(&obj));
    let continues = (event == CONTINUED_EVENT).then(|| {
        obj.get("from_file")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
            .to_owned()
    });
    Ok(Parsed {
        seq,
        prev,
        hash,
        content_ok,
        canonical_ok: again == text,
        leaf: leaf_of(&obj),
        checkpoint,
        continues,
    })
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn reserved_field_names_are_kept_aside() {
        let p = Pending {
            event: "e",
            fields: serde_json::json!({"seq": 99, "hash": "x", "peer": "k"}),
            at: UNIX_EPOCH,
        };
        let (line, hash, _) = render(1, GENESIS.to_owned(), p);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["_seq"], 99);
        assert_eq!(v["_hash"], "x");
        assert_eq!(v["hash"], hash.as_str());
        let parsed = parse_line(line.as_bytes()).unwrap();
        assert!(parsed.content_ok && parsed.canonical_ok);
    }
}
