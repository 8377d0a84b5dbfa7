//! Authorizing RPCs by the caller's POOL key.

use std::collections::HashSet;
use std::sync::Arc;

use pool_net::PublicKey;
use tonic::{Request, Status};

use crate::server::PoolConnectInfo;

/// The caller's authenticated POOL key, or `None` when the request did not
/// come over POOL (plain TCP, or a `tcp2pool` bridge's far side on TCP).
pub fn peer_key<T>(request: &Request<T>) -> Option<PublicKey> {
    request
        .extensions()
        .get::<Option<PoolConnectInfo>>()
        .and_then(|i| i.as_ref())
        .map(|i| i.peer)
}

/// A tonic interceptor that lets through only RPCs from the listed POOL
/// keys: others get `PERMISSION_DENIED` before the service sees them.
/// Requests that did not come over POOL are refused too, unless
/// [`AllowKeys::and_tcp`] says the TCP side is trusted by other means.
///
/// Wrap a generated server with it:
/// `KvServer::with_interceptor(kv, AllowKeys::new([client_key]))`.
#[derive(Clone, Debug)]
pub struct AllowKeys {
    keys: Arc<HashSet<PublicKey>>,
    tcp: bool,
}

impl AllowKeys {
    /// Allows exactly `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> AllowKeys {
        AllowKeys {
            keys: Arc::new(keys.into_iter().collect()),
            tcp: false,
        }
    }

    /// Also lets through requests that did not come over POOL.
    pub fn and_tcp(mut self) -> AllowKeys {
        self.tcp = true;
        self
    }

    /// Whether a request from `key` (`None`: not over POOL) may go on.
    pub fn allows(&self, key: Option<&PublicKey>) -> bool {
        match key {
            Some(k) => self.keys.contains(k),
            None => self.tcp,
        }
    }
}

impl tonic::service::Interceptor for AllowKeys {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let key = peer_key(&request);
        if self.allows(key.as_ref()) {
            return Ok(request);
        }
        Err(match key {
            Some(k) => Status::permission_denied(format!(
                "POOL key {} may not call this service",
                k.short()
            )),
            None => Status::permission_denied("this service answers only over POOL"),
        })
    }
}
