//! A stream of a session: `AsyncRead + AsyncWrite`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pool_core::{ReadResult, StreamError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session::Shared;

/// One bidirectional stream. Reading returns EOF after the peer's FIN;
/// `shutdown()` sends our FIN; dropping it finishes the sending side and
/// discards whatever else arrives; [`Stream::reset`] aborts both ways.
/// [`Stream::into_split`] gives separately owned halves.
pub struct Stream {
    inner: Arc<Inner>,
    finished: bool,
}

/// The reading half of a [`Stream`].
pub struct RecvStream {
    inner: Arc<Inner>,
}

/// The writing half of a [`Stream`]; dropping it sends FIN.
pub struct SendStream {
    inner: Arc<Inner>,
    finished: bool,
}

pub(crate) struct Inner {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            // Handed off: the stream's new home goes when its last handle
            // here does.
            let home = st.rehomed.remove(&self.id);
            let _ = st.core.stream_stop(self.id);
            drop(home);
            st.read_wakers.remove(&self.id);
            st.write_wakers.remove(&self.id);
        }
        self.shared.wake.notify_one();
        self.shared.drop_handle();
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({}/{})", self.inner.shared.id, self.inner.id)
    }
}

fn to_io(e: StreamError) -> io::Error {
    match e {
        StreamError::Reset(code) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by peer (code {code})"),
        ),
        StreamError::SessionClosed(r) => io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("session closed: {r}"),
        ),
        StreamError::Finished => io::Error::new(
            io::ErrorKind::BrokenPipe,
            "stream already shut down for writing",
        ),
        other => io::Error::other(other.to_string()),
    }
}

/// A stream's home after its session was handed off (source side): the
/// worker-session stream that carries it on to the target. The service's
/// handles keep working; each call goes there.
pub(crate) struct Rehomed {
    pub(crate) inner: Arc<Inner>,
    finished: std::sync::Mutex<bool>,
}

impl Rehomed {
    pub(crate) fn new(s: Stream) -> Arc<Rehomed> {
        let finished = s.finished;
        Arc::new(Rehomed {
            inner: s.into_inner(),
            finished: std::sync::Mutex::new(finished),
        })
    }

    fn poll_finish(&self, cx: &mut Context<'_>, outer: &mut bool) -> Poll<io::Result<()>> {
        let mut f = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.inner.poll_finish(cx, &mut f);
        if r.is_ready() {
            *outer = true;
        }
        r
    }

    /// Sends FIN now if there is room (a FIN the application asked for
    /// while the session was frozen, or a dropped writing half).
    pub(crate) fn finish_now(&self) {
        let mut f = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        if !*f {
            *f = true;
            self.inner.finish_now();
        }
    }
}

/// A consumer of a stream's buffered bytes: see [`RecvStream::read_with`].
type Sink<'a> = dyn FnMut(&[u8], &[u8]) -> io::Result<usize> + 'a;

/// A producer of a stream's next bytes: see [`SendStream::write_with`].
type Source<'a> = dyn FnMut(&mut [io::IoSliceMut<'_>]) -> io::Result<usize> + 'a;

impl Inner {
    fn finish_now(&self) {
        let mut st = self.shared.lock();
        let _ = st.core.stream_finish(self.id);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Where the stream lives after its session was handed off, if it was.
    fn home(&self, st: &crate::session::State) -> Option<Arc<Inner>> {
        if st.rehomed.is_empty() {
            return None;
        }
        st.rehomed.get(&self.id).map(|r| r.inner.clone())
    }

    pub(crate) fn reset(&self, code: u64) {
        let mut st = self.shared.lock();
        if let Some(home) = self.home(&st) {
            drop(st);
            return home.reset(code);
        }
        let _ = st.core.stream_reset(self.id, code);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Copies what has arrived into `buf`, through [`Inner::poll_read_with`].
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        self.poll_read_with(cx, &mut |a, b| {
            let na = a.len().min(buf.remaining());
            buf.put_slice(&a[..na]);
            let nb = b.len().min(buf.remaining());
            buf.put_slice(&b[..nb]);
            Ok(na + nb)
        })
        .map_ok(|_| ())
    }

    /// Hands what has arrived to `f`: see [`RecvStream::read_with`].
    fn poll_read_with(&self, cx: &mut Context<'_>, f: &mut Sink<'_>) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(home) = self.home(&st) {
            drop(st);
            return home.poll_read_with(cx, f);
        }
        let mut sink_err = None;
        let res = st.core.stream_read_with(self.id, |a, b| match f(a, b) {
            Ok(n) => n,
            Err(e) => {
                sink_err = Some(e);
                0
            }
        });
        match res {
            Ok(ReadResult::Data(0)) => Poll::Ready(Err(sink_err.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::WriteZero, "read_with: the sink took nothing")
            }))),
            Ok(ReadResult::Data(n)) => {
                drop(st);
                // Reading may have opened a window the peer waits for.
                self.shared.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Ok(ReadResult::Fin) => Poll::Ready(Ok(0)),
            Ok(ReadResult::Blocked) => {
                st.read_wakers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            // Forgotten after FIN was read and our side finished: EOF.
            Err(StreamError::Unknown(_)) => Poll::Ready(Ok(0)),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }

    pub(crate) fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(home) = self.home(&st) {
            drop(st);
            return home.poll_write(cx, data);
        }
        let res = st.core.stream_write(self.id, data);
        self.written(st, cx, res)
    }

    /// A write's outcome: wakes the driver for what was written, or waits
    /// for room.
    fn written(
        &self,
        mut st: std::sync::MutexGuard<'_, crate::session::State>,
        cx: &mut Context<'_>,
        res: Result<usize, StreamError>,
    ) -> Poll<io::Result<usize>> {
        match res {
            Ok(n) => {
                drop(st);
                if n > 0 {
                    self.shared.wake.notify_one();
                }
                Poll::Ready(Ok(n))
            }
            Err(StreamError::Blocked) => {
                st.write_wakers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Err(StreamError::Unknown(_)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream is closed",
            ))),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }

    /// Lets `f` write the stream's next bytes straight into the replay
    /// buffer: see [`SendStream::write_with`].
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        f: &mut Source<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(home) = self.home(&st) {
            drop(st);
            return home.poll_write_with(cx, max, f);
        }
        let mut source_err = None;
        let res = st
            .core
            .stream_write_with(self.id, max, |rooms| match f(rooms) {
                Ok(n) => n,
                Err(e) => {
                    source_err = Some(e);
                    0
                }
            });
        match (res, source_err) {
            (Ok(0), Some(e)) => Poll::Ready(Err(e)),
            (res, _) => self.written(st, cx, res),
        }
    }

    pub(crate) fn poll_finish(
        &self,
        cx: &mut Context<'_>,
        finished: &mut bool,
    ) -> Poll<io::Result<()>> {
        if *finished {
            return Poll::Ready(Ok(()));
        }
        let mut st = self.shared.lock();
        if let Some(home) = st.rehomed.get(&self.id).cloned() {
            drop(st);
            return home.poll_finish(cx, finished);
        }
        match st.core.stream_finish(self.id) {
            Ok(()) | Err(StreamError::Unknown(_)) => {
                *finished = true;
                drop(st);
                self.shared.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Err(StreamError::Blocked) => {
                st.write_wakers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: u64) -> Self {
        shared.add_handle();
        Stream {
            inner: Arc::new(Inner { shared, id }),
            finished: false,
        }
    }

    /// The stream id within its session.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The shared part, for re-homing a stream after a handoff.
    pub(crate) fn into_inner(self) -> Arc<Inner> {
        self.inner
    }

    /// Aborts the stream in both directions; the peer's reads and writes
    /// fail with a reset carrying `code`.
    pub fn reset(&mut self, code: u64) {
        self.inner.reset(code);
        self.finished = true;
    }

    /// Puts the halves of one stream back together (the inverse of
    /// [`Stream::into_split`]); gives them back if they are not halves of
    /// the same stream.
    pub fn reunite(
        recv: RecvStream,
        mut send: SendStream,
    ) -> Result<Stream, (RecvStream, SendStream)> {
        if !Arc::ptr_eq(&recv.inner, &send.inner) {
            return Err((recv, send));
        }
        let finished = send.finished;
        let inner = send.inner.clone();
        // The half's drop must not send FIN: the whole stream goes on.
        send.finished = true;
        drop(send);
        drop(recv);
        Ok(Stream { inner, finished })
    }

    /// Splits into a reading and a writing half, each usable from its own
    /// task.
    pub fn into_split(self) -> (RecvStream, SendStream) {
        let r = RecvStream {
            inner: self.inner.clone(),
        };
        let w = SendStream {
            inner: self.inner.clone(),
            finished: self.finished,
        };
        (r, w)
    }
}

impl RecvStream {
    /// Aborts the whole stream (both directions) with `code`.
    pub fn reset(&self, code: u64) {
        self.inner.reset(code);
    }

    /// Reads without copying into a buffer of the caller's: waits until
    /// bytes have arrived, then hands them to `sink` as two slices (in
    /// order; the second may be empty), which returns how many it took,
    /// typically by writing them to a socket with a non-blocking vectored
    /// write. Returns that count, or `Ok(0)` at the end of the stream.
    ///
    /// `sink` runs with the session locked, so it must not block or
    /// await: a sink that cannot take anything now returns an error such
    /// as [`io::ErrorKind::WouldBlock`], which is passed back unchanged and
    /// leaves the bytes in place for the next call. A sink that returns
    /// `Ok(0)` gives a [`io::ErrorKind::WriteZero`] error.
    pub async fn read_with<F>(&mut self, mut sink: F) -> io::Result<usize>
    where
        F: FnMut(&[u8], &[u8]) -> io::Result<usize>,
    {
        std::future::poll_fn(|cx| self.inner.poll_read_with(cx, &mut sink)).await
    }
}

impl SendStream {
    /// Aborts the whole stream (both directions) with `code`.
    pub fn reset(&mut self, code: u64) {
        self.inner.reset(code);
        self.finished = true;
    }

    /// Writes without copying from a buffer of the caller's: waits until
    /// the stream may take bytes, then hands `source` room for up to `max`
    /// of them in the session's replay buffer (where sent bytes wait for
    /// the peer's acknowledgement anyway), as slices to fill in order,
    /// typically by one non-blocking vectored read from a socket. `source`
    /// returns how many bytes it wrote. Returns that count; `Ok(0)` when
    /// `source` returned `Ok(0)` (its end).
    ///
    /// `source` runs with the session locked, so it must not block or
    /// await: a source with nothing to give now returns an error such as
    /// [`io::ErrorKind::WouldBlock`], which is passed back unchanged.
    pub async fn write_with<F>(&mut self, max: usize, mut source: F) -> io::Result<usize>
    where
        F: FnMut(&mut [io::IoSliceMut<'_>]) -> io::Result<usize>,
    {
        std::future::poll_fn(|cx| self.inner.poll_write_with(cx, max, &mut source)).await
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = self.inner.shared.lock();
            if let Some(home) = st.rehomed.get(&self.inner.id).cloned() {
                drop(st);
                home.finish_now();
                return;
            }
            let _ = st.core.stream_finish(self.inner.id);
            drop(st);
            self.inner.shared.wake.notify_one();
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is in the session's replay buffer: it will be
        // delivered (or the session fails) whatever happens to the carrier.
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.inner.poll_finish(cx, &mut this.finished)
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.inner.poll_finish(cx, &mut this.finished)
    }
}
