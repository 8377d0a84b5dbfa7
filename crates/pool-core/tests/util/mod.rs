//! A deterministic two-endpoint harness: a virtual clock and a carrier
//! (two byte queues) that can be cut, corrupted or swapped.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod forge;

use std::time::{Duration, Instant};

use pool_core::{
    Acceptor, CloseReason, Config, Event, FleetSecret, Initiator, PublicKey, ReadResult, SecretKey,
    SeededRng, Session, StreamError, MAX_RECORD_LEN,
};

pub const T0_UNIX: u64 = 1_800_000_000_000_000_000;

pub fn key(n: u64) -> SecretKey {
    let mut rng = SeededRng::from_u64(n);
    let mut b = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rng, &mut b);
    SecretKey::from_bytes(b)
}

/// Sees (and may alter) every record one side sends.
pub type Tamper = Box<dyn FnMut(&mut [u8])>;

pub struct Pair {
    pub a: Session,
    pub b: Session,
    pub now: Instant,
    /// Bytes in flight a→b and b→a.
    pub ab: Vec<u8>,
    pub ba: Vec<u8>,
    pub a_events: Vec<Event>,
    pub b_events: Vec<Event>,
    pub rng: SeededRng,
    /// Called on every record a sends, before b sees it.
    pub tamper_ab: Option<Tamper>,
    /// Called on every record b sends, before a sees it.
    pub tamper_ba: Option<Tamper>,
    /// While set, a→b bytes stay in flight (so a cut loses them).
    pub hold_ab: bool,
    /// While set, b→a bytes stay in flight.
    pub hold_ba: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pair(a={:?}, b={:?})", self.a, self.b)
    }
}

/// Runs a full handshake between a fresh initiator (key 1) and responder (key 2).
pub fn handshake_with(
    ca: &Config,
    cb: &Config,
    fleet: Option<FleetSecret>,
) -> Result<Pair, pool_core::HandshakeError> {
    handshake_fleets(ca, cb, fleet.clone(), fleet)
}

/// As [`handshake_with`], with each side's own fleet secret (or none).
pub fn handshake_fleets(
    ca: &Config,
    cb: &Config,
    fleet_a: Option<FleetSecret>,
    fleet_b: Option<FleetSecret>,
) -> Result<Pair, pool_core::HandshakeError> {
    let now = Instant::now();
    let mut rng = SeededRng::from_u64(99);
    let (ka, kb) = (key(1), key(2));
    let mut acceptor = Acceptor::new(cb, kb, fleet_b);
    let mut hello = Vec::new();
    let init = Initiator::start(
        ca,
        &ka,
        acceptor.public_key(),
        fleet_a.as_ref(),
        T0_UNIX,
        &mut rng,
        &mut hello,
    )?;
    let mut welcome = Vec::new();
    let a_pub = ka.public_key();
    let b = acceptor.accept(
        now,
        T0_UNIX,
        b"src",
        &hello,
        &mut |k: &PublicKey| *k == a_pub,
        &mut rng,
        &mut welcome,
    )?;
    let a = init.finish(now, &welcome)?;
    Ok(Pair::from_sessions(a, b, now, rng))
}

pub fn pair() -> Pair {
    handshake_with(&Config::default(), &Config::default(), None).expect("handshake")
}

impl Pair {
    /// A pair around two sessions made elsewhere (a the initiator).
    pub fn from_sessions(a: Session, b: Session, now: Instant, rng: SeededRng) -> Pair {
        Pair {
            a,
            b,
            now,
            ab: Vec::new(),
            ba: Vec::new(),
            a_events: Vec::new(),
            b_events: Vec::new(),
            rng,
            tamper_ab: None,
            tamper_ba: None,
            hold_ab: false,
            hold_ba: false,
            buf: vec![0u8; MAX_RECORD_LEN],
        }
    }

    /// Moves records both ways until nothing moves. Returns bytes moved
    /// (sent plus handed over).
    pub fn drive(&mut self) -> usize {
        let mut total = 0;
        loop {
            let mut moved = 0;
            while let Some(n) = self.a.poll_transmit(self.now, &mut self.buf) {
                if let Some(t) = &mut self.tamper_ab {
                    t(&mut self.buf[..n]);
                }
                self.ab.extend_from_slice(&self.buf[..n]);
                moved += n;
            }
            while let Some(n) = self.b.poll_transmit(self.now, &mut self.buf) {
                if let Some(t) = &mut self.tamper_ba {
                    t(&mut self.buf[..n]);
                }
                self.ba.extend_from_slice(&self.buf[..n]);
                moved += n;
            }
            // Bytes handed over count as movement too: they may cause replies
            // (for example bytes a test put in flight by hand).
            if !self.ab.is_empty() && self.b.carrier_up() && !self.hold_ab {
                let used = self.b.handle_carrier_data(self.now, &mut self.ab);
                self.ab.drain(..used);
                moved += used;
            }
            if !self.ba.is_empty() && self.a.carrier_up() && !self.hold_ba {
                let used = self.a.handle_carrier_data(self.now, &mut self.ba);
                self.ba.drain(..used);
                moved += used;
            }
            while let Some(e) = self.a.poll_event() {
                self.a_events.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.b_events.push(e);
            }
            total += moved;
            if moved == 0 {
                return total;
            }
        }
    }

    /// Advances the clock, running both sides' timers.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|t| *t <= end)
                .min();
            match next {
                Some(t) => {
                    self.now = self.now.max(t);
                    self.a.handle_timeout(self.now);
                    self.b.handle_timeout(self.now);
                    self.drive();
                }
                None => break,
            }
        }
        self.now = end;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.drive();
    }

    /// The carrier dies: bytes in flight are lost.
    pub fn cut(&mut self) {
        self.hold_ab = false;
        self.hold_ba = false;
        self.ab.clear();
        self.ba.clear();
        self.a.carrier_lost(self.now);
        self.b.carrier_lost(self.now);
    }

    /// A new carrier: a resumes, b answers.
    pub fn resume(&mut self) -> Result<(), pool_core::HandshakeError> {
        let mut msg = Vec::new();
        self.a.start_resume(&mut self.rng, &mut msg)?;
        let mut reply = Vec::new();
        self.b
            .handle_resume(self.now, &msg, &mut self.rng, &mut reply)?;
        self.ab.clear();
        self.ba.clear();
        self.a.finish_resume(self.now, &reply)?;
        self.commit_resume()
    }

    /// The new carrier's first record, a to b: b switches to it (the
    /// responder's commit point).
    pub fn commit_resume(&mut self) -> Result<(), pool_core::HandshakeError> {
        let n = self
            .a
            .poll_transmit(self.now, &mut self.buf)
            .expect("the initiator sends at once after a resume");
        if let Some(t) = &mut self.tamper_ab {
            t(&mut self.buf[..n]);
        }
        let mut rec = self.buf[..n].to_vec();
        self.b.confirm_resume(self.now, &mut rec)
    }
}

/// The reason of the first `Event::Closed` among `events`, if any.
pub fn closed_reason(events: &[Event]) -> Option<&CloseReason> {
    events.iter().find_map(|e| match e {
        Event::Closed(r) => Some(r),
        _ => None,
    })
}

/// Reads what a stream has now: the bytes, and whether its FIN was read.
pub fn read_available(s: &mut Session, id: u64) -> Result<(Vec<u8>, bool), StreamError> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.stream_read(id, &mut buf)? {
            ReadResult::Data(n) => got.extend_from_slice(&buf[..n]),
            ReadResult::Fin => return Ok((got, true)),
            ReadResult::Blocked => return Ok((got, false)),
        }
    }
}

/// `len` bytes of a deterministic pattern starting at `offset`, distinct per `salt`.
pub fn pattern(offset: usize, len: usize, salt: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(salt.wrapping_mul(7)) as u8
                ^ (i >> 8) as u8
        })
        .collect()
}

/// Writes and reads `total` bytes of a deterministic pattern on `streams`
/// streams from a to b, calling `hook(pair, bytes_received)` after every
/// round so the test can cut, rekey or snapshot in the middle. Returns the
/// SHA-256 of what was sent and what arrived, per stream.
pub fn transfer(
    p: &mut Pair,
    streams: usize,
    total: usize,
    mut hook: impl FnMut(&mut Pair, usize),
) -> Vec<([u8; 32], [u8; 32], usize, usize)> {
    use ring::digest::{Context, SHA256};
    let per = total / streams;
    let ids: Vec<u64> = (0..streams)
        .map(|_| p.a.open_stream().expect("open"))
        .collect();
    let mut sent = vec![0usize; streams];
    let mut recvd = vec![0usize; streams];
    let mut fin = vec![false; streams];
    let mut hs: Vec<Context> = (0..streams).map(|_| Context::new(&SHA256)).collect();
    let mut hr: Vec<Context> = (0..streams).map(|_| Context::new(&SHA256)).collect();
    let mut chunk = vec![0u8; 100_000];
    let mut out = vec![0u8; 64 * 1024];
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 1_000_000, "transfer made no progress");
        for i in 0..streams {
            if sent[i] < per {
                let n = (per - sent[i]).min(chunk.len());
                for (j, c) in chunk[..n].iter_mut().enumerate() {
                    *c = ((sent[i] + j) as u64)
                        .wrapping_mul(31)
                        .wrapping_add(i as u64 * 7) as u8;
                }
                if let Ok(w) = p.a.stream_write(ids[i], &chunk[..n]) {
                    hs[i].update(&chunk[..w]);
                    sent[i] += w;
                }
            } else if sent[i] == per && p.a.stream_finish(ids[i]).is_ok() {
                sent[i] += 1;
            }
        }
        p.drive();
        for i in 0..streams {
            while !fin[i] {
                match p.b.stream_read(ids[i], &mut out) {
                    Ok(ReadResult::Data(n)) => {
                        hr[i].update(&out[..n]);
                        recvd[i] += n;
                    }
                    Ok(ReadResult::Fin) => fin[i] = true,
                    Ok(ReadResult::Blocked) => break,
                    Err(e) => panic!("read error: {e}"),
                }
            }
        }
        let got: usize = recvd.iter().sum();
        hook(p, got);
        if fin.iter().all(|f| *f) {
            break;
        }
        if p.drive() == 0 && !p.a.carrier_up() {
            // Let timers run when the carrier is down and the hook did nothing.
            p.advance(Duration::from_millis(1));
        }
    }
    (0..streams)
        .map(|i| {
            let a: [u8; 32] = hs[i].clone().finish().as_ref().try_into().unwrap();
            let b: [u8; 32] = hr[i].clone().finish().as_ref().try_into().unwrap();
            (a, b, per, recvd[i])
        })
        .collect()
}
