//! A request on its way to an HTTP/1.1 upstream: its head written once into one buffer, then its
//! body framed as the client's was (`Content-Length`) or `chunked`.

use super::UpIo;
use crate::http::body::BoxError;
use crate::proxy::connect::UpBody;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use http_body::Body;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// Slices handed to one `writev`.
const MAX_IOVECS: usize = 16;

/// How the body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` (the client's): exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, for a body whose length nobody announced.
    Chunked,
}

/// A request ready to be sent: its encoded head and its body.
pub struct Request {
    head: Bytes,
    body: Option<UpBody>,
    framing: Framing,
    /// Trailer fields the head declared in `Trailer` (RFC 9110 §6.6.2), the only ones sent.
    trailers: Vec<HeaderName>,
    /// `HEAD`: the response has no body, whatever its fields say.
    pub(super) head_only: bool,
    /// The method is idempotent (RFC 9110 §9.2.2): the request may be sent again after a
    /// connection ended before any answer.
    idempotent: bool,
}

impl Request {
    /// Encodes `parts` (already rewritten for the upstream, URI in origin form) and the fields
    /// `added` to them (see [`crate::proxy::headers::Added`]: `Host` first, the others last)
    /// with `body`.
    pub fn new(
        parts: &http::request::Parts,
        added: &[(HeaderName, HeaderValue)],
        body: UpBody,
    ) -> Result<Request, &'static str> {
        let headers = &parts.headers;
        let length = match headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(
                super::response::content_length(v.as_bytes()).ok_or("the request's Content-Length is not a number")?,
            ),
            None => None,
        };
        let framing = match length {
            _ if body.is_end_stream() => Framing::Empty,
            Some(n) => Framing::Length(n),
            // A body of unknown length on GET or HEAD (an HTTP/2 request whose HEADERS did not end
            // the stream) is taken to be none, as hyper's client does: such requests almost never
            // carry one, and a chunked GET is refused by many servers.
            None if matches!(parts.method, Method::GET | Method::HEAD) => Framing::Empty,
            None => Framing::Chunked,
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let method = parts.method.as_str();
        // The exact size first: one allocation, never grown.
        let mut len = method.len() + 1 + target.len() + " HTTP/1.1\r\n".len() + 2;
        for (name, value) in headers.iter().chain(added.iter().map(|(n, v)| (n, v))) {
            len += name.as_str().len() + 2 + value.len() + 2;
        }
        len += "content-length: \r\n".len() + 20;
        let mut head = BytesMut::with_capacity(len);
        head.put_slice(method.as_bytes());
        head.put_u8(b' ');
        head.put_slice(target.as_bytes());
        head.put_slice(b" HTTP/1.1\r\n");
        let host_first = added.iter().filter(|(n, _)| n == header::HOST);
        let rest = added.iter().filter(|(n, _)| n != header::HOST);
        let fields = host_first
            .map(|(n, v)| (n, v))
            .chain(headers)
            .chain(rest.map(|(n, v)| (n, v)));
        for (name, value) in fields {
            // This side frames the body. The client's `Transfer-Encoding` is hop-by-hop and gone
            // already, and must not come back through here; its `Content-Length` is written
            // below as one number (a list of one repeated value, which hyper accepts from a
            // client, is refused by some servers).
            if name == header::TRANSFER_ENCODING || name == header::CONTENT_LENGTH {
                continue;
            }
            head.put_slice(name.as_str().as_bytes());
            head.put_slice(b": ");
            head.put_slice(value.as_bytes());
            head.put_slice(b"\r\n");
        }
        match (framing, length) {
            (Framing::Chunked, _) => head.put_slice(b"transfer-encoding: chunked\r\n"),
            (_, Some(n)) => {
                head.put_slice(b"content-length: ");
                head.put_slice(itoa(n, &mut [0; 20]));
                head.put_slice(b"\r\n");
            }
            (_, None) => {}
        }
        head.put_slice(b"\r\n");
        let trailers = if framing == Framing::Chunked {
            declared_trailers(headers)
        } else {
            Vec::new()
        };
        Ok(Request {
            head: head.freeze(),
            body: (framing != Framing::Empty).then_some(body),
            framing,
            trailers,
            head_only: parts.method == Method::HEAD,
            idempotent: matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
            ),
        })
    }
}

/// The field names a `Trailer` field lists, less those that may never be trailers here: framing,
/// routing and the fields that name other fields (RFC 9110 §6.5.1).
fn declared_trailers(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| {
            ![
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::HOST,
                header::TRAILER,
                header::TE,
                header::CONNECTION,
            ]
            .contains(n)
        })
        .collect()
}

/// Why sending the request stopped.
pub(super) enum UploadError {
    /// The client's body failed.
    Body(BoxError),
    /// The connection refused the bytes.
    Io(io::Error),
}

/// A request being written: the head, then the body frame by frame, never more than one frame
/// ahead of the socket.
pub(super) struct Upload {
    request: Request,
    /// Bytes of the head not yet written (all of it, at first).
    head_left: Bytes,
    /// Body bytes taken from the client and not yet written.
    out: VecDeque<Bytes>,
    /// `Length`: body bytes still due.
    due: u64,
    /// The body has been polled: it cannot be sent again.
    touched: bool,
    /// The body ended and its end is queued.
    body_ended: bool,
    /// Everything is written and flushed.
    done: bool,
}

impl Upload {
    pub(super) fn new(request: Request) -> Self {
        let due = match request.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Upload {
            head_left: request.head.clone(),
            body_ended: request.body.is_none(),
            request,
            out: VecDeque::new(),
            due,
            touched: false,
            done: false,
        }
    }

    pub(super) fn done(&self) -> bool {
        self.done
    }

    /// The request again, for another connection, if it may be sent again: its method is
    /// idempotent and its body (if any) was not yet taken from the client.
    pub(super) fn replay(self) -> Option<Request> {
        if !self.request.idempotent || self.touched {
            return None;
        }
        Some(self.request)
    }

    /// Writes what can be written; `Ready(Ok)` once all of the request is.
    pub(super) fn poll(&mut self, io: &mut UpIo, cx: &mut Context<'_>) -> Poll<Result<(), UploadError>> {
        loop {
            ready!(self.poll_write_out(io, cx)).map_err(UploadError::Io)?;
            // Through TLS, written bytes can wait in rustls as records: they go out before this
            // waits on the client for more, or an interactive upload would stall.
            ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(UploadError::Io)?;
            if self.body_ended {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.request.body.as_mut() else {
                self.body_ended = true;
                continue;
            };
            self.touched = true;
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.queue_data(data)?,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.queue_end(Some(&trailers))?;
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(UploadError::Body(e))),
                None => self.queue_end(None)?,
            }
        }
    }

    fn queue_data(&mut self, data: Bytes) -> Result<(), UploadError> {
        if data.is_empty() {
            return Ok(());
        }
        match self.request.framing {
            Framing::Length(_) => {
                let n = data.len() as u64;
                if n > self.due {
                    return Err(body_error("the request body is longer than its Content-Length"));
                }
                self.due -= n;
                self.out.push_back(data);
            }
            Framing::Chunked => {
                let mut size = BytesMut::with_capacity(18);
                push_hex(&mut size, data.len());
                size.put_slice(b"\r\n");
                self.out.push_back(size.freeze());
                self.out.push_back(data);
                self.out.push_back(Bytes::from_static(b"\r\n"));
            }
            Framing::Empty => return Err(body_error("a body on a request framed without one")),
        }
        Ok(())
    }

    /// Queues the end of the body (and `trailers`, which only `chunked` can carry).
    fn queue_end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), UploadError> {
        if self.body_ended {
            return Ok(());
        }
        self.body_ended = true;
        self.request.body = None;
        match self.request.framing {
            Framing::Length(_) if self.due != 0 => Err(body_error("the request body ended before its Content-Length")),
            Framing::Chunked => {
                let mut end = BytesMut::with_capacity(64);
                end.put_slice(b"0\r\n");
                if let Some(trailers) = trailers {
                    for (name, value) in trailers {
                        if self.request.trailers.contains(name) {
                            end.put_slice(name.as_str().as_bytes());
                            end.put_slice(b": ");
                            end.put_slice(value.as_bytes());
                            end.put_slice(b"\r\n");
                        }
                    }
                }
                end.put_slice(b"\r\n");
                self.out.push_back(end.freeze());
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Writes the head and the queued body bytes, several slices per `writev`.
    fn poll_write_out(&mut self, io: &mut UpIo, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.head_left.is_empty() || !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            if !self.head_left.is_empty() {
                slices[0] = IoSlice::new(&self.head_left);
                count = 1;
            }
            for chunk in self.out.iter().take(MAX_IOVECS - count) {
                slices[count] = IoSlice::new(chunk);
                count += 1;
            }
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_head = n.min(self.head_left.len());
            self.head_left.advance(from_head);
            n -= from_head;
            while n > 0 {
                let Some(front) = self.out.front_mut() else { break };
                if n >= front.len() {
                    n -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn body_error(what: &'static str) -> UploadError {
    UploadError::Body(what.into())
}

/// `n` in decimal, written at the end of `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Writes `n` in lowercase hexadecimal, as a chunk size.
fn push_hex(out: &mut BytesMut, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let bits = usize::BITS - n.leading_zeros();
    let mut shift = bits.div_ceil(4).max(1) * 4;
    while shift > 0 {
        shift -= 4;
        out.put_u8(DIGITS[(n >> shift) & 0xf]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};

    fn empty() -> UpBody {
        Empty::new().map_err(|e| match e {}).boxed_unsync()
    }

    #[test]
    fn decimal_lengths() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, text) in [(0, "0"), (1, "1"), (15, "f"), (16, "10"), (255, "ff"), (4096, "1000")] {
            let mut b = BytesMut::new();
            push_hex(&mut b, n);
            assert_eq!(&b[..], text.as_bytes(), "{n}");
        }
    }

    #[test]
    fn a_bodyless_request_is_its_head_in_origin_form() {
        let (mut parts, ()) = http::Request::get("/a?b=1").body(()).unwrap().into_parts();
        parts.headers.insert(header::HOST, "up:80".parse().unwrap());
        parts.headers.append("x-two", "1".parse().unwrap());
        parts.headers.append("x-two", "2".parse().unwrap());
        parts
            .headers
            .insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        let r = Request::new(&parts, &[], empty()).unwrap();
        assert_eq!(
            &r.head[..],
            b"GET /a?b=1 HTTP/1.1\r\nhost: up:80\r\nx-two: 1\r\nx-two: 2\r\n\r\n".as_slice()
        );
        assert!(r.body.is_none());
        assert!(r.idempotent && !r.head_only);
    }

    #[test]
    fn added_fields_go_after_the_clients_with_host_first() {
        let (mut parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        parts.headers.insert("x-client", "1".parse().unwrap());
        let added = [
            (
                HeaderName::from_static("x-forwarded-for"),
                HeaderValue::from_static("10.0.0.1"),
            ),
            (header::HOST, HeaderValue::from_static("up:80")),
            (header::VIA, HeaderValue::from_static("1.1 gatehouse")),
        ];
        let r = Request::new(&parts, &added, empty()).unwrap();
        assert_eq!(
            &r.head[..],
            b"GET / HTTP/1.1\r\nhost: up:80\r\nx-client: 1\r\nx-forwarded-for: 10.0.0.1\r\nvia: 1.1 gatehouse\r\n\r\n"
                .as_slice()
        );
    }

    #[test]
    fn a_body_of_unknown_length_goes_chunked_with_its_declared_trailers() {
        let (mut parts, ()) = http::Request::post("/").body(()).unwrap().into_parts();
        parts
            .headers
            .insert(header::TRAILER, "x-sum, content-length".parse().unwrap());
        let body = Full::new(Bytes::from_static(b"hello"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let r = Request::new(&parts, &[], body).unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.head.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        assert_eq!(r.trailers, vec![HeaderName::from_static("x-sum")]);
        assert!(!r.idempotent);
    }

    #[test]
    fn a_content_length_list_is_sent_as_one_number_and_a_conflicting_one_refused() {
        let body = || {
            Full::new(Bytes::from_static(b"hello"))
                .map_err(|e| match e {})
                .boxed_unsync()
        };
        let (mut parts, ()) = http::Request::post("/").body(()).unwrap().into_parts();
        parts.headers.insert(header::CONTENT_LENGTH, "5, 5".parse().unwrap());
        let r = Request::new(&parts, &[], body()).unwrap();
        assert_eq!(r.framing, Framing::Length(5));
        assert_eq!(&r.head[..], b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n".as_slice());
        parts.headers.insert(header::CONTENT_LENGTH, "5, 6".parse().unwrap());
        assert!(Request::new(&parts, &[], body()).is_err());
    }

    #[test]
    fn a_get_body_of_unknown_length_is_not_sent() {
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let body = Full::new(Bytes::from_static(b"x"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let r = Request::new(&parts, &[], body).unwrap();
        assert_eq!(r.framing, Framing::Empty);
        assert!(r.body.is_none());
        assert_eq!(&r.head[..], b"GET / HTTP/1.1\r\n\r\n".as_slice());
    }
}
