//! OpenTelemetry tracing: one SERVER span per request, W3C trace context in and out, OTLP export.
//!
//! Why not the `opentelemetry` SDK and `opentelemetry-otlp`: their OTLP/HTTP exporter brings its
//! own HTTP client stack and a generic span pipeline (processors, a `Span` object per request
//! with dynamic attributes, a global provider) that would roughly double a clean build on a
//! two-core CI machine, while gatehouse already owns an HTTP client (hyper), a request record
//! that ends exactly when the response body does, and a bounded-queue pattern (the access log).
//! So a span here is a protobuf buffer: the attributes known when the request starts are encoded
//! then, the rest when its response ends, and the finished bytes go through a bounded queue to
//! one exporter task that concatenates them into `ExportTraceServiceRequest`s (see `proto`,
//! checked in the tests against the official generated types, and `export`).
//!
//! Zero cost when off: without `[tracing] otlp_endpoint` listeners hold no [`Tracer`], and the
//! request path only tests that `Option`: no ids, no clock read, no allocation, no extension.
//!
//! Sampling is parent-based: a valid incoming `traceparent` decides (its `sampled` flag); a new
//! trace is sampled when its id falls under `sample_ratio`. Unsampled requests still get a
//! [`TraceContext`] so that calls they make carry the trace on, but they encode nothing.

mod context;
mod export;
mod proto;

pub use context::{
    incoming_parent, incoming_tracestate, parse_traceparent, ratio_sampled, IdSource, SpanId, TraceContext, TraceId,
    Traceparent, TraceparentError, TRACEPARENT, TRACESTATE,
};
pub use export::{Endpoint, ExportSettings, ExportTask, Exporter};

use crate::config::TracingConfig;
use crate::conn::{ConnInfo, Protocol};
use crate::observe::redact::Redactor;
use http::header;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use proto::Value;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// The instrumentation scope of every span.
pub const SCOPE_NAME: &str = "gatehouse";
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: &'static str,
}

/// `gatehouse_trace_*`: what became of every sampled span.
#[derive(Clone, Debug, Default)]
pub struct TraceMetrics {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans lost, by reason: `queue_full`, `export_failed`, `rejected` (by the collector, in
    /// a partial success), `shutdown` (still queued when the flush deadline passed).
    pub dropped: Family<DropLabels, Counter>,
    /// Failed export attempts, retried or not, by reason: `connect`, `timeout`, `transport`,
    /// `throttled` (429), `unavailable` (502, 503, 504), `rejected` (any other status).
    pub export_failures: Family<DropLabels, Counter>,
}

impl TraceMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "trace_spans_exported",
            "Trace spans accepted by the OTLP collector",
            self.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Sampled trace spans that were not exported, by reason",
            self.dropped.clone(),
        );
        r.register(
            "trace_export_failures",
            "Failed OTLP export attempts, by reason",
            self.export_failures.clone(),
        );
    }

    fn dropped(&self, reason: &'static str, n: usize) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n as u64);
    }

    fn export_failed(&self, reason: &'static str) {
        self.export_failures.get_or_create(&DropLabels { reason }).inc();
    }
}

/// Starts a span per request and queues it for export when it ends. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tracer(Arc<TracerInner>);

#[derive(Debug)]
struct TracerInner {
    sample_ratio: f64,
    queue: mpsc::Sender<Vec<u8>>,
    metrics: TraceMetrics,
}

impl Tracer {
    /// The tracer and its (not yet started) exporter, or `None` when `[tracing]` has no
    /// endpoint. `Err` only for settings that validation refuses.
    pub fn from_config(cfg: &TracingConfig, metrics: TraceMetrics) -> Result<Option<(Tracer, Exporter)>, String> {
        let Some(url) = &cfg.otlp_endpoint else {
            return Ok(None);
        };
        let endpoint = Endpoint::parse(url)?;
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let settings = ExportSettings {
            endpoint,
            timeout: cfg.export_timeout.get(),
            batch_delay: cfg.batch_delay.get(),
            batch_size: cfg.batch_size.clamp(1, cfg.queue_size.max(1)),
            resource: vec![
                ("service.name", cfg.service_name.clone()),
                ("service.version", SCOPE_VERSION.to_string()),
            ],
        };
        let tracer = Tracer(Arc::new(TracerInner {
            sample_ratio: cfg.sample_ratio,
            queue: tx,
            metrics: metrics.clone(),
        }));
        Ok(Some((tracer, Exporter::new(settings, rx, metrics))))
    }

    /// Starts the server span of a request whose head is `parts`.
    pub fn start(
        &self,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        req_id: &str,
        redact: &Redactor,
    ) -> Box<RequestSpan> {
        let ids = IdSource::global();
        let parent = match incoming_parent(&parts.headers) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(
                    conn_id = conn.id,
                    req_id,
                    reason = e.as_str(),
                    "malformed traceparent ignored; starting a new trace"
                );
                None
            }
        };
        let (trace_id, sampled, tracestate) = match parent {
            Some(p) => (p.trace_id, p.sampled(), incoming_tracestate(&parts.headers)),
            None => {
                let id = ids.trace_id();
                (id, ratio_sampled(id, self.0.sample_ratio), None)
            }
        };
        let ctx = TraceContext {
            trace_id,
            span_id: ids.span_id(),
            sampled,
            tracestate,
        };
        let buf = sampled.then(|| {
            let start = SystemTime::now();
            let mut b = Vec::with_capacity(640);
            encode_start(
                &mut b,
                &ctx,
                parent.map(|p| p.parent_id),
                start,
                parts,
                conn,
                req_id,
                redact,
            );
            (b, start)
        });
        Box::new(RequestSpan { ctx, buf })
    }

    /// Ends `span` with the request's outcome and queues it; a full queue drops it (counted).
    pub fn finish(&self, span: RequestSpan, end: SpanEnd<'_>) {
        let RequestSpan {
            buf: Some((mut b, start)),
            ..
        } = span
        else {
            return;
        };
        encode_end(&mut b, start, &end);
        match self.0.queue.try_send(b) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.0.metrics.dropped("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.0.metrics.dropped("shutdown", 1),
        }
    }
}

/// A request's span while it runs: its trace context, and the encoded span if it is sampled.
#[derive(Debug)]
pub struct RequestSpan {
    pub ctx: TraceContext,
    buf: Option<(Vec<u8>, SystemTime)>,
}

/// How a request ended.
pub struct SpanEnd<'a> {
    pub status: u16,
    /// gatehouse's named error (`timeout:request`, `panic`, `limit:max_body_bytes`, ...).
    pub error: Option<&'a str>,
    /// The response did not reach its end (client gone, write timeout).
    pub aborted: bool,
    pub elapsed: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The span's fields known when the request starts (span fields may come in any order, and
/// repeated `attributes` may be split, so the rest is appended when it ends).
#[allow(clippy::too_many_arguments)]
fn encode_start(
    b: &mut Vec<u8>,
    ctx: &TraceContext,
    parent: Option<SpanId>,
    start: SystemTime,
    parts: &http::request::Parts,
    conn: &ConnInfo,
    req_id: &str,
    redact: &Redactor,
) {
    // Span: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6,
    // start_time_unix_nano 7, end_time_unix_nano 8, attributes 9, status 15, flags 16.
    proto::bytes_field(b, 1, &ctx.trace_id.0);
    proto::bytes_field(b, 2, &ctx.span_id.0);
    if let Some(state) = &ctx.tracestate {
        proto::bytes_field(b, 3, state.as_bytes());
    }
    let mut flags = u32::from(ctx.sampled) | proto::SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE;
    if let Some(p) = parent {
        proto::bytes_field(b, 4, &p.0);
        flags |= proto::SPAN_FLAGS_CONTEXT_IS_REMOTE;
    }
    // Semantic conventions: methods outside the known set are `_OTHER`, and the span is `HTTP`.
    let known = crate::observe::metrics::method_label(&parts.method);
    let (method, name) = if known == "OTHER" {
        ("_OTHER", "HTTP")
    } else {
        (known, known)
    };
    proto::bytes_field(b, 5, name.as_bytes());
    proto::varint_field(b, 6, proto::SPAN_KIND_SERVER);
    proto::fixed64_field(b, 7, unix_nanos(start));
    proto::fixed32_field(b, 16, flags);

    let attr = |b: &mut Vec<u8>, k: &str, v: Value<'_>| proto::attribute(b, 9, k, v);
    attr(b, "http.request.method", Value::Str(method));
    if known == "OTHER" {
        attr(b, "http.request.method_original", Value::Str(parts.method.as_str()));
    }
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let redacted = redact.path(pq);
    let (path, query) = match redacted.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&*redacted, None),
    };
    attr(b, "url.path", Value::Str(path));
    if let Some(q) = query {
        attr(b, "url.query", Value::Str(q));
    }
    let tls = conn.tls().is_some();
    attr(b, "url.scheme", Value::Str(if tls { "https" } else { "http" }));
    let protocol = conn.protocol();
    attr(b, "network.protocol.name", Value::Str("http"));
    let version = match protocol {
        Protocol::Http11 => "1.1",
        _ if protocol.is_h2() => "2",
        _ => "",
    };
    if !version.is_empty() {
        attr(b, "network.protocol.version", Value::Str(version));
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
    if let Some(authority) = authority {
        let host = crate::http::strip_port(authority);
        attr(
            b,
            "server.address",
            Value::Str(host.trim_start_matches('[').trim_end_matches(']')),
        );
    }
    let port = authority
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(conn.local.port());
    attr(b, "server.port", Value::Int(i64::from(port)));
    let peer = conn.peer.ip().to_string();
    attr(b, "client.address", Value::Str(&peer));
    attr(b, "network.peer.address", Value::Str(&peer));
    attr(b, "network.peer.port", Value::Int(i64::from(conn.peer.port())));
    if let Some(ua) = parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()) {
        attr(b, "user_agent.original", Value::Str(ua));
    }
    attr(b, "gatehouse.listener", Value::Str(&conn.listener));
    attr(b, "gatehouse.connection.id", Value::Int(conn.id as i64));
    attr(b, "gatehouse.request.id", Value::Str(req_id));
}

fn encode_end(b: &mut Vec<u8>, start: SystemTime, end: &SpanEnd<'_>) {
    proto::fixed64_field(b, 8, unix_nanos(start.checked_add(end.elapsed).unwrap_or(start)));
    let attr = |b: &mut Vec<u8>, k: &str, v: Value<'_>| proto::attribute(b, 9, k, v);
    attr(b, "http.response.status_code", Value::Int(i64::from(end.status)));
    attr(b, "http.request.body.size", Value::Int(end.bytes_in as i64));
    attr(b, "http.response.body.size", Value::Int(end.bytes_out as i64));
    // A server's 4xx is the client's error: the span status stays unset (semantic conventions),
    // though gatehouse's named cause (a body timeout, a limit) is still given as `error.type`.
    let status_code = end.status.to_string();
    let error_type = end.error.or((end.status >= 500).then_some(status_code.as_str()));
    if let Some(e) = error_type {
        attr(b, "error.type", Value::Str(e));
    }
    if end.status >= 500 || end.aborted {
        // Status: message 2, code 3.
        let mut status = Vec::with_capacity(32);
        if let Some(e) = error_type {
            proto::bytes_field(&mut status, 2, e.as_bytes());
        }
        proto::varint_field(&mut status, 3, proto::STATUS_CODE_ERROR);
        proto::bytes_field(b, 15, &status);
    }
}
