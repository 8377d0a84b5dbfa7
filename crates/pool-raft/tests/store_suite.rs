//! The memory log store and state machine pass openraft's own storage
//! test suite (vote, append, truncate, purge, log state, applied state,
//! membership, snapshots).

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use pool_raft::store::{LogStore, StateMachine};
use pool_raft::{NodeId, TypeConfig};

struct Fresh;

impl StoreBuilder<TypeConfig, LogStore, StateMachine> for Fresh {
    async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError<NodeId>> {
        Ok(((), LogStore::new(), StateMachine::new()))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Fresh).expect("openraft's storage suite");
}
