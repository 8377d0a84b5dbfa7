//! Public keys are base64url, so one in 64 starts with `-`. Such a key must
//! work as the value of `--allow` and `--peer-key` (the form the README
//! shows), not be taken for a flag.
mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use pool_net::SecretKey;
use util::*;

/// A key file whose public key starts with `-` (deterministic search).
fn dash_key(dir: &TempDir, name: &str, start: u8) -> (PathBuf, String) {
    for i in 0..=u16::MAX {
        let mut b = [start; 32];
        b[..2].copy_from_slice(&i.to_le_bytes());
        let key = SecretKey::from_bytes(b);
        let public = key.public_key().to_string();
        if public.starts_with('-') {
            let path = dir.join(&format!("{name}.key"));
            std::fs::write(&path, key.to_file_text()).expect("write key");
            let mut perm = std::fs::metadata(&path).expect("meta").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
            std::fs::set_permissions(&path, perm).expect("chmod");
            // The binary agrees on the public key.
            let out = pool_cmd(&["pubkey", path.to_str().expect("utf-8")]);
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), public);
            return (path, public);
        }
    }
    panic!("no key starting with `-` found");
}

#[test]
fn bridge_accepts_keys_starting_with_dash() {
    let dir = TempDir::new("dashkeys");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let target = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut req = [0u8; 4];
            if s.read_exact(&mut req).is_ok() && &req == b"ping" {
                let _ = s.write_all(b"pong");
            }
        }
    });
    let (server_key, server_pub) = dash_key(&dir, "server", 1);
    let (client_key, client_pub) = dash_key(&dir, "client", 2);

    let (mut server, pool_addr) = start_pool2tcp(
        &dir,
        "pool2tcp",
        &server_key,
        &target,
        &["--allow", &client_pub],
    );
    let (mut client, tcp_addr) =
        start_tcp2pool(&dir, "tcp2pool", &client_key, &pool_addr, &server_pub, &[]);
    let mut s = TcpStream::connect(&tcp_addr).expect("connect tcp2pool");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(b"ping").expect("send");
    let mut answer = [0u8; 4];
    s.read_exact(&mut answer)
        .expect("answer through the bridge");
    assert_eq!(&answer, b"pong");
    server.assert_running();
    client.assert_running();
}

#[test]
fn listen_and_connect_accept_keys_starting_with_dash() {
    let dir = TempDir::new("dashkeys-nc");
    let (server_key, server_pub) = dash_key(&dir, "server", 3);
    let (client_key, client_pub) = dash_key(&dir, "client", 4);
    let mut listener = Proc::pool(
        "listen",
        &[
            "listen",
            "127.0.0.1:0",
            "--key",
            server_key.to_str().expect("utf-8"),
            "--allow",
            &client_pub,
            "--once",
        ],
        &dir,
    );
    let line = listener.wait_log("listening on ", Duration::from_secs(10));
    let addr = line.split(" as ").next().expect("address").to_string();
    let out = pool_cmd(&[
        "connect",
        &addr,
        "--key",
        client_key.to_str().expect("utf-8"),
        "--peer-key",
        &server_pub,
    ]);
    assert!(
        out.status.success(),
        "pool connect --peer-key {server_pub}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = listener.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "pool listen --once exited with {st}");
}
