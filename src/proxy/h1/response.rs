//! Reading an upstream's response head (RFC 9112 §4–6): the status line and fields, and from
//! them how long the body is and whether the connection can carry another request.

use super::{Error, MAX_FIELDS, MAX_HEAD_BYTES};
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use std::mem::MaybeUninit;

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    /// None: `HEAD`, `204`, `304`.
    Empty,
    Length(u64),
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
    /// `101`: the connection stops speaking HTTP.
    Switched,
}

/// One head read from the front of the buffer.
pub(super) enum Parsed {
    /// An interim `1xx` response, read and dropped.
    Interim,
    Final {
        parts: http::response::Parts,
        shape: Shape,
        /// Why the connection cannot carry another request after this response (RFC 9112 §9.3),
        /// as a `reason` of `gatehouse_upstream_new_connection_reasons_total`; `None`: it can.
        closes: Option<&'static str>,
    },
}

/// What the framing and connection fields of one head say.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    /// `Transfer-Encoding` present, and how its codings end.
    transfer_encoding: bool,
    chunked_last: bool,
    chunked_count: usize,
    close: bool,
    keep_alive: bool,
}

impl Fields {
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), Error> {
        if name == header::CONTENT_LENGTH {
            let n = content_length(value).ok_or_else(|| Error::bad("invalid Content-Length"))?;
            if self.content_length.is_some_and(|m| m != n) {
                return Err(Error::bad("conflicting Content-Length values"));
            }
            self.content_length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in value.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                let chunked = coding.eq_ignore_ascii_case(b"chunked");
                self.chunked_count += usize::from(chunked);
                self.chunked_last = chunked;
            }
        } else if name == header::CONNECTION {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }
}

/// A `Content-Length` value: digits, or a list of one repeated value, which is that value
/// (RFC 9110 §8.6). `None` for anything else, an empty value or more than 19 digits.
pub(super) fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for item in value.split(|&b| b == b',') {
        let digits = item.trim_ascii();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|m| m != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Parses one response head at the front of `buf` and removes it. `Ok(None)`: the head is not
/// complete yet. `head_only`: the request was `HEAD`, so no body follows whatever the fields say.
pub(super) fn parse(buf: &mut BytesMut, head_only: bool) -> Result<Option<Parsed>, Error> {
    // Where each field's name and value lie in the head, so that the values can be slices of
    // the head's own bytes once it is split off (no copy per value). `u16`: a head is at most
    // `MAX_HEAD_BYTES`, and this array is zeroed for every response.
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_FIELDS];
    let (len, code, version, count, reason) = {
        // Not zeroed: httparse writes each field before it reads it.
        let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_FIELDS];
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut fields);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
                return Err(Error::bad(format!(
                    "response head larger than {} KiB",
                    (MAX_HEAD_BYTES + 1) / 1024
                )))
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::bad(format!("invalid response head ({e})"))),
        };
        let base = buf.as_ptr() as usize;
        let offset = |p: *const u8| (p as usize - base) as u16;
        let count = r.headers.len();
        for (span, f) in spans.iter_mut().zip(r.headers.iter()) {
            let name = offset(f.name.as_ptr());
            let value = offset(f.value.as_ptr());
            *span = (name, name + f.name.len() as u16, value, value + f.value.len() as u16);
        }
        // A reason phrase of the server's own (not the status's usual one) is kept for the
        // client, as hyper keeps it: `200 Everything Fine` stays that.
        let status = r.code.and_then(|c| StatusCode::from_u16(c).ok());
        let reason = match (r.reason, status) {
            (Some(text), Some(status)) if !text.is_empty() && status.canonical_reason() != Some(text) => {
                hyper::ext::ReasonPhrase::try_from(text.as_bytes().to_vec()).ok()
            }
            _ => None,
        };
        (len, r.code.unwrap_or(0), r.version.unwrap_or(1), count, reason)
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| Error::bad(format!("invalid status code {code}")))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(Parsed::Interim));
    }
    // Room for the fields a proxy adds on the way to the client (`Via`), so that adding them
    // does not rebuild the map (a reallocation and every field hashed again).
    let mut headers = HeaderMap::with_capacity(count + 2);
    let mut f = Fields::default();
    for &(ns, ne, vs, ve) in &spans[..count] {
        let (ns, ne, vs, ve) = (usize::from(ns), usize::from(ne), usize::from(vs), usize::from(ve));
        let name = HeaderName::from_bytes(&head[ns..ne]).map_err(|_| Error::bad("invalid field name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| Error::bad("invalid field value"))?;
        f.note(&name, value.as_bytes())?;
        headers.append(name, value);
    }
    let http10 = version == 0;
    let shape = if status == StatusCode::SWITCHING_PROTOCOLS {
        Shape::Switched
    } else if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Shape::Empty
    } else if f.transfer_encoding {
        // Both framings at once is the shape of a smuggling attempt (RFC 9112 §6.3 item 3).
        if f.content_length.is_some() {
            return Err(Error::bad("both Content-Length and Transfer-Encoding"));
        }
        if http10 {
            return Err(Error::bad("Transfer-Encoding in an HTTP/1.0 response"));
        }
        match (f.chunked_last, f.chunked_count) {
            (true, 1) => Shape::Chunked,
            (_, 0) => Shape::UntilClose,
            _ => return Err(Error::bad("chunked is not the last transfer coding, or appears twice")),
        }
    } else if let Some(n) = f.content_length {
        Shape::Length(n)
    } else {
        Shape::UntilClose
    };
    let closes = match shape {
        _ if f.close || (http10 && !f.keep_alive) => Some("connection_close_header"),
        // The server ends this body by closing the connection.
        Shape::UntilClose => Some("upstream_closed"),
        Shape::Switched => Some("upgraded"),
        _ => None,
    };
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
    parts.headers = headers;
    if let Some(reason) = reason {
        parts.extensions.insert(reason);
    }
    Ok(Some(Parsed::Final { parts, shape, closes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_of(text: &str, head_only: bool) -> Result<(http::response::Parts, Shape, bool, usize), Error> {
        let mut buf = BytesMut::from(text.as_bytes());
        match parse(&mut buf, head_only)? {
            Some(Parsed::Final { parts, shape, closes }) => Ok((parts, shape, closes.is_none(), buf.len())),
            Some(Parsed::Interim) => panic!("interim"),
            None => panic!("partial"),
        }
    }

    #[test]
    fn a_length_delimited_response_keeps_its_connection() {
        let (parts, shape, keep, rest) =
            final_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", false).unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-a"], "b");
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_none());
        let (parts, ..) = final_of("HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n", false).unwrap();
        assert_eq!(
            parts.extensions.get::<hyper::ext::ReasonPhrase>().unwrap().as_bytes(),
            b"Fine"
        );
        assert_eq!((shape, keep, rest), (Shape::Length(5), true, 5));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let shape = |t: &str, head_only| final_of(t, head_only).map(|r| (r.1, r.2));
        assert_eq!(
            shape("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false).unwrap(),
            (Shape::Chunked, true)
        );
        assert_eq!(
            shape("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false).unwrap(),
            (Shape::UntilClose, false)
        );
        assert_eq!(
            shape("HTTP/1.1 200 OK\r\n\r\n", false).unwrap(),
            (Shape::UntilClose, false)
        );
        assert_eq!(
            shape("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap(),
            (Shape::Empty, true)
        );
        assert_eq!(
            shape("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false).unwrap(),
            (Shape::Empty, true)
        );
        assert_eq!(
            shape(
                "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nConnection: close\r\n\r\n",
                false
            )
            .unwrap(),
            (Shape::Length(3), false)
        );
        assert_eq!(
            shape("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", false).unwrap(),
            (Shape::Length(3), false)
        );
        assert_eq!(
            shape(
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",
                false
            )
            .unwrap(),
            (Shape::Length(3), true)
        );
        assert_eq!(
            shape("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", false).unwrap(),
            (Shape::Switched, false)
        );
    }

    #[test]
    fn ambiguous_or_malformed_heads_are_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A : b\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
        ] {
            assert!(final_of(text, false).is_err(), "{text:?}");
        }
    }

    #[test]
    fn interim_responses_are_dropped_and_a_partial_head_waits() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n"[..]);
        assert!(matches!(parse(&mut buf, false), Ok(Some(Parsed::Interim))));
        assert!(matches!(parse(&mut buf, false), Ok(None)));
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n");
    }
}
