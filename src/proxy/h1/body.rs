//! An upstream response's body, read from its connection as the client takes it; the
//! connection goes back to its pool at the body's end when it can carry another request.

use super::request::Upload;
use super::response::Shape;
use super::{Error, H1Conn, Upgraded, MAX_FIELDS, READ_CHUNK};
use crate::http::body::BoxError;
use crate::proxy::pool::ServerPool;
use bytes::{Buf, Bytes};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// The longest chunk-size line (size and extensions) read before it is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The largest trailer section read.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// What one read asks for at most while a body of known length is read.
const MAX_READ: usize = 64 * 1024;

/// Where the decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Bytes still due (`Content-Length`).
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes still due.
    ChunkData(u64),
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    UntilClose,
    /// After `101`: nothing here; the connection is taken by [`H1Body::into_upgraded`].
    Switched,
    Done,
}

/// A response body from an HTTP/1.1 upstream.
pub struct H1Body {
    /// `None` once the body ended (the connection pooled or closed) or was taken.
    conn: Option<H1Conn>,
    state: State,
    /// Why the connection cannot carry another request after this body, as a `reason` of
    /// `gatehouse_upstream_new_connection_reasons_total`; `None` while it can.
    closes: Option<&'static str>,
    /// The rest of the request, when the response came before all of it was sent: written as
    /// this body is read (HTTP/1.1 allows both directions at once).
    upload: Option<Box<Upload>>,
    /// The pool the connection returns to; `None` for a health check's single-use connection.
    home: Option<Arc<ServerPool>>,
    /// Why the connection is lost if this body is dropped before its end.
    fate: &'static str,
}

impl H1Body {
    pub(super) fn new(
        conn: H1Conn,
        shape: Shape,
        closes: Option<&'static str>,
        upload: Option<Box<Upload>>,
        home: Option<Arc<ServerPool>>,
    ) -> Self {
        let state = match shape {
            Shape::Empty | Shape::Length(0) => State::Done,
            Shape::Length(n) => State::Length(n),
            Shape::Chunked => State::ChunkSize,
            Shape::UntilClose => State::UntilClose,
            Shape::Switched => State::Switched,
        };
        let mut body = H1Body {
            conn: Some(conn),
            state,
            closes,
            upload,
            home,
            fate: "cancelled",
        };
        if state == State::Done {
            body.finish();
        }
        body
    }

    /// A body dropped from now on (its response is not passed on) costs its connection as an
    /// error, not as a client's cancellation.
    pub fn abandon(&mut self) {
        self.fate = "error";
    }

    /// The connection after a `101`, for the tunnel.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        if self.state != State::Switched {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Upgraded {
            prefix: conn.buf.freeze(),
            io: conn.io,
        })
    }

    /// The body ended: the connection goes back to its pool if it can carry another request,
    /// else it closes and the pool remembers why.
    fn finish(&mut self) {
        self.state = State::Done;
        let Some(conn) = self.conn.take() else { return };
        let Some(pool) = self.home.take() else { return };
        if let Some(reason) = self.closes {
            pool.note_lost(reason);
        } else if self.upload.is_some() || !conn.buf.is_empty() {
            // The request was not all sent, or the server sent more than its response said: the
            // connection is mid-message either way. Bytes not read yet (in the socket, or held
            // by rustls) are found when a request would take the connection
            // ([`H1Conn::unquiet`]), which looks once, there, for every way a connection goes bad
            // while it idles.
            pool.note_lost("error");
        } else {
            pool.put_idle(conn);
        }
    }

    /// Fails the body: the connection closes, counted as lost to an error.
    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.upload = None;
        if let (Some(_), Some(pool)) = (self.conn.take(), self.home.take()) {
            pool.note_lost("error");
        }
        Poll::Ready(Some(Err(e.into())))
    }

    /// Takes up to `due` bytes already read as a data frame.
    fn take(conn: &mut H1Conn, due: u64) -> Bytes {
        let n = usize::try_from(due).unwrap_or(usize::MAX).min(conn.buf.len());
        conn.buf.split_to(n).freeze()
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(up) = this.upload.as_mut() {
            match up.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Pending => {}
                // The server stopped taking the request: its response may still be whole, but
                // the connection is done after it.
                Poll::Ready(Err(super::request::UploadError::Io(_))) => {
                    this.upload = None;
                    this.closes = Some("error");
                }
                Poll::Ready(Err(super::request::UploadError::Body(e))) => {
                    return this.fail(Error::RequestBody(e));
                }
            }
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let want = match this.state {
                State::Done | State::Switched => return Poll::Ready(None),
                State::Length(due) | State::ChunkData(due) if !conn.buf.is_empty() => {
                    let data = Self::take(conn, due);
                    let left = due - data.len() as u64;
                    this.state = match (this.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), n) => State::Length(n),
                        (_, 0) => State::ChunkEnd,
                        (_, n) => State::ChunkData(n),
                    };
                    if this.state == State::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Length(due) | State::ChunkData(due) => {
                    usize::try_from(due).unwrap_or(MAX_READ).clamp(READ_CHUNK, MAX_READ)
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => READ_CHUNK,
                State::ChunkSize => match chunk_line(&conn.buf) {
                    Ok(Some((len, size))) => {
                        conn.buf.advance(len);
                        this.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        continue;
                    }
                    Ok(None) if conn.buf.len() > MAX_CHUNK_LINE => {
                        return this.fail(Error::bad("chunk-size line too long"));
                    }
                    Ok(None) => READ_CHUNK,
                    Err(what) => return this.fail(Error::bad(what)),
                },
                State::ChunkEnd if conn.buf.len() >= 2 => {
                    if &conn.buf[..2] != b"\r\n" {
                        return this.fail(Error::bad("chunk data not followed by CRLF"));
                    }
                    conn.buf.advance(2);
                    this.state = State::ChunkSize;
                    continue;
                }
                State::ChunkEnd => READ_CHUNK,
                State::Trailers => match trailers(&conn.buf) {
                    Ok(Some((len, fields))) => {
                        conn.buf.advance(len);
                        this.finish();
                        match fields {
                            Some(fields) => return Poll::Ready(Some(Ok(Frame::trailers(fields)))),
                            None => return Poll::Ready(None),
                        }
                    }
                    Ok(None) if conn.buf.len() > MAX_TRAILER_BYTES => {
                        return this.fail(Error::bad("trailer section too large"));
                    }
                    Ok(None) => READ_CHUNK,
                    Err(e) => return this.fail(e),
                },
            };
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) if this.state == State::UntilClose => {
                    // The server closed: that is this body's end (and `closes` says so already).
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::bad("connection closed before the end of the body")),
                Ok(_) => {}
                Err(e) => return this.fail(Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Switched)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done | State::Switched => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // Dropped before its end: the connection is mid-response and closes with this body.
        if let (Some(_), Some(pool)) = (self.conn.take(), self.home.take()) {
            pool.note_lost(self.fate);
        }
    }
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// `chunk-size [ chunk-ext ] CRLF` at the front of `buf` (RFC 9112 §7.1): the line's length and
/// the size, `None` while the line is incomplete. Strict, because a connection whose chunks are
/// misread delivers the rest of this body as the next response: 1 to 16 hex digits, then
/// optional whitespace and `;` extensions (ignored) of visible characters, then CRLF.
fn chunk_line(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let mut size: u64 = 0;
    let mut i = 0;
    while let Some(&b) = buf.get(i) {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        if i == 16 {
            return Err("chunk size too large");
        }
        size = size << 4 | u64::from(digit);
        i += 1;
    }
    if i == buf.len() {
        return Ok(None);
    }
    if i == 0 {
        return Err("chunk size missing");
    }
    while matches!(buf.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    if buf.get(i) == Some(&b';') {
        while let Some(&b) = buf.get(i) {
            if b == b'\r' {
                break;
            }
            if b != b'\t' && (b < 0x20 || b == 0x7f) {
                return Err("invalid byte in a chunk extension");
            }
            i += 1;
        }
    }
    match (buf.get(i), buf.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((i + 2, size))),
        _ => Err("invalid chunk-size line"),
    }
}

/// The trailer section at the front of `buf`: its length and its fields (`None` when empty),
/// or `None` while incomplete.
#[allow(clippy::type_complexity)]
fn trailers(buf: &[u8]) -> Result<Option<(usize, Option<HeaderMap>)>, Error> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf.starts_with(b"\r\n") {
        return Ok(Some((2, None)));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((len, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Error::bad("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| Error::bad("invalid trailer value"))?;
                map.append(name, value);
            }
            Ok(Some((len, Some(map))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(Error::bad(format!("invalid trailer section ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lines_are_read_strictly() {
        assert_eq!(chunk_line(b"5\r\nhello"), Ok(Some((3, 5))));
        assert_eq!(chunk_line(b"1A;name=\"v\"\r\n"), Ok(Some((13, 26))));
        assert_eq!(chunk_line(b"0 ;x\r\n"), Ok(Some((6, 0))));
        assert_eq!(chunk_line(b"ffffffffffffffff\r\n"), Ok(Some((18, u64::MAX))));
        for partial in [&b""[..], b"5", b"5\r", b"5;ext", b"5 "] {
            assert_eq!(chunk_line(partial), Ok(None), "{partial:?}");
        }
        for bad in [
            &b"\r\n"[..],
            b";x\r\n",
            b"5\n",
            b"5;a\nb\r\n",
            b"5 6\r\n",
            b"-5\r\n",
            b"10000000000000000\r\n",
            b"5\r5",
        ] {
            assert!(chunk_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trailer_sections_end_with_an_empty_line() {
        assert_eq!(trailers(b"\r\nnext").unwrap().map(|t| t.0), Some(2));
        let (len, fields) = trailers(b"X-Sum: 1\r\n\r\n").unwrap().unwrap();
        assert_eq!(len, 12);
        assert_eq!(fields.unwrap()["x-sum"], "1");
        assert!(trailers(b"X-Sum: 1\r\n").unwrap().is_none());
        assert!(trailers(b"X-Sum 1\r\n\r\n").is_err());
    }
}
