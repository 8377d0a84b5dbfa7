//! The live handoff on tokio (docs/handoff.md): a session moves from this
//! server (the source) to another (the target) while its client keeps its
//! streams.
//!
//! - **Source** ([`Session::handoff_to`]): asks the target to prepare
//!   (PREPARE → PREPARED with a token) over a worker-to-worker stream the
//!   caller opens ([`HandoffLink`]); offers the client the move; when the
//!   client arrives at the target, the target pulls the state (FREEZE →
//!   STATE); on COMMITTED the streams this side serves are re-homed onto
//!   worker streams to the target (`pool.handoff.fwd`) and the session is
//!   fenced. Any failure before the commit unfreezes it: nothing moved.
//! - **Target** ([`crate::Endpoint::serve_handoff`], [`crate::Endpoint::serve_forward`]):
//!   mints the token, takes the client's RESUME_HANDOFF on its listener
//!   (token checked before any key exchange), restores the state, answers
//!   with `KKpsk0`, commits on the client's first record, and forwards the
//!   source's streams.
//! - **Client**: follows an offer by itself ([`offered`]), within its
//!   [`HandoffPolicy`].
//!
//! Link messages: `type u8 | len u32 | body`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use std::collections::HashMap;

use pool_core::{PublicKey, SessionId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::session::Session;
use crate::stream::Stream;

mod follow;
mod source;
mod target;

pub(crate) use follow::{offered, Follow};
pub(crate) use target::{handle_resume_handoff, Imported};

pub(super) const PREPARE: u8 = 1;
pub(super) const PREPARED: u8 = 2;
pub(super) const REFUSED: u8 = 3;
pub(super) const FREEZE: u8 = 4;
pub(super) const STATE: u8 = 5;
pub(super) const COMMITTED: u8 = 6;
pub(super) const ABORT: u8 = 7;
/// The largest link message (STATE: a snapshot holds the replay buffer and
/// the streams' receive buffers).
const MAX_MSG: usize = 64 << 20;
/// The stream reset code for a forwarded stream that outlived the forward
/// deadline, or whose worker link died.
pub const RESET_HANDOFF_DEADLINE: u64 = 7;

/// What a worker-to-worker stream is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkPurpose {
    /// The handoff's own messages (served by [`crate::Endpoint::serve_handoff`]).
    Handoff,
    /// One stream the source forwards (served by [`crate::Endpoint::serve_forward`]).
    Forward,
}

/// A boxed future opening a worker stream.
pub type LinkFuture<'a> = Pin<Box<dyn Future<Output = Result<Stream, Error>> + Send + 'a>>;

/// Opens streams from the source to the target, for the handoff's messages
/// and the streams the source forwards; `pool-node` opens them on a
/// worker-to-worker session, with the service preamble for `purpose`.
pub trait HandoffLink: Send + Sync {
    /// A new stream to the target.
    fn open(&self, purpose: LinkPurpose) -> LinkFuture<'_>;
}

/// What happens to one stream of a session handed off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamPolicy {
    /// The stream stays with its service on the source, and the target
    /// forwards it (streams bound to the source host: a `pool2tcp`
    /// connection to its backend). The default.
    #[default]
    Forward,
    /// The stream moves: the target's instance of the same service goes
    /// on with it from its offsets ([`Importer`]).
    Move,
    /// The stream is reset with [`RESET_HANDOFF`] before the state leaves
    /// (services that opt out).
    Reset,
}

/// The stream reset code for a stream whose service does not move with a
/// handed-off session.
pub const RESET_HANDOFF: u64 = 6;

/// The target's side of moved streams: a service takes a stream of a
/// handed-in session over, from where the source's instance left it.
pub trait Importer: Send + Sync {
    /// `stream` of `session` was served by `service` at the source, which
    /// had read `read` bytes and written `written` bytes of it.
    fn moved(&self, session: Session, stream: Stream, service: String, read: u64, written: u64);

    /// The client has arrived: may this node take `session` from
    /// `source`? Asked before the state is pulled (the source is not
    /// frozen yet); an `Err` aborts the handoff (code `fenced`) and the
    /// client goes back to the source. A director's fleet answers it from
    /// its store, whose revision fences workers whose lease lapsed. The
    /// default allows.
    fn claim(&self, session: SessionId, source: PublicKey) -> ClaimFuture<'_> {
        let _ = (session, source);
        Box::pin(std::future::ready(Ok(())))
    }

    /// A handoff whose [`Importer::claim`] held did not commit: give the
    /// session back to `source`.
    fn unclaim(&self, session: SessionId, source: PublicKey) {
        let _ = (session, source);
    }
}

/// What [`Importer::claim`] returns: `Err` says why not.
pub type ClaimFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// How a handoff is run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandoffOptions {
    /// How long the client has to reach the target (the token's life).
    pub token_lifetime: Duration,
    /// How long the target forwards streams that stay on the source.
    pub forward_deadline: Duration,
    /// Per stream: its policy and its service's name (streams not listed
    /// are forwarded).
    pub policies: HashMap<u64, (StreamPolicy, String)>,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        HandoffOptions {
            token_lifetime: Duration::from_secs(10),
            forward_deadline: Duration::from_secs(600),
            policies: HashMap::new(),
        }
    }
}

impl HandoffOptions {
    /// With this token lifetime.
    pub fn token_lifetime(mut self, d: Duration) -> Self {
        self.token_lifetime = d;
        self
    }
    /// With this forward deadline.
    pub fn forward_deadline(mut self, d: Duration) -> Self {
        self.forward_deadline = d;
        self
    }
    /// With these stream policies (stream id → policy and service name).
    pub fn policies(mut self, p: HashMap<u64, (StreamPolicy, String)>) -> Self {
        self.policies = p;
        self
    }
}

/// A handoff that committed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandoffReport {
    /// The session.
    pub session: SessionId,
    /// The target's key.
    pub to: PublicKey,
    /// From the start to the commit.
    pub total: Duration,
    /// How long the session was frozen here (the stall bound).
    pub frozen: Duration,
    /// Streams left on this side and forwarded through the target.
    pub forwarded: usize,
    /// Streams that moved to the target's services.
    pub moved: usize,
    /// Streams reset because their service does not move.
    pub reset: usize,
    /// Bytes of state sent.
    pub state_bytes: usize,
}

pub(super) fn fail(stage: &'static str, code: &'static str, reason: impl Into<String>) -> Error {
    Error::Handoff {
        stage,
        reason: reason.into(),
        code,
    }
}

pub(super) async fn write_msg<W: AsyncWrite + Unpin>(
    w: &mut W,
    ty: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut head = [0u8; 5];
    head[0] = ty;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(body).await
}

pub(super) async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MSG {
        return Err(std::io::Error::other(format!(
            "handoff message of {len} bytes exceeds {MAX_MSG}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

pub(super) fn abort_body(code: &str, reason: &str) -> Vec<u8> {
    let mut b = vec![u8::try_from(code.len()).unwrap_or(0)];
    b.extend_from_slice(code.as_bytes());
    b.extend_from_slice(reason.as_bytes());
    b
}

pub(super) fn parse_abort(body: &[u8]) -> (String, String) {
    let n = body.first().copied().unwrap_or(0) as usize;
    let code = body.get(1..1 + n).unwrap_or(b"target_refused");
    let reason = body.get(1 + n..).unwrap_or(&[]);
    (
        String::from_utf8_lossy(code).into_owned(),
        String::from_utf8_lossy(reason).into_owned(),
    )
}

/// The abort codes a target may send, as static labels (metrics).
pub(super) fn label(code: &str) -> &'static str {
    match code {
        "token_expired" => "token_expired",
        "client_unreachable" => "client_unreachable",
        "target_lost" => "target_lost",
        "pending" => "pending",
        "fenced" => "fenced",
        _ => "target_refused",
    }
}

/// A [`HandoffLink`] for endpoints that have no service router of their
/// own: each worker stream starts with one tag byte ([`TAG_HANDOFF`] or
/// [`TAG_FORWARD`]), which [`Endpoint::serve_tagged`](crate::Endpoint::serve_tagged)
/// reads at the target. (`pool-node` names its services in a preamble
/// instead.)
pub struct TaggedLink(pub Session);

/// [`TaggedLink`]: a stream of the application.
pub const TAG_APP: u8 = 0;
/// [`TaggedLink`]: a handoff's messages.
pub const TAG_HANDOFF: u8 = 1;
/// [`TaggedLink`]: a stream the source forwards.
pub const TAG_FORWARD: u8 = 2;

impl HandoffLink for TaggedLink {
    fn open(&self, purpose: LinkPurpose) -> LinkFuture<'_> {
        Box::pin(async move {
            let mut s = self.0.open_stream().await?;
            let tag = match purpose {
                LinkPurpose::Handoff => TAG_HANDOFF,
                LinkPurpose::Forward => TAG_FORWARD,
            };
            s.write_all(&[tag]).await?;
            Ok(s)
        })
    }
}

impl crate::Endpoint {
    /// The target's side of [`TaggedLink`]: reads a stream's tag byte and
    /// serves a handoff or a forwarded stream from `peer` (which the caller
    /// trusts for handoffs); a stream tagged [`TAG_APP`] is handed back,
    /// its tag read, for the application.
    pub async fn serve_tagged(
        &self,
        mut stream: Stream,
        peer: PublicKey,
    ) -> Result<Option<Stream>, Error> {
        let mut tag = [0u8; 1];
        stream.read_exact(&mut tag).await?;
        match tag[0] {
            TAG_HANDOFF => self.serve_handoff(stream, peer).await.map(|()| None),
            TAG_FORWARD => self.serve_forward(stream, peer).await.map(|()| None),
            _ => Ok(Some(stream)),
        }
    }
}
