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
pub struct Stream {
    shared: Arc<Shared>,
    id: u64,
    finished: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({}/{})", self.shared.id, self.id)
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

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: u64) -> Self {
        shared.add_handle();
        Stream {
            shared,
            id,
            finished: false,
        }
    }

    /// The stream id within its session.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Aborts the stream in both directions; the peer's reads and writes
    /// fail with a reset carrying `code`.
    pub fn reset(&mut self, code: u64) {
        let mut st = self.shared.lock();
        let _ = st.core.stream_reset(self.id, code);
        drop(st);
        self.finished = true;
        self.shared.wake.notify_one();
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.shared.lock();
        let dst = buf.initialize_unfilled();
        match st.core.stream_read(this.id, dst) {
            Ok(ReadResult::Data(n)) => {
                buf.advance(n);
                drop(st);
                // Reading may have opened a window the peer waits for.
                this.shared.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Ok(ReadResult::Fin) => Poll::Ready(Ok(())),
            Ok(ReadResult::Blocked) => {
                st.read_wakers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
            // Forgotten after FIN was read and our side finished: EOF.
            Err(StreamError::Unknown(_)) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = this.shared.lock();
        match st.core.stream_write(this.id, data) {
            Ok(n) => {
                drop(st);
                this.shared.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(StreamError::Blocked) => {
                st.write_wakers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
            Err(StreamError::Unknown(_)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream is closed",
            ))),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is in the session's replay buffer: it will be
        // delivered (or the session fails) whatever happens to the carrier.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Ok(()));
        }
        let mut st = this.shared.lock();
        match st.core.stream_finish(this.id) {
            Ok(()) | Err(StreamError::Unknown(_)) => {
                this.finished = true;
                drop(st);
                this.shared.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Err(StreamError::Blocked) => {
                st.write_wakers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            let _ = st.core.stream_stop(self.id);
            st.read_wakers.remove(&self.id);
            st.write_wakers.remove(&self.id);
        }
        self.shared.wake.notify_one();
        self.shared.drop_handle();
    }
}
