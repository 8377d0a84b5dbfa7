//! How an endpoint is set up.

use std::net::SocketAddr;
use std::time::Duration;

use std::collections::HashSet;

use pool_core::{Config, PublicKey, SecretKey};

use crate::trust::Trust;

/// How an endpoint is set up. A key is required: there is no default
/// identity, and no default trust (an endpoint that trusts nobody refuses
/// every client).
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    pub(crate) key: SecretKey,
    pub(crate) protocol: Config,
    pub(crate) trust: Trust,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_pending_handshakes: usize,
    pub(crate) relays: Vec<String>,
    pub(crate) direct_retry: Duration,
    pub(crate) relay_only: bool,
    pub(crate) handoff: HandoffPolicy,
    pub(crate) greeting: Option<Greeting>,
}

/// What a listener says first to each new session ([`EndpointConfig::greeting`]):
/// given the initiator's key, the bytes to send on a stream the listener
/// opens, or `None` for none.
#[derive(Clone)]
pub struct Greeting(pub std::sync::Arc<GreetFn>);

/// The function behind a [`Greeting`].
pub type GreetFn = dyn Fn(&PublicKey) -> Option<Vec<u8>> + Send + Sync;

impl std::fmt::Debug for Greeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Greeting")
    }
}

/// Which handoffs a dialled session follows when its server offers to move
/// it to another server (the live handoff, docs/handoff.md). The offer
/// comes from the server this side authenticated, in an authenticated
/// frame, and the target proves the key the offer names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandoffPolicy {
    /// Follow any target the server names (the default).
    #[default]
    Any,
    /// Follow none: stay on the server (it is told, and keeps the session).
    Refuse,
    /// Follow only to these keys.
    Only(HashSet<PublicKey>),
}

impl EndpointConfig {
    /// A configuration for this node's key.
    pub fn new(key: SecretKey) -> Self {
        EndpointConfig {
            key,
            protocol: Config::default(),
            trust: Trust::new(),
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 1024,
            relays: Vec::new(),
            direct_retry: Duration::from_secs(60),
            relay_only: false,
            handoff: HandoffPolicy::Any,
            greeting: None,
        }
    }

    /// Sends a greeting to each new session: the bytes `g` returns for
    /// the initiator's key go on a stream this listener opens (finished
    /// at once), in the same flight as its handshake answer, so they
    /// arrive one round trip after the initiator's HELLO (0.5-RTT data,
    /// as a TLS 1.3 server's). They are encrypted to the new session's
    /// keys, so only the initiator can read them; the session is still
    /// only accepted once the initiator's first record confirms its keys.
    /// The director places clients this way.
    pub fn greeting(mut self, g: Greeting) -> Self {
        self.greeting = Some(g);
        self
    }
    /// Which handoffs dialled sessions follow (default: any the server
    /// names).
    pub fn handoff(mut self, policy: HandoffPolicy) -> Self {
        self.handoff = policy;
        self
    }
    /// Protocol knobs (windows, timers, ciphers).
    pub fn protocol(mut self, config: Config) -> Self {
        self.protocol = config;
        self
    }
    /// Who may connect (listener) and the fleet secret (both sides).
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }
    /// How long a new carrier may take to present its first record and to
    /// finish the handshake (default 5 s; slowloris connections are cut).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
    /// Relays (`HOST:PORT`, default port 9255): a listening endpoint
    /// registers at each so that peers can reach it by key alone; every
    /// endpoint uses them to reach peers without a direct path, and falls
    /// back to them when a direct path dies.
    pub fn relays(mut self, relays: Vec<String>) -> Self {
        self.relays = relays
            .into_iter()
            .map(|r| {
                if r.parse::<SocketAddr>().is_ok()
                    || r.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok())
                {
                    r
                } else {
                    format!("{r}:{}", pool_core::relay::DEFAULT_PORT)
                }
            })
            .collect();
        self
    }
    /// While a session runs through a relay, how often direct paths are
    /// tried again (default 60 s; also at once when candidates arrive or a
    /// local address changes).
    pub fn direct_retry(mut self, every: Duration) -> Self {
        self.direct_retry = every.max(Duration::from_millis(100));
        self
    }
    /// Keep dialled sessions on the relays: never try direct paths (for
    /// measuring or debugging a relay; default off).
    pub fn relay_only(mut self, on: bool) -> Self {
        self.relay_only = on;
        self
    }
    /// Handshakes in progress at once on a listener (default 1024).
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.max_pending_handshakes = n.max(1);
        self
    }
}
