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

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use curve25519_dalek::montgomery::MontgomeryPoint;
use rand_core::RngCore;
use zeroize::Zeroize;

use crate::crypto::{ct_eq, hkdf};
use crate::keys::{PublicKey, SecretKey};

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

/// What a connection to the relay is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// The node's control connection (reachable by key).
    Register,
    /// A carrier to this peer.
    Connect(PublicKey),
    /// Accepting this circuit.
    Accept(CircuitId),
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
        }
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
        }
    }

    /// Appends the encoded message to `out`.
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
                // Cut a long message on a character boundary, so that it
                // decodes to a prefix of itself.
                let mut end = message.len().min(MAX_BODY - 1);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&message.as_bytes()[..end]);
            }
            Msg::Incoming { circuit, from } => {
                out.extend_from_slice(circuit);
                out.extend_from_slice(&from.0);
            }
            Msg::Ping(t) | Msg::Pong(t) => out.extend_from_slice(&t.to_be_bytes()),
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
        if !(1..=8).contains(&ty) {
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
                let rest = &b[65..];
                let intent = match b[64] {
                    0 if rest.is_empty() => Intent::Register,
                    1 if rest.len() == 32 => Intent::Connect(PublicKey(arr(rest)?)),
                    2 if rest.len() == 16 => Intent::Accept(arr(rest)?),
                    _ => return Err(RelayError::Malformed("bad AUTH intent")),
                };
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
            _ => return Err(RelayError::UnknownType(ty)),
        };
        Ok(Some((msg, 3 + len)))
    }
}

fn proof_for(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    nonce: &[u8; 32],
    key: &PublicKey,
    intent: &Intent,
) -> [u8; 32] {
    let mut k = [0u8; 32];
    hkdf(b"POOL-RELAY/1 auth", &[shared], b"proof key", &mut k);
    let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k);
    k.zeroize();
    let mut ctx = ring::hmac::Context::with_key(&hk);
    ctx.update(MAGIC);
    ctx.update(ephemeral);
    ctx.update(nonce);
    ctx.update(&key.0);
    let mut i = Vec::with_capacity(33);
    intent.encode(&mut i);
    ctx.update(&i);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// X25519; `None` for a non-contributory (low-order) peer point.
fn dh(secret: &[u8; 32], public: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = MontgomeryPoint(*public).mul_clamped(*secret).to_bytes();
    if shared.iter().all(|b| *b == 0) {
        None
    } else {
        Some(shared)
    }
}

/// Node side: the AUTH message answering a CHALLENGE.
pub fn authenticate(
    key: &SecretKey,
    ephemeral: &[u8; 32],
    nonce: &[u8; 32],
    intent: Intent,
) -> Option<Msg> {
    let mut shared = dh(key.as_bytes(), ephemeral)?;
    let public = key.public_key();
    let proof = proof_for(&shared, ephemeral, nonce, &public, &intent);
    shared.zeroize();
    Some(Msg::Auth {
        key: public,
        proof,
        intent,
    })
}

/// Relay side: one connection's challenge (a fresh ephemeral key and
/// nonce), able to check the node's answer.
pub struct Challenge {
    secret: [u8; 32],
    ephemeral: [u8; 32],
    nonce: [u8; 32],
}

impl Drop for Challenge {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl Challenge {
    /// A new challenge.
    pub fn new(rng: &mut dyn RngCore) -> Challenge {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let ephemeral = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        Challenge {
            secret,
            ephemeral,
            nonce,
        }
    }

    /// The CHALLENGE message to send.
    pub fn msg(&self) -> Msg {
        Msg::Challenge {
            ephemeral: self.ephemeral,
            nonce: self.nonce,
        }
    }

    /// Whether `proof` shows that the sender holds `key`'s secret.
    pub fn verify(&self, key: &PublicKey, proof: &[u8; 32], intent: &Intent) -> bool {
        let Some(mut shared) = dh(&self.secret, &key.0) else {
            return false;
        };
        let want = proof_for(&shared, &self.ephemeral, &self.nonce, key, intent);
        shared.zeroize();
        ct_eq(&want, proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeededRng;

    #[test]
    fn messages_round_trip() {
        let k = PublicKey([7; 32]);
        let msgs = [
            Msg::Hello { version: VERSION },
            Msg::Challenge {
                ephemeral: [1; 32],
                nonce: [2; 32],
            },
            Msg::Auth {
                key: k,
                proof: [3; 32],
                intent: Intent::Register,
            },
            Msg::Auth {
                key: k,
                proof: [3; 32],
                intent: Intent::Connect(PublicKey([9; 32])),
            },
            Msg::Auth {
                key: k,
                proof: [3; 32],
                intent: Intent::Accept([4; 16]),
            },
            Msg::Welcome {
                observed: "[fd00::1]:443".parse().unwrap(),
            },
            Msg::Welcome {
                observed: "10.1.2.3:9".parse().unwrap(),
            },
            Msg::Error {
                code: ERR_UNKNOWN_PEER,
                message: "no such peer".into(),
            },
            Msg::Incoming {
                circuit: [5; 16],
                from: k,
            },
            Msg::Ping(42),
            Msg::Pong(43),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        let mut at = 0;
        for m in &msgs {
            // Every prefix short of the whole message asks for more.
            let (got, used) = Msg::decode(&buf[at..]).unwrap().unwrap();
            assert_eq!(&got, m);
            for cut in 0..used {
                assert_eq!(Msg::decode(&buf[at..at + cut]).unwrap(), None);
            }
            at += used;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn long_error_is_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_BODY); // 2 bytes each
        let mut buf = Vec::new();
        Msg::Error {
            code: ERR_PROTOCOL,
            message: message.clone(),
        }
        .encode(&mut buf);
        assert!(buf.len() <= 3 + MAX_BODY);
        let (Msg::Error { message: got, .. }, used) = Msg::decode(&buf).unwrap().unwrap() else {
            panic!("not an ERROR")
        };
        assert_eq!(used, buf.len());
        assert!(!got.contains('\u{fffd}'));
        assert!(message.starts_with(&got) && got.len() >= MAX_BODY - 2);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Msg::decode(&[0, 0, 0]).is_err());
        assert!(Msg::decode(&[9, 0, 0]).is_err());
        assert!(matches!(
            Msg::decode(&[1, 0xff, 0xff]),
            Err(RelayError::TooLong(_))
        ));
        assert!(Msg::decode(b"\x01\x00\x0bNOT-RELAY!\x01").is_err());
        assert!(Msg::decode(&[3, 0, 66, 0, 0]).is_ok()); // incomplete: wait
        let mut auth = vec![3, 0, 66];
        auth.extend_from_slice(&[0; 66]);
        assert!(Msg::decode(&auth).is_err()); // REGISTER with a body
                                              // Fuzz-ish: random bytes never panic.
        let mut rng = SeededRng::from_u64(1);
        for _ in 0..20_000 {
            let mut b = [0u8; 80];
            rng.fill_bytes(&mut b);
            b[0] %= 10;
            b[1] = 0;
            let _ = Msg::decode(&b);
        }
    }

    #[test]
    fn proof_checks_key_ownership_and_binding() {
        let mut rng = SeededRng::from_u64(2);
        let node = SecretKey::from_bytes([11; 32]);
        let other = SecretKey::from_bytes([12; 32]);
        let ch = Challenge::new(&mut rng);
        let Msg::Challenge { ephemeral, nonce } = ch.msg() else {
            unreachable!()
        };
        let intent = Intent::Connect(other.public_key());
        let Some(Msg::Auth {
            key,
            proof,
            intent: i,
        }) = authenticate(&node, &ephemeral, &nonce, intent)
        else {
            panic!("no auth")
        };
        assert!(ch.verify(&key, &proof, &i));
        // Claiming another key with this proof fails.
        assert!(!ch.verify(&other.public_key(), &proof, &i));
        // The proof is bound to the intent.
        assert!(!ch.verify(&key, &proof, &Intent::Register));
        // ... and to this challenge.
        let ch2 = Challenge::new(&mut rng);
        assert!(!ch2.verify(&key, &proof, &i));
        // A low-order key is refused outright.
        assert!(!ch.verify(&PublicKey([0; 32]), &proof, &i));
        assert!(authenticate(&node, &[0; 32], &nonce, Intent::Register).is_none());
    }
}
