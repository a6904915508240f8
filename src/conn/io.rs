//! The transport under hyper: counts bytes, feeds the watchdog, and replays sniffed bytes.

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
        // Bytes already read while sniffing the protocol, replayed before reading `inner`.
        prefix: Bytes,
        info: Arc<ConnInfo>,
    }
}

impl<T> MeteredIo<T> {
    pub fn new(inner: T, prefix: Bytes, info: Arc<ConnInfo>) -> Self {
        MeteredIo { inner, prefix, info }
    }
}

impl<T: AsyncRead> AsyncRead for MeteredIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.info.add_bytes_in(n);
            this.info.note_read();
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for MeteredIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        note_write(this.info, &res);
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        note_write(this.info, &res);
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let res = this.inner.poll_flush(cx);
        this.info.set_write_blocked(res.is_pending());
        res
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Counts written bytes and whether the peer is holding writes back (drain waits for those).
fn note_write(info: &ConnInfo, res: &Poll<io::Result<usize>>) {
    match res {
        Poll::Ready(Ok(n)) => {
            info.add_bytes_out(*n);
            info.set_write_blocked(false);
        }
        Poll::Pending => info.set_write_blocked(true),
        Poll::Ready(Err(_)) => info.set_write_blocked(false),
    }
}
