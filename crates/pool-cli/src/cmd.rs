//! The commands.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pool_net::{Endpoint, EndpointConfig, KnownPeers, PublicKey, SecretKey, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{PathArgs, TrustArgs};

/// A message for the person at the terminal.
pub(crate) struct CliError(pub(crate) String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl CliError {
    pub(crate) fn msg(m: impl Into<String>) -> Self {
        CliError(m.into())
    }
}

impl From<pool_net::Error> for CliError {
    fn from(e: pool_net::Error) -> Self {
        CliError(e.to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError(e.to_string())
    }
}

pub(crate) type Result<T> = std::result::Result<T, CliError>;

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(CliError(msg.into()))
}

const CHUNK: usize = 256 << 10;

/// Buffers go back and forth between the async side and a plain thread,
/// so large chunks are neither allocated nor zeroed per read.
struct Chunk(Vec<u8>, usize);

/// Reads stdin on a plain thread in large chunks (tokio's stdin goes
/// through the blocking pool in small steps, which halves throughput).
fn stdin_chunks() -> (
    tokio::sync::mpsc::Receiver<std::io::Result<Chunk>>,
    std::sync::mpsc::SyncSender<Vec<u8>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = back_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(Ok(Chunk(buf, n))).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    (rx, back_tx)
}

enum Out {
    Data(Chunk),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Writes stdout on a plain thread, as a plain file (std's stdout is line
/// buffered and scans every byte for newlines); `Flush` answers once all
/// before it is out.
#[derive(Clone)]
struct Stdout {
    tx: tokio::sync::mpsc::Sender<Out>,
    back: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<Vec<u8>>>>,
}

impl Stdout {
    fn spawn() -> Self {
        use std::os::fd::AsFd;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Out>(8);
        let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        std::thread::spawn(move || {
            let stdout = std::io::stdout();
            let mut out: Box<dyn Write> = match stdout.as_fd().try_clone_to_owned() {
                Ok(fd) => Box::new(std::fs::File::from(fd)),
                Err(_) => Box::new(stdout.lock()),
            };
            let mut broken = false;
            while let Some(m) = rx.blocking_recv() {
                match m {
                    Out::Data(Chunk(buf, n)) => {
                        if !broken {
                            broken = out.write_all(&buf[..n]).is_err();
                        }
                        let _ = back_tx.try_send(buf);
                    }
                    Out::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.send(());
                    }
                }
            }
        });
        Stdout {
            tx,
            back: Arc::new(std::sync::Mutex::new(back_rx)),
        }
    }
    fn buffer(&self) -> Vec<u8> {
        self.back
            .lock()
            .ok()
            .and_then(|r| r.try_recv().ok())
            .unwrap_or_else(|| vec![0u8; CHUNK])
    }
    async fn write(&self, chunk: Chunk) -> bool {
        self.tx.send(Out::Data(chunk)).await.is_ok()
    }
    async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Out::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Copies a reader to stdout in large chunks.
async fn copy_to_stdout<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    out: &Stdout,
) -> std::io::Result<()> {
    loop {
        let mut buf = out.buffer();
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if !out.write(Chunk(buf, n)).await {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdout closed",
            ));
        }
    }
    out.flush().await;
    Ok(())
}

/// The async runtime: one thread by default, `POOL_THREADS=N` for N
/// worker threads, `POOL_THREADS=0` for one per core.
///
/// One thread is the default because it measured best for a bridge on a
/// small machine: with two worker threads every hop between a socket task
/// and the session's driver crosses threads, which cost 2.4x in 50-client
/// request rate and ~25 µs per round trip (docs/benchmarks.md). Nodes with
/// many busy sessions on many cores should set `POOL_THREADS=0`.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    let threads: usize = std::env::var("POOL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| CliError(format!("cannot start the async runtime: {e}")))
}

pub(crate) fn keygen(out: &Path) -> Result<()> {
    let key = pool_node::daemon::create_key_file(out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CliError(format!(
            "{} already exists; refusing to overwrite a key (remove it first if you really mean to)",
            out.display()
        )),
        _ => CliError(format!("cannot create {}: {e}", out.display())),
    })?;
    println!("{}", key.public_key());
    Ok(())
}

pub(crate) fn load_key(path: &Path) -> Result<SecretKey> {
    Ok(pool_node::daemon::load_or_create_key(path, false)?)
}

pub(crate) fn pubkey(path: &Path) -> Result<()> {
    println!("{}", load_key(path)?.public_key());
    Ok(())
}

pub(crate) fn parse_key(token: &str, what: &str) -> Result<PublicKey> {
    PublicKey::from_token(token).map_err(|e| CliError(format!("{what}: {e}")))
}

pub(crate) fn known_peers_path(args: &TrustArgs) -> PathBuf {
    if let Some(p) = &args.known_peers {
        return p.clone();
    }
    let base = std::env::var_os("POOL_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/pool")))
        .unwrap_or_else(|| PathBuf::from("."));
    let _ = std::fs::create_dir_all(&base);
    base.join("known_peers")
}

/// Builds the trust policy from the shared flags (the same rules as the
/// daemon's `[trust]` section).
pub(crate) fn trust(args: &TrustArgs) -> Result<Trust> {
    let section = crate::node::trust_section(args)?;
    pool_node::keys::build_trust(&section, &known_peers_path(args))
        .map_err(|e| CliError(e.to_string()))
}

/// Endpoint settings from the path flags.
pub(crate) fn with_paths(cfg: EndpointConfig, paths: &PathArgs) -> EndpointConfig {
    let mut protocol = pool_net::Config::default();
    protocol.probe_timeout(Some(std::time::Duration::from_millis(
        paths.probe_timeout_ms.max(50),
    )));
    if let Some(every) = pool_node::daemon::test_rekey_after() {
        protocol.rekey_after(every);
    }
    cfg.protocol(protocol)
        .relays(paths.relays.clone())
        .direct_retry(std::time::Duration::from_secs(paths.direct_retry))
        .relay_only(paths.relay_only)
}

pub(crate) async fn listen(
    addr: &str,
    key: &Path,
    args: &TrustArgs,
    paths: &PathArgs,
    once: bool,
) -> Result<()> {
    let key = load_key(key)?;
    let trust = trust(args)?;
    if !trust.accepts_clients() {
        return err(
            "no client is trusted, so every connection would be refused; \
             add --allow PEER_PUBKEY, --authorized FILE (see `pool trust add`) or --fleet-secret FILE \
             (--tofu only pins the listeners this node dials)",
        );
    }
    if args.tofu {
        eprintln!(
            "pool: note: --tofu pins the keys of listeners this node dials; it never makes this listener \
             accept a client it does not trust"
        );
    }
    let ep = Endpoint::bind(
        addr,
        with_paths(EndpointConfig::new(key).trust(trust), paths),
    )
    .await?;
    eprintln!(
        "pool: listening on {} as {}",
        ep.local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| addr.into()),
        ep.public_key()
    );
    let stdout = Stdout::spawn();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let session = tokio::select! {
            s = ep.accept() => match s { Some(s) => s, None => return Ok(()) },
            _ = done_rx.recv() => return Ok(()),
        };
        let peer = session.peer_key();
        eprintln!("pool: session from {peer} ({})", fmt_remote(&session));
        let stdout = stdout.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            while let Some(mut stream) = session.accept_stream().await {
                if let Err(e) = copy_to_stdout(&mut stream, &stdout).await {
                    eprintln!("pool: stream from {peer} failed: {e}");
                }
                // Our side has nothing to say: finishing tells the sender
                // that everything arrived.
                let _ = stream.shutdown().await;
                if once {
                    // Close gracefully (our FIN and a CLOSE go out) before
                    // the process exits.
                    drop(stream);
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        session.close("done"),
                    )
                    .await;
                    let _ = done.send(()).await;
                    return;
                }
            }
        });
    }
}

fn fmt_remote(s: &pool_net::Session) -> String {
    let st = s.stats();
    match st.remote {
        Some(a) => format!("{a}, {}", st.core.cipher),
        None => st.core.cipher.to_string(),
    }
}

pub(crate) async fn connect(
    addr: Option<&str>,
    key: &Path,
    peer_key: Option<&str>,
    args: &TrustArgs,
    paths: &PathArgs,
) -> Result<()> {
    let key = load_key(key)?;
    let trust = trust(args)?;
    if addr.is_none() && paths.relays.is_empty() {
        return err(
            "give the listener's address (HOST:PORT), or --relay HOST:9255 to reach it by key",
        );
    }
    let peer = match (peer_key, addr) {
        (Some(k), _) => parse_key(k, "--peer-key")?,
        (None, Some(addr)) if args.tofu => tofu_peer(addr, &trust).await?,
        (None, _) => {
            return err(
                "the listener's public key is needed to authenticate it: \
                 add --peer-key KEY (run `pool pubkey KEYFILE` on the listener), or --tofu to pin it on first use",
            )
        }
    };
    let ep = Endpoint::client(with_paths(EndpointConfig::new(key).trust(trust), paths));
    let session = match addr {
        Some(a) => ep.connect(a, peer).await?,
        None => ep.connect_key(peer).await?,
    };
    let addr = addr.map_or_else(|| format!("{} (via relay)", peer.short()), str::to_string);
    let stream = session.open_stream().await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = async {
        let (mut stdin, back) = stdin_chunks();
        while let Some(chunk) = stdin.recv().await {
            let Chunk(buf, n) = chunk?;
            wr.write_all(&buf[..n]).await?;
            let _ = back.try_send(buf);
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let stdout = Stdout::spawn();
    let recv = copy_to_stdout(&mut rd, &stdout);
    let (s, r) = tokio::join!(send, recv);
    s.map_err(|e| CliError(format!("sending to {addr} failed: {e}")))?;
    r.map_err(|e| CliError(format!("receiving from {addr} failed: {e}")))?;
    // The listener's FIN came after it read all of ours: nothing is in flight.
    drop(rd);
    drop(wr);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), session.close("done")).await;
    Ok(())
}

pub(crate) async fn tofu_peer(addr: &str, trust: &Trust) -> Result<PublicKey> {
    let Some(kp) = trust.known_peers() else {
        return err("--tofu needs a known-peers file");
    };
    let pinned = kp.lock().ok().and_then(|k| k.lookup(addr));
    if let Some(k) = pinned {
        return Ok(k);
    }
    let key = Endpoint::probe_key(addr).await?;
    let mut store = kp
        .lock()
        .map_err(|_| CliError("known-peers store poisoned".into()))?;
    pin(&mut store, addr, key)?;
    eprintln!("pool: trust on first use: pinned {addr} = {key}");
    Ok(key)
}

fn pin(store: &mut KnownPeers, addr: &str, key: PublicKey) -> Result<()> {
    store.pin(addr, key).map_err(CliError::from)
}
