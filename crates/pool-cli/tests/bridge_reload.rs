//! `pool daemon` reloads on SIGHUP: transfers running through both
//! daemons (pool2tcp and tcp2pool sides) lose nothing while each reloads,
//! and a changed `[trust] authorized` file takes effect: a key added is
//! accepted after SIGHUP (refused before), a key removed is refused for
//! new sessions.
mod util;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use util::*;

const TRANSFER: usize = 2 << 20;
const CHUNK: usize = 32 << 10;
const PING: u64 = u64::MAX;

/// The target: reads an 8-byte id; id `PING` gets "pong", any other id
/// gets `TRANSFER` bytes of `pattern(id)`, paced over about 1.5 s.
async fn target() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut id = [0u8; 8];
                if s.read_exact(&mut id).await.is_err() {
                    return;
                }
                let id = u64::from_be_bytes(id);
                if id == PING {
                    let _ = s.write_all(b"pong").await;
                } else {
                    for chunk in pattern(id, TRANSFER).chunks(CHUNK) {
                        if s.write_all(chunk).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn write_server_config(dir: &TempDir, key: &Path, target: &str) -> std::path::PathBuf {
    let d = dir.path().display();
    let text = format!(
        "[node]\n\
         key = \"{}\"\n\
         listen = \"127.0.0.1:0\"\n\
         control = \"{d}/server.sock\"\n\
         journal = \"{d}/server-journal.log\"\n\
         drain_timeout_secs = 2\n\
         \n\
         [trust]\n\
         authorized = \"{d}/authorized_keys\"\n\
         \n\
         [[pool2tcp]]\n\
         target = \"{target}\"\n",
        key.display()
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).expect("write server config");
    path
}

fn start_daemon(dir: &TempDir, name: &str, config: &Path) -> Proc {
    Proc::pool(
        name,
        &["daemon", "--config", config.to_str().expect("utf-8")],
        dir,
    )
}

fn reloads(journal: &Path) -> usize {
    journal_entries(journal)
        .iter()
        .filter(|e| e["event"] == "config_applied" && e["how"] == "reload")
        .count()
}

/// Sends SIGHUP and waits for the journal to record the reload.
fn sighup_and_wait(p: &Proc, journal: &Path) {
    let before = reloads(journal);
    p.signal("HUP");
    wait_journal(journal, Duration::from_secs(5), "config_applied", |_| {
        reloads(journal) > before
    });
}

/// One request through a tcp2pool address: `Ok(answer)` or the error.
async fn fetch(addr: &str, id: u64) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&id.to_be_bytes()).await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_transfers_loses_no_connection() {
    let dir = TempDir::new("reload-live");
    let target = target().await;
    let (server_key, _server_pub) = keygen(&dir, "server");
    let (client_key, client_pub) = keygen(&dir, "client");
    std::fs::write(
        dir.join("authorized_keys"),
        format!("# the client daemon\n{client_pub} client\n"),
    )
    .expect("write authorized_keys");
    let server_cfg = write_server_config(&dir, &server_key, &target);
    let mut server = start_daemon(&dir, "server", &server_cfg);
    let pool_addr = server.wait_log("POOL listener on ", Duration::from_secs(10));
    let server_pub =
        String::from_utf8_lossy(&pool_cmd(&["pubkey", server_key.to_str().expect("utf-8")]).stdout)
            .trim()
            .to_string();

    let d = dir.path().display();
    let client_cfg = dir.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "[node]\n\
             key = \"{}\"\n\
             listen = \"\"\n\
             journal = \"{d}/client-journal.log\"\n\
             drain_timeout_secs = 2\n\
             \n\
             [[tcp2pool]]\n\
             name = \"web\"\n\
             listen = \"127.0.0.1:0\"\n\
             peer = \"{pool_addr}\"\n\
             peer_key = \"{server_pub}\"\n",
            client_key.display()
        ),
    )
    .expect("write client config");
    let mut client = start_daemon(&dir, "client", &client_cfg);
    let tcp_addr = client.wait_log("listening on ", Duration::from_secs(10));

    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 1..=6u64 {
        let addr = tcp_addr.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let got = fetch(&addr, id).await;
            done.fetch_add(1, Ordering::SeqCst);
            (id, got)
        }));
    }
    // Let every transfer get going, then reload both daemons, twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server_journal = dir.join("server-journal.log");
    let client_journal = dir.join("client-journal.log");
    wait_journal(
        &server_journal,
        Duration::from_secs(5),
        "session_opened",
        |e| e["event"] == "session_opened",
    );
    tokio::task::block_in_place(|| {
        sighup_and_wait(&server, &server_journal);
        sighup_and_wait(&client, &client_journal);
        sighup_and_wait(&server, &server_journal);
        sighup_and_wait(&client, &client_journal);
    });
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "transfers ended before the reloads were over; the test proves nothing (make them longer)"
    );
    server.assert_running();
    client.assert_running();

    let results = tokio::time::timeout(Duration::from_secs(20), async {
        let mut r = Vec::new();
        for t in tasks {
            r.push(t.await.expect("transfer task"));
        }
        r
    })
    .await
    .expect("transfers did not finish within 20 s of the reloads");
    for (id, got) in results {
        let got = got.unwrap_or_else(|e| panic!("transfer {id} failed across the reloads: {e}"));
        assert_eq!(got.len(), TRANSFER, "transfer {id}: length");
        assert_eq!(
            sha256_hex(&got),
            sha256_hex(&pattern(id, TRANSFER)),
            "transfer {id}: SHA-256"
        );
    }

    // Still one session, never resumed or reopened.
    let entries = journal_entries(&server_journal);
    let opened = entries
        .iter()
        .filter(|e| e["event"] == "session_opened")
        .count();
    let closed = entries
        .iter()
        .filter(|e| e["event"] == "session_closed")
        .count();
    assert_eq!(
        (opened, closed),
        (1, 0),
        "sessions opened/closed across the reloads"
    );
    assert!(entries.iter().all(|e| e["event"] != "config_not_applied"));
    let check = pool_cmd(&["journal", "verify", server_journal.to_str().expect("utf-8")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_authorized_file_changes() {
    let dir = TempDir::new("reload-trust");
    let target = target().await;
    let (server_key, server_pub) = keygen(&dir, "server");
    let (key_a, pub_a) = keygen(&dir, "a");
    let (key_b, pub_b) = keygen(&dir, "b");
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{pub_a} a\n")).expect("write authorized_keys");
    let server_cfg = write_server_config(&dir, &server_key, &target);
    let mut server = start_daemon(&dir, "server", &server_cfg);
    let pool_addr = server.wait_log("POOL listener on ", Duration::from_secs(10));
    let journal = dir.join("server-journal.log");

    let (_a, addr_a) = start_tcp2pool(&dir, "tcp2pool-a", &key_a, &pool_addr, &server_pub, &[]);
    let (_b, addr_b) = start_tcp2pool(&dir, "tcp2pool-b", &key_b, &pool_addr, &server_pub, &[]);

    let pong = fetch(&addr_a, PING).await.expect("A through the bridge");
    assert_eq!(pong, b"pong", "key A is authorized");

    let refused = fetch(&addr_b, PING).await;
    assert!(
        !matches!(&refused, Ok(b) if !b.is_empty()),
        "key B is not in the authorized file yet, but its connection got {refused:?}"
    );
    let entry = wait_journal(
        &journal,
        Duration::from_secs(5),
        "handshake_refused for key B",
        |e| e["event"] == "handshake_refused" && e["key"] == pub_b.as_str(),
    );
    eprintln!("before the reload: B refused: {}", entry["reason"]);

    // Add B, remove A, reload.
    std::fs::write(&authorized, format!("# A removed\n{pub_b} b\n")).expect("rewrite authorized");
    tokio::task::block_in_place(|| sighup_and_wait(&server, &journal));
    server.assert_running();

    // A's live session ends: a revoked key keeps nothing open.
    wait_journal(
        &journal,
        Duration::from_secs(5),
        "session_revoked for key A",
        |e| e["event"] == "session_revoked" && e["peer"] == pub_a.as_str(),
    );
    let after = fetch(&addr_a, PING).await;
    assert!(
        !matches!(&after, Ok(b) if !b.is_empty()),
        "key A was revoked, but its tcp2pool still got through: {after:?}"
    );

    let pong = tokio::time::timeout(Duration::from_secs(15), fetch(&addr_b, PING))
        .await
        .expect("B: no answer within 15 s after the reload")
        .expect("B through the bridge after the reload");
    assert_eq!(pong, b"pong", "key B is authorized after SIGHUP");

    // A new session with key A (a fresh tcp2pool) is refused now.
    let (_a2, addr_a2) = start_tcp2pool(&dir, "tcp2pool-a2", &key_a, &pool_addr, &server_pub, &[]);
    let refused = fetch(&addr_a2, PING).await;
    assert!(
        !matches!(&refused, Ok(b) if !b.is_empty()),
        "key A was removed from the authorized file, but a new session with it got {refused:?}"
    );
    wait_journal(
        &journal,
        Duration::from_secs(5),
        "handshake_refused for key A",
        |e| e["event"] == "handshake_refused" && e["key"] == pub_a.as_str(),
    );

    // SIGTERM: a clean stop, and an intact journal.
    server.signal("TERM");
    let st = server.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "pool daemon exited with {st} on SIGTERM");
    let check = pool_cmd(&["journal", "verify", journal.to_str().expect("utf-8")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
