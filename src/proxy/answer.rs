//! What the client gets when no upstream response is passed on: an error that says what
//! happened (502 the upstream failed, 503 nothing to send to, 504 it was too slow), or a
//! fallback (the stale copy of a GET, then the configured answer) that says it is one.

use super::body::StaleRequest;
use super::connect::ConnectError;
use super::metrics::{CauseLabels, StatusLabels, UnavailableLabels};
use super::pool::{ServerPool, UpError};
use super::resilience::stale::FallbackKind;
use super::upstream::Upstream;
use crate::http::body::ResponseBody;
use crate::http::{AccessLogError, BodyState};
use http::{header, HeaderValue, Method, Response, StatusCode};
use std::time::Instant;

/// Why no response head came back.
pub(super) enum Failed {
    Timeout,
    Connect(ConnectError),
    Exchange(UpError),
    Released,
}

impl Failed {
    /// The answer for this failure, and whether it was the upstream's (a transport failure,
    /// which a retry or a fallback may make good) rather than the client's.
    pub(super) fn answer(
        self,
        pool: &ServerPool,
        body: &BodyState,
        first_h2: bool,
        timeout: &std::time::Duration,
    ) -> (Response<ResponseBody>, bool) {
        if let Some(fault) = body.fault() {
            // The client's body failed (too large, stalled, aborted): the pipeline answers with
            // 413/408/400 from the body's state; the upstream did nothing wrong.
            record_status(pool, "cancelled");
            tracing::debug!(upstream = %pool.upstream.0, server = %pool.server.0, ?fault, "request body failed while it streamed upstream");
            let mut r = crate::handlers::text(StatusCode::BAD_REQUEST, "request body failed\n");
            r.extensions_mut()
                .insert(AccessLogError(format!("proxy:request_body {fault:?}")));
            return (r, false);
        }
        let transport = !matches!(self, Failed::Released);
        let r = match self {
            Failed::Timeout => failure(
                pool,
                StatusCode::GATEWAY_TIMEOUT,
                "response_header_timeout",
                &format!("no response head within response_header_timeout ({timeout:?})"),
            ),
            Failed::Connect(e) => {
                let status = match e {
                    ConnectError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                failure(pool, status, e.cause(), &e.to_string())
            }
            Failed::Exchange(UpError::H1(e)) => failure(pool, StatusCode::BAD_GATEWAY, e.cause(), &error_chain(&e)),
            Failed::Exchange(UpError::Hyper(e)) => {
                let cause = classify(&e, first_h2);
                if cause == "h2_refused" {
                    pool.note_lost("h2_refused");
                }
                failure(pool, StatusCode::BAD_GATEWAY, cause, &error_chain(&e))
            }
            Failed::Released => failure(
                pool,
                StatusCode::BAD_GATEWAY,
                "internal",
                "the connection was released before the request was sent",
            ),
        };
        (r, transport)
    }
}

/// The `cause` of an exchange that failed before the response head.
fn classify(e: &hyper::Error, first_h2: bool) -> &'static str {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() || e.is_parse_version_h2() {
        return "bad_response";
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if first_h2 && !h2e.is_reset() {
                return "h2_refused";
            }
            if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return "refused_stream";
            }
            // An error h2 raised itself is the upstream breaking the protocol.
            return if h2e.is_remote() || h2e.is_io() || h2e.is_go_away() {
                "reset_before_response"
            } else {
                "bad_response"
            };
        }
        source = s.source();
    }
    if first_h2 {
        return "h2_refused";
    }
    "reset_before_response"
}

/// `e` and its sources, joined: hyper's own message alone is often just "connection error".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

pub(super) fn record_status(pool: &ServerPool, status: &str) {
    pool.metrics()
        .requests
        .get_or_create(&StatusLabels {
            upstream: pool.upstream.clone(),
            server: pool.server.clone(),
            status: status.to_string(),
        })
        .inc();
}

/// Counts a response head received, and the connection it came on for the reuse ratio.
pub(super) fn record_sent(pool: &ServerPool, reused: bool, status: StatusCode) {
    pool.sent_series(status, |series| series.count(reused));
}

/// gatehouse's answer for an exchange that failed: counted, logged, and named in the access log.
pub(super) fn failure(
    pool: &ServerPool,
    status: StatusCode,
    cause: &'static str,
    detail: &str,
) -> Response<ResponseBody> {
    record_status(pool, "error");
    pool.metrics()
        .errors
        .get_or_create(&CauseLabels {
            upstream: pool.upstream.clone(),
            server: pool.server.clone(),
            cause,
        })
        .inc();
    tracing::warn!(
        upstream = %pool.upstream.0,
        server = %pool.server.0,
        cause,
        detail,
        status = status.as_u16(),
        "upstream exchange failed"
    );
    let text = match status {
        StatusCode::GATEWAY_TIMEOUT => "gateway timeout",
        StatusCode::SERVICE_UNAVAILABLE => "service unavailable",
        _ => "bad gateway",
    };
    let mut r = Response::new(ResponseBody::from(format!(
        "{text}: upstream `{}` {cause}\n",
        pool.upstream.0
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.extensions_mut().insert(AccessLogError(format!(
        "upstream:{cause} upstream={} server={} ({detail})",
        pool.upstream.0, pool.server.0
    )));
    r
}

/// An answer gatehouse makes before any upstream is involved.
pub(super) fn refusal(status: StatusCode, body: &'static str, error: &str) -> Response<ResponseBody> {
    let mut r = crate::handlers::text(status, body);
    r.extensions_mut().insert(AccessLogError(error.to_string()));
    r
}

/// No server of `upstream` could be tried: every one is unhealthy, ejected or behind an open
/// breaker (`why` names the last skipped). Answered by a fallback when one applies, else 503.
pub(super) fn unavailable(
    upstream: &Upstream,
    why: &'static str,
    method: &Method,
    stale: Option<&StaleRequest>,
) -> Response<ResponseBody> {
    let name = &upstream.spec.name;
    upstream
        .metrics
        .load()
        .unavailable
        .get_or_create(&UnavailableLabels {
            upstream: name.clone(),
            reason: why,
        })
        .inc();
    let report = upstream.availability_report(Instant::now());
    let error = format!("upstream:no_server_available upstream={} server=- ({report})", name.0);
    if let Some(r) = fallback(upstream, method, stale, &error) {
        return r;
    }
    tracing::warn!(upstream = %name.0, cause = "no_server_available", servers = %report, status = 503, "no upstream server available");
    let mut r = crate::handlers::text(StatusCode::SERVICE_UNAVAILABLE, "");
    *r.body_mut() = ResponseBody::from(format!(
        "service unavailable: upstream `{}` has no server available ({why})\n",
        name.0
    ));
    r.extensions_mut().insert(AccessLogError(error));
    r
}

/// The fallback answer for a request no server answered, if one is configured and applies: the
/// stale copy of a GET within `stale_for`, else the `respond` answer. `error` (what went wrong)
/// stays in the access log, with the fallback named.
pub(super) fn fallback(
    upstream: &Upstream,
    method: &Method,
    stale: Option<&StaleRequest>,
    error: &str,
) -> Option<Response<ResponseBody>> {
    let now = Instant::now();
    let cached = upstream
        .stale
        .as_ref()
        .zip(stale)
        .and_then(|(cache, r)| cache.lookup(method, &r.host, &r.path_and_query, &r.headers, now));
    let (kind, resp) = match (cached, &upstream.spec.respond) {
        (Some(r), _) => (FallbackKind::Stale, r),
        (None, Some(respond)) => (FallbackKind::Respond, respond.response()),
        (None, None) => return None,
    };
    upstream.resilience().fallback(&upstream.spec.name, kind);
    tracing::info!(
        upstream = %upstream.spec.name.0,
        fallback = kind.as_label(),
        status = resp.status().as_u16(),
        error,
        "no upstream answer; a fallback answered"
    );
    let mut resp = resp.map(ResponseBody::full);
    resp.extensions_mut()
        .insert(AccessLogError(format!("{error} fallback={}", kind.as_label())));
    Some(resp)
}
