//! A node that joins after the log it would need was purged gets the
//! state by InstallSnapshot RPCs, over POOL (with a cut while it joins)
//! and over TCP, and ends identical to the others.

use std::time::Duration;

use pool_raft::{Cluster, ClusterConfig, Request, Transport};

async fn learner_catches_up_by_snapshot(transport: Transport) {
    // Two voters; a snapshot every 100 entries, none kept behind it.
    let config = ClusterConfig::new(transport).voters(2).snapshots(100, 0);
    let cluster = Cluster::start(config).await.expect("start");
    cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .expect("leader");
    for i in 0..500 {
        let req = Request::Set {
            key: format!("k{i}"),
            value: i.to_string(),
        };
        cluster
            .write(req, Duration::from_secs(10))
            .await
            .expect("write");
    }
    // The voters have purged what node 2 would need from the log.
    let views = cluster.sm_views();
    assert!(views[0].snapshots_built >= 1, "no snapshot on node 0");
    assert_eq!(views[2].kv.len(), 0);

    cluster.cut();
    cluster.add_learners().await.expect("add learner");
    cluster.cut();
    for i in 500..600 {
        let req = Request::Set {
            key: format!("k{i}"),
            value: i.to_string(),
        };
        cluster
            .write(req, Duration::from_secs(10))
            .await
            .expect("write");
    }
    let state = cluster
        .check_identical(Duration::from_secs(10))
        .await
        .expect("identical");
    assert_eq!(state.kv.len(), 600);
    let learner = &cluster.sm_views()[2];
    assert!(
        learner.snapshots_installed >= 1,
        "node 2 caught up without a snapshot"
    );
    let snap = cluster
        .stats
        .summary(Some(pool_raft::stats::RpcKind::Snapshot));
    assert!(snap.answered >= 1, "no InstallSnapshot RPC answered");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_learner_catches_up_by_snapshot() {
    learner_catches_up_by_snapshot(Transport::Pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_learner_catches_up_by_snapshot() {
    learner_catches_up_by_snapshot(Transport::Tcp).await;
}
