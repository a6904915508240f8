//! The transport under hyper: counts bytes, feeds the watchdog, and replays sniffed bytes.
//!
//! Writes feed the `write` timeout: a `Pending` write or flush marks the transport blocked, and
//! accepted bytes mark progress. Both are atomics in `ConnInfo`, read by the watchdog.

use super::sendfile::{self, SpliceTarget};
use super::ConnInfo;
use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// Wraps a connection's transport for its whole life (TLS or not).
    pub struct MeteredIo<T> {
        #[pin]
        inner: T,
        // Bytes already read off `inner` (while sniffing the protocol, or by a hyper connection
        // released while idle), replayed before reading `inner`.
        prefix: Bytes,
        // Whether `prefix` is already in the connection's bytes in (a released connection's).
        prefix_counted: bool,
        // An error met while topping up a read that replayed the prefix, reported by the next read.
        deferred_error: Option<io::Error>,
        info: Arc<ConnInfo>,
    }
}

impl<T> MeteredIo<T> {
    pub fn new(inner: T, prefix: Bytes, info: Arc<ConnInfo>) -> Self {
        MeteredIo {
            inner,
            prefix,
            prefix_counted: false,
            deferred_error: None,
            info,
        }
    }

    /// Replays `bytes`, which a released hyper connection had read but not parsed, before
    /// reading `inner` again. They were counted when they came off the socket.
    pub fn replay(&mut self, bytes: Bytes) {
        self.prefix = bytes;
        self.prefix_counted = true;
    }

    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

fn read_counted<T: AsyncRead>(
    inner: Pin<&mut T>,
    info: &ConnInfo,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let before = buf.filled().len();
    let res = inner.poll_read(cx, buf);
    info.note_read_waiting(res.is_pending());
    let n = buf.filled().len() - before;
    if n > 0 {
        info.add_bytes_in(n);
        info.note_read();
    }
    res
}

impl<T: AsyncRead> AsyncRead for MeteredIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if let Some(e) = this.deferred_error.take() {
            return Poll::Ready(Err(e));
        }
        if this.prefix.is_empty() {
            return read_counted(this.inner, this.info, cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        // The sniffed bytes came off the socket too: without this, a connection's bytes in
        // missed the start of its first request.
        if !*this.prefix_counted {
            this.info.add_bytes_in(n);
        }
        // They start a request head, as any read on an idle connection does (`header_read`).
        this.info.note_read();
        if this.prefix.is_empty() {
            // Release the sniffing buffer, and fill the rest of the caller's buffer now: a read that
            // returned only the sniffed bytes would make hyper reserve room for a second read
            // before it parsed the head, which doubles its read buffer for the connection's life.
            *this.prefix = Bytes::new();
            if buf.remaining() > 0 {
                match read_counted(this.inner.as_mut(), this.info, cx, buf) {
                    Poll::Ready(Err(e)) => *this.deferred_error = Some(e),
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

// A file response's placeholder (see `super::sendfile`) is sent by `sendfile`, never as bytes:
// a write sends what precedes the first placeholder, or the file bytes that placeholder stands for.
impl<T: AsyncWrite + SpliceTarget> AsyncWrite for MeteredIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = if sendfile::is_placeholder(buf) {
            this.info.splice().poll_send(this.inner.as_ref().get_ref(), cx, buf)
        } else {
            this.inner.poll_write(cx, buf)
        };
        note_write(this.info, &res);
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = match bufs.iter().position(|b| sendfile::is_placeholder(b)) {
            None => this.inner.poll_write_vectored(cx, bufs),
            Some(0) => this
                .info
                .splice()
                .poll_send(this.inner.as_ref().get_ref(), cx, &bufs[0]),
            Some(i) => this.inner.poll_write_vectored(cx, &bufs[..i]),
        };
        note_write(this.info, &res);
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        // A TLS stream flushes its buffered records here: a stuck peer shows up as `Pending`.
        let res = this.inner.poll_flush(cx);
        if res.is_pending() {
            this.info.note_write_blocked();
        }
        res
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let res = this.inner.poll_shutdown(cx);
        if res.is_pending() {
            this.info.note_write_blocked();
        }
        res
    }
}

fn note_write(info: &ConnInfo, res: &Poll<io::Result<usize>>) {
    match res {
        Poll::Ready(Ok(n)) if *n > 0 => {
            info.add_bytes_out(*n);
            info.note_write_progress();
        }
        Poll::Pending => info.note_write_blocked(),
        Poll::Ready(_) => {}
    }
}
