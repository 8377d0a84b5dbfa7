//! The gRPC figures of issue 15: unary RPC latency (p50, p99) and
//! requests/s at concurrency 1 and 32, tonic over POOL against tonic over
//! plain TCP on loopback, in the same run. The server runs in a child
//! process (this binary, `serve`), as tonic's helloworld benchmark does.
//!
//! Over POOL it also measures the other way to carry RPCs: each RPC on a
//! stream (and HTTP/2 connection) of its own on the shared session, rather
//! than every RPC of a client on one stream's HTTP/2 connection.
//!
//! ```text
//! cargo build --release --examples -p pool-grpc
//! target/release/examples/grpc-bench [--seconds 5] [--payload 64]
//! ```

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_grpc::PoolConnector;
use pool_net::{Endpoint, EndpointConfig, SecretKey, Trust};
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("pool.echo.v1");
}
use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{CountRequest, Message, Total};

type Msgs = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Message, Status>> + Send>>;

struct Bench;

#[tonic::async_trait]
impl Echo for Bench {
    async fn say(&self, r: Request<Message>) -> Result<Response<Message>, Status> {
        Ok(Response::new(r.into_inner()))
    }
    async fn sum(&self, _: Request<tonic::Streaming<Message>>) -> Result<Response<Total>, Status> {
        Err(Status::unimplemented("bench"))
    }
    type CountStream = Msgs;
    async fn count(&self, _: Request<CountRequest>) -> Result<Response<Msgs>, Status> {
        Err(Status::unimplemented("bench"))
    }
    type ChatStream = Msgs;
    async fn chat(&self, _: Request<tonic::Streaming<Message>>) -> Result<Response<Msgs>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

fn server_key() -> SecretKey {
    SecretKey::from_bytes([41; 32])
}
fn client_key() -> SecretKey {
    SecretKey::from_bytes([42; 32])
}

/// The child: serves on TCP and POOL, prints both addresses, runs until
/// its stdin closes.
async fn serve() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("tcp");
    let trust = Trust::new().allow(client_key().public_key());
    let ep = Endpoint::bind(
        "127.0.0.1:0",
        EndpointConfig::new(server_key()).trust(trust),
    )
    .await
    .expect("pool");
    println!(
        "{} {}",
        tcp.local_addr().expect("addr"),
        ep.local_addr().expect("addr")
    );
    let router = tonic::transport::Server::builder().add_service(EchoServer::new(Bench));
    tokio::spawn(pool_grpc::serve(router, Some(tcp), Some(ep)));
    let mut line = String::new();
    let _ = tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Tcp,
    /// One HTTP/2 connection on one POOL stream for all RPCs.
    PoolStream,
    /// Each RPC its own POOL stream and HTTP/2 connection.
    PoolPerRpc,
}

struct Row {
    p50: Duration,
    p99: Duration,
    rps: f64,
}

async fn load(way: Way, tcp: &str, pool: &str, conc: usize, secs: f64, payload: usize) -> Row {
    let conn = PoolConnector::new(
        Endpoint::client(EndpointConfig::new(client_key())),
        pool,
        server_key().public_key(),
    );
    let channel: Option<Channel> = match way {
        Way::Tcp => Some(
            tonic::transport::Endpoint::from_shared(format!("http://{tcp}"))
                .expect("uri")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("tcp connect"),
        ),
        Way::PoolStream => Some(conn.channel().await.expect("pool connect")),
        Way::PoolPerRpc => {
            // Dial the session once; streams are per RPC.
            conn.channel().await.expect("pool connect");
            None
        }
    };
    let msg = Message {
        pad: vec![7; payload],
        ..Default::default()
    };
    // Warm up.
    let warm_until = Instant::now() + Duration::from_millis(500);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (channel, conn, msg, stop) = (channel.clone(), conn.clone(), msg.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let ch = match &channel {
                    Some(c) => c.clone(),
                    None => conn.channel().await.expect("stream"),
                };
                EchoClient::new(ch).say(msg.clone()).await.expect("rpc");
                if t >= warm_until {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_millis(500) + Duration::from_secs_f64(secs)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    let q = |f: f64| all[((all.len() as f64 * f) as usize).min(all.len() - 1)];
    Row {
        p50: q(0.50),
        p99: q(0.99),
        rps: all.len() as f64 / secs,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve().await;
    }
    let flag = |name: &str, default: f64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let secs = flag("--seconds", 5.0);
    let payload = flag("--payload", 64.0) as usize;

    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("server addresses");
    let mut it = line.split_whitespace();
    let (tcp, pool) = (
        it.next().expect("tcp").to_string(),
        it.next().expect("pool").to_string(),
    );

    println!("unary RPC, {payload}-byte message, {secs} s per row, server in its own process");
    println!("| transport | concurrency | p50 ms | p99 ms | requests/s |");
    println!("|---|---|---|---|---|");
    let mut results = Vec::new();
    for conc in [1, 32] {
        for (name, way) in [
            ("tcp", Way::Tcp),
            ("pool (one stream)", Way::PoolStream),
            ("pool (stream per RPC)", Way::PoolPerRpc),
        ] {
            let r = load(way, &tcp, &pool, conc, secs, payload).await;
            println!(
                "| {name} | {conc} | {} | {} | {:.0} |",
                ms(r.p50),
                ms(r.p99),
                r.rps
            );
            results.push((conc, way, r));
        }
    }
    let find = |c: usize, w: Way| {
        results
            .iter()
            .find(|(cc, ww, _)| *cc == c && *ww == w)
            .map(|(_, _, r)| r)
            .expect("row")
    };
    for c in [1, 32] {
        let (t, p) = (find(c, Way::Tcp), find(c, Way::PoolStream));
        println!(
            "concurrency {c}: POOL/TCP p50 {:.2}x (goal <= 1.3x), requests/s {:.2}x{}",
            p.p50.as_secs_f64() / t.p50.as_secs_f64(),
            p.rps / t.rps,
            if c == 32 { " (goal >= 0.8x)" } else { "" }
        );
    }
    drop(child.stdin.take());
    let _ = child.wait();
}
