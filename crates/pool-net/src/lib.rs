//! # pool-net: the POOL runtime on tokio
//!
//! An [`Endpoint`] holds a node's key and trust; it dials sessions
//! ([`Endpoint::connect`]) and, when bound, accepts them
//! ([`Endpoint::accept`]). A [`Session`] carries many [`Stream`]s, each an
//! `AsyncRead + AsyncWrite`. When a carrier dies, the dialling side
//! reconnects and resumes the session by itself; applications see neither
//! an error nor a lost byte unless the resume deadline passes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pool_net::Error> {
//! use pool_net::{Endpoint, EndpointConfig, SecretKey, Trust};
//! use tokio::io::AsyncWriteExt;
//! let key = SecretKey::from_bytes([7; 32]);
//! let server_key = "P5bAqjXQu0wIY0_-Ke6TM8gbp9M_XeY1z4Cm8hN6nVg".parse()?;
//! let ep = Endpoint::client(EndpointConfig::new(key));
//! let session = ep.connect("[::1]:9253", server_key).await?;
//! let mut stream = session.open_stream().await?;
//! stream.write_all(b"hello").await?;
//! stream.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The protocol itself lives in `pool-core`; this crate only drives it.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod carrier;
mod config;
mod endpoint;
mod error;
mod handoff;
mod listener;
mod paths;
mod preamble;
mod relay;
mod session;
mod stream;
mod trust;

pub use carrier::{BoxedCarrier, Carrier, DialFuture, Dialer, TcpDialer};
pub use config::{GreetFn, Greeting, HandoffPolicy};
pub use endpoint::{bind_tcp, Endpoint, EndpointConfig, EndpointEvent, ListenerStats, RelayStatus};
pub use error::Error;
pub use handoff::{
    ClaimFuture, HandoffLink, HandoffOptions, HandoffReport, Importer, LinkFuture, LinkPurpose,
    StreamPolicy, TaggedLink, RESET_HANDOFF, RESET_HANDOFF_DEADLINE, TAG_APP, TAG_FORWARD,
    TAG_HANDOFF,
};
pub use pool_core::{
    CipherSuite, CloseCode, CloseReason, Config, FleetSecret, HandshakeError, KeyError, PublicKey,
    SecretKey, SessionId, Stats,
};
pub use preamble::Preamble;
pub use relay::{RelayCarrier, RelayDialer};
pub use session::{Session, SessionStats};
pub use stream::{RecvStream, SendStream, Stream};
pub use trust::{KnownPeers, Trust};

impl From<KeyError> for Error {
    fn from(source: KeyError) -> Self {
        Error::KeyFile {
            path: "key".into(),
            source,
        }
    }
}
