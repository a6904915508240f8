//! The upstream's response body on its way to the client: streamed frame by frame (trailers
//! included), holding its connection and its server's load until it ends, and teeing a small
//! GET response into the stale cache as it passes.

use super::guard::ServerGuard;
use super::metrics::{CauseLabels, PhaseLabels};
use super::pool::{InFlight, Lease, ServerPool, UpIncoming};
use super::resilience::stale::StaleCache;
use crate::http::body::BoxError;
use crate::http::AccessLogError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// What a response body holds until it ends: the lease (an HTTP/2 stream slot; an HTTP/1.1
/// connection travels in the body itself) and the server's in-flight count.
pub struct Exchange {
    pub pool: Arc<ServerPool>,
    pub lease: Lease,
    pub in_flight: InFlight,
    /// Told when the body breaks off (passive health).
    pub guard: Arc<ServerGuard>,
}

/// What a GET request and its 200 response need to be stored as a stale fallback.
#[derive(Debug)]
pub struct StaleRequest {
    pub host: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
}

/// A copy of a response body being gathered for the stale cache, up to its size cap; the client
/// gets every frame as it comes, whatever happens to the copy.
pub struct Tee {
    pub cache: Arc<StaleCache>,
    pub request: StaleRequest,
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    /// The cache's `max_body_bytes`: beyond it the copy is dropped, the response never stored.
    pub cap: usize,
    pub chunks: Vec<Bytes>,
    pub len: usize,
}

impl Tee {
    /// Adds a chunk; false once the body outgrew the cap (the caller drops the copy).
    fn push(&mut self, chunk: &Bytes) -> bool {
        self.len += chunk.len();
        if self.len > self.cap {
            return false;
        }
        self.chunks.push(chunk.clone());
        true
    }

    /// The whole body arrived: store it.
    fn finish(self) {
        let body = match self.chunks.len() {
            1 => self.chunks[0].clone(),
            _ => {
                let mut b = bytes::BytesMut::with_capacity(self.len);
                for c in &self.chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        let r = &self.request;
        self.cache.store(
            &http::Method::GET,
            &r.host,
            &r.path_and_query,
            &r.headers,
            self.status,
            &self.headers,
            &body,
            std::time::Instant::now(),
        );
    }
}

/// A proxied response body.
pub struct UpstreamBody {
    inner: UpIncoming,
    /// `Some` until the body ends, fails or is dropped.
    exchange: Option<Exchange>,
    /// Boxed: only a cacheable GET carries one, and every response body would otherwise be
    /// as large as its request and response heads.
    tee: Option<Box<Tee>>,
    /// The request's traffic-class slot, given back when the body is dropped (hyper drops it
    /// once the response has been sent, or the client went away).
    slot: Option<crate::proxy::resilience::classes::InFlight>,
}

impl UpstreamBody {
    pub fn new(inner: UpIncoming, exchange: Exchange, tee: Option<Tee>) -> Self {
        let mut body = UpstreamBody {
            inner,
            exchange: Some(exchange),
            tee: tee.map(Box::new),
            slot: None,
        };
        if body.inner.is_end_stream() {
            body.exchange = None; // nothing to stream (HEAD, 204, 304): done already
            if let Some(t) = body.tee.take() {
                t.finish();
            }
        }
        body
    }

    /// Drops a response that will not reach the client (its request is retried elsewhere):
    /// the connection is lost as after an error, and nothing counts as a client cancellation.
    pub fn abandon(mut self) {
        self.tee = None;
        if let UpIncoming::H1(b) = &mut self.inner {
            b.abandon();
        }
        if let Some(mut ex) = self.exchange.take() {
            ex.lease.fate = "error";
        }
    }

    fn ended(&mut self) {
        self.exchange = None;
        if let Some(t) = self.tee.take() {
            t.finish();
        }
    }
}

impl UpstreamBody {
    /// Holds `slot` for as long as the response is being sent.
    pub fn hold(&mut self, slot: crate::proxy::resilience::classes::InFlight) {
        self.slot = Some(slot);
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(tee), Some(data)) = (this.tee.as_mut(), frame.data_ref()) {
                    if !tee.push(data) {
                        this.tee = None;
                    }
                }
                if this.inner.is_end_stream() {
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.tee = None;
                let Some(mut ex) = this.exchange.take() else {
                    return Poll::Ready(Some(Err(e)));
                };
                ex.lease.fate = "error";
                let pool = &ex.pool;
                ex.guard.failed_mid_body(pool);
                pool.metrics()
                    .errors
                    .get_or_create(&CauseLabels {
                        upstream: pool.upstream.clone(),
                        server: pool.server.clone(),
                        cause: "reset_mid_response",
                    })
                    .inc();
                tracing::warn!(
                    upstream = %pool.upstream.0,
                    server = %pool.server.0,
                    cause = "reset_mid_response",
                    error = %e,
                    "upstream failed mid-response; aborting the client's response"
                );
                // The client must see a broken response, never a short one that looks whole:
                // hyper ends an HTTP/1.1 response without its last chunk (or short of its
                // Content-Length) and resets an HTTP/2 stream with INTERNAL_ERROR.
                Poll::Ready(Some(Err(Box::new(AccessLogError(format!(
                    "upstream:reset_mid_response upstream={} server={} ({e})",
                    pool.upstream.0, pool.server.0
                ))))))
            }
            None => {
                this.ended();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-body. Dropping `inner` cancels the
        // upstream side (HTTP/1.1: the connection closes; HTTP/2: RST_STREAM(CANCEL)).
        let Some(ex) = self.exchange.take() else { return };
        let pool = &ex.pool;
        pool.metrics()
            .cancelled
            .get_or_create(&PhaseLabels {
                upstream: pool.upstream.clone(),
                phase: "response_body",
            })
            .inc();
        tracing::debug!(
            upstream = %pool.upstream.0,
            server = %pool.server.0,
            "client went away mid-response; upstream response cancelled"
        );
    }
}
