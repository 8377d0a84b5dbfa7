//! A stream that *moves* with its session: the built-in `pool.handoff.test`
//! service writes a paced stream of indexed 1 KiB chunks; a client daemon's
//! `[[tcp2pool]]` bridge names that service, and a TCP reader checks every
//! chunk by index and content while the session is handed A → B → A … 100
//! times. At each handoff the target's instance of the service goes on from
//! the byte the source's had written: nothing is forwarded, nothing is lost
//! or repeated.
mod util;

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use pool_node::handoff_test::{chunk, CHUNK};
use util::workers::*;
use util::*;

#[test]
fn a_moved_stream_survives_a_hundred_handoffs_chunk_for_chunk() {
    let dir = TempDir::new("handoff-moved");
    let (ckey, cpub) = keygen(&dir, "client");
    let a = Worker::new(&dir, "a");
    let b = Worker::new(&dir, "b");
    // The workers' own [[pool2tcp]] target is not used here.
    let unused = format!("127.0.0.1:{}", free_port());
    let mut pa = a.start(&dir, &cpub, &b.public, &unused);
    let mut pb = b.start(&dir, &cpub, &a.public, &unused);
    let listen = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "[node]\nkey = {ckey:?}\nlisten = \"\"\ncontrol = {:?}\n\n\
         [[tcp2pool]]\nname = \"test\"\nlisten = \"{listen}\"\npeer = \"{}\"\npeer_key = \"{}\"\n\
         service = \"pool.handoff.test\"\n",
        dir.join("client.sock"),
        a.listen,
        a.public,
    );
    let path = dir.join("client.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut client = Proc::pool(
        "client",
        &["daemon", "--config", path.to_str().unwrap()],
        &dir,
    );
    client.wait_log("listening on", Duration::from_secs(15));

    let mut tcp = TcpStream::connect(&listen).expect("connect to the bridge");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let stopper = tcp.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; CHUNK];
        let mut next = 0u64;
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        while tcp.read_exact(&mut buf).is_ok() {
            assert_eq!(buf, chunk(next), "chunk {next}: lost, repeated or changed");
            let now = Instant::now();
            if next > 0 {
                worst = worst.max(now - last);
            }
            last = now;
            next += 1;
        }
        (next, worst)
    });
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..100 {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let out = from.try_handoff(&cpub, &to.listen, &to.public);
        assert!(
            out.status.success(),
            "handoff {i} {} -> {}: {}",
            from.name,
            to.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("0 stream(s) forwarded, 1 moved"),
            "the stream moves, it is not forwarded: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    pa.assert_running();
    pb.assert_running();
    client.assert_running();
    // Stop reading: the reader sees the end of its connection.
    stopper.shutdown(Shutdown::Both).unwrap();
    let (chunks, worst) = reader.join().unwrap();
    eprintln!("{chunks} chunks across 100 handoffs; largest gap {worst:?}");
    assert!(chunks > 500, "the stream kept flowing: {chunks} chunks");
}
