//! The path manager: which carrier a session uses, and when it moves.
//!
//! - Both sides tell each other where they accept direct carriers (PATHS
//!   frames): their interface addresses with the listening port, plus the
//!   address a relay observed. They say it again after every resume and
//!   whenever their local addresses change.
//! - The initiator dials with a [`PathDialer`]: the last direct address
//!   that worked first, the relays after a short head start (or at once
//!   when the direct attempt fails). The first carrier that authenticates
//!   wins.
//! - While on a relay, the initiator tries the peer's direct candidates:
//!   at once when they arrive, every `direct_retry` (default 60 s), and
//!   whenever a local address changes. A candidate that connects is
//!   switched to by a resume while the relay carrier keeps working
//!   (make-before-break).
//! - A path that leaves data or a ping unanswered for the probe timeout
//!   (default 2 s, at least 4 RTT) is dead; the initiator then resumes on
//!   whatever [`PathDialer`] finds: the relay if the direct path is gone.
//!
//! See `docs/paths.md` for the states, timers and why each default.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pool_core::{PublicKey, SecretKey};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{debug, info, Instrument};

use crate::carrier::{tune, BoxedCarrier, DialFuture, Dialer, TcpDialer};
use crate::error::Error;
use crate::relay::RelayDialer;
use crate::session::{self, Session, Shared};

/// How often local interface addresses are looked at.
const ADDRESS_POLL: Duration = Duration::from_secs(1);
/// The direct attempt's head start before relays are dialled too.
const DIRECT_HEAD_START: Duration = Duration::from_millis(250);
/// How long one direct candidate may take to connect.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What sessions of one endpoint share about paths.
pub(crate) struct PathCtx {
    /// The listening address, if the endpoint listens.
    pub(crate) listen: Option<SocketAddr>,
    /// Our addresses as relays observed them.
    pub(crate) observed: Mutex<Vec<IpAddr>>,
    /// Bumped when local addresses (or observed ones) change.
    pub(crate) version: tokio::sync::watch::Sender<u64>,
    pub(crate) relays: Vec<String>,
    pub(crate) direct_retry: Duration,
}

impl PathCtx {
    pub(crate) fn new(
        listen: Option<SocketAddr>,
        relays: Vec<String>,
        direct_retry: Duration,
    ) -> Arc<PathCtx> {
        let ctx = Arc::new(PathCtx {
            listen,
            observed: Mutex::new(Vec::new()),
            version: tokio::sync::watch::Sender::new(0),
            relays,
            direct_retry,
        });
        // Only nodes with relays move sessions between paths.
        if !ctx.relays.is_empty() {
            tokio::spawn(watch_addresses(Arc::downgrade(&ctx)));
        }
        ctx
    }

    pub(crate) fn set_observed(&self, ip: IpAddr) {
        let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        if !o.contains(&ip) {
            o.push(ip);
            drop(o);
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Where this node accepts direct carriers (empty if it does not listen).
    pub(crate) fn local_paths(&self) -> Vec<SocketAddr> {
        let Some(listen) = self.listen else {
            return Vec::new();
        };
        let observed = self
            .observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut ips: Vec<IpAddr> = if listen.ip().is_unspecified() {
            let v4_only = listen.is_ipv4();
            pool_sys::local_addresses()
                .into_iter()
                .filter(|ip| !(v4_only && ip.is_ipv6()))
                .collect()
        } else {
            vec![listen.ip()]
        };
        // Link-local IPv6 needs a scope to be dialled: leave it out.
        ips.retain(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80));
        // Loopback only helps a peer on this same host: offer it when the
        // relay saw us on loopback, or when there is nothing else.
        let local_only =
            ips.iter().all(|ip| ip.is_loopback()) || observed.iter().any(|ip| ip.is_loopback());
        if !local_only {
            ips.retain(|ip| !ip.is_loopback());
        }
        for ip in observed {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips.into_iter()
            .take(pool_core::wire::MAX_PATHS)
            .map(|ip| SocketAddr::new(ip, listen.port()))
            .collect()
    }
}

async fn watch_addresses(ctx: Weak<PathCtx>) {
    let mut last = pool_sys::local_addresses();
    loop {
        tokio::time::sleep(ADDRESS_POLL).await;
        let Some(ctx) = ctx.upgrade() else { return };
        let now = pool_sys::local_addresses();
        if now != last {
            debug!(?now, "local addresses changed");
            last = now;
            ctx.version.send_modify(|v| *v += 1);
        }
    }
}

/// Dials a peer by the best path known: its direct address (the last that
/// worked, or the one given), racing the relays after a short head start.
pub(crate) struct PathDialer {
    key: SecretKey,
    peer: PublicKey,
    direct: Mutex<Option<String>>,
    relays: Vec<String>,
}

impl PathDialer {
    pub(crate) fn new(
        key: SecretKey,
        peer: PublicKey,
        direct: Option<String>,
        relays: Vec<String>,
    ) -> PathDialer {
        PathDialer {
            key,
            peer,
            direct: Mutex::new(direct),
            relays,
        }
    }

    fn direct(&self) -> Option<String> {
        self.direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_direct(&self, addr: String) {
        *self.direct.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    pub(crate) fn has_relays(&self) -> bool {
        !self.relays.is_empty()
    }

    async fn dial_relays(&self) -> Result<BoxedCarrier, Error> {
        let mut last = Error::NoPath {
            peer: self.peer.to_token(),
        };
        for r in &self.relays {
            match RelayDialer::new(r.clone(), self.key.clone(), self.peer)
                .dial()
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => {
                    debug!(relay = %r, error = %e, "relay dial failed");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

impl Dialer for PathDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let Some(direct) = self.direct() else {
                return self.dial_relays().await;
            };
            let direct_fut = async { TcpDialer::new(direct).dial().await };
            if self.relays.is_empty() {
                return direct_fut.await;
            }
            tokio::pin!(direct_fut);
            let relay_fut = self.dial_relays();
            tokio::pin!(relay_fut);
            let head = tokio::time::sleep(DIRECT_HEAD_START);
            tokio::pin!(head);
            let (mut direct_done, mut relay_on, mut relay_done) = (false, false, false);
            let mut direct_err = None;
            loop {
                tokio::select! {
                    r = &mut direct_fut, if !direct_done => match r {
                        Ok(c) => return Ok(c),
                        Err(e) => {
                            direct_done = true;
                            relay_on = true;
                            if relay_done {
                                return Err(e);
                            }
                            direct_err = Some(e);
                        }
                    },
                    _ = &mut head, if !relay_on => relay_on = true,
                    r = &mut relay_fut, if relay_on && !relay_done => match r {
                        Ok(c) => return Ok(c),
                        Err(e) => {
                            relay_done = true;
                            if direct_done {
                                return Err(direct_err.unwrap_or(e));
                            }
                        }
                    },
                }
            }
        })
    }

    fn describe(&self) -> String {
        match (self.direct(), self.relays.first()) {
            (Some(d), None) => d,
            (Some(d), Some(r)) => format!("{d} (or relay {r})"),
            (None, Some(r)) => format!("{} via relay {r}", self.peer.short()),
            (None, None) => format!("{} (no path)", self.peer.short()),
        }
    }
}

/// The path manager task of one session: advertises our candidates and,
/// on the initiator, moves from a relay to a direct path when one works.
///
/// Direct paths are tried when candidates first arrive or change, when a
/// local address changes, and every `direct_retry` while on a relay: not
/// right after falling back (hysteresis: a path that just failed is not
/// hammered).
/// Starts the path manager of a new session (its candidates, and for an
/// initiator with `dialer` its moves to a direct path).
pub(crate) fn start(session: &Session, ctx: Arc<PathCtx>, dialer: Option<Arc<PathDialer>>) {
    let shared = session.shared.clone();
    let span = session::span(&shared);
    tokio::spawn(run(shared, ctx, dialer).instrument(span));
}

async fn run(shared: Arc<Shared>, ctx: Arc<PathCtx>, dialer: Option<Arc<PathDialer>>) {
    let mut version = ctx.version.subscribe();
    // Our candidates, computed again only when local addresses change (the
    // core sends them again by itself after every resume).
    let mut advertise = true;
    let mut due = true;
    let mut next_retry: Option<tokio::time::Instant> = None;
    loop {
        let paths_changed = shared.paths_changed.notified();
        tokio::pin!(paths_changed);
        paths_changed.as_mut().enable();
        let app = shared.app.notified();
        tokio::pin!(app);
        app.as_mut().enable();
        let (on_relay, candidates) = {
            let mut st = shared.lock();
            if st.closed.is_some() {
                return;
            }
            if advertise {
                st.core.set_local_paths(&ctx.local_paths());
            }
            (
                st.core.carrier_up() && st.carrier_kind == "relay",
                st.peer_paths.clone(),
            )
        };
        if std::mem::take(&mut advertise) {
            shared.wake.notify_one();
        }
        if let Some(d) = &dialer {
            if on_relay && !candidates.is_empty() {
                if next_retry.is_none() {
                    next_retry = Some(tokio::time::Instant::now() + ctx.direct_retry);
                }
                if due {
                    due = false;
                    next_retry = Some(tokio::time::Instant::now() + ctx.direct_retry);
                    if try_direct(&shared, d, &candidates).await {
                        next_retry = None;
                        continue;
                    }
                }
            } else {
                next_retry = None;
            }
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(next_retry.unwrap_or(far));
        tokio::select! {
            _ = &mut paths_changed => due = true,
            r = version.changed() => {
                if r.is_err() {
                    return;
                }
                advertise = true;
                due = true;
            }
            _ = sleep => due = true,
            _ = &mut app => {}
        }
    }
}

/// Tries the direct candidates at once; the first that connects and
/// resumes the session wins. Returns whether the session moved.
async fn try_direct(shared: &Arc<Shared>, dialer: &PathDialer, candidates: &[SocketAddr]) -> bool {
    let mut attempts = JoinSet::new();
    for &addr in candidates {
        attempts.spawn(async move {
            let r = tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
            (addr, r)
        });
    }
    while let Some(done) = attempts.join_next().await {
        let Ok((addr, Ok(Ok(sock)))) = done else {
            continue;
        };
        tune(&sock);
        match session::resume_on(shared, Box::new(sock), &addr.to_string()).await {
            Ok(()) => {
                info!(to = %addr, "session moved to a direct path");
                dialer.set_direct(addr.to_string());
                return true;
            }
            Err(e) => debug!(to = %addr, error = %e, "direct candidate failed"),
        }
    }
    false
}
