//! `kv`: a small key-value store served with tonic over plain TCP and POOL
//! at once, with gRPC health and server reflection on both.
//!
//! ```text
//! kv serve --tcp 127.0.0.1:50051 --pool [::]:9253 --key server.key --allow CLIENT_KEY
//! kv put --pool HOST:9253 --peer-key SERVER_KEY --key client.key NAME VALUE
//! kv get --tcp 127.0.0.1:50051 NAME
//! ```
//!
//! Built with `cargo build --release --examples` (`target/release/examples/kv`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};
use pool_grpc::PoolConnector;
use pool_net::{Endpoint, EndpointConfig, PublicKey, SecretKey, Trust};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("pool.kv.v1");
    pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("kv_descriptor");
}
use pb::kv_client::KvClient;
use pb::kv_server::{Kv, KvServer};

#[derive(Parser)]
#[command(
    name = "kv",
    about = "A key-value store over gRPC, on TCP and POOL at once"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves the store (in memory) on TCP, POOL, or both.
    Serve {
        /// Plain TCP listen address.
        #[arg(long)]
        tcp: Option<String>,
        /// POOL listen address.
        #[arg(long)]
        pool: Option<String>,
        /// This server's POOL key file (`pool keygen --out FILE`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// A client key allowed over POOL (repeat for more).
        #[arg(long = "allow")]
        allow: Vec<PublicKey>,
        /// A file of allowed client keys, one per line.
        #[arg(long)]
        allow_file: Option<PathBuf>,
    },
    /// Sets NAME to VALUE.
    Put {
        #[command(flatten)]
        to: Target,
        /// The entry's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// Prints NAME's value.
    Get {
        #[command(flatten)]
        to: Target,
        /// The entry's name.
        name: String,
    },
    /// Removes NAME.
    Del {
        #[command(flatten)]
        to: Target,
        /// The entry's name.
        name: String,
    },
    /// Prints every entry whose name starts with PREFIX, one `name=value` a line.
    Scan {
        #[command(flatten)]
        to: Target,
        /// The prefix (empty: everything).
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Prints the server's gRPC health status (SERVING, ...).
    Health {
        #[command(flatten)]
        to: Target,
    },
    /// Lists the services the server offers, by server reflection.
    Services {
        #[command(flatten)]
        to: Target,
    },
}

/// Where a client command goes: `--tcp ADDR`, or `--pool ADDR` with the
/// server's key and ours.
#[derive(Args)]
struct Target {
    /// The server's plain TCP address.
    #[arg(long, conflicts_with = "pool")]
    tcp: Option<String>,
    /// The server's POOL address (HOST:PORT).
    #[arg(long, requires_all = ["peer_key", "key"])]
    pool: Option<String>,
    /// The server's POOL key.
    #[arg(long)]
    peer_key: Option<PublicKey>,
    /// This client's POOL key file.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The service name in each POOL stream's preamble (a node's
    /// `[[pool2tcp]]` name when the server sits behind a bridge).
    #[arg(long, default_value = "")]
    service: String,
}

#[derive(Default)]
struct Store {
    entries: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<pb::Entry, Status>> + Send>>;

#[tonic::async_trait]
impl Kv for Arc<Store> {
    async fn put(&self, r: Request<pb::PutRequest>) -> Result<Response<pb::PutReply>, Status> {
        let r = r.into_inner();
        let mut m = self.lock();
        m.insert(r.name, r.value);
        Ok(Response::new(pb::PutReply {
            entries: m.len() as u64,
        }))
    }

    async fn get(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::GetReply>, Status> {
        let name = r.into_inner().name;
        match self.lock().get(&name) {
            Some(v) => Ok(Response::new(pb::GetReply { value: v.clone() })),
            None => Err(Status::not_found(format!("{name} is not set"))),
        }
    }

    async fn delete(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::PutReply>, Status> {
        let mut m = self.lock();
        m.remove(&r.into_inner().name);
        Ok(Response::new(pb::PutReply {
            entries: m.len() as u64,
        }))
    }

    type ScanStream = EntryStream;

    async fn scan(&self, r: Request<pb::ScanRequest>) -> Result<Response<EntryStream>, Status> {
        let prefix = r.into_inner().prefix;
        let hits: Vec<_> = self
            .lock()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| {
                Ok(pb::Entry {
                    name: k.clone(),
                    value: v.clone(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(hits))))
    }
}

fn load_key(path: &std::path::Path) -> Result<SecretKey, String> {
    pool_node::keys::load_or_create_key(path, false).map_err(|e| e.to_string())
}

async fn serve(
    tcp: Option<String>,
    pool: Option<String>,
    key: Option<PathBuf>,
    allow: Vec<PublicKey>,
    allow_file: Option<PathBuf>,
) -> Result<(), String> {
    if tcp.is_none() && pool.is_none() {
        return Err("give --tcp ADDR, --pool ADDR, or both".into());
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KvServer<Arc<Store>>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(KvServer::new(Arc::new(Store::default())));

    let tcp = match tcp {
        Some(a) => Some(
            tokio::net::TcpListener::bind(&a)
                .await
                .map_err(|e| format!("cannot listen on TCP {a}: {e}"))?,
        ),
        None => None,
    };
    let pool = match pool {
        Some(a) => {
            let key = load_key(&key.ok_or("--pool needs --key FILE")?)?;
            let mut trust = Trust::new();
            for k in allow {
                trust = trust.allow(k);
            }
            if let Some(f) = allow_file {
                trust = trust.allow_file(&f).map_err(|e| e.to_string())?;
            }
            if !trust.accepts_clients() {
                return Err("--pool needs --allow CLIENT_KEY (or --allow-file FILE)".into());
            }
            let ep = Endpoint::bind(&a, EndpointConfig::new(key).trust(trust))
                .await
                .map_err(|e| format!("cannot listen on POOL {a}: {e}"))?;
            Some(ep)
        }
        None => None,
    };
    if let Some(l) = &tcp {
        eprintln!(
            "kv: serving on tcp {}",
            l.local_addr().map_err(|e| e.to_string())?
        );
    }
    if let Some(ep) = &pool {
        eprintln!(
            "kv: serving on pool {} (key {})",
            ep.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            ep.public_key()
        );
    }
    pool_grpc::serve(router, tcp, pool)
        .await
        .map_err(|e| format!("server stopped: {e}"))
}

async fn channel(t: &Target) -> Result<tonic::transport::Channel, String> {
    if let Some(addr) = &t.tcp {
        return tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {addr}: {e}"));
    }
    let (Some(addr), Some(peer), Some(key)) = (&t.pool, t.peer_key, &t.key) else {
        return Err("give --tcp ADDR, or --pool ADDR --peer-key KEY --key FILE".into());
    };
    let ep = Endpoint::client(EndpointConfig::new(load_key(key)?));
    PoolConnector::new(ep, addr, peer)
        .service(&t.service)
        .channel()
        .await
        .map_err(|e| format!("cannot reach {addr} over POOL: {}", source_chain(&e)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn status(s: Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

async fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Serve {
            tcp,
            pool,
            key,
            allow,
            allow_file,
        } => serve(tcp, pool, key, allow, allow_file).await,
        Cmd::Put { to, name, value } => {
            let mut c = KvClient::new(channel(&to).await?);
            c.put(pb::PutRequest {
                name,
                value: value.into_bytes(),
            })
            .await
            .map_err(status)?;
            Ok(())
        }
        Cmd::Get { to, name } => {
            let mut c = KvClient::new(channel(&to).await?);
            let v = c.get(pb::GetRequest { name }).await.map_err(status)?;
            println!("{}", String::from_utf8_lossy(&v.into_inner().value));
            Ok(())
        }
        Cmd::Del { to, name } => {
            let mut c = KvClient::new(channel(&to).await?);
            c.delete(pb::GetRequest { name }).await.map_err(status)?;
            Ok(())
        }
        Cmd::Scan { to, prefix } => {
            let mut c = KvClient::new(channel(&to).await?);
            let mut s = c
                .scan(pb::ScanRequest { prefix })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(e) = s.message().await.map_err(status)? {
                println!("{}={}", e.name, String::from_utf8_lossy(&e.value));
            }
            Ok(())
        }
        Cmd::Health { to } => {
            let mut c = tonic_health::pb::health_client::HealthClient::new(channel(&to).await?);
            let r = c
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(status)?;
            let s = tonic_health::pb::health_check_response::ServingStatus::try_from(
                r.into_inner().status,
            )
            .map(|s| s.as_str_name().to_string())
            .unwrap_or_else(|_| "UNKNOWN".into());
            println!("{s}");
            Ok(())
        }
        Cmd::Services { to } => {
            use tonic_reflection::pb::v1 as refl;
            let mut c =
                refl::server_reflection_client::ServerReflectionClient::new(channel(&to).await?);
            let ask = refl::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    refl::server_reflection_request::MessageRequest::ListServices(String::new()),
                ),
            };
            let mut answers = c
                .server_reflection_info(tokio_stream::iter([ask]))
                .await
                .map_err(status)?
                .into_inner();
            let answer = answers
                .message()
                .await
                .map_err(status)?
                .ok_or("no reflection answer")?;
            match answer.message_response {
                Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(
                    l,
                )) => {
                    for s in l.service {
                        println!("{}", s.name);
                    }
                    Ok(())
                }
                other => Err(format!("unexpected reflection answer: {other:?}")),
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv: {e}");
            ExitCode::FAILURE
        }
    }
}
