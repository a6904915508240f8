//! The request pipeline: what wraps every request on every connection, before any handler.
//!
//! It refuses unsound request heads (see `head`), numbers the request, applies the
//! per-connection request limit and the body limit, turns
//! handler panics and errors into a 500 for that request alone, bounds the whole handling with the
//! `request` timeout (504), answers for a request body that failed (413, 408, 400), intercepts
//! `Upgrade: h2c`, and records the request when its response body ends: metrics, access log,
//! connection state, trace span. On HTTP/2 the response body also tells the watchdog when it waits on the
//! peer's flow-control window, which is how the `write` timeout sees a zero-window stall.

use super::body::BoxError;
use super::head::{check_head_present, Present};
use super::request_body::{BodyFault, BodyState, RequestBody};
use super::{HttpService, ServiceBody};
use crate::conn::{h2c, CloseReason, ConnInfo, ConnShared, PendingH2c, Protocol};
use crate::observe::metrics::{method_label, ListenerLabels};
use crate::observe::otel::{RequestSpan, SpanEnd};
use crate::observe::Switch;
use crate::proxy::headers::connection_has;
use crate::route::Router;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::any::TypeId;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Per-request facts a handler can read from the request's extensions.
///
/// While `[tracing]` is on, the extensions also hold the request's
/// [`TraceContext`](crate::observe::TraceContext), to forward on calls made for it.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub conn: Arc<ConnInfo>,
    /// 1-based number of this request on its connection.
    pub seq: u64,
}

/// What went wrong with a request, in words, for the access log's `error` field: a handler puts
/// it in its response's extensions (an answer it made for a failure), or returns it as its
/// response body's error (a failure after the response started, such as an upstream that died
/// mid-body). The access log then names the cause instead of a generic label.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct AccessLogError(pub String);

impl RequestContext {
    /// `<connection id>-<sequence>`: unique per process, and names the connection.
    pub fn request_id(&self) -> String {
        format!("{}-{}", self.conn.id, self.seq)
    }
}

/// Wraps a tower service for one connection.
pub struct Pipeline<S> {
    svc: S,
    conn: Arc<ConnShared>,
}

impl<S> Pipeline<S> {
    pub fn new(svc: S, conn: Arc<ConnShared>) -> Self {
        Pipeline { svc, conn }
    }
}

// The service is never pinned in place: each request calls a clone of it from its own future. So
// the pipeline can move while a hyper connection runs, which is what lets an idle HTTP/1.1
// connection be taken apart (`into_parts`) and its buffers released.
impl<S> Unpin for Pipeline<S> {}

impl<S: Clone> Clone for Pipeline<S> {
    fn clone(&self) -> Self {
        Pipeline {
            svc: self.svc.clone(),
            conn: self.conn.clone(),
        }
    }
}

type PipelineFuture<B> = Pin<Box<dyn Future<Output = Result<Response<Instrumented<B>>, Infallible>> + Send>>;

const BODY_TOO_LARGE: &str = "request body exceeds limits.max_body_bytes\n";

impl<S, B> hyper::service::Service<Request<Incoming>> for Pipeline<S>
where
    // The explicit `Response` names `B` so the impl can be generic over it.
    S: HttpService<B> + tower_service::Service<Request<RequestBody>, Response = Response<B>>,
    B: ServiceBody,
{
    type Response = Response<Instrumented<B>>;
    type Error = Infallible;
    type Future = PipelineFuture<B>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // hyper puts an `OnUpgrade` in every HTTP/1.1 request that could switch protocols (an
        // `Upgrade` header, CONNECT). On a connection that does not support upgrades yet, the
        // answer waits until the connection task has switched (see `UpgradeGate`).
        let gated = !self.conn.upgrades.is_open()
            && req.extensions().get::<hyper::upgrade::OnUpgrade>().is_some()
            && self.conn.info.protocol() == Protocol::Http11;
        let answer = self.respond(req);
        if !gated {
            return answer;
        }
        let conn = self.conn.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| conn.upgrades.poll_open(cx)).await;
            answer.await
        })
    }
}

impl<S, B> Pipeline<S>
where
    S: HttpService<B> + tower_service::Service<Request<RequestBody>, Response = Response<B>>,
    B: ServiceBody,
{
    fn respond(&self, mut req: Request<Incoming>) -> PipelineFuture<B> {
        let conn = &self.conn;
        let protocol = conn.info.protocol();
        let settings = conn.listener.settings.load();
        let present = Present::scan(req.headers());
        if protocol == Protocol::Http11 {
            log_request_head(conn, &req);
            // hyper closes after answering a request that asked for it (or HTTP/1.0 without
            // keep-alive); the connection must not be released as idle meanwhile.
            let has_connection = present.has(Present::CONNECTION);
            let asks_close = if req.version() == http::Version::HTTP_10 {
                !(has_connection && connection_has(req.headers(), "keep-alive"))
            } else {
                has_connection && connection_has(req.headers(), "close")
            };
            if asks_close {
                conn.upgrades.no_release();
            }
        }
        // First, so that nothing (not even an h2c upgrade) acts on a head that is not sound.
        let refusal = check_head_present(&req, protocol, &settings.limits, present).err();
        // Read now: `present` borrows the head, which the h2c upgrade below may change.
        let has_content_length = present.has(Present::CONTENT_LENGTH);
        if refusal.is_none()
            && protocol == Protocol::Http11
            && present.has(Present::UPGRADE)
            && h2c::requested(req.headers())
        {
            if let Some(switching) = self.h2c_upgrade(&mut req) {
                return Box::pin(std::future::ready(Ok(switching)));
            }
        }

        let started = Instant::now();
        let seq = conn.info.request_started();
        let max_body = settings.limits.max_body_bytes.get();
        let request_timeout = settings.timeouts.request.get();
        let body_read_timeout = settings.timeouts.body_read.get();
        let last = seq >= u64::from(settings.limits.max_requests_per_connection);
        if last && protocol.is_h2() {
            conn.close_requested.notify_one();
        }
        let close_after = last && protocol == Protocol::Http11;

        let (mut parts, incoming) = req.into_parts();
        let body_state = Arc::new(BodyState::default());
        let record = Record::new(conn.clone(), &parts, seq, started, body_state.clone());
        if let Some(refusal) = refusal {
            tracing::debug!(
                conn_id = conn.info.id,
                req_id = %record.req_id(),
                listener = %conn.listener.name.0,
                remote = %conn.info.peer,
                error = refusal.label(),
                "request refused before any handler"
            );
            // An unread body would be drained by hyper only as far as it is already buffered, and
            // then the connection closed anyway; say so up front rather than leave it to chance.
            let close = close_after || refusal.close() || !incoming.is_end_stream();
            let resp = gatehouse_response(refusal.status(), refusal.message());
            return Box::pin(std::future::ready(Ok(record.attach(
                resp,
                close,
                Some(refusal.label()),
            ))));
        }
        let declared_too_large = has_content_length
            && parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > max_body);
        if declared_too_large {
            // Refused before the handler runs; the unread body makes HTTP/1.1 framing unusable.
            let resp = gatehouse_response(StatusCode::PAYLOAD_TOO_LARGE, BODY_TOO_LARGE);
            return Box::pin(std::future::ready(Ok(record.attach(
                resp,
                true,
                Some("limit:max_body_bytes"),
            ))));
        }
        let context = RequestContext {
            conn: conn.info.clone(),
            seq,
        };
        // Every service that can look at the request finds its context in the extensions. The
        // first extension costs a request a map, its table and a boxed value (about 700
        // instructions with their drops, callgrind); gatehouse's own router, served bare as the
        // binary does, reads the context from the body instead, so it is spared them. A service
        // wrapping that router is another type and gets the extension.
        if TypeId::of::<S>() != TypeId::of::<Router>() {
            parts.extensions.insert(context.clone());
        }
        let body = RequestBody::new(incoming, max_body, body_read_timeout, body_state.clone()).with_context(context);
        if let Some(span) = &record.span {
            parts.extensions.insert(span.ctx.clone());
        }
        let req = Request::from_parts(parts, body);

        let pending = Pending {
            record,
            body_state,
            body_read_timeout,
            close_after,
        };
        match start_handler(self.svc.clone(), req) {
            Ok(handled) => Box::pin(Answer {
                // From `started`: one clock read fewer than `timeout`, which reads it again.
                handled: tokio::time::timeout_at(
                    tokio::time::Instant::from_std(started) + request_timeout,
                    AssertUnwindSafe(handled).catch_unwind(),
                ),
                pending: Some(pending),
            }),
            Err(panic) => Box::pin(std::future::ready(Ok(pending.conclude(Ok(Err(panic)))))),
        }
    }
}

/// A handler's result as the pipeline sees it: in time or not, panicked or not, and its own.
type Outcome<B> =
    Result<Result<Result<Response<B>, BoxError>, Box<dyn std::any::Any + Send>>, tokio::time::error::Elapsed>;

/// What turns the handler's result into the answer: the request's record and its bounds.
struct Pending {
    record: Box<Record>,
    body_state: Arc<BodyState>,
    body_read_timeout: std::time::Duration,
    close_after: bool,
}

impl Pending {
    fn conclude<B>(self, outcome: Outcome<B>) -> Response<Instrumented<B>>
    where
        Instrumented<B>: Body,
    {
        let Pending {
            record,
            body_state,
            body_read_timeout,
            close_after,
        } = self;
        match outcome {
            Ok(Ok(_)) if body_state.fault().is_some() => {
                let fault = body_state.fault().unwrap_or(BodyFault::Aborted);
                answer_body_fault(record, fault, body_read_timeout)
            }
            Ok(Ok(Ok(mut resp))) => {
                let error = resp
                    .extensions_mut()
                    .remove::<AccessLogError>()
                    .map(|e| Cow::Owned(e.0));
                let (parts, body) = resp.into_parts();
                record.attach_note(
                    Response::from_parts(parts, Instrumented::inner(body)),
                    close_after,
                    error,
                )
            }
            Ok(Ok(Err(e))) => {
                tracing::error!(req_id = %record.req_id(), method = %record.method, path = %record.path, error = %e, "handler failed; answered 500");
                let resp = gatehouse_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
                record.attach(resp, close_after, Some("handler_error"))
            }
            Ok(Err(panic)) => {
                let listener = &record.conn.listener;
                listener
                    .metrics
                    .panics
                    .get_or_create(&ListenerLabels {
                        listener: listener.name.clone(),
                    })
                    .inc();
                tracing::error!(
                    req_id = %record.req_id(),
                    method = %record.method,
                    path = %record.path,
                    panic = %panic_message(&*panic),
                    "handler panicked; answered 500"
                );
                let resp = gatehouse_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
                record.attach(resp, close_after, Some("panic"))
            }
            Err(_) => {
                let listener = &record.conn.listener;
                listener.metrics.timeout(&listener.name, "request");
                let resp = gatehouse_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request took longer than timeouts.request\n",
                );
                record.attach(resp, close_after, Some("timeout:request"))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer to a request its handler took: the handler under `timeouts.request` and panic
    /// capture, then the record attached. Written out rather than as an `async` block, which would
    /// keep room for its captures next to the future it awaits and come out above 1 KiB: past the
    /// allocator's small size classes, and copied whole on every move.
    struct Answer<F> {
        #[pin]
        handled: tokio::time::Timeout<futures_util::future::CatchUnwind<AssertUnwindSafe<F>>>,
        pending: Option<Pending>,
    }
}

impl<F, B> Future for Answer<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
    Instrumented<B>: Body,
{
    type Output = Result<Response<Instrumented<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = std::task::ready!(this.handled.poll(cx));
        match this.pending.take() {
            Some(pending) => Poll::Ready(Ok(pending.conclude(outcome))),
            // Polled again after it answered (hyper never does): there is nothing more to give.
            None => Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future: called at once (the usual case, polled in place), or boxed when its
    /// service was not ready or refused.
    #[project = HandledProj]
    enum Handled<F, B> {
        Called { #[pin] fut: F },
        Later { fut: Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>> },
    }
}

impl<F, B, E> Future for Handled<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            HandledProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            HandledProj::Later { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// Calls the handler now when its service is ready (tower's services nearly always are), so the
/// request head is dropped as early as the handler lets it go. hyper reserves its read buffer for
/// the next request before it first polls this answer, and the buffer can be reused in place
/// only if nothing still holds the head's bytes: a head kept alive until then costs a fresh 8 KiB
/// buffer per request. A service that is not ready is polled again, with the task's waker, from
/// the answer. A panic in `call` itself is the handler's, answered 500 like one in its future.
fn start_handler<S, B>(
    mut svc: S,
    req: Request<RequestBody>,
) -> Result<Handled<S::Future, B>, Box<dyn std::any::Any + Send>>
where
    S: HttpService<B>,
    B: ServiceBody,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => std::panic::catch_unwind(AssertUnwindSafe(|| Handled::Called { fut: svc.call(req) })),
        Poll::Ready(Err(e)) => Ok(Handled::Later {
            fut: Box::pin(std::future::ready(Err(e.into()))),
        }),
        Poll::Pending => Ok(Handled::Later {
            fut: Box::pin(async move {
                std::future::poll_fn(|cx| svc.poll_ready(cx))
                    .await
                    .map_err(Into::into)?;
                svc.call(req).await.map_err(Into::into)
            }),
        }),
    }
}

impl<S> Pipeline<S> {
    /// An `Upgrade: h2c` request on HTTP/1.1. Returns the 101 when we switch; `None` when the
    /// request is served as plain HTTP/1.1, which is counted as a fallback with its reason.
    fn h2c_upgrade<B>(&self, req: &mut Request<Incoming>) -> Option<Response<Instrumented<B>>> {
        let listener = &self.conn.listener;
        let policy = listener.policy.load();
        let refusal = if !(policy.h2c_upgrade && policy.h2c) {
            "h2c_upgrade_disabled"
        } else {
            match h2c::check(req.headers()) {
                Ok(()) => {
                    let stream_one = h2c::stream_one_frames(req.method(), req.uri(), req.headers());
                    let on_upgrade = hyper::upgrade::on(&mut *req);
                    let mut pending = self.conn.pending_h2c.lock().unwrap_or_else(|p| p.into_inner());
                    *pending = Some(PendingH2c { on_upgrade, stream_one });
                    let mut resp = Response::new(Instrumented::fixed(Bytes::new()));
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                    resp.headers_mut()
                        .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
                    return Some(resp);
                }
                Err(h2c::NotUpgraded::HasBody) => "h2c_upgrade_with_body",
                Err(_) => "h2c_upgrade_malformed",
            }
        };
        listener.metrics.alpn_fallback(&listener.name, refusal);
        tracing::info!(
            conn_id = self.conn.info.id,
            listener = %listener.name.0,
            reason = refusal,
            "client asked for Upgrade: h2c; serving HTTP/1.1"
        );
        None
    }
}

/// The `h1_headers` switch: the request head as received, values redacted per `[log]`.
fn log_request_head(conn: &ConnShared, req: &Request<Incoming>) {
    let l = &conn.listener;
    if !l.debug.enabled(Switch::H1Headers, &l.name.0, conn.info.peer) {
        return;
    }
    let log = l.access_log.load();
    let r = log.redactor();
    // The request target as sent: origin form, or the absolute form a proxy client uses.
    let target = match req.uri().scheme() {
        Some(_) => req.uri().to_string(),
        None => req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string(),
    };
    let version = format!("{:?}", req.version());
    let raw_len = req.method().as_str().len() + 1 + target.len() + 1 + version.len();
    let start = format!("{} {} {version}", req.method(), r.path(&target));
    let line = r.head_line("request head", raw_len, &start, req.headers());
    // HTTP/1.1 serves one request at a time: this one gets the next sequence number.
    let req_id = format!("{}-{}", conn.info.id, conn.info.requests() + 1);
    l.debug.event(Switch::H1Headers, &l.name.0, conn.info.peer, || {
        format!("conn {} req {req_id} {line}", conn.info.id)
    });
}

/// The `h1_headers` switch: the response head as handed to the HTTP/1.1 encoder (which then adds
/// `date` and the framing header, `content-length` or `transfer-encoding`).
fn log_response_head<B>(conn: &ConnShared, seq: u64, resp: &Response<B>) {
    let l = &conn.listener;
    l.debug.event(Switch::H1Headers, &l.name.0, conn.info.peer, || {
        let log = l.access_log.load();
        let status = resp.status();
        let start = format!(
            "HTTP/1.1 {} {}",
            status.as_str(),
            status.canonical_reason().unwrap_or("")
        );
        let start = start.trim_end();
        let line = log
            .redactor()
            .head_line("response head", start.len(), start, resp.headers());
        let id = conn.info.id;
        format!("conn {id} req {id}-{seq} {line}")
    });
}

/// The answer for a request whose body failed, whatever the handler made of the error it read.
fn answer_body_fault<B>(
    record: Box<Record>,
    fault: BodyFault,
    body_read: std::time::Duration,
) -> Response<Instrumented<B>>
where
    Instrumented<B>: Body,
{
    let conn = record.conn.clone();
    let http1 = record.protocol == Protocol::Http11;
    let listener = &conn.listener;
    // On HTTP/1.1 the rest of the body is unread, so the connection cannot carry another request:
    // each answer closes it. On HTTP/2 only this stream is affected and the connection serves on.
    let (status, body, error) = match fault {
        BodyFault::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, BODY_TOO_LARGE, "limit:max_body_bytes"),
        BodyFault::Timeout => {
            listener.metrics.timeout(&listener.name, "body_read");
            if http1 {
                let _ = conn.close_cause.set(CloseReason::BodyTimeout);
            }
            tracing::debug!(
                conn_id = conn.info.id,
                req_id = %record.req_id(),
                listener = %listener.name.0,
                remote = %conn.info.peer,
                timeout_ms = body_read.as_millis() as u64,
                bytes_in = record.body.bytes(),
                "body read timeout: the client sent no body bytes; answered 408"
            );
            (
                StatusCode::REQUEST_TIMEOUT,
                "request body stalled longer than timeouts.body_read\n",
                "timeout:body_read",
            )
        }
        BodyFault::Malformed => {
            if http1 {
                let _ = conn.close_cause.set(CloseReason::ProtocolError);
            }
            tracing::debug!(conn_id = conn.info.id, req_id = %record.req_id(), "malformed request body; answered 400");
            (StatusCode::BAD_REQUEST, "malformed request body\n", "malformed_body")
        }
        // The client is gone: this answer reaches nobody, but the request is still recorded.
        BodyFault::Aborted => (StatusCode::BAD_REQUEST, "request body aborted\n", "body_aborted"),
    };
    record.attach(gatehouse_response(status, body), true, Some(error))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// `host[:port]` without the port; IPv6 literals keep their brackets.
pub fn strip_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    }
}

/// A short plain-text response made by gatehouse itself (errors, limits).
fn gatehouse_response<B>(status: StatusCode, body: &'static str) -> Response<Instrumented<B>> {
    let mut r = Response::new(Instrumented::fixed(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What is known about a request until its response body ends. Always boxed: it rides in the
/// response body, which hyper moves about a dozen times between the handler and the encoder
/// (and HTTP/2 into each stream's task), and inline its 160 bytes were copied on every move.
struct Record {
    conn: Arc<ConnShared>,
    seq: u64,
    started: Instant,
    protocol: Protocol,
    method: Method,
    /// Whether the access log was on when the request began: only then is it written, and the
    /// log's setting is not loaded again at the end (a reload that turns the log on mid-request
    /// starts with the next request, which is also the first whose host and path it has).
    logged: bool,
    /// Host and path are kept only when the access log is on.
    host: String,
    path: String,
    status: u16,
    error: Option<Cow<'static, str>>,
    bytes_out: u64,
    body: Arc<BodyState>,
    complete_if_dropped: bool,
    /// Only while `[tracing]` is on.
    span: Option<Box<RequestSpan>>,
}

impl Record {
    fn new(
        conn: Arc<ConnShared>,
        parts: &http::request::Parts,
        seq: u64,
        started: Instant,
        body: Arc<BodyState>,
    ) -> Box<Self> {
        let log = conn.listener.access_log.load();
        let logged = log.enabled();
        let (host, path) = if logged {
            let host = parts
                .uri
                .host()
                .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
                .map(strip_port)
                .unwrap_or_default()
                .to_string();
            let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let path = log.redactor().path(pq).into_owned();
            (host, path)
        } else {
            (String::new(), String::new())
        };
        let span = conn.listener.tracer.as_ref().map(|t| {
            let req_id = format!("{}-{seq}", conn.info.id);
            t.start(parts, &conn.info, &req_id, log.redactor())
        });
        drop(log);
        Box::new(Record {
            protocol: conn.info.protocol(),
            conn,
            seq,
            started,
            method: parts.method.clone(),
            logged,
            host,
            path,
            status: 0,
            error: None,
            bytes_out: 0,
            body,
            complete_if_dropped: false,
            span,
        })
    }

    fn req_id(&self) -> String {
        format!("{}-{}", self.conn.info.id, self.seq)
    }

    /// Attaches the record to the response, which reports it when its body ends.
    fn attach<B>(
        self: Box<Self>,
        resp: Response<Instrumented<B>>,
        close: bool,
        error: Option<&'static str>,
    ) -> Response<Instrumented<B>>
    where
        Instrumented<B>: Body,
    {
        self.attach_note(resp, close, error.map(Cow::Borrowed))
    }

    /// `attach` with an error in words (see [`AccessLogError`]).
    fn attach_note<B>(
        mut self: Box<Self>,
        mut resp: Response<Instrumented<B>>,
        close: bool,
        error: Option<Cow<'static, str>>,
    ) -> Response<Instrumented<B>>
    where
        Instrumented<B>: Body,
    {
        // A body that is empty from the start may never be polled (HEAD, 304, 204): it is complete.
        self.complete_if_dropped = resp.body().is_end_stream();
        // Once this process stops accepting (drain, or a binary upgrade's handover), each answer
        // tells the client to take its next request to a new connection. Decided here, when the
        // head is written, so a request that started before the handover is covered too.
        let leaving = self.conn.listener.shutdown.phase() != crate::lifecycle::Phase::Running;
        if (close || leaving) && self.protocol == Protocol::Http11 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            // hyper ends the connection after this answer: it must not be released as idle.
            self.conn.upgrades.no_release();
        }
        self.status = resp.status().as_u16();
        self.error = error;
        if self.protocol == Protocol::Http11 {
            log_response_head(&self.conn, self.seq, &resp);
        }
        let ended = self.complete_if_dropped;
        let body = resp.body_mut();
        body.record = Some(self);
        if !ended {
            // Handed to hyper, not polled yet: from here hyper waits on the peer to send it.
            set_peer_wait(&body.record, &mut body.awaiting_peer, true);
        }
        resp
    }

    /// Reports the request; called once, as its box is taken out of the body.
    fn finish(&mut self, aborted: bool) {
        let listener = &self.conn.listener;
        // One clock read for the duration and the connection's idle-since.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.started);
        let error: Option<Cow<'static, str>> = match (self.error.take(), aborted) {
            (Some(e), _) => Some(e),
            (None, true) if self.conn.close_cause.get() == Some(&CloseReason::WriteTimeout) => {
                Some(Cow::Borrowed("timeout:write"))
            }
            (None, true) => Some(Cow::Borrowed("response_aborted")),
            _ => None,
        };
        if let (Some(span), Some(tracer)) = (self.span.take(), &listener.tracer) {
            tracer.finish(
                *span,
                SpanEnd {
                    status: self.status,
                    error: error.as_deref(),
                    aborted,
                    elapsed,
                    bytes_in: self.body.bytes(),
                    bytes_out: self.bytes_out,
                },
            );
        }
        let protocol = self.protocol.as_str();
        listener.metrics.request_done(
            &self.conn.request_metrics,
            &listener.name,
            protocol,
            method_label(&self.method),
            self.status,
            elapsed.as_secs_f64(),
        );
        if self.logged {
            self.write_log_line(protocol, elapsed, error.as_deref());
        }
        self.conn.info.request_finished(now);
    }

    fn write_log_line(&self, protocol: &str, elapsed: std::time::Duration, error: Option<&str>) {
        let listener = &self.conn.listener;
        let log = listener.access_log.load();
        log.record(|line| {
            let info = &self.conn.info;
            let tls = info.tls();
            line.num("conn_id", info.id);
            line.dashed("req_id", info.id, self.seq);
            line.str("listener", &listener.name.0);
            line.addr("remote", info.peer);
            line.str("protocol", protocol);
            line.str("tls_version", tls.map_or("", |t| t.version));
            line.str("alpn", tls.and_then(|t| t.alpn.as_deref()).unwrap_or(""));
            line.str("method", self.method.as_str());
            line.str("host", &self.host);
            line.str("path", &self.path);
            line.num("status", u64::from(self.status));
            line.num("bytes_in", self.body.bytes());
            line.num("bytes_out", self.bytes_out);
            line.millis("duration_ms", elapsed);
            if let Some(e) = error {
                line.str("error", e);
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports its request when it ends or is dropped.
    pub struct Instrumented<B> {
        #[pin]
        kind: Kind<B>,
        record: Option<Box<Record>>,
        // HTTP/2: hyper holds data (or the headers) from this body and has not asked for more,
        // which it does only once the peer's flow-control window has room. Waiting on the
        // handler (the inner body is `Pending`) is never counted: that is not the peer's fault.
        awaiting_peer: bool,
    }

    impl<B> PinnedDrop for Instrumented<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            set_peer_wait(this.record, this.awaiting_peer, false);
            if let Some(mut record) = this.record.take() {
                let aborted = !record.complete_if_dropped;
                record.finish(aborted);
            }
        }
    }
}

/// Keeps the connection's count of responses waiting on the peer in step with `flag` (HTTP/2
/// only: on HTTP/1.1 the socket itself reports a peer that takes no bytes).
fn set_peer_wait(record: &Option<Box<Record>>, flag: &mut bool, on: bool) {
    if *flag == on {
        return;
    }
    let Some(rec) = record else { return };
    if !rec.protocol.is_h2() {
        return;
    }
    if on {
        rec.conn.info.peer_wait_started();
    } else {
        rec.conn.info.peer_wait_ended();
    }
    *flag = on;
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Fixed { data: Option<Bytes> },
    }
}

impl<B> Instrumented<B> {
    fn inner(body: B) -> Self {
        Instrumented {
            kind: Kind::Inner { body },
            record: None,
            awaiting_peer: false,
        }
    }
    fn fixed(data: Bytes) -> Self {
        Instrumented {
            kind: Kind::Fixed {
                data: if data.is_empty() { None } else { Some(data) },
            },
            record: None,
            awaiting_peer: false,
        }
    }
}

fn kind_ended<B: Body>(kind: &Kind<B>) -> bool {
    match kind {
        Kind::Inner { body } => body.is_end_stream(),
        Kind::Fixed { data } => data.is_none(),
    }
}

impl<B> Body for Instrumented<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        // Polled again: hyper has room to send, so whatever it held has gone to the peer.
        set_peer_wait(this.record, this.awaiting_peer, false);
        let mut kind = this.kind;
        let polled = match kind.as_mut().project() {
            KindProj::Inner { body } => match body.poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r.map(|r| r.map_err(Into::into)),
            },
            KindProj::Fixed { data } => data.take().map(|d| Ok(Frame::data(d))),
        };
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(rec)) = (frame.data_ref(), this.record.as_mut()) {
                    rec.bytes_out += data.len() as u64;
                }
                // hyper stops polling once a body says it has ended, so finish here, not at `None`.
                if kind_ended(kind.as_ref().get_ref()) {
                    if let Some(mut rec) = this.record.take() {
                        rec.finish(false);
                    }
                } else {
                    set_peer_wait(this.record, this.awaiting_peer, true);
                }
            }
            Some(Err(e)) => {
                if let Some(rec) = this.record.as_mut() {
                    let note = e.downcast_ref::<AccessLogError>().map(|n| Cow::Owned(n.0.clone()));
                    rec.error
                        .get_or_insert(note.unwrap_or(Cow::Borrowed("response_body_error")));
                }
            }
            None => {
                if let Some(mut rec) = this.record.take() {
                    rec.finish(false);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        kind_ended(&self.kind)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Fixed { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
