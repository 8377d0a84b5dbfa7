//! A client that breaks the rules, speaking the vault's frames by hand to a
//! real `VaultServer` over real POOL sessions on loopback: every bad
//! request gets a clear error, nothing is written where it must not be, and
//! the session (and the next request) goes on.

use std::sync::{Arc, Mutex};

use pool_net::{Endpoint, EndpointConfig, Preamble, SecretKey, Session, Trust};
use pool_vault::manifest::{chunk_hash, hex, Manifest, CHUNK};
use pool_vault::wire::{self, FileMeta, Frame, Msg};
use pool_vault::{Access, Grant, VaultEvent, VaultPath, VaultServer, SERVICE};
use tokio::io::AsyncWriteExt;

fn key(n: u8) -> SecretKey {
    SecretKey::from_bytes([n; 32])
}

struct Setup {
    root: std::path::PathBuf,
    session: Session,
    events: Arc<Mutex<Vec<VaultEvent>>>,
}

async fn setup(tag: &str) -> Setup {
    let root =
        std::env::temp_dir().join(format!("pool-vault-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("in")).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let server = Arc::new(VaultServer::new(
        root.clone(),
        vec![Grant {
            key: Some(key(2).public_key()),
            path: VaultPath::parse("/in").unwrap(),
            access: Access::Write,
        }],
        move |e| ev.lock().unwrap().push(e),
    ));
    let ep = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(key(1)).trust(Trust::new().allow(key(2).public_key())),
    )
    .await
    .unwrap();
    let addr = ep.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Some(s) = ep.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                while let Some(st) = s.accept_stream().await {
                    let (mut r, w) = st.into_split();
                    let pre = Preamble::read(&mut r).await.unwrap();
                    assert_eq!(pre.service, SERVICE);
                    tokio::spawn(server.clone().serve(s.peer_key(), r, w));
                }
            });
        }
    });
    let client = Endpoint::client(EndpointConfig::new(key(2)));
    let session = client.connect(&addr, key(1).public_key()).await.unwrap();
    Setup {
        root,
        session,
        events,
    }
}

async fn stream(s: &Session) -> (pool_net::RecvStream, pool_net::SendStream) {
    let (r, mut w) = s.open_stream().await.unwrap().into_split();
    w.write_all(&Preamble::for_service(SERVICE).encode())
        .await
        .unwrap();
    (r, w)
}

fn meta_of(data: &[u8]) -> (Manifest, FileMeta) {
    let m = Manifest::of_reader(data, data.len() as u64, CHUNK).unwrap();
    let meta = FileMeta {
        size: m.size,
        mode: 0o644,
        mtime_ns: 0,
        root: m.root_hex(),
        sealed: None,
    };
    (m, meta)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_stream_goes_on() {
    let s = setup("requests").await;
    let (mut r, mut w) = stream(&s.session).await;
    let (m, meta) = meta_of(b"hello");
    for path in ["/in/../../etc/passwd", "../x", "/elsewhere/x", "/in/a\0b"] {
        wire::send_msg(
            &mut w,
            &Msg::Put {
                path: path.into(),
                meta: meta.clone(),
            },
        )
        .await
        .unwrap();
        wire::send_hashes(&mut w, &m.hashes).await.unwrap();
        match wire::read_msg(&mut r).await.unwrap() {
            Msg::Error { message } => assert!(!message.is_empty(), "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    // The same stream still serves a good request.
    wire::send_msg(&mut w, &Msg::Ls { path: "/in".into() })
        .await
        .unwrap();
    assert!(matches!(
        wire::read_msg(&mut r).await.unwrap(),
        Msg::List { .. }
    ));
    assert!(!s.root.join("etc").exists() && !s.root.join("elsewhere").exists());
    let refused = s
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, VaultEvent::Refused { .. }))
        .count();
    assert_eq!(refused, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lies_about_hashes_and_chunks_write_nothing_wrong() {
    let s = setup("lies").await;
    let data: Vec<u8> = (0..(2 * CHUNK + 99)).map(|i| (i % 253) as u8).collect();
    let (m, meta) = meta_of(&data);

    // Hashes that do not add up to the root: refused, stream ended.
    let (mut r, mut w) = stream(&s.session).await;
    let mut wrong = m.hashes.clone();
    wrong[1][0] ^= 1;
    wire::send_msg(
        &mut w,
        &Msg::Put {
            path: "/in/f".into(),
            meta: meta.clone(),
        },
    )
    .await
    .unwrap();
    wire::send_hashes(&mut w, &wrong).await.unwrap();
    match wire::read_msg(&mut r).await.unwrap() {
        Msg::Error { message } => assert!(message.contains("root hash"), "{message}"),
        other => panic!("{other:?}"),
    }

    // Right hashes, then a chunk with the wrong bytes: not written, asked
    // for again; the right bytes then complete the file.
    let (mut r, mut w) = stream(&s.session).await;
    wire::send_msg(
        &mut w,
        &Msg::Put {
            path: "/in/f".into(),
            meta: meta.clone(),
        },
    )
    .await
    .unwrap();
    wire::send_hashes(&mut w, &m.hashes).await.unwrap();
    let Msg::Need { ranges } = wire::read_msg(&mut r).await.unwrap() else {
        panic!()
    };
    assert_eq!(ranges, vec![(0, 3)]);
    let chunk =
        |i: u64| &data[(i * CHUNK) as usize..((i * CHUNK) as usize + m.chunk_len(i, CHUNK))];
    let mut bad = chunk(1).to_vec();
    bad[7] ^= 0xff;
    wire::send_chunk(&mut w, 0, chunk(0)).await.unwrap();
    wire::send_chunk(&mut w, 1, &bad).await.unwrap();
    wire::send_chunk(&mut w, 2, chunk(2)).await.unwrap();
    let Msg::Need { ranges } = wire::read_msg(&mut r).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        ranges,
        vec![(1, 2)],
        "the bad chunk was not asked for again"
    );
    assert!(!s.root.join("in/f").exists());
    wire::send_chunk(&mut w, 1, chunk(1)).await.unwrap();
    assert!(matches!(
        wire::read_msg(&mut r).await.unwrap(),
        Msg::Done { .. }
    ));
    assert_eq!(std::fs::read(s.root.join("in/f")).unwrap(), data);
    assert_eq!(hex(&chunk_hash(chunk(0))), hex(&m.hashes[0]));

    // A frame past its limit ends that stream, not the session.
    let (mut r, mut w) = stream(&s.session).await;
    w.write_all(&[3, 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    match wire::read_frame(&mut r).await {
        Ok(Some(Frame::Msg(Msg::Error { message }))) => {
            assert!(message.contains("frame"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let (mut r, mut w) = stream(&s.session).await;
    wire::send_msg(&mut w, &Msg::Ls { path: "/in".into() })
        .await
        .unwrap();
    let Msg::List { entries } = wire::read_msg(&mut r).await.unwrap() else {
        panic!()
    };
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(!s.session.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refuses_its_bad_items_and_stores_the_good_ones() {
    use pool_vault::wire::BatchItem;
    let s = setup("batch").await;
    let (m, meta) = meta_of(b"small file");
    let item = |p: &str| BatchItem {
        path: p.into(),
        meta: meta.clone(),
    };
    let (mut r, mut w) = stream(&s.session).await;
    wire::send_msg(
        &mut w,
        &Msg::Batch {
            items: vec![item("/in/a"), item("/in/../../x"), item("/in/b")],
        },
    )
    .await
    .unwrap();
    let hashes: Vec<_> = (0..3).flat_map(|_| m.hashes.clone()).collect();
    wire::send_hashes(&mut w, &hashes).await.unwrap();
    let Msg::BatchNeed { need, errors } = wire::read_msg(&mut r).await.unwrap() else {
        panic!()
    };
    assert_eq!(need, vec![0, 2]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, 1);
    for i in need {
        wire::send_chunk(&mut w, u64::from(i), b"small file")
            .await
            .unwrap();
    }
    let Msg::BatchDone {
        written, errors, ..
    } = wire::read_msg(&mut r).await.unwrap()
    else {
        panic!()
    };
    assert_eq!((written, errors.len()), (20, 0));
    assert_eq!(std::fs::read(s.root.join("in/a")).unwrap(), b"small file");
    assert_eq!(std::fs::read(s.root.join("in/b")).unwrap(), b"small file");

    // Too few hashes, or an item bigger than a chunk: the stream ends with
    // an error; the session goes on.
    let big = FileMeta {
        size: 3 * CHUNK,
        ..meta.clone()
    };
    for (items, hashes) in [
        (vec![item("/in/c"), item("/in/d")], m.hashes.clone()),
        (
            vec![BatchItem {
                path: "/in/e".into(),
                meta: big,
            }],
            vec![[0u8; 32]; 3],
        ),
    ] {
        let (mut r, mut w) = stream(&s.session).await;
        wire::send_msg(&mut w, &Msg::Batch { items }).await.unwrap();
        wire::send_hashes(&mut w, &hashes).await.unwrap();
        assert!(matches!(
            wire::read_msg(&mut r).await.unwrap(),
            Msg::Error { .. }
        ));
    }
    assert!(!s.session.is_closed());
    assert!(!s.root.join("in/c").exists() && !s.root.join("in/e").exists());
}
