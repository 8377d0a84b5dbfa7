//! The vault protocol: frames on one POOL stream.
//!
//! A frame is `kind u8, length u32 (big endian), body`:
//!
//! | kind | body |
//! |---|---|
//! | 1 [`Msg`] | one JSON message |
//! | 2 hashes | a manifest's chunk hashes, 32 bytes each, after a `put` or `file` |
//! | 3 chunk | `index u64`, then the chunk's bytes |
//!
//! A push (`put`): the client sends `put` and the hashes; the server answers
//! `need` (the chunk ranges it lacks; none if the file is already there) or
//! `error`; the client sends those chunks; the server answers `done`. The
//! client may then send the next `put`, or `bye`. Small files go by
//! `batch`: up to 256 files of at most one chunk, their hashes in one frame;
//! the server answers `batch_need`, the client sends those chunks (indexed
//! by item), the server syncs them together and answers `batch_done`. A pull (`get`): the server
//! sends `file` and hashes for each file under the path, the client answers
//! `need`, the server sends the chunks; then the next file; `end` after the
//! last. `ls` is answered by `list`.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::manifest::{Hash, CHUNK};
use crate::VaultError;

const KIND_MSG: u8 = 1;
const KIND_HASHES: u8 = 2;
const KIND_CHUNK: u8 = 3;

/// The largest JSON message (an `ls` of a big directory).
const MAX_MSG: usize = 16 << 20;
/// The largest hash list: a 256 GiB file in 1 MiB chunks.
pub const MAX_CHUNKS: usize = 1 << 18;
/// The largest chunk frame: a sealed chunk (its tag) and its index.
const MAX_CHUNK_FRAME: usize = CHUNK as usize + 64;

/// What a file is, apart from its bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileMeta {
    /// Size in bytes (of what is stored: the ciphertext when sealed).
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// The manifest's root hash (hex).
    pub root: String,
    /// Present when the stored bytes are sealed to a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<crate::seal::SealInfo>,
}

/// One line of `ls`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// The name in its directory.
    pub name: String,
    /// `"file"`, `"dir"` or `"link"`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Whether the file is sealed.
    #[serde(default)]
    pub sealed: bool,
}

/// The JSON messages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// List a directory (or one file).
    Ls {
        /// The vault path.
        path: String,
    },
    /// The answer to `ls`.
    List {
        /// Its entries, by name.
        entries: Vec<Entry>,
    },
    /// Store a file at `path`; its hashes follow.
    Put {
        /// The vault path of the file.
        path: String,
        /// What it is.
        meta: FileMeta,
    },
    /// Send everything under `path`.
    Get {
        /// The vault path.
        path: String,
    },
    /// A file of a pull, its path relative to the `get` path (empty when
    /// the `get` named the file itself); its hashes follow.
    File {
        /// Relative path, `/`-separated.
        rel: String,
        /// What it is.
        meta: FileMeta,
    },
    /// The chunk ranges `[start, end)` the receiver lacks.
    Need {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// A push stored: what was written and what was already there.
    Done {
        /// Bytes written now.
        written: u64,
        /// Bytes already stored and verified.
        skipped: u64,
    },
    /// Store up to [`MAX_BATCH`] small files (each at most one chunk);
    /// their hashes follow in one frame, in order.
    Batch {
        /// The files.
        items: Vec<BatchItem>,
    },
    /// The answer to `batch`: which items to send (by index; each is one
    /// chunk frame whose index is the item's), and which were refused.
    BatchNeed {
        /// Items to send.
        need: Vec<u32>,
        /// Items refused, with why.
        errors: Vec<(u32, String)>,
    },
    /// A batch stored: synced together, then renamed into place.
    BatchDone {
        /// Bytes written now.
        written: u64,
        /// Bytes already stored.
        skipped: u64,
        /// Items that failed, with why.
        errors: Vec<(u32, String)>,
    },
    /// The last file of a pull was sent.
    End,
    /// The client is finished.
    Bye,
    /// The request failed; the stream can go on.
    Error {
        /// What happened and what to do.
        message: String,
    },
}

/// The most files in one `batch`.
pub const MAX_BATCH: usize = 256;

/// One file of a `batch`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// Its vault path.
    pub path: String,
    /// What it is (at most one chunk long).
    pub meta: FileMeta,
}

/// One frame.
#[derive(Debug)]
pub enum Frame {
    /// A JSON message.
    Msg(Msg),
    /// A manifest's chunk hashes.
    Hashes(Vec<Hash>),
    /// A chunk.
    Chunk(u64, Vec<u8>),
}

/// Writes a message frame.
pub async fn send_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<(), VaultError> {
    let body = serde_json::to_vec(m).map_err(|e| VaultError::Protocol(e.to_string()))?;
    write_frame(w, KIND_MSG, &[&body]).await
}

/// Writes a hash-list frame.
pub async fn send_hashes<W: AsyncWrite + Unpin>(w: &mut W, h: &[Hash]) -> Result<(), VaultError> {
    let mut body = Vec::with_capacity(h.len() * 32);
    for x in h {
        body.extend_from_slice(x);
    }
    write_frame(w, KIND_HASHES, &[&body]).await
}

/// Writes a chunk frame.
pub async fn send_chunk<W: AsyncWrite + Unpin>(
    w: &mut W,
    index: u64,
    data: &[u8],
) -> Result<(), VaultError> {
    write_frame(w, KIND_CHUNK, &[&index.to_be_bytes(), data]).await
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    parts: &[&[u8]],
) -> Result<(), VaultError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(len as u32).to_be_bytes());
    w.write_all(&head).await?;
    for p in parts {
        w.write_all(p).await?;
    }
    Ok(())
}

/// Reads the next frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, VaultError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let max = match head[0] {
        KIND_MSG => MAX_MSG,
        KIND_HASHES => MAX_CHUNKS * 32,
        KIND_CHUNK => MAX_CHUNK_FRAME,
        k => return Err(VaultError::Protocol(format!("unknown frame kind {k}"))),
    };
    if len > max {
        return Err(VaultError::Protocol(format!(
            "frame of {len} bytes (at most {max})"
        )));
    }
    if head[0] == KIND_CHUNK {
        // The index, then the bytes straight into their own buffer (no
        // copy of a megabyte to drop the index in front of it).
        if len < 8 {
            return Err(VaultError::Protocol("short chunk frame".into()));
        }
        let mut i = [0u8; 8];
        r.read_exact(&mut i).await?;
        let mut data = vec![0u8; len - 8];
        r.read_exact(&mut data).await?;
        return Ok(Some(Frame::Chunk(u64::from_be_bytes(i), data)));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(if head[0] == KIND_MSG {
        Frame::Msg(
            serde_json::from_slice(&body)
                .map_err(|e| VaultError::Protocol(format!("bad message: {e}")))?,
        )
    } else {
        if !len.is_multiple_of(32) {
            return Err(VaultError::Protocol(
                "hash list not a multiple of 32".into(),
            ));
        }
        Frame::Hashes(
            body.chunks_exact(32)
                .map(|c| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    h
                })
                .collect(),
        )
    }))
}

/// Reads a frame that must be a message.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, VaultError> {
    match read_frame(r).await? {
        Some(Frame::Msg(m)) => Ok(m),
        Some(other) => Err(VaultError::Protocol(format!(
            "expected a message, got {}",
            kind(&other)
        ))),
        None => Err(VaultError::Protocol("the stream ended early".into())),
    }
}

/// Reads a frame that must be a hash list.
pub async fn read_hashes<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<Hash>, VaultError> {
    match read_frame(r).await? {
        Some(Frame::Hashes(h)) => Ok(h),
        Some(other) => Err(VaultError::Protocol(format!(
            "expected hashes, got {}",
            kind(&other)
        ))),
        None => Err(VaultError::Protocol("the stream ended early".into())),
    }
}

fn kind(f: &Frame) -> &'static str {
    match f {
        Frame::Msg(_) => "a message",
        Frame::Hashes(_) => "hashes",
        Frame::Chunk(..) => "a chunk",
    }
}

/// Turns sorted chunk indexes into `[start, end)` ranges.
pub fn to_ranges(idx: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in idx {
        match out.last_mut() {
            Some((_, e)) if *e == i => *e += 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// The chunk indexes of `ranges`, checked against `count` chunks.
pub fn from_ranges(ranges: &[(u64, u64)], count: u64) -> Result<Vec<u64>, VaultError> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if s >= e || e > count {
            return Err(VaultError::Protocol(format!(
                "chunk range {s}..{e} outside 0..{count}"
            )));
        }
        out.extend(s..e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip() {
        let idx = [0, 1, 2, 5, 7, 8];
        let r = to_ranges(idx);
        assert_eq!(r, vec![(0, 3), (5, 6), (7, 9)]);
        assert_eq!(from_ranges(&r, 9).unwrap(), idx);
        assert!(from_ranges(&[(3, 2)], 9).is_err());
        assert!(from_ranges(&[(0, 10)], 9).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        send_msg(&mut buf, &Msg::Ls { path: "/x".into() })
            .await
            .unwrap();
        send_hashes(&mut buf, &[[1; 32], [2; 32]]).await.unwrap();
        send_chunk(&mut buf, 9, b"abc").await.unwrap();
        let mut r = &buf[..];
        assert!(matches!(read_msg(&mut r).await.unwrap(), Msg::Ls { .. }));
        assert_eq!(read_hashes(&mut r).await.unwrap().len(), 2);
        match read_frame(&mut r).await.unwrap() {
            Some(Frame::Chunk(9, d)) => assert_eq!(d, b"abc"),
            f => panic!("{f:?}"),
        }
        assert!(read_frame(&mut r).await.unwrap().is_none());
        // Unknown kind, oversize frame, bad JSON, unknown op.
        for bad in [
            vec![9, 0, 0, 0, 0],
            vec![3, 0xff, 0xff, 0xff, 0xff],
            [vec![1, 0, 0, 0, 2], b"{x".to_vec()].concat(),
            [vec![1, 0, 0, 0, 13], br#"{"op":"rmrf"}"#.to_vec()].concat(),
        ] {
            let mut r = &bad[..];
            assert!(read_frame(&mut r).await.is_err(), "{bad:?}");
        }
    }
}
