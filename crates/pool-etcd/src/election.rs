//! Leader election for directors sharing one etcd: a campaign on
//! `{prefix}leader` with a lease of its own, kept alive from a task, and
//! the phase (`Lead`) that [`EtcdStore::deposed`](pool_director::store::Store::deposed)
//! waits on.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use pool_director::store::{Store, StoreError};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::{lease_not_found, timed, ttl_secs, EtcdStore};

/// One campaign: the lease it runs on, and the keeper task's stop line.
pub(crate) struct Campaign {
    generation: u64,
    /// Dropped (with the campaign or the store): the keeper revokes the
    /// lease and stops.
    _stop: oneshot::Sender<()>,
}

/// Where the campaign of one generation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No campaign yet.
    Idle,
    /// Waiting for the lead.
    Campaigning,
    /// Leading.
    Leading,
    /// Led, and the lease is gone.
    Deposed,
    /// The lease went before the lead was won.
    Lost,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Lead {
    pub(crate) generation: u64,
    pub(crate) phase: Phase,
}

impl EtcdStore {
    pub(crate) async fn campaign_inner(&self, me: &str) -> Result<(), StoreError> {
        let mut slot = self.campaign.lock().await;
        if let Some(c) = slot.as_ref() {
            let lead = *self.lead.borrow();
            if lead.generation == c.generation && lead.phase == Phase::Leading {
                return Ok(());
            }
        }
        // A campaign lost or deposed before: its keeper revokes its lease.
        *slot = None;
        let mut leases = self.client.lease_client();
        let lease = timed(leases.grant(ttl_secs(self.lease_ttl), None))
            .await
            .map_err(|e| self.err("lease to campaign with", e))?
            .id();
        let generation = self.lead.borrow().generation + 1;
        self.lead.send_replace(Lead {
            generation,
            phase: Phase::Campaigning,
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(keep_leader_lease(
            self.client.lease_client(),
            lease,
            self.lease_ttl,
            self.lead.clone(),
            generation,
            stopped,
            self.describe(),
        ));
        *slot = Some(Campaign {
            generation,
            _stop: stop,
        });
        tracing::info!(store = %self.describe(), me, lease, "campaigning for the lead");
        let mut lead = self.lead.subscribe();
        let lost = lead.wait_for(|l| l.generation != generation || l.phase == Phase::Lost);
        let mut election = self.client.election_client();
        let name = self.election_name();
        let outcome = tokio::select! {
            won = election.campaign(name, me, lease) => {
                won.map_err(|e| self.err("campaign", e)).map(|_| ())
            }
            _ = lost => Err(self.err("campaign", "the campaign's lease lapsed while waiting")),
        };
        if outcome.is_ok() {
            let mut leading = false;
            self.lead.send_modify(|l| {
                if l.generation == generation && l.phase == Phase::Campaigning {
                    l.phase = Phase::Leading;
                    leading = true;
                }
            });
            if leading {
                tracing::info!(store = %self.describe(), me, "leading");
                return Ok(());
            }
        }
        *slot = None;
        outcome.and(Err(self.err(
            "campaign",
            "the campaign's lease lapsed as the lead was won",
        )))
    }

    pub(crate) async fn deposed_inner(&self) -> Result<(), StoreError> {
        let mut lead = self.lead.subscribe();
        // The sender lives as long as `self`: this waits, or returns deposed.
        let _ = lead.wait_for(|l| l.phase == Phase::Deposed).await;
        Ok(())
    }
}

/// One keep-alive on the stream kept in `stream` (opened if `None`).
async fn keep_alive_on(
    leases: &mut LeaseClient,
    lease: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<bool, etcd_client::Error> {
    if let Some((keeper, answers)) = stream.as_mut() {
        keeper.keep_alive().await?;
        return match answers.message().await? {
            Some(answer) => Ok(answer.ttl() > 0),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".to_string(),
            )),
        };
    }
    match leases.keep_alive(lease).await {
        Ok(opened) => {
            *stream = Some(opened);
            Ok(true)
        }
        Err(e) if lease_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Keeps the campaign's lease alive every third of its TTL until `stop`
/// (then revokes it), or until it is gone (then says so in `lead`).
async fn keep_leader_lease(
    mut leases: LeaseClient,
    lease: i64,
    ttl: Duration,
    lead: Arc<watch::Sender<Lead>>,
    generation: u64,
    mut stop: oneshot::Receiver<()>,
    store: String,
) {
    let ttl = Duration::from_secs(u64::try_from(ttl_secs(ttl)).unwrap_or(1));
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut last_ok = Instant::now();
    let mut stream = None;
    loop {
        tokio::select! {
            _ = &mut stop => {
                match timed(leases.revoke(lease)).await {
                    Ok(_) => tracing::debug!(%store, lease, "campaign lease revoked"),
                    Err(e) => tracing::warn!(%store, lease, error = %e, "could not revoke the campaign's lease: it lapses on its own"),
                }
                return;
            }
            () = tokio::time::sleep(period) => {}
        }
        let gone = match tokio::time::timeout(
            period,
            keep_alive_on(&mut leases, lease, &mut stream),
        )
        .await
        {
            Ok(Ok(true)) => {
                last_ok = Instant::now();
                false
            }
            Ok(Ok(false)) => {
                tracing::warn!(%store, lease, "the campaign's lease is gone (revoked or expired)");
                true
            }
            failed => {
                stream = None;
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_string(),
                };
                let unsure = last_ok.elapsed() + period >= ttl;
                tracing::warn!(%store, lease, %error, giving_up = unsure, "keep-alive of the campaign's lease failed");
                unsure
            }
        };
        if gone {
            // Best effort: if it still lives, the lead passes on at once.
            let _ = timed(leases.revoke(lease)).await;
            lead.send_modify(|l| {
                if l.generation == generation {
                    l.phase = match l.phase {
                        Phase::Leading | Phase::Deposed => Phase::Deposed,
                        _ => Phase::Lost,
                    };
                }
            });
            return;
        }
    }
}
