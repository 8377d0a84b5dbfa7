//! The chaos test's carrier forwarder: a TCP forwarder on 127.0.0.1 in
//! front of the server-side bridge whose carriers the test kills, resets,
//! cuts after a number of bytes or at the first record of a new key epoch.

use super::*;

/// One spliced carrier. Direction 0 is tcp2pool → pool2tcp, 1 the reverse.
pub(crate) struct Carrier {
    pub(crate) n: u64,
    pub(crate) started: Instant,
    pub(crate) forwarded: [AtomicU64; 2],
    /// Forward at most this many bytes in each direction, then cut.
    pub(crate) limit: [AtomicU64; 2],
    /// Armed (non-zero, a random number): cut at the first record of the
    /// next epoch in this direction, this many bytes into it (modulo its
    /// length).
    pub(crate) rekey_cut: [AtomicU64; 2],
    /// Set to end the carrier now; `true` resets instead of closing.
    pub(crate) kill: watch::Sender<Option<bool>>,
    pub(crate) ended: AtomicBool,
}

pub(crate) struct FwdShared {
    pub(crate) events: Arc<Events>,
    pub(crate) live: Mutex<Vec<Arc<Carrier>>>,
    pub(crate) accepted: AtomicU64,
    /// A cut point (direction, bytes) for the next carrier accepted.
    pub(crate) cut_next: Mutex<Option<(usize, u64)>>,
    /// Carriers that ended because a limit was reached.
    pub(crate) cuts: AtomicU64,
}

/// A TCP forwarder on 127.0.0.1 in front of `target`, whose carriers the
/// test kills.
pub(crate) struct Forwarder {
    pub(crate) addr: SocketAddr,
    pub(crate) target: SocketAddr,
    pub(crate) shared: Arc<FwdShared>,
    pub(crate) accept_task: Option<JoinHandle<()>>,
}

impl Forwarder {
    pub(crate) async fn start(target: SocketAddr, events: Arc<Events>) -> Forwarder {
        let mut f = Forwarder {
            addr: "127.0.0.1:0".parse().expect("addr"),
            target,
            shared: Arc::new(FwdShared {
                events,
                live: Mutex::default(),
                accepted: AtomicU64::default(),
                cut_next: Mutex::default(),
                cuts: AtomicU64::default(),
            }),
            accept_task: None,
        };
        f.listen();
        f
    }

    pub(crate) fn listen(&mut self) {
        let sock = TcpSocket::new_v4().expect("socket");
        // Killed carriers leave TIME_WAIT entries on our port.
        sock.set_reuseaddr(true).expect("SO_REUSEADDR");
        sock.bind(self.addr).expect("bind forwarder");
        let listener: TcpListener = sock.listen(64).expect("listen");
        self.addr = listener.local_addr().expect("addr");
        let (target, shared) = (self.target, self.shared.clone());
        self.accept_task = Some(tokio::spawn(async move {
            loop {
                let Ok((inbound, from)) = listener.accept().await else {
                    continue;
                };
                let n = shared.accepted.fetch_add(1, Ordering::Relaxed) + 1;
                let (kill, kill_rx) = watch::channel(None);
                let c = Arc::new(Carrier {
                    n,
                    started: Instant::now(),
                    forwarded: Default::default(),
                    limit: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
                    rekey_cut: Default::default(),
                    kill,
                    ended: AtomicBool::new(false),
                });
                let cut = shared.cut_next.lock().expect("lock").take();
                if let Some((dir, at)) = cut {
                    c.limit[dir].store(at, Ordering::Relaxed);
                }
                shared.events.say(format_args!(
                    "carrier #{n} accepted from {from}{}",
                    cut.map(|(d, at)| format!(", to be cut after {at} bytes in direction {d}"))
                        .unwrap_or_default()
                ));
                shared.live.lock().expect("lock").push(c.clone());
                let shared = shared.clone();
                tokio::spawn(async move {
                    let how = splice(inbound, target, &c, kill_rx, &shared).await;
                    shared.events.say(format_args!(
                        "carrier #{} ended ({how}) after {:.1} s; forwarded {} bytes tcp2pool->pool2tcp, {} back",
                        c.n,
                        c.started.elapsed().as_secs_f64(),
                        c.forwarded[0].load(Ordering::Relaxed),
                        c.forwarded[1].load(Ordering::Relaxed),
                    ));
                    c.ended.store(true, Ordering::Relaxed);
                    shared
                        .live
                        .lock()
                        .expect("lock")
                        .retain(|x| !Arc::ptr_eq(x, &c));
                });
            }
        }));
    }

    /// Closes the listener (connections already spliced stay).
    pub(crate) async fn stop_listening(&mut self) {
        if let Some(t) = self.accept_task.take() {
            t.abort();
            let _ = t.await;
        }
        self.shared.events.say(format_args!("listener closed"));
    }

    pub(crate) fn live(&self) -> Vec<Arc<Carrier>> {
        self.shared.live.lock().expect("lock").clone()
    }
}

/// Ends these carriers (closes, or resets, both sockets).
pub(crate) fn kill(victims: &[Arc<Carrier>], reset: bool) {
    for c in victims {
        let _ = c.kill.send(Some(reset));
    }
}

/// Waits until these carriers have ended, `limit` at most; returns whether
/// they all did.
pub(crate) async fn ended(victims: &[Arc<Carrier>], limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if victims.iter().all(|c| c.ended.load(Ordering::Relaxed)) {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) async fn splice(
    mut a: TcpStream,
    target: SocketAddr,
    c: &Carrier,
    mut kill: watch::Receiver<Option<bool>>,
    shared: &FwdShared,
) -> &'static str {
    let Ok(mut b) = TcpStream::connect(target).await else {
        return "could not reach pool2tcp";
    };
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let how = {
        let (ar, aw) = a.split();
        let (br, bw) = b.split();
        tokio::select! {
            r = pump(ar, bw, c, 0, shared) => r,
            r = pump(br, aw, c, 1, shared) => r,
            r = kill.wait_for(|k| k.is_some()) => match r.map(|k| *k) {
                Ok(Some(true)) => "killed: reset",
                _ => "killed: closed",
            },
        }
    };
    if how == "cut" {
        shared.cuts.fetch_add(1, Ordering::Relaxed);
    }
    if how == "killed: reset" {
        let _ = a.set_zero_linger();
        let _ = b.set_zero_linger();
    }
    how
}

/// Copies one direction until EOF, an error or the carrier's limit;
/// says which.
pub(crate) async fn pump(
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
    c: &Carrier,
    dir: usize,
    shared: &FwdShared,
) -> &'static str {
    let mut buf = vec![0u8; 64 << 10];
    let mut records = Records::default();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) if dir == 0 => return "EOF from tcp2pool",
            Ok(0) => return "EOF from pool2tcp",
            Err(_) if dir == 0 => return "read error from tcp2pool",
            Err(_) => return "read error from pool2tcp",
            Ok(n) => n,
        };
        let done = c.forwarded[dir].load(Ordering::Relaxed);
        if let Some((start, len, epoch)) = records.feed(done, &buf[..n]) {
            let r = c.rekey_cut[dir].swap(0, Ordering::Relaxed);
            if r != 0 {
                let at = start + r % len;
                c.limit[dir].fetch_min(at, Ordering::Relaxed);
                shared.events.say(format_args!(
                    "carrier #{}: epoch {epoch} starts at byte {start} in direction {dir} \
                     (a record of {len} bytes); cut at byte {at}",
                    c.n
                ));
            }
        }
        let room = c.limit[dir].load(Ordering::Relaxed).saturating_sub(done);
        let take = n.min(usize::try_from(room).unwrap_or(usize::MAX));
        if w.write_all(&buf[..take]).await.is_err() {
            return "write error";
        }
        c.forwarded[dir].fetch_add(take as u64, Ordering::Relaxed);
        if take < n || room == take as u64 {
            let _ = w.flush().await;
            return "cut";
        }
    }
}
