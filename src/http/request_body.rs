//! The request body handlers read: hyper's body with the body-size limit enforced and counted.

use super::body::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

/// What the pipeline learns from a request body as the handler reads it.
#[derive(Debug, Default)]
pub struct BodyState {
    bytes: AtomicU64,
    limit_exceeded: AtomicBool,
    malformed: AtomicBool,
}

impl BodyState {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }
    pub fn limit_exceeded(&self) -> bool {
        self.limit_exceeded.load(Relaxed)
    }
    /// The client's body framing was broken (HTTP/1.1 chunked syntax); the pipeline answers 400.
    pub fn malformed(&self) -> bool {
        self.malformed.load(Relaxed)
    }
}

/// hyper reports a broken chunked body (bad size line, bad trailer, trailers over the header
/// limit) as a body error over an `io::Error` of kind `InvalidData`/`InvalidInput`; a peer that
/// went away is `UnexpectedEof` or a connection error instead.
fn is_malformed(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, InvalidInput};
    e.is_parse()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), InvalidData | InvalidInput))
}

/// The body was larger than `limits.max_body_bytes`; the pipeline answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds limits.max_body_bytes ({limit} bytes)")]
pub struct BodyLimitExceeded {
    pub limit: u64,
}

/// A request body as handlers see it. It enforces `limits.max_body_bytes` for every framing
/// (Content-Length, chunked, HTTP/2 DATA) and counts the bytes for the access log.
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    state: Arc<BodyState>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, state: Arc<BodyState>) -> Self {
        RequestBody {
            inner,
            limit,
            seen: 0,
            state,
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("seen", &self.seen)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.state.limit_exceeded() {
            return Poll::Ready(Some(Err(BodyLimitExceeded { limit: this.limit }.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.state.bytes.store(this.seen, Relaxed);
                    if this.seen > this.limit {
                        this.state.limit_exceeded.store(true, Relaxed);
                        return Poll::Ready(Some(Err(BodyLimitExceeded { limit: this.limit }.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if is_malformed(&e) {
                    this.state.malformed.store(true, Relaxed);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
