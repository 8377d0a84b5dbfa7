//! Three openraft nodes on real sockets, carriers cut every 3 s while a
//! client writes 100 entries a second: over POOL every write commits, the
//! state machines end identical, and the cuts cost no election; over TCP
//! the same harness runs and stays correct.

use std::time::Duration;

use pool_raft::bench::{run, Report, RunOptions};
use pool_raft::Transport;

fn options(transport: Transport) -> RunOptions {
    RunOptions {
        transport,
        duration: Duration::from_secs(14),
        cut_every: Some(Duration::from_secs(3)),
        writes_per_sec: 100,
        heartbeat_ms: 50,
    }
}

fn assert_correct(r: &Report) {
    assert!(
        r.writes_issued >= 1400,
        "writes issued: {}",
        r.writes_issued
    );
    assert_eq!(r.writes_failed, 0, "writes that never committed");
    assert_eq!(r.writes_acked, r.writes_issued, "every write acknowledged");
    assert!(r.identical, "state machines differ: {:?}", r.diverged);
    assert_eq!(r.acked_missing, 0, "acknowledged writes missing");
    // Ten warm-up writes, the client's writes; every one of them distinct.
    assert_eq!(r.keys, r.writes_acked + 10);
    // Cuts at 3, 6, 9 and 12 s.
    assert_eq!(r.cuts, 4, "cut rounds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_cluster_survives_carrier_cuts() {
    let r = run(&options(Transport::Pool)).await.expect("run");
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_correct(&r);
    // Every node keeps a session to each of the two others: six carriers
    // per round, each of which resumed.
    assert_eq!(r.carriers_cut, 6 * r.cuts);
    assert!(r.reconnects >= r.carriers_cut, "resumes: {}", r.reconnects);
    // A resume loses no byte, so no RPC fails under a cut.
    assert_eq!(r.rpc.errors, 0, "RPC errors over POOL");
    assert!(r.append.answered > 1000);
    // Measured: no election at all in these runs (a resume on loopback
    // takes about a millisecond, the election timeout is 150-300 ms).
    // One is allowed for a loaded CI machine stalling a node's thread.
    assert!(
        r.stability.elections <= 1,
        "elections: {}",
        r.stability.elections
    );
    assert!(r.stability.leader_changes <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_cluster_stays_correct_across_cuts() {
    let r = run(&options(Transport::Tcp)).await.expect("run");
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_correct(&r);
    assert!(
        r.carriers_cut >= r.cuts,
        "connections cut: {}",
        r.carriers_cut
    );
}
