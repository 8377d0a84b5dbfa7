//! gRPC over POOL with clients and servers no one here wrote: Python
//! `grpcio` (with `grpcio-health-checking`) calls the POOL-served `kv`
//! example through a real `pool bridge tcp2pool`, and the `kv` tonic client
//! calls a Python `grpcio` server over POOL through `pool bridge pool2tcp`.
//! Health answers SERVING on both transports.
//!
//! Needs the `kv` example (`cargo build --release --examples`, which
//! `cargo test` does) and a Python with `grpcio` and
//! `grpcio-health-checking` (`$POOL_GRPC_PYTHON`, else `python3`; `.ci/run`
//! installs them).

mod util;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use util::*;

/// The `kv` example next to this test binary (`target/PROFILE/examples`).
fn kv_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/PROFILE/deps");
    let kv = profile_dir.join("examples").join("kv");
    assert!(
        kv.is_file(),
        "{} is missing: build it with `cargo build --release --examples -p pool-grpc` \
         (cargo test builds it)",
        kv.display()
    );
    kv
}

fn python() -> String {
    let py = std::env::var("POOL_GRPC_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import grpc, grpc_health.v1.health"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{py}` cannot import grpc and grpc_health: this test runs Python grpcio for real; \
         install them (pip install grpcio grpcio-health-checking; .ci/run does this) \
         or point POOL_GRPC_PYTHON at a Python that has them"
    );
    py
}

fn py_script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pool-grpc/tests/py")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Runs a command to completion; returns its trimmed stdout, failing the
/// test (with stderr) if it did not succeed.
fn ok(cmd: Command, what: &str) -> String {
    let out = run(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn py_client(py: &str, addr: &str, args: &[&str]) -> String {
    let mut c = Command::new(py);
    c.arg(py_script("kv_client.py")).arg(addr).args(args);
    ok(c, &format!("python kv_client.py {args:?}"))
}

fn kv(args: &[&str]) -> String {
    let mut c = Command::new(kv_bin());
    c.args(args);
    ok(c, &format!("kv {args:?}"))
}

#[test]
fn python_grpcio_calls_kv_over_pool_through_tcp2pool() {
    let py = python();
    let dir = TempDir::new("grpc-py-client");
    let (server_key, server_pub) = keygen(&dir, "kv-server");
    let (bridge_key, bridge_pub) = keygen(&dir, "bridge");
    let (client_key, client_pub) = keygen(&dir, "kv-client");
    let tcp = format!("127.0.0.1:{}", free_port());
    let mut server = Proc::spawn(
        "kv",
        {
            let mut c = Command::new(kv_bin());
            c.args([
                "serve",
                "--tcp",
                &tcp,
                "--pool",
                "127.0.0.1:0",
                "--key",
                server_key.to_str().unwrap(),
                "--allow",
                &bridge_pub,
                "--allow",
                &client_pub,
            ]);
            c
        },
        &dir,
    );
    let pool_addr = server
        .wait_log("serving on pool ", Duration::from_secs(10))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    wait_port(&tcp, Duration::from_secs(10));
    let (_bridge, bridge_addr) =
        start_tcp2pool(&dir, "tcp2pool", &bridge_key, &pool_addr, &server_pub, &[]);

    // Python, through the bridge, over POOL.
    assert_eq!(py_client(&py, &bridge_addr, &["health"]), "SERVING");
    assert_eq!(
        py_client(&py, &bridge_addr, &["put", "colour", "teal"]),
        "1"
    );
    assert_eq!(py_client(&py, &bridge_addr, &["get", "colour"]), "teal");
    // Python on plain TCP sees the same store, and the same health.
    assert_eq!(py_client(&py, &tcp, &["health"]), "SERVING");
    assert_eq!(py_client(&py, &tcp, &["get", "colour"]), "teal");
    // The tonic client on both transports.
    let pool_flags = [
        "--pool",
        pool_addr.as_str(),
        "--peer-key",
        server_pub.as_str(),
        "--key",
        client_key.to_str().unwrap(),
    ];
    let with = |cmd: &str, rest: &[&str]| {
        let mut a = vec![cmd];
        a.extend_from_slice(&pool_flags);
        a.extend_from_slice(rest);
        kv(&a)
    };
    assert_eq!(with("health", &[]), "SERVING");
    with("put", &["shape", "round"]);
    assert_eq!(kv(&["get", "--tcp", &tcp, "shape"]), "round");
    assert_eq!(kv(&["health", "--tcp", &tcp]), "SERVING");
    assert_eq!(with("scan", &[]), "colour=teal\nshape=round");
    // Server reflection on both transports.
    let want = "grpc.health.v1.Health\ngrpc.reflection.v1.ServerReflection\npool.kv.v1.Kv";
    let mut listed: Vec<String> = with("services", &[]).lines().map(String::from).collect();
    listed.sort();
    assert_eq!(listed.join("\n"), want);
    let mut listed: Vec<String> = kv(&["services", "--tcp", &tcp])
        .lines()
        .map(String::from)
        .collect();
    listed.sort();
    assert_eq!(listed.join("\n"), want);
    // An unknown name is NOT_FOUND, over either.
    let out = run(
        {
            let mut c = Command::new(kv_bin());
            c.args(["get", "--tcp", &tcp, "nothing"]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
    server.assert_running();
}

#[test]
fn the_tonic_client_calls_python_grpcio_over_pool_through_pool2tcp() {
    let py = python();
    let dir = TempDir::new("grpc-py-server");
    let mut pyserver = Proc::spawn(
        "kv_server.py",
        {
            let mut c = Command::new(&py);
            c.arg("-u").arg(py_script("kv_server.py"));
            c
        },
        &dir,
    );
    let port = pyserver.wait_log("port ", Duration::from_secs(15));
    let target = format!("127.0.0.1:{port}");
    let (node_key, node_pub) = keygen(&dir, "node");
    let (client_key, client_pub) = keygen(&dir, "kv-client");
    let (_node, pool_addr) = start_pool2tcp(
        &dir,
        "pool2tcp",
        &node_key,
        &target,
        &["--allow", &client_pub],
    );
    let flags = |cmd: &'static str| {
        vec![
            cmd.to_string(),
            "--pool".into(),
            pool_addr.clone(),
            "--peer-key".into(),
            node_pub.clone(),
            "--key".into(),
            client_key.to_string_lossy().into_owned(),
        ]
    };
    let call = |cmd: &'static str, rest: &[&str]| {
        let mut a = flags(cmd);
        a.extend(rest.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        kv(&a)
    };
    assert_eq!(call("health", &[]), "SERVING");
    call("put", &["planet", "mars"]);
    assert_eq!(call("get", &["planet"]), "mars");
    // The Python server's store, read by Python over plain TCP.
    assert_eq!(py_client(&py, &target, &["get", "planet"]), "mars");
    pyserver.assert_running();
}
