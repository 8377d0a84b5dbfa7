//! The client's side of placement: dial the director, read where to go,
//! dial that worker. One extra round trip against dialling the worker
//! directly: the director pushes the placement right after its handshake
//! answer, before the client asks anything.

use std::time::Duration;

use pool_net::{Endpoint, PublicKey, Session};
use tracing::{debug, info};

use crate::store::WorkerState;
use crate::wire::{write_line, LineReader, Placement, PlacementReply, WorkerAnswer, WorkerQuery};

fn alive(state: Option<WorkerState>) -> bool {
    matches!(state, Some(WorkerState::Active | WorkerState::Draining))
}

/// Why a client could not be placed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlaceError {
    /// The director or the worker could not be reached.
    #[error(transparent)]
    Net(#[from] pool_net::Error),
    /// The director has no worker for this client now.
    #[error("the director at {director} has no worker for us: {reason}")]
    NoWorker {
        /// The director's address.
        director: String,
        /// What it said.
        reason: String,
    },
    /// The director did not say where to go in time, or said nonsense.
    #[error("the director at {director} did not place us: {reason} (is it a `pool director`?)")]
    Protocol {
        /// The director's address.
        director: String,
        /// What went wrong.
        reason: String,
    },
    /// None of the worker's addresses answered.
    #[error("the worker {worker} the director chose is unreachable at {addrs}: {last}")]
    Worker {
        /// Its key.
        worker: String,
        /// Its addresses.
        addrs: String,
        /// The last error.
        last: String,
    },
}

/// How long the director has to say where to go, after its handshake.
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// Asks the director at `director` (key `director_key`) where to go.
///
/// # Errors
///
/// See [`PlaceError`].
pub async fn place(
    endpoint: &Endpoint,
    director: &str,
    director_key: PublicKey,
) -> Result<Placement, PlaceError> {
    let (reply, _) = ask(endpoint, director, director_key, None).await?;
    placed(director, reply)
}

fn placed(director: &str, reply: PlacementReply) -> Result<Placement, PlaceError> {
    match reply {
        PlacementReply::Placed(p) if !p.addrs.is_empty() => Ok(p),
        PlacementReply::Placed(_) => Err(PlaceError::Protocol {
            director: director.to_string(),
            reason: "a worker without addresses".into(),
        }),
        PlacementReply::Error { error } => Err(PlaceError::NoWorker {
            director: director.to_string(),
            reason: error,
        }),
    }
}

/// One session with the director: the placement it pushes and, with
/// `worker`, the answer to whether that worker lives.
async fn ask(
    endpoint: &Endpoint,
    director: &str,
    director_key: PublicKey,
    worker: Option<PublicKey>,
) -> Result<(PlacementReply, Option<WorkerAnswer>), PlaceError> {
    let session = connect_any(endpoint, director, director_key).await?;
    let protocol = |reason: String| PlaceError::Protocol {
        director: director.to_string(),
        reason,
    };
    let talk = async {
        let stream = session
            .accept_stream()
            .await
            .ok_or_else(|| protocol("the session closed".into()))?;
        let mut r = LineReader::new(stream);
        let pushed = r
            .next::<PlacementReply>()
            .await
            .map_err(|e| protocol(e.to_string()))?
            .ok_or_else(|| protocol("an empty answer".into()))?;
        let Some(worker) = worker else {
            return Ok((pushed, None));
        };
        let mut q = session.open_stream().await?;
        write_line(&mut q, &WorkerQuery { worker })
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let answer = LineReader::new(q)
            .next::<WorkerAnswer>()
            .await
            .map_err(|e| protocol(e.to_string()))?
            .ok_or_else(|| protocol("no answer about our worker".into()))?;
        Ok((pushed, Some(answer)))
    };
    let reply = tokio::time::timeout(PLACEMENT_WAIT, talk)
        .await
        .map_err(|_| protocol(format!("no answer within {}s", PLACEMENT_WAIT.as_secs())));
    // Done with the director either way.
    tokio::spawn(async move {
        session.close("placed").await;
    });
    reply?
}

/// Dials the director at `addrs`: one `HOST:PORT`, or several separated by
/// commas (directors sharing a store and a key: the one that leads
/// answers, the others do not listen), each in turn.
///
/// # Errors
///
/// The last address's error.
pub async fn connect_any(
    endpoint: &Endpoint,
    addrs: &str,
    key: PublicKey,
) -> Result<Session, pool_net::Error> {
    let mut last = None;
    for a in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match endpoint.connect(a, key).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| pool_net::Error::Resolve {
        addr: addrs.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"),
    }))
}

/// Dials the worker `p` names, each address in turn.
///
/// # Errors
///
/// [`PlaceError::Worker`] when none answers.
pub async fn dial(endpoint: &Endpoint, p: &Placement) -> Result<Session, PlaceError> {
    let mut last = String::new();
    for a in &p.addrs {
        match endpoint.connect(a, p.worker).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                debug!(addr = %a, "worker address failed: {e}");
                last = e.to_string();
            }
        }
    }
    Err(PlaceError::Worker {
        worker: p.worker.short(),
        addrs: p.addrs.join(", "),
        last,
    })
}

/// Places this client through the director and dials its worker.
///
/// # Errors
///
/// See [`PlaceError`].
pub async fn connect(
    endpoint: &Endpoint,
    director: &str,
    director_key: PublicKey,
) -> Result<(Session, Placement), PlaceError> {
    let p = place(endpoint, director, director_key).await?;
    let s = dial(endpoint, &p).await?;
    info!(worker = %p.worker.short(), session = %s.id(), "placed by the director");
    Ok((s, p))
}

/// How long a placed session may be without a carrier before the client
/// asks the director whether its worker still lives.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(500);

/// How often a client whose worker is suspect asks the director again.
pub const ASK_EVERY: Duration = Duration::from_millis(250);

/// Watches a placed session: once it has had no carrier for
/// [`SUSPECT_AFTER`], asks the director every [`ASK_EVERY`]; when the
/// director places the client on another worker (its worker was declared
/// lost), dials it and returns the new session (the caller closes the old
/// one, which resets its streams: the state that lived only on the dead
/// worker is gone). Returns `None` when `current` closes by itself.
pub async fn watch(
    endpoint: &Endpoint,
    director: &str,
    director_key: PublicKey,
    current: &Session,
) -> Option<(Session, Placement)> {
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        if current.is_closed() {
            return None;
        }
        let st = current.stats();
        if st.carrier == "none" {
            let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= SUSPECT_AFTER {
                let worker = current.peer_key();
                match ask(endpoint, director, director_key, Some(worker)).await {
                    Ok((_, Some(a))) if alive(a.state) => {
                        debug!("the director still counts our worker alive; waiting");
                    }
                    Ok((pushed, answer)) => {
                        let reply = answer.and_then(|a| a.placement).unwrap_or(pushed);
                        match placed(director, reply) {
                            Ok(p) if p.worker != worker => match dial(endpoint, &p).await {
                                Ok(s) => return Some((s, p)),
                                Err(e) => debug!("re-placement failed: {e}"),
                            },
                            Ok(_) => debug!("placed on the same worker again; waiting"),
                            Err(e) => debug!("no new placement: {e}"),
                        }
                    }
                    Err(e) => debug!("the director did not answer: {e}"),
                }
            }
        } else {
            down_since = None;
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}
