//! The `pool.vault` service: the daemon's side of `pool vault`
//! (`crates/pool-vault`), with its writes and refusals journaled.

use std::sync::Arc;

use pool_journal::{Event, Journal};
use pool_vault::{paths, Grant, VaultEvent, VaultPath, VaultServer};
use serde_json::json;

use crate::config::{VaultAccess, VaultSection};
use crate::router::{Incoming, ServeFuture, Service};

/// The vault a `[vault]` section describes.
pub struct VaultService {
    server: Arc<VaultServer>,
}

impl VaultService {
    /// Checks the section (the root must be a directory; grant paths must be
    /// vault paths) and builds the service.
    pub fn new(
        section: &VaultSection,
        journal: Option<Journal>,
    ) -> Result<Arc<VaultService>, String> {
        let root = &section.root;
        if !root.is_dir() {
            return Err(format!(
                "[vault] root {} is not a directory (create it, owned by the daemon's user)",
                root.display()
            ));
        }
        let mut grants = Vec::new();
        for g in &section.grant {
            grants.push(Grant {
                key: g.key,
                path: VaultPath::parse(&g.path)
                    .map_err(|e| format!("[[vault.grant]] path {}: {e}", g.path))?,
                access: match g.access {
                    VaultAccess::Read => paths::Access::Read,
                    VaultAccess::Write => paths::Access::Write,
                },
            });
        }
        let server = VaultServer::new(root.clone(), grants, move |e| {
            let Some(j) = &journal else { return };
            match e {
                VaultEvent::Write {
                    peer,
                    path,
                    written,
                    skipped,
                    sealed,
                } => j.record(
                    Event::VaultWrite,
                    json!({"peer": peer.to_string(), "path": path, "written": written, "skipped": skipped, "sealed": sealed}),
                ),
                VaultEvent::Refused {
                    peer,
                    op,
                    path,
                    reason,
                } => j.record_bulk(
                    Event::VaultRefused,
                    json!({"peer": peer.to_string(), "op": op, "path": path, "reason": reason}),
                ),
            }
        });
        Ok(Arc::new(VaultService {
            server: Arc::new(server),
        }))
    }
}

impl Service for VaultService {
    fn serve(self: Arc<Self>, stream: Incoming) -> ServeFuture {
        let server = self.server.clone();
        Box::pin(server.serve(stream.peer, stream.recv, stream.send))
    }
}
