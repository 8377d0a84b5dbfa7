//! The director's messages: JSON lines on POOL streams.
//!
//! - A worker opens one stream on its session to the director and sends
//!   [`FromWorker::Hello`], then a [`FromWorker::Beat`] every heartbeat;
//!   the director answers [`ToWorker::Welcome`] and later sends orders
//!   ([`ToWorker::Move`], [`ToWorker::State`]) and answers to claims on
//!   the same stream.
//! - A client's session to the director gets one stream opened by the
//!   director, at once: one [`Placement`] line, then the end of the stream.
//!   The client then dials the worker it names; the director is not on
//!   the data path.

use pool_net::PublicKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::registry::Load;
use crate::store::{key_text, WorkerState};

/// The longest line either side accepts (a worker's first heartbeat lists
/// its sessions: 33 bytes each).
pub const MAX_LINE: usize = 4 << 20;

/// What a worker sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromWorker {
    /// The first message: where clients reach it, what it holds.
    Hello {
        /// Its POOL addresses for clients, best first.
        addrs: Vec<String>,
        /// Every client session it holds, by id.
        sessions: Vec<String>,
        /// Its load now.
        load: Load,
        /// The standing the director gave it last (`None`: a new run of
        /// its process, or never registered).
        #[serde(default)]
        was: Option<WorkerState>,
    },
    /// A heartbeat: renews the lease.
    Beat {
        /// Its load now.
        load: Load,
        /// Sessions that started since the last beat.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        added: Vec<String>,
        /// Sessions that ended or left since the last beat.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removed: Vec<String>,
    },
    /// The answer to a [`ToWorker::Move`].
    Moved {
        /// The order's id.
        id: u64,
        /// Sessions handed over.
        handed: u32,
        /// Handoffs that failed (the sessions stayed).
        failed: u32,
    },
    /// This worker (the source) is about to hand `session` to the worker
    /// `to`: the director lets `to` claim it only after this.
    Handing {
        /// The session id.
        session: String,
        /// The target worker.
        #[serde(with = "key_text")]
        to: PublicKey,
    },
    /// May this worker take `session` from the worker `from`? (Asked by a
    /// handoff's target before it takes the state: fencing.)
    Claim {
        /// The request's id.
        id: u64,
        /// The session id.
        session: String,
        /// The source worker.
        #[serde(with = "key_text")]
        from: PublicKey,
    },
    /// A handoff whose claim held did not commit: `session` stays with
    /// `source`, so the ownership goes back to it.
    Unclaim {
        /// The session id.
        session: String,
        /// The source worker, which keeps the session.
        #[serde(with = "key_text")]
        source: PublicKey,
    },
    /// Drain me (the worker got SIGTERM): hand my sessions to others.
    Leave,
}

/// What the director sends a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToWorker {
    /// Registered: the lease, and how often to beat.
    Welcome {
        /// The lease, in milliseconds.
        lease_ms: u64,
        /// The heartbeat interval, in milliseconds.
        beat_ms: u64,
        /// The worker's standing.
        state: WorkerState,
    },
    /// Hand `count` of your sessions to the worker `to_key` at `to`.
    Move {
        /// The order's id, for [`FromWorker::Moved`].
        id: u64,
        /// How many sessions.
        count: u32,
        /// The target's POOL address.
        to: String,
        /// The target's key.
        #[serde(with = "key_text")]
        to_key: PublicKey,
        /// "drain" or "rebalance".
        why: String,
    },
    /// Your standing changed (draining, drained, active).
    State {
        /// The new state.
        state: WorkerState,
    },
    /// The answer to a [`FromWorker::Claim`].
    Claimed {
        /// The request's id.
        id: u64,
        /// Whether the claim holds.
        ok: bool,
        /// The ownership's revision (the fencing epoch), when it holds.
        #[serde(default)]
        revision: u64,
        /// Why not, when it does not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// What the director tells a client: the worker to dial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The worker's key (the client authenticates it by this key).
    #[serde(with = "key_text")]
    pub worker: PublicKey,
    /// The worker's addresses, best first.
    pub addrs: Vec<String>,
}

/// Or why there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PlacementReply {
    /// A worker.
    Placed(Placement),
    /// No worker can take the client now.
    Error {
        /// Why.
        error: String,
    },
}

/// A client's question on its own stream to the director: does my worker
/// still live? (Asked only when the client's session has lost its
/// carrier; see [`crate::client::watch`].)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerQuery {
    /// The worker the client is placed on.
    #[serde(with = "key_text")]
    pub worker: PublicKey,
}

/// The director's answer to a [`WorkerQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerAnswer {
    /// The worker's standing (`None`: the director does not know it).
    pub state: Option<WorkerState>,
    /// Where to go instead, when the worker is not alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementReply>,
}

/// Writes one message as a line.
///
/// # Errors
///
/// The stream's.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Reads JSON lines of at most [`MAX_LINE`] bytes.
pub struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Lines from `r`.
    pub fn new(r: R) -> Self {
        LineReader {
            inner: BufReader::new(r),
            buf: Vec::new(),
        }
    }

    /// The next message; `Ok(None)` at the end of the stream.
    ///
    /// # Errors
    ///
    /// The stream's, a line over [`MAX_LINE`], or one that is not a `T`
    /// (`InvalidData`, saying what was wrong).
    pub async fn next<T: for<'de> Deserialize<'de>>(&mut self) -> std::io::Result<Option<T>> {
        self.buf.clear();
        let n = (&mut self.inner)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() != Some(&b'\n') {
            let what = if n > MAX_LINE {
                "a line longer than 4 MiB"
            } else {
                "a line cut short"
            };
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
        }
        serde_json::from_slice(&self.buf)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_round_trip_and_bad_ones_are_errors() {
        let k = PublicKey([7; 32]);
        let mut out = Vec::new();
        write_line(
            &mut out,
            &ToWorker::Move {
                id: 3,
                count: 2,
                to: "[::1]:9".into(),
                to_key: k,
                why: "drain".into(),
            },
        )
        .await
        .unwrap();
        write_line(&mut out, &FromWorker::Leave).await.unwrap();
        out.extend_from_slice(b"{\"t\":\"nonsense\"}\n");
        let mut r = LineReader::new(&out[..]);
        assert!(matches!(
            r.next::<ToWorker>().await.unwrap(),
            Some(ToWorker::Move { id: 3, to_key, .. }) if to_key == k
        ));
        assert_eq!(
            r.next::<FromWorker>().await.unwrap(),
            Some(FromWorker::Leave)
        );
        let e = r.next::<FromWorker>().await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(r.next::<FromWorker>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_endless_line_is_refused() {
        let big = vec![b'x'; MAX_LINE + 10];
        let mut r = LineReader::new(&big[..]);
        let e = r.next::<FromWorker>().await.unwrap_err();
        assert!(e.to_string().contains("longer"), "{e}");
    }
}
