//! The relay protocol (POOL-RELAY/1), without I/O.
//!
//! A relay splices TCP connections between nodes that cannot reach each
//! other. It never sees inside a session: what it forwards are sealed POOL
//! records. It does learn node keys, who talks to whom, sizes and timing.
//!
//! Every connection to a relay starts the same way; integers are
//! big-endian, every message is `type u8 | length u16 | body`:
//!
//! ```text
//! node  -> relay  HELLO      "POOL-RELAY" | version u8
//! relay -> node   CHALLENGE  ephemeral [32] | nonce [32]
//! node  -> relay  AUTH       key [32] | proof [32] | intent u8 | intent body
//! relay -> node   WELCOME    observed address [18]      (or ERROR)
//! ```
//!
//! The proof is `HMAC-SHA256(HKDF(X25519(node secret, ephemeral)), transcript)`:
//! only the holder of the node's secret key can compute it, and it is bound
//! to this connection's ephemeral key, nonce and intent, so it cannot be
//! replayed. The intent says what the connection is for:
//!
//! - `REGISTER` (0): the node's control connection. The relay answers
//!   WELCOME and later sends INCOMING when someone wants the node.
//! - `CONNECT` (1) `peer key [32]`: a carrier to that peer. WELCOME comes
//!   once the peer has accepted; from then on the connection is a raw,
//!   spliced byte pipe to the peer.
//! - `ACCEPT` (2) `circuit [16]`: the peer's side of a CONNECT, opened in
//!   answer to INCOMING. WELCOME, then raw bytes.
//!
//! Control connections also carry `INCOMING circuit [16] | from key [32]`
//! (relay to node) and `PING token u64` / `PONG token u64` (either way).
//!
//! Peering (relays that trust each other's keys forward circuits between
//! them). A relay dials a peer relay and proves its relay key like a node,
//! with an intent that carries its own [`PeerChallenge`]; the dialled relay
//! answers `PEER_PROOF key [32] | proof [32]` ([`peer_proof`]) before
//! anything else, so both keys are proven:
//!
//! - `PEER` (3) `challenge [64]`: the enrolment link. After WELCOME both
//!   sides send `HAVE keys [32]*` / `GONE keys [32]*` (1 to 32 keys each)
//!   for the nodes registered at them, PING / PONG, and `END message` to
//!   end the enrolment.
//! - `PEER_CIRCUIT` (4) `challenge [64] | from [32] | to [32]`: one
//!   circuit for the dialler's node `from` to `to`, registered at the
//!   dialled relay; WELCOME once `to` accepted, then raw bytes.
//! - `CONNECT_ROUTED` (5) / `ACCEPT_ROUTED` (6): as CONNECT and ACCEPT, and
//!   the relay sends `ROUTE (key [32] | address [18])*` (the relays past
//!   it) right before WELCOME. Plain CONNECT and ACCEPT never see ROUTE.
//!
//! Relays forward sealed records only: peering adds nothing a relay can
//! read.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::keys::PublicKey;

/// The first bytes a node sends to a relay.
pub const MAGIC: &[u8; 10] = b"POOL-RELAY";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Largest message body.
pub const MAX_BODY: usize = 1024;
/// The default relay port.
pub const DEFAULT_PORT: u16 = 9255;

/// ERROR code: the proof of key ownership is wrong.
pub const ERR_AUTH: u8 = 1;
/// ERROR code: the wanted peer is not registered at this relay.
pub const ERR_UNKNOWN_PEER: u8 = 2;
/// ERROR code: a cap (connections, bytes) was reached.
pub const ERR_CAPACITY: u8 = 3;
/// ERROR code: the peer did not accept in time.
pub const ERR_NO_ANSWER: u8 = 4;
/// ERROR code: a malformed or unexpected message.
pub const ERR_PROTOCOL: u8 = 5;
/// ERROR code: this relay does not serve this key.
pub const ERR_NOT_ALLOWED: u8 = 6;

/// A circuit id: pairs a CONNECT with the peer's ACCEPT.
pub type CircuitId = [u8; 16];

/// A dialling relay's challenge to the relay it dials (in the `PEER` and
/// `PEER_CIRCUIT` intents): the dialled relay answers with
/// [`Msg::PeerProof`], so both ends of a relay-to-relay connection prove
/// their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerChallenge {
    /// The dialler's ephemeral X25519 public key for this connection.
    pub ephemeral: [u8; 32],
    /// A random nonce.
    pub nonce: [u8; 32],
}

/// One relay on a circuit's way, as [`Msg::Route`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteHop {
    /// The relay's key.
    pub key: PublicKey,
    /// Its address as the relay before it knows it.
    pub addr: SocketAddr,
}

/// What a connection to the relay is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// The node's control connection (reachable by key).
    Register,
    /// A carrier to this peer.
    Connect(PublicKey),
    /// Accepting this circuit.
    Accept(CircuitId),
    /// A relay's link to a peer relay it is enrolled with: registrations
    /// are gossiped over it (HAVE / GONE), and either side may END it.
    Peer(PeerChallenge),
    /// A circuit that a peer relay forwards for its node `from` (whose key
    /// it checked) to `to`, a node registered here.
    PeerCircuit {
        /// The dialler's challenge to this relay.
        challenge: PeerChallenge,
        /// The node that asked, at the dialling relay.
        from: PublicKey,
        /// The node wanted, registered here.
        to: PublicKey,
    },
    /// As [`Intent::Connect`], and the relay sends ROUTE (the relays on the
    /// way past it) before WELCOME.
    ConnectRouted(PublicKey),
    /// As [`Intent::Accept`], and the relay sends ROUTE before WELCOME.
    AcceptRouted(CircuitId),
}

impl Intent {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Intent::Register => out.push(0),
            Intent::Connect(k) => {
                out.push(1);
                out.extend_from_slice(&k.0);
            }
            Intent::Accept(c) => {
                out.push(2);
                out.extend_from_slice(c);
            }
            Intent::Peer(ch) => {
                out.push(3);
                out.extend_from_slice(&ch.ephemeral);
                out.extend_from_slice(&ch.nonce);
            }
            Intent::PeerCircuit {
                challenge,
                from,
                to,
            } => {
                out.push(4);
                out.extend_from_slice(&challenge.ephemeral);
                out.extend_from_slice(&challenge.nonce);
                out.extend_from_slice(&from.0);
                out.extend_from_slice(&to.0);
            }
            Intent::ConnectRouted(k) => {
                out.push(5);
                out.extend_from_slice(&k.0);
            }
            Intent::AcceptRouted(c) => {
                out.push(6);
                out.extend_from_slice(c);
            }
        }
    }

    fn decode(code: u8, rest: &[u8]) -> Result<Intent, RelayError> {
        let challenge = |b: &[u8]| -> Result<PeerChallenge, RelayError> {
            Ok(PeerChallenge {
                ephemeral: arr(b)?,
                nonce: arr(&b[32..])?,
            })
        };
        Ok(match (code, rest.len()) {
            (0, 0) => Intent::Register,
            (1, 32) => Intent::Connect(PublicKey(arr(rest)?)),
            (2, 16) => Intent::Accept(arr(rest)?),
            (3, 64) => Intent::Peer(challenge(rest)?),
            (4, 128) => Intent::PeerCircuit {
                challenge: challenge(rest)?,
                from: PublicKey(arr(&rest[64..])?),
                to: PublicKey(arr(&rest[96..])?),
            },
            (5, 32) => Intent::ConnectRouted(PublicKey(arr(rest)?)),
            (6, 16) => Intent::AcceptRouted(arr(rest)?),
            _ => return Err(RelayError::Malformed("bad AUTH intent")),
        })
    }

    /// Whether the connection comes from a relay (a peer link or a
    /// forwarded circuit), not from a node.
    #[must_use]
    pub fn is_relay(&self) -> bool {
        matches!(self, Intent::Peer(_) | Intent::PeerCircuit { .. })
    }

    /// Whether the node asked for ROUTE before WELCOME.
    #[must_use]
    pub fn wants_route(&self) -> bool {
        matches!(self, Intent::ConnectRouted(_) | Intent::AcceptRouted(_))
    }
}

/// One relay protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Node opens: magic and version.
    Hello {
        /// The node's protocol version.
        version: u8,
    },
    /// Relay's challenge.
    Challenge {
        /// The relay's ephemeral X25519 public key for this connection.
        ephemeral: [u8; 32],
        /// A random nonce.
        nonce: [u8; 32],
    },
    /// Node proves its key and says what it wants.
    Auth {
        /// The node's static public key.
        key: PublicKey,
        /// The proof (see the module docs).
        proof: [u8; 32],
        /// What the connection is for.
        intent: Intent,
    },
    /// Accepted; for CONNECT and ACCEPT, raw spliced bytes follow.
    Welcome {
        /// The node's address as the relay sees it.
        observed: SocketAddr,
    },
    /// Refused, with a code and a message for people.
    Error {
        /// One of the `ERR_*` codes.
        code: u8,
        /// What happened and what to do.
        message: String,
    },
    /// Someone wants this node: open an ACCEPT connection for `circuit`.
    Incoming {
        /// The circuit to accept.
        circuit: CircuitId,
        /// The authenticated key of the node that asked.
        from: PublicKey,
    },
    /// Liveness probe.
    Ping(u64),
    /// Answer to a PING.
    Pong(u64),
    /// A dialled relay proves its key over the dialler's
    /// [`PeerChallenge`] (see [`peer_proof`]); sent right after a relay's
    /// AUTH checks out.
    PeerProof {
        /// The dialled relay's key.
        key: PublicKey,
        /// Its proof.
        proof: [u8; 32],
    },
    /// The relays on a circuit's way past the one the node talks to (at
    /// most [`MAX_ROUTE`]); sent before WELCOME to `*_ROUTED` intents.
    Route(Vec<RouteHop>),
    /// Peer link: these keys are registered here now (1 to
    /// [`MAX_KEYS_PER_MSG`]).
    Have(Vec<PublicKey>),
    /// Peer link: these keys are no longer registered here.
    Gone(Vec<PublicKey>),
    /// Peer link: the enrolment ends (the sender no longer peers with the
    /// receiver), with a message for people.
    End {
        /// Why.
        message: String,
    },
}

/// Most keys in one HAVE or GONE.
pub const MAX_KEYS_PER_MSG: usize = MAX_BODY / 32;
/// Most relays in one ROUTE.
pub const MAX_ROUTE: usize = 8;

/// `keys` cut into HAVE (or GONE, `gone`) messages of at most
/// [`MAX_KEYS_PER_MSG`] keys.
pub fn key_batches(keys: &[PublicKey], gone: bool) -> impl Iterator<Item = Msg> + '_ {
    keys.chunks(MAX_KEYS_PER_MSG).map(move |c| {
        if gone {
            Msg::Gone(c.to_vec())
        } else {
            Msg::Have(c.to_vec())
        }
    })
}

/// A relay message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Unknown message type.
    #[error("unknown relay message type {0}")]
    UnknownType(u8),
    /// A body of the wrong size or content.
    #[error("malformed relay message: {0}")]
    Malformed(&'static str),
    /// A length over [`MAX_BODY`].
    #[error("relay message too long ({0} bytes)")]
    TooLong(usize),
    /// Not the relay protocol, or another version.
    #[error("not a POOL relay (or an unsupported version {0})")]
    Version(u8),
}

/// Writes an address as 16 bytes (IPv4 mapped into IPv6) and a port.
pub fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let v6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// Reads what [`put_addr`] wrote (18 bytes); IPv4-mapped becomes IPv4.
pub fn get_addr(b: &[u8; 18]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let ip = Ipv6Addr::from(ip);
    let port = u16::from_be_bytes([b[16], b[17]]);
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::new(IpAddr::V6(ip), port),
    }
}

/// Writes at most `max` bytes of `text`, cut on a character boundary so
/// that it decodes to a prefix of itself.
fn put_text(out: &mut Vec<u8>, text: &str, max: usize) {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn arr<const N: usize>(b: &[u8]) -> Result<[u8; N], RelayError> {
    b.get(..N)
        .and_then(|s| s.try_into().ok())
        .ok_or(RelayError::Malformed("short body"))
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Challenge { .. } => 2,
            Msg::Auth { .. } => 3,
            Msg::Welcome { .. } => 4,
            Msg::Error { .. } => 5,
            Msg::Incoming { .. } => 6,
            Msg::Ping(_) => 7,
            Msg::Pong(_) => 8,
            Msg::PeerProof { .. } => 9,
            Msg::Route(_) => 10,
            Msg::Have(_) => 11,
            Msg::Gone(_) => 12,
            Msg::End { .. } => 13,
        }
    }

    /// Appends the encoded message to `out`. A HAVE or GONE of more than
    /// [`MAX_KEYS_PER_MSG`] keys, or a ROUTE of more than [`MAX_ROUTE`]
    /// relays, is cut to that many (use [`key_batches`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(self.kind());
        out.extend_from_slice(&[0, 0]);
        match self {
            Msg::Hello { version } => {
                out.extend_from_slice(MAGIC);
                out.push(*version);
            }
            Msg::Challenge { ephemeral, nonce } => {
                out.extend_from_slice(ephemeral);
                out.extend_from_slice(nonce);
            }
            Msg::Auth { key, proof, intent } => {
                out.extend_from_slice(&key.0);
                out.extend_from_slice(proof);
                intent.encode(out);
            }
            Msg::Welcome { observed } => put_addr(out, observed),
            Msg::Error { code, message } => {
                out.push(*code);
                put_text(out, message, MAX_BODY - 1);
            }
            Msg::End { message } => put_text(out, message, MAX_BODY),
            Msg::Incoming { circuit, from } => {
                out.extend_from_slice(circuit);
                out.extend_from_slice(&from.0);
            }
            Msg::Ping(t) | Msg::Pong(t) => out.extend_from_slice(&t.to_be_bytes()),
            Msg::PeerProof { key, proof } => {
                out.extend_from_slice(&key.0);
                out.extend_from_slice(proof);
            }
            Msg::Route(hops) => {
                for h in hops.iter().take(MAX_ROUTE) {
                    out.extend_from_slice(&h.key.0);
                    put_addr(out, &h.addr);
                }
            }
            Msg::Have(keys) | Msg::Gone(keys) => {
                for k in keys.iter().take(MAX_KEYS_PER_MSG) {
                    out.extend_from_slice(&k.0);
                }
            }
        }
        let len = (out.len() - start - 3) as u16;
        out[start + 1..start + 3].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one message from the front of `buf`: `Ok(None)` when more
    /// bytes are needed, else the message and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Msg, usize)>, RelayError> {
        if buf.len() < 3 {
            return Ok(None);
        }
        let ty = buf[0];
        if !(1..=13).contains(&ty) {
            return Err(RelayError::UnknownType(ty));
        }
        let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
        if len > MAX_BODY {
            return Err(RelayError::TooLong(len));
        }
        let Some(b) = buf.get(3..3 + len) else {
            return Ok(None);
        };
        let exact = |n: usize| {
            if len == n {
                Ok(())
            } else {
                Err(RelayError::Malformed("wrong body length"))
            }
        };
        let msg = match ty {
            1 => {
                if len != MAGIC.len() + 1 || &b[..MAGIC.len()] != MAGIC {
                    return Err(RelayError::Version(0));
                }
                Msg::Hello {
                    version: b[MAGIC.len()],
                }
            }
            2 => {
                exact(64)?;
                Msg::Challenge {
                    ephemeral: arr(b)?,
                    nonce: arr(&b[32..])?,
                }
            }
            3 => {
                if len < 65 {
                    return Err(RelayError::Malformed("short AUTH"));
                }
                let key = PublicKey(arr(b)?);
                let proof = arr(&b[32..])?;
                let intent = Intent::decode(b[64], &b[65..])?;
                Msg::Auth { key, proof, intent }
            }
            4 => {
                exact(18)?;
                Msg::Welcome {
                    observed: get_addr(&arr(b)?),
                }
            }
            5 => {
                if len < 1 {
                    return Err(RelayError::Malformed("empty ERROR"));
                }
                Msg::Error {
                    code: b[0],
                    message: String::from_utf8_lossy(&b[1..]).into_owned(),
                }
            }
            6 => {
                exact(48)?;
                Msg::Incoming {
                    circuit: arr(b)?,
                    from: PublicKey(arr(&b[16..])?),
                }
            }
            7 | 8 => {
                exact(8)?;
                let t = u64::from_be_bytes(arr(b)?);
                if ty == 7 {
                    Msg::Ping(t)
                } else {
                    Msg::Pong(t)
                }
            }
            9 => {
                exact(64)?;
                Msg::PeerProof {
                    key: PublicKey(arr(b)?),
                    proof: arr(&b[32..])?,
                }
            }
            10 => {
                if len % 50 != 0 || len / 50 > MAX_ROUTE {
                    return Err(RelayError::Malformed("bad ROUTE length"));
                }
                let mut hops = Vec::with_capacity(len / 50);
                for h in b.chunks_exact(50) {
                    hops.push(RouteHop {
                        key: PublicKey(arr(h)?),
                        addr: get_addr(&arr(&h[32..])?),
                    });
                }
                Msg::Route(hops)
            }
            11 | 12 => {
                if len == 0 || len % 32 != 0 {
                    return Err(RelayError::Malformed("HAVE / GONE must hold 1 to 32 keys"));
                }
                let mut keys = Vec::with_capacity(len / 32);
                for k in b.chunks_exact(32) {
                    keys.push(PublicKey(arr(k)?));
                }
                if ty == 11 {
                    Msg::Have(keys)
                } else {
                    Msg::Gone(keys)
                }
            }
            13 => Msg::End {
                message: String::from_utf8_lossy(b).into_owned(),
            },
            _ => return Err(RelayError::UnknownType(ty)),
        };
        Ok(Some((msg, 3 + len)))
    }
}

mod auth;
#[cfg(test)]
mod tests;

pub use auth::{authenticate, peer_proof, Challenge};
