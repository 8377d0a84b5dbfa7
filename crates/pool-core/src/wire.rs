//! The POOL wire format (protocol version 2): records on a carrier, frames inside data records.
//!
//! See `docs/protocol.md` for the tables. Everything here is pure encoding:
//! `encode` writes into a caller's buffer, `decode` borrows from the input,
//! `encoded_len` is exact.

use crate::error::WireError;

/// Bytes in a record header: type (1) and body length (3, big-endian).
pub const RECORD_HEADER_LEN: usize = 4;
/// Bytes before the ciphertext of a data record body: epoch (4), counter (8).
pub const DATA_PREFIX_LEN: usize = 12;
/// Largest plaintext carried by one data record.
pub const MAX_PLAINTEXT: usize = 64 * 1024;
/// Largest record body accepted from a carrier.
pub const MAX_RECORD_BODY: usize = DATA_PREFIX_LEN + MAX_PLAINTEXT + crate::crypto::TAG_LEN;
/// Largest whole record (header included).
pub const MAX_RECORD_LEN: usize = RECORD_HEADER_LEN + MAX_RECORD_BODY;
/// Largest handshake-class record body (hello, resume, probe, refusal).
pub const MAX_HANDSHAKE_BODY: usize = 1024;
/// Bytes of a data record that are not plaintext: header, prefix, tag.
pub const DATA_OVERHEAD: usize = RECORD_HEADER_LEN + DATA_PREFIX_LEN + crate::crypto::TAG_LEN;

/// Record types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum RecordType {
    /// Noise IK first message, with a MAC over the responder's key.
    Hello = 0x01,
    /// Noise IK second message.
    Welcome = 0x02,
    /// Resume: session id, new epoch, Noise NNpsk0 first message.
    Resume = 0x03,
    /// Resume answer: Noise NNpsk0 second message.
    Resumed = 0x04,
    /// A plaintext refusal before any session exists.
    Refuse = 0x05,
    /// Asks a listener for its public key (for trust on first use).
    KeyProbe = 0x06,
    /// A listener's public key.
    KeyInfo = 0x07,
    /// A listener under load: a cookie for the HELLO's source, to be sent
    /// back in `mac2` (WireGuard's cookie reply).
    Cookie = 0x08,
    /// Resume at a handoff's target: session id, new epoch, base epoch,
    /// refusal key, migration token, Noise KKpsk0 first message.
    ResumeHandoff = 0x09,
    /// An encrypted record of frames.
    Data = 0x10,
}

impl RecordType {
    /// Parses a record type byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => RecordType::Hello,
            0x02 => RecordType::Welcome,
            0x03 => RecordType::Resume,
            0x04 => RecordType::Resumed,
            0x05 => RecordType::Refuse,
            0x06 => RecordType::KeyProbe,
            0x07 => RecordType::KeyInfo,
            0x08 => RecordType::Cookie,
            0x09 => RecordType::ResumeHandoff,
            0x10 => RecordType::Data,
            _ => return None,
        })
    }
}

/// Writes a record header for a body of `body_len` bytes.
pub fn write_record_header(out: &mut [u8], ty: RecordType, body_len: usize) {
    out[0] = ty as u8;
    out[1] = (body_len >> 16) as u8;
    out[2] = (body_len >> 8) as u8;
    out[3] = body_len as u8;
}

/// Appends a whole record (header and body) to `out`.
pub fn push_record(out: &mut Vec<u8>, ty: RecordType, body: &[&[u8]]) {
    let len: usize = body.iter().map(|b| b.len()).sum();
    let mut h = [0u8; RECORD_HEADER_LEN];
    write_record_header(&mut h, ty, len);
    out.extend_from_slice(&h);
    for b in body {
        out.extend_from_slice(b);
    }
}

/// Looks at the front of a carrier's byte buffer: `Ok(None)` if no whole
/// record is there yet, `Ok(Some((type, total_len)))` if one is.
///
/// Checks the type and the size limit from the header alone, so a peer
/// cannot make us buffer more than [`MAX_RECORD_LEN`] bytes.
pub fn peek_record(buf: &[u8]) -> Result<Option<(RecordType, usize)>, WireError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let ty = RecordType::from_u8(buf[0]).ok_or(WireError::UnknownRecordType(buf[0]))?;
    if buf.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    let len = (usize::from(buf[1]) << 16) | (usize::from(buf[2]) << 8) | usize::from(buf[3]);
    let limit = if ty == RecordType::Data {
        MAX_RECORD_BODY
    } else {
        MAX_HANDSHAKE_BODY
    };
    if len > limit {
        return Err(WireError::RecordTooLong { len, max: limit });
    }
    if ty == RecordType::Data && len < DATA_PREFIX_LEN + crate::crypto::TAG_LEN {
        return Err(WireError::Truncated);
    }
    let total = RECORD_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((ty, total)))
}

// ---- varints (QUIC's encoding: 2-bit length prefix, 1/2/4/8 bytes) ----

/// Largest value a varint can hold.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Bytes needed to encode `v` as a varint.
pub fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Writes a varint; `v` must be at most [`VARINT_MAX`].
fn put_varint(out: &mut [u8], pos: &mut usize, v: u64) {
    let v = v.min(VARINT_MAX);
    match varint_len(v) {
        1 => out[*pos] = v as u8,
        2 => out[*pos..*pos + 2].copy_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        4 => out[*pos..*pos + 4].copy_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out[*pos..*pos + 8].copy_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
    *pos += varint_len(v);
}

/// A cursor over borrowed bytes, returning [`WireError::Truncated`] at the end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub(crate) fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos.min(self.buf.len())..]
    }
    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self.buf.get(self.pos).ok_or(WireError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for _ in 1..len {
            v = (v << 8) | u64::from(self.u8()?);
        }
        Ok(v)
    }
}

/// Frame type bytes (inside a data record's plaintext).
mod ty {
    pub(super) const ACK: u8 = 0x01;
    pub(super) const PING: u8 = 0x02;
    pub(super) const PONG: u8 = 0x03;
    pub(super) const KEY_UPDATE: u8 = 0x04;
    pub(super) const KEY_UPDATE_ACK: u8 = 0x05;
    pub(super) const HANDOFF: u8 = 0x06;
    pub(super) const HANDOFF_DECLINE: u8 = 0x07;
    pub(super) const STREAM: u8 = 0x08;
    pub(super) const STREAM_FIN: u8 = 0x09;
    pub(super) const RESET_STREAM: u8 = 0x0a;
    pub(super) const MAX_DATA: u8 = 0x0b;
    pub(super) const MAX_STREAM_DATA: u8 = 0x0c;
    pub(super) const MAX_STREAMS: u8 = 0x0d;
    pub(super) const CLOSE: u8 = 0x0e;
    pub(super) const PATHS: u8 = 0x0f;
}

/// One frame inside a data record. Frames that change session state are
/// *sequenced* (see [`Frame::is_sequenced`]): they take the next session
/// sequence number, sit in the replay buffer until acknowledged, and are
/// resent after a resume.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame<'a> {
    /// Cumulative acknowledgement: every sequenced frame below `next` arrived.
    Ack {
        /// The next sequence number the sender of this frame expects.
        next: u64,
    },
    /// Asks for a [`Frame::Pong`] echoing `stamp` (RTT and liveness).
    Ping {
        /// Opaque to the receiver; the sender's clock in microseconds.
        stamp: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's stamp.
        stamp: u64,
    },
    /// Starts a rekey: a Noise `NNpsk0` first message for `epoch`.
    KeyUpdate {
        /// The epoch the new keys will have.
        epoch: u32,
        /// The Noise message.
        msg: &'a [u8],
    },
    /// Completes a rekey: the Noise `NNpsk0` second message.
    KeyUpdateAck {
        /// The epoch the new keys will have.
        epoch: u32,
        /// The Noise message.
        msg: &'a [u8],
    },
    /// Stream data, in order; `fin` marks the end of the sender's side.
    Stream {
        /// Stream id: even when opened by the session initiator, odd otherwise.
        id: u64,
        /// The last data on this stream.
        fin: bool,
        /// The bytes.
        data: &'a [u8],
    },
    /// Aborts a stream in both directions with an application error code.
    ResetStream {
        /// The stream.
        id: u64,
        /// Application-defined error code.
        code: u64,
    },
    /// Session-level flow control: total stream bytes the peer may send.
    MaxData {
        /// Absolute limit.
        max: u64,
    },
    /// Stream-level flow control: bytes the peer may send on `id`.
    MaxStreamData {
        /// The stream.
        id: u64,
        /// Absolute limit.
        max: u64,
    },
    /// How many streams the peer may open in total (cumulative).
    MaxStreams {
        /// Absolute limit.
        max: u64,
    },
    /// Graceful close with a code and a human-readable reason.
    Close {
        /// [`crate::CloseCode`] value.
        code: u64,
        /// UTF-8 reason.
        reason: &'a [u8],
    },
    /// The sender's direct-path candidates: addresses where it accepts
    /// carriers, 18 bytes each (IPv6 or IPv4-mapped, port), at most
    /// [`MAX_PATHS`]. Advisory; sent again after every resume.
    Paths {
        /// The encoded addresses.
        addrs: &'a [u8],
    },
    /// Server → client: "resume this session at another server" (the live
    /// handoff, docs/handoff.md). Authenticated by the current epoch, so
    /// only the server the client already trusts can send it. Not
    /// sequenced; sent again after every resume while the offer stands.
    Handoff {
        /// The source's id of this handoff (echoed by a decline).
        id: u32,
        /// The target's static public key.
        target: [u8; 32],
        /// The lowest epoch the resume at the target may propose.
        floor: u32,
        /// Milliseconds the token stays valid.
        expires_ms: u32,
        /// The migration token, [`HANDOFF_TOKEN_LEN`] bytes, opaque to the
        /// client (minted and checked by the target).
        token: &'a [u8],
        /// The target's addresses, 18 bytes each as in PATHS, at most
        /// [`MAX_PATHS`]; empty: reach the target by key through relays.
        addrs: &'a [u8],
    },
    /// Client → server: the client will not follow handoff `id`, and why
    /// (a [`DeclineCode`] value). Not sequenced.
    HandoffDecline {
        /// The handoff declined.
        id: u32,
        /// Why.
        code: u8,
    },
}

/// Most direct-path candidates one PATHS frame carries.
pub const MAX_PATHS: usize = 16;

/// Encodes up to [`MAX_PATHS`] addresses, 18 bytes each, as PATHS and
/// HANDOFF frames carry them.
pub(crate) fn encode_addrs(addrs: &[std::net::SocketAddr]) -> Vec<u8> {
    let mut enc = Vec::with_capacity(addrs.len().min(MAX_PATHS) * 18);
    for a in addrs.iter().take(MAX_PATHS) {
        crate::relay::put_addr(&mut enc, a);
    }
    enc
}

/// Decodes addresses written by [`encode_addrs`] (a trailing partial one
/// is ignored).
pub(crate) fn decode_addrs(enc: &[u8]) -> Vec<std::net::SocketAddr> {
    enc.chunks_exact(18)
        .filter_map(|c| c.try_into().ok())
        .map(crate::relay::get_addr)
        .collect()
}

/// Length of a migration token in a HANDOFF frame.
pub const HANDOFF_TOKEN_LEN: usize = 48;

/// Why a client declines a handoff ([`Frame::HandoffDecline`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DeclineCode {
    /// This client follows no handoffs.
    Policy = 1,
    /// The target's key is not one this client allows.
    KeyNotAllowed = 2,
    /// The client could not reach the target.
    Unreachable = 3,
    /// The target refused the resume.
    Refused = 4,
    /// The token expired before the client got there.
    Expired = 5,
}

impl Frame<'_> {
    /// Whether this frame takes a sequence number (and is resent on resume).
    ///
    /// Only stream data and stream resets are sequenced: they must arrive
    /// exactly once and in order. Flow-control limits are absolute values,
    /// so they are simply sent again after a resume; acks, pings and key
    /// updates belong to one carrier or epoch.
    pub fn is_sequenced(&self) -> bool {
        matches!(self, Frame::Stream { .. } | Frame::ResetStream { .. })
    }

    /// Exact number of bytes [`Frame::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Frame::Ack { next: v } | Frame::MaxData { max: v } | Frame::MaxStreams { max: v } => {
                varint_len(*v)
            }
            Frame::Ping { .. } | Frame::Pong { .. } => 8,
            Frame::KeyUpdate { msg, .. } | Frame::KeyUpdateAck { msg, .. } => {
                4 + varint_len(msg.len() as u64) + msg.len()
            }
            Frame::Stream { id, data, .. } => {
                varint_len(*id) + varint_len(data.len() as u64) + data.len()
            }
            Frame::ResetStream { id, code: v } | Frame::MaxStreamData { id, max: v } => {
                varint_len(*id) + varint_len(*v)
            }
            Frame::Close { code, reason } => {
                varint_len(*code) + varint_len(reason.len() as u64) + reason.len()
            }
            Frame::Paths { addrs } => varint_len(addrs.len() as u64) + addrs.len(),
            Frame::Handoff { token, addrs, .. } => {
                4 + 32
                    + 4
                    + 4
                    + varint_len(token.len() as u64)
                    + token.len()
                    + varint_len(addrs.len() as u64)
                    + addrs.len()
            }
            Frame::HandoffDecline { .. } => 4 + 1,
        }
    }

    /// Writes the frame at the start of `out` and returns its length.
    /// `out` must hold at least [`Frame::encoded_len`] bytes.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut p = 0;
        let byte = |out: &mut [u8], p: &mut usize, b: u8| {
            out[*p] = b;
            *p += 1;
        };
        match self {
            Frame::Ack { next } => {
                byte(out, &mut p, ty::ACK);
                put_varint(out, &mut p, *next);
            }
            Frame::Ping { stamp } | Frame::Pong { stamp } => {
                let t = if matches!(self, Frame::Ping { .. }) {
                    ty::PING
                } else {
                    ty::PONG
                };
                byte(out, &mut p, t);
                out[p..p + 8].copy_from_slice(&stamp.to_be_bytes());
                p += 8;
            }
            Frame::KeyUpdate { epoch, msg } | Frame::KeyUpdateAck { epoch, msg } => {
                let t = if matches!(self, Frame::KeyUpdate { .. }) {
                    ty::KEY_UPDATE
                } else {
                    ty::KEY_UPDATE_ACK
                };
                byte(out, &mut p, t);
                out[p..p + 4].copy_from_slice(&epoch.to_be_bytes());
                p += 4;
                put_varint(out, &mut p, msg.len() as u64);
                out[p..p + msg.len()].copy_from_slice(msg);
                p += msg.len();
            }
            Frame::Stream { id, fin, data } => {
                byte(out, &mut p, if *fin { ty::STREAM_FIN } else { ty::STREAM });
                put_varint(out, &mut p, *id);
                put_varint(out, &mut p, data.len() as u64);
                out[p..p + data.len()].copy_from_slice(data);
                p += data.len();
            }
            Frame::ResetStream { id, code } => {
                byte(out, &mut p, ty::RESET_STREAM);
                put_varint(out, &mut p, *id);
                put_varint(out, &mut p, *code);
            }
            Frame::MaxData { max } => {
                byte(out, &mut p, ty::MAX_DATA);
                put_varint(out, &mut p, *max);
            }
            Frame::MaxStreamData { id, max } => {
                byte(out, &mut p, ty::MAX_STREAM_DATA);
                put_varint(out, &mut p, *id);
                put_varint(out, &mut p, *max);
            }
            Frame::MaxStreams { max } => {
                byte(out, &mut p, ty::MAX_STREAMS);
                put_varint(out, &mut p, *max);
            }
            Frame::Close { code, reason } => {
                byte(out, &mut p, ty::CLOSE);
                put_varint(out, &mut p, *code);
                put_varint(out, &mut p, reason.len() as u64);
                out[p..p + reason.len()].copy_from_slice(reason);
                p += reason.len();
            }
            Frame::Paths { addrs } => {
                byte(out, &mut p, ty::PATHS);
                put_varint(out, &mut p, addrs.len() as u64);
                out[p..p + addrs.len()].copy_from_slice(addrs);
                p += addrs.len();
            }
            Frame::Handoff {
                id,
                target,
                floor,
                expires_ms,
                token,
                addrs,
            } => {
                byte(out, &mut p, ty::HANDOFF);
                out[p..p + 4].copy_from_slice(&id.to_be_bytes());
                out[p + 4..p + 36].copy_from_slice(target);
                out[p + 36..p + 40].copy_from_slice(&floor.to_be_bytes());
                out[p + 40..p + 44].copy_from_slice(&expires_ms.to_be_bytes());
                p += 44;
                for field in [token, addrs] {
                    put_varint(out, &mut p, field.len() as u64);
                    out[p..p + field.len()].copy_from_slice(field);
                    p += field.len();
                }
            }
            Frame::HandoffDecline { id, code } => {
                byte(out, &mut p, ty::HANDOFF_DECLINE);
                out[p..p + 4].copy_from_slice(&id.to_be_bytes());
                out[p + 4] = *code;
                p += 5;
            }
        }
        p
    }

    /// Appends the encoded frame to a vector.
    pub fn encode_to_vec(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.encoded_len(), 0);
        self.encode(&mut out[start..]);
    }
}

/// Writes the header of a STREAM frame carrying `len` bytes (the data
/// follows it); returns the header length (at most 17 bytes).
pub(crate) fn stream_header(id: u64, fin: bool, len: usize, out: &mut [u8; 17]) -> usize {
    let mut p = 1;
    out[0] = if fin { ty::STREAM_FIN } else { ty::STREAM };
    put_varint(out, &mut p, id);
    put_varint(out, &mut p, len as u64);
    p
}

/// Writes the header of a STREAM frame whose length field takes two bytes
/// whatever `len` is (a valid, non-minimal varint), so that the header's
/// size is known before the data is: the data can be read into place
/// behind it. `len` must be below 2^14 (every chunk is).
pub(crate) fn stream_header_fixed(id: u64, len: usize, out: &mut [u8; 17]) -> usize {
    debug_assert!(len < 1 << 14);
    let mut p = 1;
    out[0] = ty::STREAM;
    put_varint(out, &mut p, id);
    out[p..p + 2].copy_from_slice(&((len as u16 & 0x3fff) | 0x4000).to_be_bytes());
    p + 2
}

/// Decodes one frame from the front of `r`.
pub(crate) fn decode_frame<'a>(r: &mut Reader<'a>) -> Result<Frame<'a>, WireError> {
    let t = r.u8()?;
    Ok(match t {
        ty::ACK => Frame::Ack { next: r.varint()? },
        ty::PING => Frame::Ping { stamp: r.u64()? },
        ty::PONG => Frame::Pong { stamp: r.u64()? },
        ty::KEY_UPDATE | ty::KEY_UPDATE_ACK => {
            let epoch = r.u32()?;
            let len = r.varint()?;
            if len > MAX_HANDSHAKE_BODY as u64 {
                return Err(WireError::FieldTooLong);
            }
            let msg = r.bytes(len as usize)?;
            if t == ty::KEY_UPDATE {
                Frame::KeyUpdate { epoch, msg }
            } else {
                Frame::KeyUpdateAck { epoch, msg }
            }
        }
        ty::STREAM | ty::STREAM_FIN => {
            let id = r.varint()?;
            let len = r.varint()?;
            if len > MAX_PLAINTEXT as u64 {
                return Err(WireError::FieldTooLong);
            }
            let data = r.bytes(len as usize)?;
            Frame::Stream {
                id,
                fin: t == ty::STREAM_FIN,
                data,
            }
        }
        ty::RESET_STREAM => Frame::ResetStream {
            id: r.varint()?,
            code: r.varint()?,
        },
        ty::MAX_DATA => Frame::MaxData { max: r.varint()? },
        ty::MAX_STREAM_DATA => Frame::MaxStreamData {
            id: r.varint()?,
            max: r.varint()?,
        },
        ty::MAX_STREAMS => Frame::MaxStreams { max: r.varint()? },
        ty::CLOSE => {
            let code = r.varint()?;
            let len = r.varint()?;
            if len > 1024 {
                return Err(WireError::FieldTooLong);
            }
            Frame::Close {
                code,
                reason: r.bytes(len as usize)?,
            }
        }
        ty::PATHS => {
            let len = r.varint()?;
            if len > (MAX_PATHS * 18) as u64 || len % 18 != 0 {
                return Err(WireError::FieldTooLong);
            }
            Frame::Paths {
                addrs: r.bytes(len as usize)?,
            }
        }
        ty::HANDOFF => {
            let id = r.u32()?;
            let target = r.array()?;
            let floor = r.u32()?;
            let expires_ms = r.u32()?;
            if r.varint()? != HANDOFF_TOKEN_LEN as u64 {
                return Err(WireError::FieldTooLong);
            }
            let token = r.bytes(HANDOFF_TOKEN_LEN)?;
            let len = r.varint()?;
            if len > (MAX_PATHS * 18) as u64 || len % 18 != 0 {
                return Err(WireError::FieldTooLong);
            }
            Frame::Handoff {
                id,
                target,
                floor,
                expires_ms,
                token,
                addrs: r.bytes(len as usize)?,
            }
        }
        ty::HANDOFF_DECLINE => Frame::HandoffDecline {
            id: r.u32()?,
            code: r.u8()?,
        },
        other => return Err(WireError::UnknownFrameType(other)),
    })
}

/// Decodes one frame from the start of `buf`, returning it and its length.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), WireError> {
    let mut r = Reader::new(buf);
    let f = decode_frame(&mut r)?;
    Ok((f, r.pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = (u8, u64, u64, Vec<u8>, bool, u32)> {
        (
            0u8..14,
            0..=VARINT_MAX,
            0..=VARINT_MAX,
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
            any::<u32>(),
        )
    }

    fn build(k: u8, a: u64, b: u64, d: &[u8], fin: bool, e: u32) -> Frame<'_> {
        match k {
            0 => Frame::Ack { next: a },
            1 => Frame::Ping { stamp: a },
            2 => Frame::Pong { stamp: b },
            3 => Frame::KeyUpdate { epoch: e, msg: d },
            4 => Frame::KeyUpdateAck { epoch: e, msg: d },
            5 => Frame::Stream {
                id: a,
                fin,
                data: d,
            },
            6 => Frame::ResetStream { id: a, code: b },
            7 => Frame::MaxData { max: a },
            8 => Frame::MaxStreamData { id: a, max: b },
            9 => Frame::MaxStreams { max: b },
            10 => Frame::Paths {
                addrs: &d[..(d.len() / 18).min(MAX_PATHS) * 18],
            },
            11 if d.len() >= HANDOFF_TOKEN_LEN => {
                let rest = &d[HANDOFF_TOKEN_LEN..];
                Frame::Handoff {
                    id: e,
                    target: [d[0]; 32],
                    floor: e.rotate_left(7),
                    expires_ms: a as u32,
                    token: &d[..HANDOFF_TOKEN_LEN],
                    addrs: &rest[..(rest.len() / 18).min(MAX_PATHS) * 18],
                }
            }
            12 => Frame::HandoffDecline {
                id: e,
                code: b as u8,
            },
            _ => Frame::Close { code: a, reason: d },
        }
    }

    proptest! {
        #[test]
        fn frame_round_trip((k, a, b, d, fin, e) in arb_frame()) {
            let f = build(k, a, b, &d, fin, e);
            let mut buf = vec![0u8; f.encoded_len() + 8];
            let n = f.encode(&mut buf);
            prop_assert_eq!(n, f.encoded_len());
            let (g, m) = decode(&buf[..n]).unwrap();
            prop_assert_eq!(m, n);
            prop_assert_eq!(g, f);
        }

        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = Reader::new(&data);
            while !r.is_empty() {
                if decode_frame(&mut r).is_err() { break; }
            }
            let _ = peek_record(&data);
        }

        #[test]
        fn truncated_frames_are_errors((k, a, b, d, fin, e) in arb_frame(), cut in 0usize..1000) {
            let f = build(k, a, b, &d, fin, e);
            let mut buf = vec![0u8; f.encoded_len()];
            f.encode(&mut buf);
            let cut = cut % buf.len();
            prop_assert!(decode(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn handoff_frames_have_bounded_fields() {
        let token = [7u8; HANDOFF_TOKEN_LEN];
        let addrs = [1u8; 18 * MAX_PATHS];
        let f = Frame::Handoff {
            id: 9,
            target: [3; 32],
            floor: 4,
            expires_ms: 10_000,
            token: &token,
            addrs: &addrs,
        };
        let mut buf = Vec::new();
        f.encode_to_vec(&mut buf);
        assert_eq!(buf.len(), 1 + 44 + 1 + 48 + 2 + 288);
        assert_eq!(decode(&buf).unwrap(), (f.clone(), buf.len()));
        // A token of another length, or an address list that is too long
        // or not whole addresses, is refused.
        for (token_len, addrs_len) in [(47, 0), (49, 0), (48, 17), (48, 18 * (MAX_PATHS + 1))] {
            let mut b = vec![ty::HANDOFF];
            b.extend_from_slice(&[0; 44]);
            b.push(token_len as u8);
            b.extend(std::iter::repeat_n(0u8, token_len));
            let mut p = 0;
            let mut v = [0u8; 8];
            put_varint(&mut v, &mut p, addrs_len as u64);
            b.extend_from_slice(&v[..p]);
            b.extend(std::iter::repeat_n(0u8, addrs_len));
            assert!(decode(&b).is_err(), "token {token_len}, addrs {addrs_len}");
        }
        let d = Frame::HandoffDecline {
            id: 9,
            code: DeclineCode::KeyNotAllowed as u8,
        };
        let mut buf = Vec::new();
        d.encode_to_vec(&mut buf);
        assert_eq!(buf, [ty::HANDOFF_DECLINE, 0, 0, 0, 9, 2]);
        assert!(!f.is_sequenced() && !d.is_sequenced());
    }

    #[test]
    fn varint_boundaries() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, VARINT_MAX] {
            let mut buf = [0u8; 8];
            let mut p = 0;
            put_varint(&mut buf, &mut p, v);
            assert_eq!(p, varint_len(v));
            assert_eq!(Reader::new(&buf).varint().unwrap(), v);
        }
    }

    #[test]
    fn oversized_record_refused_from_header() {
        let mut h = [0u8; 4];
        write_record_header(&mut h, RecordType::Data, MAX_RECORD_BODY + 1);
        assert!(matches!(
            peek_record(&h),
            Err(WireError::RecordTooLong { .. })
        ));
        write_record_header(&mut h, RecordType::Hello, 5000);
        assert!(matches!(
            peek_record(&h),
            Err(WireError::RecordTooLong { .. })
        ));
        assert!(matches!(
            peek_record(&[0x99]),
            Err(WireError::UnknownRecordType(0x99))
        ));
    }
}
