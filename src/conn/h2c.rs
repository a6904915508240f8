//! `Upgrade: h2c` (RFC 7540 §3.2): switching a cleartext HTTP/1.1 connection to HTTP/2.
//!
//! The h2 crate has no API for the upgrade's implicit stream 1, so after the 101 we re-create it:
//! the upgraded request is encoded as a HEADERS frame on stream 1 and spliced into the byte stream
//! right after the client's connection preface and first SETTINGS frame. Header fields are HPACK
//! literals *without indexing*, which leave the client's and our dynamic tables untouched, so the
//! rest of the connection decodes exactly as the client encoded it.

use crate::proxy::headers::connection_has;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
/// The smallest SETTINGS_MAX_FRAME_SIZE a server may advertise; safe whatever we configured.
const MAX_FRAME: usize = 16_384;

/// Why an `Upgrade: h2c` request is not upgraded even though the listener allows it.
#[derive(Debug, PartialEq, Eq)]
pub enum NotUpgraded {
    /// No `h2c` token in `Upgrade`: not an h2c upgrade request at all.
    NotRequested,
    /// RFC 7540 §3.2: the request must carry exactly one valid `HTTP2-Settings` and name it in `Connection`.
    MalformedSettings,
    /// A request body would have to be read before switching; we do not buffer bodies for this.
    HasBody,
}

/// Whether the request asks for h2c (an `h2c` token in `Upgrade`).
pub fn requested(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("h2c"))
}

/// Checks an h2c upgrade request (RFC 7540 §3.2, §3.2.1).
pub fn check(h: &HeaderMap) -> Result<(), NotUpgraded> {
    if !requested(h) {
        return Err(NotUpgraded::NotRequested);
    }
    let settings: Vec<_> = h.get_all("http2-settings").iter().collect();
    let valid_b64url = |v: &http::HeaderValue| {
        v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' || *b == b'=')
    };
    if settings.len() != 1
        || !valid_b64url(settings[0])
        || !connection_has(h, "upgrade")
        || !connection_has(h, "http2-settings")
    {
        return Err(NotUpgraded::MalformedSettings);
    }
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .map(|v| v.as_bytes() != b"0")
            .unwrap_or(false);
    if has_body {
        return Err(NotUpgraded::HasBody);
    }
    Ok(())
}

/// HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1); `first` holds the pattern bits.
/// Shared with `gatehouse doctor`'s raw HTTP/2 probe.
pub(crate) fn hpack_int(out: &mut impl BufMut, prefix_bits: u8, first: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.put_u8(first | v as u8);
        return;
    }
    out.put_u8(first | max as u8);
    v -= max;
    while v >= 128 {
        out.put_u8((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.put_u8(v as u8);
}

fn hpack_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0x00); // literal header field without indexing, new name
    hpack_int(out, 7, 0x00, name.len());
    out.put_slice(name);
    hpack_int(out, 7, 0x00, value.len());
    out.put_slice(value);
}

/// Fields that are connection-specific in HTTP/1.1 and forbidden in HTTP/2 (RFC 9113 §8.2.2).
fn is_connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::UPGRADE
        || name == header::HOST
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name.as_str() == "http2-settings"
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The upgraded request as HEADERS (+ CONTINUATION) frames on stream 1, END_STREAM set.
pub fn stream_one_frames(method: &http::Method, uri: &http::Uri, headers: &HeaderMap) -> Bytes {
    let mut block = BytesMut::with_capacity(512);
    let authority = headers
        .get(header::HOST)
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| uri.authority().map(|a| a.as_str().as_bytes().to_vec()))
        .unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    hpack_literal(&mut block, b":method", method.as_str().as_bytes());
    hpack_literal(&mut block, b":scheme", b"http");
    hpack_literal(&mut block, b":authority", &authority);
    hpack_literal(&mut block, b":path", path.as_bytes());
    for (name, value) in headers {
        if !is_connection_specific(name) {
            hpack_literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let mut out = BytesMut::with_capacity(block.len() + 9 * (1 + block.len() / MAX_FRAME));
    let chunks: Vec<&[u8]> = if block.is_empty() {
        vec![&[][..]]
    } else {
        block.chunks(MAX_FRAME).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let (ty, mut flags) = if i == 0 {
            (FRAME_HEADERS, FLAG_END_STREAM)
        } else {
            (FRAME_CONTINUATION, 0)
        };
        if i == last {
            flags |= FLAG_END_HEADERS;
        }
        let len = chunk.len();
        out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
        out.put_u32(1); // stream 1
        out.put_slice(chunk);
    }
    out.freeze()
}

/// Splices `inject` into the bytes read from `inner`, after the preface and the first frame.
pub struct Spliced<T> {
    inner: T,
    /// Bytes read so far while looking for the end of the first frame.
    head: BytesMut,
    inject: Option<Bytes>,
    /// Bytes ready to hand to the reader before reading `inner` again.
    out: Bytes,
}

impl<T> Spliced<T> {
    pub fn new(inner: T, inject: Bytes) -> Self {
        Spliced {
            inner,
            head: BytesMut::new(),
            inject: Some(inject),
            out: Bytes::new(),
        }
    }

    /// Once enough of the client's bytes are in `head`, builds `out` with the frames spliced in.
    fn try_splice(&mut self) {
        let Some(inject) = &self.inject else { return };
        let h = &self.head;
        let n = PREFACE.len();
        if h.len() >= n && &h[..n] != PREFACE || h.len() < n && h[..] != PREFACE[..h.len()] {
            // Not HTTP/2: hand the bytes over untouched and let the h2 server reject them.
            self.out = self.head.split().freeze();
            self.inject = None;
            return;
        }
        if h.len() < n + 9 {
            return;
        }
        let len = ((h[n] as usize) << 16) | ((h[n + 1] as usize) << 8) | h[n + 2] as usize;
        let end = n + 9 + len;
        if h.len() < end {
            return;
        }
        let mut out = BytesMut::with_capacity(h.len() + inject.len());
        out.put_slice(&h[..end]);
        out.put_slice(inject);
        out.put_slice(&h[end..]);
        self.out = out.freeze();
        self.head.clear();
        self.inject = None;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Spliced<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.inject.is_none() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // EOF before the first frame completed: pass on what we have, then EOF.
                    this.inject = None;
                    this.out = this.head.split().freeze();
                    if this.out.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    this.head.extend_from_slice(rb.filled());
                    this.try_splice();
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Spliced<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc7541_examples() {
        let mut b = BytesMut::new();
        hpack_int(&mut b, 5, 0, 10);
        assert_eq!(&b[..], &[10]);
        let mut b = BytesMut::new();
        hpack_int(&mut b, 5, 0, 1337);
        assert_eq!(&b[..], &[31, 154, 10]);
    }

    #[test]
    fn large_header_blocks_use_continuation() {
        let req = http::Request::builder()
            .uri("/x")
            .header("host", "a")
            .header("x-big", "v".repeat(40_000))
            .body(())
            .unwrap();
        let frames = stream_one_frames(req.method(), req.uri(), req.headers());
        assert_eq!(frames[3], FRAME_HEADERS);
        assert_eq!(frames[4], FLAG_END_STREAM);
        let second = 9 + MAX_FRAME;
        assert_eq!(frames[second + 3], FRAME_CONTINUATION);
    }
}
