//! The objects behind the handles, the library's runtime, and the
//! non-blocking machinery (buffers pumped by tasks, readiness fds).

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pool_net::{RecvStream, SendStream, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::error::{pool_status, Fail, Res};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// The runtime

static RT: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// The process-wide runtime, created (after the crypto self-test) on first
/// use and again after `pool_shutdown`.
pub(crate) fn rt() -> Res<Arc<Runtime>> {
    let mut g = lock(&RT);
    if let Some(rt) = &*g {
        return Ok(rt.clone());
    }
    pool_core::selftest::run()
        .map_err(|e| Fail::new(pool_status::POOL_EINTERNAL, e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("libpool")
        .enable_all()
        .build()
        .map_err(|e| {
            Fail::new(
                pool_status::POOL_EINTERNAL,
                format!("cannot start libpool's runtime threads: {e}"),
            )
        })?;
    let rt = Arc::new(rt);
    *g = Some(rt.clone());
    Ok(rt)
}

/// Stops the runtime (after the handles are gone): its threads exit and
/// its memory is freed.
pub(crate) fn shutdown_runtime() {
    let rt = lock(&RT).take();
    if let Some(rt) = rt {
        match Arc::try_unwrap(rt) {
            Ok(rt) => rt.shutdown_timeout(Duration::from_secs(2)),
            // A call is still running on another thread: it keeps the
            // runtime until it returns.
            Err(rt) => drop(rt),
        }
    }
}

// ---------------------------------------------------------------------------
// Trust and endpoint

pub(crate) struct TrustObj {
    pub(crate) trust: Mutex<pool_net::Trust>,
}

pub(crate) struct Endpoint {
    pub(crate) ep: pool_net::Endpoint,
    pub(crate) public: CString,
    pub(crate) local: Option<CString>,
}

// ---------------------------------------------------------------------------
// Readiness signal: a socketpair whose read end is readable while ready.

struct Signal {
    r: UnixStream,
    w: UnixStream,
    on: bool,
}

impl Signal {
    fn new() -> Res<Signal> {
        let (r, w) = UnixStream::pair().map_err(|e| {
            Fail::new(
                pool_status::POOL_EIO,
                format!("cannot create a readiness fd: {e}"),
            )
        })?;
        r.set_nonblocking(true)
            .and_then(|()| w.set_nonblocking(true))
            .map_err(|e| Fail::new(pool_status::POOL_EIO, e.to_string()))?;
        Ok(Signal { r, w, on: false })
    }

    /// Level-triggered: makes the fd readable exactly while `ready`.
    fn set(&mut self, ready: bool) {
        if ready && !self.on {
            let _ = (&self.w).write(&[1]);
            self.on = true;
        } else if !ready && self.on {
            let mut b = [0u8; 16];
            while matches!((&self.r).read(&mut b), Ok(n) if n > 0) {}
            self.on = false;
        }
    }
}

// ---------------------------------------------------------------------------
// Streams

/// Buffered bytes per direction of a non-blocking stream.
const NB_CAP: usize = 256 * 1024;
const CHUNK: usize = 64 * 1024;

pub(crate) struct StreamObj {
    recv: Mutex<Option<RecvStream>>,
    send: Mutex<Option<SendStream>>,
    nb: OnceLock<Arc<Nb>>,
}

struct NbState {
    rx: VecDeque<u8>,
    rx_eof: bool,
    rx_err: Option<String>,
    tx: VecDeque<u8>,
    tx_err: Option<String>,
    finish: bool,
    want_write: bool,
    sig: Signal,
}

struct Nb {
    st: Mutex<NbState>,
    rx_space: Notify,
    tx_data: Notify,
    reader: Mutex<Option<AbortHandle>>,
    fd: RawFd,
}

impl Nb {
    fn update(st: &mut NbState) {
        let readable = !st.rx.is_empty() || st.rx_eof || st.rx_err.is_some();
        let writable = st.want_write && (st.tx.len() < NB_CAP || st.tx_err.is_some());
        st.sig.set(readable || writable);
    }
}

fn closed(e: impl std::fmt::Display) -> Fail {
    Fail::new(pool_status::POOL_ECLOSED, format!("stream closed: {e}"))
}

impl StreamObj {
    pub(crate) fn new(s: pool_net::Stream) -> StreamObj {
        let (r, w) = s.into_split();
        StreamObj {
            recv: Mutex::new(Some(r)),
            send: Mutex::new(Some(w)),
            nb: OnceLock::new(),
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> Res<usize> {
        if let Some(nb) = self.nb.get() {
            let mut st = lock(&nb.st);
            if !st.rx.is_empty() {
                let n = buf.len().min(st.rx.len());
                for (d, s) in buf.iter_mut().zip(st.rx.drain(..n)) {
                    *d = s;
                }
                nb.rx_space.notify_one();
                Nb::update(&mut st);
                return Ok(n);
            }
            if let Some(e) = &st.rx_err {
                return Err(closed(e));
            }
            if st.rx_eof {
                return Ok(0);
            }
            return Err(eagain("no data to read yet"));
        }
        let rt = rt()?;
        let mut g = lock(&self.recv);
        let r = g.as_mut().ok_or_else(|| closed("not readable"))?;
        rt.block_on(r.read(buf)).map_err(closed)
    }

    pub(crate) fn write(&self, buf: &[u8]) -> Res<usize> {
        if let Some(nb) = self.nb.get() {
            let mut st = lock(&nb.st);
            if let Some(e) = &st.tx_err {
                return Err(closed(e));
            }
            if st.finish {
                return Err(closed("pool_stream_finish was called: no more writes"));
            }
            let n = buf.len().min(NB_CAP - st.tx.len());
            st.tx.extend(&buf[..n]);
            st.want_write = n < buf.len();
            if n > 0 {
                nb.tx_data.notify_one();
            }
            Nb::update(&mut st);
            if n == 0 {
                return Err(eagain("the stream's send buffer is full"));
            }
            return Ok(n);
        }
        let rt = rt()?;
        let mut g = lock(&self.send);
        let w = g
            .as_mut()
            .ok_or_else(|| closed("pool_stream_finish was called: no more writes"))?;
        rt.block_on(w.write_all(buf)).map_err(closed)?;
        Ok(buf.len())
    }

    pub(crate) fn finish(&self) -> Res<()> {
        if let Some(nb) = self.nb.get() {
            let mut st = lock(&nb.st);
            st.finish = true;
            nb.tx_data.notify_one();
            Nb::update(&mut st);
            return Ok(());
        }
        let rt = rt()?;
        let mut g = lock(&self.send);
        if let Some(mut w) = g.take() {
            rt.block_on(w.shutdown()).map_err(closed)?;
        }
        Ok(())
    }

    /// Switches to non-blocking mode (once; there is no way back) and
    /// returns the readiness fd.
    pub(crate) fn nonblocking(&self) -> Res<RawFd> {
        if let Some(nb) = self.nb.get() {
            return Ok(nb.fd);
        }
        let rt = rt()?;
        let (recv, send) = (lock(&self.recv).take(), lock(&self.send).take());
        let sig = Signal::new()?;
        let fd = sig.r.as_raw_fd();
        let nb = Arc::new(Nb {
            st: Mutex::new(NbState {
                rx: VecDeque::new(),
                rx_eof: recv.is_none(),
                rx_err: None,
                tx: VecDeque::new(),
                tx_err: None,
                finish: send.is_none(),
                want_write: false,
                sig,
            }),
            rx_space: Notify::new(),
            tx_data: Notify::new(),
            reader: Mutex::new(None),
            fd,
        });
        if let Some(r) = recv {
            let h = rt.spawn(read_pump(nb.clone(), r));
            *lock(&nb.reader) = Some(h.abort_handle());
        }
        if let Some(w) = send {
            rt.spawn(write_pump(nb.clone(), w));
        }
        let fd = nb.fd;
        {
            let mut st = lock(&nb.st);
            Nb::update(&mut st);
        }
        let _ = self.nb.set(nb);
        Ok(fd)
    }

    pub(crate) fn fd(&self) -> Option<RawFd> {
        self.nb.get().map(|n| n.fd)
    }
}

impl Drop for StreamObj {
    fn drop(&mut self) {
        if let Some(nb) = self.nb.get() {
            // Freeing finishes the sending side (after what is buffered,
            // as dropping a blocking stream does) and stops reading.
            if let Some(h) = lock(&nb.reader).take() {
                h.abort();
            }
            let mut st = lock(&nb.st);
            st.finish = true;
            nb.tx_data.notify_one();
        }
    }
}

fn eagain(what: &str) -> Fail {
    Fail::new(
        pool_status::POOL_EAGAIN,
        format!("{what} (non-blocking mode: wait until pool_stream_fd is readable)"),
    )
}

async fn read_pump(nb: Arc<Nb>, mut recv: RecvStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        loop {
            if lock(&nb.st).rx.len() < NB_CAP {
                break;
            }
            nb.rx_space.notified().await;
        }
        let r = recv.read(&mut buf).await;
        let mut st = lock(&nb.st);
        match r {
            Ok(0) => st.rx_eof = true,
            Ok(n) => st.rx.extend(&buf[..n]),
            Err(e) => st.rx_err = Some(e.to_string()),
        }
        let done = st.rx_eof || st.rx_err.is_some();
        Nb::update(&mut st);
        if done {
            return;
        }
    }
}

async fn write_pump(nb: Arc<Nb>, mut send: SendStream) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let finish = loop {
            {
                let mut st = lock(&nb.st);
                if !st.tx.is_empty() {
                    let n = st.tx.len().min(CHUNK);
                    chunk.extend(st.tx.drain(..n));
                    Nb::update(&mut st);
                    break false;
                }
                if st.finish {
                    break true;
                }
            }
            nb.tx_data.notified().await;
        };
        let r = if finish {
            send.shutdown().await
        } else {
            send.write_all(&chunk).await
        };
        chunk.clear();
        let mut st = lock(&nb.st);
        if let Err(e) = r {
            st.tx_err = Some(e.to_string());
        }
        Nb::update(&mut st);
        if finish || st.tx_err.is_some() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Sessions

/// How long freeing a session waits for the peer to acknowledge what was
/// written (through a carrier loss and resume, if need be).
pub(crate) const LINGER: Duration = Duration::from_secs(10);

pub(crate) struct SessionObj {
    pub(crate) session: Session,
    nb: OnceLock<Arc<SessNb>>,
}

struct SessNbState {
    incoming: VecDeque<pool_net::Stream>,
    closed: Option<String>,
    sig: Signal,
}

struct SessNb {
    st: Mutex<SessNbState>,
    pump: Mutex<Option<AbortHandle>>,
    fd: RawFd,
}

impl SessionObj {
    pub(crate) fn new(session: Session) -> SessionObj {
        SessionObj {
            session,
            nb: OnceLock::new(),
        }
    }

    /// Blocking: waits for the peer's next stream. Non-blocking: returns
    /// one if the accept pump has one queued.
    pub(crate) fn accept_stream(&self) -> Res<pool_net::Stream> {
        if let Some(nb) = self.nb.get() {
            let mut st = lock(&nb.st);
            let r = match st.incoming.pop_front() {
                Some(s) => Ok(s),
                None => match &st.closed {
                    Some(why) => Err(Fail::new(pool_status::POOL_ECLOSED, why.clone())),
                    None => Err(Fail::new(
                        pool_status::POOL_EAGAIN,
                        "no incoming stream yet (non-blocking mode: wait until \
                         pool_session_fd is readable)",
                    )),
                },
            };
            let ready = !st.incoming.is_empty() || st.closed.is_some();
            st.sig.set(ready);
            return r;
        }
        let rt = rt()?;
        rt.block_on(self.session.accept_stream())
            .ok_or_else(|| self.closed_error())
    }

    /// Waits (up to `LINGER`) until the peer has acknowledged everything
    /// written on the session, or it closed: like the kernel's linger on a
    /// closed TCP socket, so that a program may exit right after freeing.
    pub(crate) fn linger(&self) {
        let s = &self.session;
        if s.is_closed() || s.unacknowledged() == 0 {
            return;
        }
        let Ok(rt) = rt() else { return };
        // The timer is made inside the runtime (it needs its clock).
        rt.block_on(async {
            let acked = async {
                while !s.is_closed() && s.unacknowledged() > 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            };
            let _ = tokio::time::timeout(LINGER, acked).await;
        });
    }

    pub(crate) fn closed_error(&self) -> Fail {
        Fail::new(
            pool_status::POOL_ECLOSED,
            "the session is closed (the peer closed it, or it could not resume in time)",
        )
    }

    pub(crate) fn nonblocking(&self) -> Res<RawFd> {
        if let Some(nb) = self.nb.get() {
            return Ok(nb.fd);
        }
        let rt = rt()?;
        let sig = Signal::new()?;
        let fd = sig.r.as_raw_fd();
        let nb = Arc::new(SessNb {
            st: Mutex::new(SessNbState {
                incoming: VecDeque::new(),
                closed: None,
                sig,
            }),
            pump: Mutex::new(None),
            fd,
        });
        let (s, n) = (self.session.clone(), nb.clone());
        let h = rt.spawn(async move {
            loop {
                let next = s.accept_stream().await;
                let mut st = lock(&n.st);
                match next {
                    Some(stream) => st.incoming.push_back(stream),
                    None => st.closed = Some("the session is closed".into()),
                }
                st.sig.set(true);
                if st.closed.is_some() {
                    return;
                }
            }
        });
        *lock(&nb.pump) = Some(h.abort_handle());
        let _ = self.nb.set(nb);
        Ok(fd)
    }
}

impl Drop for SessionObj {
    fn drop(&mut self) {
        if let Some(nb) = self.nb.get() {
            if let Some(h) = lock(&nb.pump).take() {
                h.abort();
            }
        }
    }
}
