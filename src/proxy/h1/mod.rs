//! HTTP/1.1 to upstream servers, spoken by the request's own task.
//!
//! Written here rather than taken from hyper's client (`hyper::client::conn::http1`), for a
//! measured reason. hyper drives each client connection from a task of its own: a proxied
//! request went to that task through a channel, its response head came back through a oneshot
//! and its body through another channel, and the connection went back to the pool only once that
//! task said it was ready again. callgrind put that machinery (the connection's task, its channels
//! and hyper's general-purpose head encoding and parsing) at about half of the instructions a
//! proxied request cost beyond a direct answer, and the proxy spent well over twice nginx's extra
//! CPU per request (docs/performance.md). Here the request's task writes the request and reads the
//! response itself, and a pooled connection between requests is its socket and its read buffer.
//!
//! What it speaks (RFC 9112): requests in origin form, with the client's framing (`Content-Length`,
//! or `chunked` for a body of unknown length, trailers declared in `Trailer`); responses parsed
//! strictly, since a connection whose framing is misread hands the next client another client's
//! response: `httparse` for heads (no obsolete line folding, no space before a colon), one
//! `Content-Length` value, `Transfer-Encoding` only on HTTP/1.1 and never beside
//! `Content-Length`, `chunked` last and once, chunk lines ended by CRLF. Interim `1xx` responses are
//! read and dropped (`101` ends HTTP on the connection: [`Upgraded`]). A connection goes back to its
//! pool only after a whole response to a whole request, with nothing unread behind it.

mod body;
mod request;
mod response;

pub use body::H1Body;
pub use request::Request;

use crate::http::body::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use request::Upload;
use response::Parsed;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest response head (status line and fields) read from an upstream: hyper's own
/// client default is larger, nginx's `proxy_buffer_size` smaller (4–8 KiB); 64 KiB takes any
/// real application's head, and a longer one is answered 502 rather than buffered. Below
/// 64 KiB, so that an offset into a head fits in a `u16`.
const MAX_HEAD_BYTES: usize = 64 * 1024 - 1;
/// Fields in one response head or trailer section (hyper's default too).
const MAX_FIELDS: usize = 100;
/// Interim (`1xx`) responses read before the final one: each is a head of its own, and an
/// upstream sending them without end would otherwise never be answered for.
const MAX_INTERIM: usize = 16;
/// What a read asks the socket for at least.
const READ_CHUNK: usize = 8 * 1024;

/// The socket of an upstream connection: TCP, or TLS over it.
pub enum UpIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(t) => Pin::new(t).poll_read(cx, buf),
            UpIo::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(t) => Pin::new(t).poll_write(cx, buf),
            UpIo::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            UpIo::Tls(t) => Pin::new(&mut **t).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpIo::Plain(t) => t.is_write_vectored(),
            UpIo::Tls(t) => t.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(t) => Pin::new(t).poll_flush(cx),
            UpIo::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(t) => Pin::new(t).poll_shutdown(cx),
            UpIo::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

/// One HTTP/1.1 connection to an upstream server.
pub struct H1Conn {
    io: UpIo,
    /// Bytes read and not yet used: the rest of a response being read. Empty between exchanges;
    /// its allocation is kept for the next response, as hyper keeps its read buffer.
    buf: BytesMut,
}

impl H1Conn {
    pub fn new(io: UpIo) -> Self {
        H1Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether nothing waits to be read: no byte in the socket nor (TLS) in rustls, decrypted or
    /// not, and no end of stream. `None` when quiet, else why the connection must not carry
    /// another request: `upstream_closed` (end of stream, or the socket failed) or `error` (bytes
    /// nobody asked for: more than the last response said it had). A read with a waker that does
    /// nothing: on TCP it costs a load of the socket's readiness when nothing arrived (tokio
    /// knows, and makes no system call), a `recv` otherwise; through rustls it also sees what
    /// rustls holds, which the socket no longer shows. A byte it reads is lost, which is fine:
    /// the connection is then closed.
    pub fn unquiet(&mut self) -> Option<&'static str> {
        if !self.buf.is_empty() {
            return Some("error");
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        match Pin::new(&mut self.io).poll_read(&mut cx, &mut probe) {
            Poll::Pending => None,
            Poll::Ready(Ok(())) if !probe.filled().is_empty() => Some("error"),
            Poll::Ready(_) => Some("upstream_closed"),
        }
    }

    /// Reads more of the response into `buf`: the byte count, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(want.max(READ_CHUNK));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream's bytes are not an HTTP/1.1 response, or break its framing.
    #[error("invalid response from the upstream: {0}")]
    BadResponse(String),
    /// The connection ended or failed before the response head was complete.
    #[error("the upstream connection {0} before the response head")]
    Closed(Closed),
    /// Reading or writing the connection failed.
    #[error("upstream connection error: {0}")]
    Io(#[from] io::Error),
    /// The client's request body failed while it was being sent.
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
}

/// How a connection ended early.
#[derive(Debug)]
pub enum Closed {
    /// End of stream.
    Eof,
    /// A read or write error (reset, broken pipe).
    Failed(io::Error),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::Eof => f.write_str("closed"),
            Closed::Failed(e) => write!(f, "failed ({e})"),
        }
    }
}

impl Error {
    fn bad(what: impl Into<String>) -> Self {
        Error::BadResponse(what.into())
    }

    /// The `cause` label of `gatehouse_upstream_errors_total` for this failure.
    pub fn cause(&self) -> &'static str {
        match self {
            Error::BadResponse(_) => "bad_response",
            Error::Closed(_) | Error::Io(_) | Error::RequestBody(_) => "reset_before_response",
        }
    }
}

/// A failed exchange, and whether its request can go on another connection.
pub enum Failure {
    /// A pooled connection ended before anything of a response came back, to a request that may
    /// be sent again (an idempotent method, its body, if any, untouched): the keep-alive race
    /// every pool has. The request comes back to be sent on a new connection.
    Resend(Error, Request),
    Failed(Error),
}

/// A response head and what its body needs.
pub struct Sent {
    parts: http::response::Parts,
    shape: response::Shape,
    /// Why the connection closes after this exchange (see [`H1Body`]); `None`: it can be reused.
    closes: Option<&'static str>,
    /// The request body, when the response head came before all of it was sent.
    upload: Option<Box<Upload>>,
}

impl Sent {
    pub fn status(&self) -> http::StatusCode {
        self.parts.status
    }

    /// The response, its body read from `conn`; `home` takes the connection back at its end.
    pub fn into_response(
        self,
        conn: H1Conn,
        home: Option<std::sync::Arc<crate::proxy::pool::ServerPool>>,
    ) -> http::Response<H1Body> {
        let body = H1Body::new(conn, self.shape, self.closes, self.upload, home);
        http::Response::from_parts(self.parts, body)
    }
}

/// Sends `req` on `conn` and reads the response head. `reused`: the connection carried a request
/// before, so ending before any response byte is the keep-alive race rather than the server's
/// answer to this request.
pub async fn send(conn: &mut H1Conn, req: Request, reused: bool) -> Result<Sent, Failure> {
    let head_only = req.head_only;
    let mut upload = Some(Upload::new(req));
    // A write error does not end the exchange by itself: the server may have answered early
    // (a 413, say) and closed its side, and that answer is what the client should get.
    let mut write_failed: Option<io::Error> = None;
    let mut interim = 0;
    let mut read_any = false;
    std::future::poll_fn(|cx| {
        if let Some(up) = upload.as_mut().filter(|u| !u.done() && write_failed.is_none()) {
            match up.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(request::UploadError::Body(e))) => {
                    return Poll::Ready(Err(Failure::Failed(Error::RequestBody(e))));
                }
                Poll::Ready(Err(request::UploadError::Io(e))) => write_failed = Some(e),
            }
        }
        loop {
            if !conn.buf.is_empty() {
                match response::parse(&mut conn.buf, head_only) {
                    Ok(None) => {}
                    Ok(Some(Parsed::Interim)) => {
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Poll::Ready(Err(Failure::Failed(Error::bad(format!(
                                "more than {MAX_INTERIM} interim (1xx) responses"
                            )))));
                        }
                        continue;
                    }
                    Ok(Some(Parsed::Final { parts, shape, closes })) => {
                        let Some(up) = upload.take() else {
                            return Poll::Ready(Err(Failure::Failed(Error::bad("response read twice"))));
                        };
                        let unsent = !up.done() || write_failed.is_some();
                        if unsent && matches!(shape, response::Shape::Switched) {
                            return Poll::Ready(Err(Failure::Failed(Error::bad(
                                "101 Switching Protocols before the request body was sent",
                            ))));
                        }
                        return Poll::Ready(Ok(Sent {
                            parts,
                            shape,
                            // A request not sent whole leaves the connection mid-message.
                            closes: if write_failed.is_some() { Some("error") } else { closes },
                            upload: (!up.done() && write_failed.is_none()).then(|| Box::new(up)),
                        }));
                    }
                    Err(e) => return Poll::Ready(Err(Failure::Failed(e))),
                }
                if conn.buf.len() > MAX_HEAD_BYTES {
                    return Poll::Ready(Err(Failure::Failed(Error::bad(format!(
                        "response head larger than {} KiB",
                        (MAX_HEAD_BYTES + 1) / 1024
                    )))));
                }
            }
            let ended = match ready!(conn.poll_fill(cx, READ_CHUNK)) {
                Ok(0) => Closed::Eof,
                Ok(_) => {
                    read_any = true;
                    continue;
                }
                Err(e) => Closed::Failed(e),
            };
            // Nothing more will come: report the write's failure if that came first.
            let ended = match write_failed.take() {
                Some(e) => Closed::Failed(e),
                None => ended,
            };
            let error = Error::Closed(ended);
            let up = upload.take();
            return Poll::Ready(Err(match up.and_then(|u| u.replay()) {
                Some(req) if reused && !read_any => Failure::Resend(error, req),
                _ => Failure::Failed(error),
            }));
        }
    })
    .await
}

/// An upstream connection after `101 Switching Protocols`: the bytes read past the response
/// head first, then the socket.
pub struct Upgraded {
    prefix: Bytes,
    io: UpIo,
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
