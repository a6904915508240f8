//! The request body handlers read: hyper's body with the body-size limit and the `body_read`
//! timeout enforced, its bytes counted, and what went wrong with it recorded for the pipeline.

use super::body::BoxError;
use super::RequestContext;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why a request body could not be read to its end. The pipeline answers for it once the handler
/// returns, whatever the handler answered: the handler only saw an error from its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BodyFault {
    /// Over `limits.max_body_bytes`: `413`.
    TooLarge = 1,
    /// The client sent nothing for `timeouts.body_read` while the handler waited: `408`.
    Timeout = 2,
    /// The framing was broken (a bad chunk, an HTTP/2 stream error): `400`.
    Malformed = 3,
    /// The client went away mid-body (reset, EOF, a TLS error): nobody is left to answer.
    Aborted = 4,
}

impl BodyFault {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => BodyFault::TooLarge,
            2 => BodyFault::Timeout,
            3 => BodyFault::Malformed,
            4 => BodyFault::Aborted,
            _ => return None,
        })
    }
}

/// What the pipeline learns from a request body as the handler reads it.
#[derive(Debug, Default)]
pub struct BodyState {
    bytes: AtomicU64,
    /// A `BodyFault`, 0 while none; the first fault wins.
    fault: AtomicU8,
}

impl BodyState {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }
    pub fn fault(&self) -> Option<BodyFault> {
        BodyFault::from_u8(self.fault.load(Relaxed))
    }
    fn set_fault(&self, f: BodyFault) {
        let _ = self.fault.compare_exchange(0, f as u8, Relaxed, Relaxed);
    }
}

/// The body was larger than `limits.max_body_bytes`; the pipeline answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds limits.max_body_bytes ({limit} bytes)")]
pub struct BodyLimitExceeded {
    pub limit: u64,
}

/// The client sent no body bytes for `timeouts.body_read`; the pipeline answers 408.
#[derive(Debug, thiserror::Error)]
#[error("request body: no bytes for {after:?} (timeouts.body_read)")]
pub struct BodyReadTimeout {
    pub after: Duration,
}

/// A request body as handlers see it. It enforces `limits.max_body_bytes` for every framing
/// (Content-Length, chunked, HTTP/2 DATA) and `timeouts.body_read` between reads, and counts the
/// bytes for the access log.
///
/// The timer is allocated the first time a read has to wait and re-armed only when a wait starts
/// after progress, so a body that arrives with its head costs no timer at all.
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    state: Arc<BodyState>,
    read_timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last poll of `inner` returned `Pending`: the timer runs for the current gap.
    waiting: bool,
    context: Option<RequestContext>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, read_timeout: Duration, state: Arc<BodyState>) -> Self {
        RequestBody {
            inner,
            limit,
            seen: 0,
            state,
            read_timeout,
            timer: None,
            waiting: false,
            context: None,
        }
    }

    /// Attaches the request's context (the pipeline does, for every request it hands on).
    pub(crate) fn with_context(mut self, context: RequestContext) -> Self {
        self.context = Some(context);
        self
    }

    /// The request's [`RequestContext`], for a handler that holds the body: the same facts as
    /// in the request's extensions, read without a lookup. gatehouse's own
    /// [`Router`](crate::route::Router) reads it here, which lets the pipeline leave the
    /// extension out when it serves that router bare (see `Pipeline::respond`).
    pub fn context(&self) -> Option<&RequestContext> {
        self.context.as_ref()
    }

    /// What the pipeline learns from this body (its faults), for a handler that hands the body
    /// on (the proxy) and must tell a client's failure from its upstream's.
    pub fn state(&self) -> Arc<BodyState> {
        self.state.clone()
    }

    /// The gap since the last frame started with this wait: starts (or restarts) the timer, then
    /// reports whether it has run out.
    fn gap_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.read_timeout;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready())
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("seen", &self.seen)
            .field("limit", &self.limit)
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

/// Sorts hyper's body error into a client that went away or a client that broke the framing.
fn classify(e: &hyper::Error) -> BodyFault {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            // hyper's HTTP/1.1 decoder reports bad framing as InvalidData/InvalidInput; so does a
            // TLS stream for a bad record, which carries the rustls error and is a transport fault.
            let framing = matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
            let tls = io.get_ref().is_some_and(|i| i.is::<rustls::Error>());
            return if framing && !tls {
                BodyFault::Malformed
            } else {
                BodyFault::Aborted
            };
        }
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            // The peer reset the stream or the connection, or the transport failed: it went away.
            // An error h2 raised itself (DATA beyond content-length, ...) is the peer's framing.
            return if h2e.is_remote() || h2e.is_io() || h2e.is_go_away() {
                BodyFault::Aborted
            } else {
                BodyFault::Malformed
            };
        }
        source = s.source();
    }
    BodyFault::Aborted
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match this.state.fault() {
            Some(BodyFault::TooLarge) => return Poll::Ready(Some(Err(BodyLimitExceeded { limit: this.limit }.into()))),
            Some(BodyFault::Timeout) => {
                return Poll::Ready(Some(Err(BodyReadTimeout {
                    after: this.read_timeout,
                }
                .into())))
            }
            _ => {}
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            if this.gap_expired(cx) {
                this.state.set_fault(BodyFault::Timeout);
                return Poll::Ready(Some(Err(BodyReadTimeout {
                    after: this.read_timeout,
                }
                .into())));
            }
            return Poll::Pending;
        }
        this.waiting = false;
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.state.bytes.store(this.seen, Relaxed);
                    if this.seen > this.limit {
                        this.state.set_fault(BodyFault::TooLarge);
                        return Poll::Ready(Some(Err(BodyLimitExceeded { limit: this.limit }.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.set_fault(classify(&e));
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
