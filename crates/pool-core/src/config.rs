//! Protocol tuning knobs, with defaults chosen for fleets on real networks.

use std::time::Duration;

use crate::crypto::{aes_hardware, CipherSuite};

/// Protocol configuration. Start from [`Config::default`] and chain setters.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) stream_window: u64,
    pub(crate) session_window: u64,
    pub(crate) max_streams: u64,
    pub(crate) replay_buffer: usize,
    pub(crate) ack_every: usize,
    pub(crate) ack_delay: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) dead_after: Duration,
    pub(crate) probe_timeout: Option<Duration>,
    pub(crate) resume_deadline: Duration,
    pub(crate) rekey_after: Duration,
    pub(crate) rekey_after_records: u64,
    pub(crate) max_clock_skew: Duration,
    pub(crate) handshake_rate: Option<(u32, u32)>,
    pub(crate) ciphers: Vec<CipherSuite>,
}

impl Default for Config {
    fn default() -> Self {
        let mut ciphers = Vec::new();
        if aes_hardware() {
            ciphers.push(CipherSuite::Aes256Gcm);
        }
        ciphers.push(CipherSuite::ChaCha20Poly1305);
        Config {
            stream_window: 4 << 20,
            session_window: 16 << 20,
            max_streams: 4096,
            replay_buffer: 8 << 20,
            ack_every: 128 << 10,
            ack_delay: Duration::from_millis(10),
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
            probe_timeout: Some(Duration::from_secs(2)),
            resume_deadline: Duration::from_secs(60),
            rekey_after: Duration::from_secs(120),
            rekey_after_records: 1 << 40,
            max_clock_skew: Duration::from_secs(600),
            handshake_rate: Some((200, 400)),
            ciphers,
        }
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&mut self, value: $ty) -> &mut Self {
            self.$name = value;
            self
        }
    };
}

impl Config {
    setter!(
        /// Bytes the peer may send on one stream before we read them (default 4 MiB).
        stream_window: u64
    );
    setter!(
        /// Bytes the peer may send on all streams before we read them (default 16 MiB).
        session_window: u64
    );
    setter!(
        /// Streams the peer may have open at once (default 4096).
        max_streams: u64
    );
    setter!(
        /// Bytes of unacknowledged frames kept for resend after a resume
        /// (default 8 MiB). Writers wait when it is full.
        replay_buffer: usize
    );
    setter!(
        /// Acknowledge at least every this many received bytes (default 128 KiB).
        ack_every: usize
    );
    setter!(
        /// Acknowledge at most this long after receiving (default 10 ms).
        ack_delay: Duration
    );
    setter!(
        /// Ping interval: liveness and RTT samples (default 5 s).
        keepalive: Duration
    );
    setter!(
        /// A carrier that delivered nothing for this long is dead (default 20 s).
        dead_after: Duration
    );
    setter!(
        /// A carrier that leaves sent data or a ping unanswered for this
        /// long (and at least 4 round trips) is dead: the path is broken
        /// even if TCP has not noticed (default 2 s; `None` leaves only
        /// `dead_after`). This bounds how fast a session moves off a cut
        /// path while data flows; an idle one notices within one keepalive
        /// more.
        probe_timeout: Option<Duration>
    );
    setter!(
        /// A session without a carrier for this long is closed (default 60 s).
        resume_deadline: Duration
    );
    setter!(
        /// Start a new key epoch after this long (default 120 s, as WireGuard).
        rekey_after: Duration
    );
    setter!(
        /// Start a new key epoch after this many records (default 2^40).
        rekey_after_records: u64
    );
    setter!(
        /// Handshake timestamps further than this from our clock are refused
        /// (default 10 min).
        max_clock_skew: Duration
    );
    setter!(
        /// Handshakes per second and burst allowed per source address;
        /// `None` disables the limit (default 200/s, burst 400).
        handshake_rate: Option<(u32, u32)>
    );

    /// Data-path ciphers to offer or accept, in order of preference.
    /// ChaCha20-Poly1305 is always added if missing.
    pub fn ciphers(&mut self, ciphers: &[CipherSuite]) -> &mut Self {
        self.ciphers = ciphers.to_vec();
        if !self.ciphers.contains(&CipherSuite::ChaCha20Poly1305) {
            self.ciphers.push(CipherSuite::ChaCha20Poly1305);
        }
        self
    }

    /// How long a session may go without a carrier before it is closed.
    pub fn get_resume_deadline(&self) -> Duration {
        self.resume_deadline
    }

    pub(crate) fn cipher_bits(&self) -> u8 {
        self.ciphers.iter().fold(0, |acc, c| acc | c.bit())
    }
}
