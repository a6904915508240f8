//! One proxied exchange: pick a server, check out a connection, send the request with its body
//! streaming, and answer the client with the upstream's response streaming back, or with a
//! status that says what failed (502 the upstream failed, 503 nothing to send to, 504 it was
//! too slow), the access log's `error` naming upstream, server and cause.

use super::body::{Exchange, UpstreamBody};
use super::connect::{ConnectError, Wire};
use super::headers;
use super::metrics::{CauseLabels, PhaseLabels, StatusLabels, UpstreamLabels};
use super::pool::{SendError, ServerPool};
use super::upgrade;
use super::upstream::{HostRewrite, Upstream};
use crate::http::body::ResponseBody;
use crate::http::{AccessLogError, BodyState, RequestBody, RequestContext};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Proxies `req` to `upstream`.
pub async fn forward(upstream: Arc<Upstream>, mut req: Request<RequestBody>) -> Response<ResponseBody> {
    let name = &upstream.spec.name.0;
    if req.method() == Method::CONNECT {
        return refusal(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not proxied\n",
            "proxy:connect_not_proxied",
        );
    }
    if upstream.spec.host == HostRewrite::Preserve && headers::client_host(req.uri(), req.headers()).is_none() {
        return refusal(StatusCode::BAD_REQUEST, "the request has no Host\n", "proxy:no_host");
    }
    let Some(pool) = upstream.pick().cloned() else {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "no upstream server is configured\n",
            "proxy:no_server",
        );
    };
    let spec = upstream.spec.clone();
    let in_flight = pool.start_request();
    let ctx = req.extensions().get::<RequestContext>().cloned();
    let body_state = req.body().state();
    let upgrade = upgrade::requested(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let mut watch = Abandoned::new(&pool);
    let (mut parts, body) = req.into_parts();

    let mut lease = match pool.checkout().await {
        Ok(l) => l,
        Err(e) => {
            watch.disarm();
            let status = match e {
                ConnectError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            return failure(&pool, status, e.cause(), &e.to_string());
        }
    };
    if upgrade.is_some() && lease.wire.is_h2() {
        watch.disarm();
        lease.fate = "error";
        return failure(
            &pool,
            StatusCode::BAD_GATEWAY,
            "upgrade_unsupported",
            "the client asked for an Upgrade, which needs an HTTP/1.1 upstream connection",
        );
    }
    let wire = lease.wire;
    if let Err(why) = headers::to_upstream(&mut parts, ctx.as_ref(), &spec, &pool.server.0, wire.is_h2(), upgrade) {
        watch.disarm();
        lease.fate = "error";
        return failure(&pool, StatusCode::BAD_GATEWAY, "bad_request_head", why);
    }
    let mut outgoing = Request::from_parts(parts, body.boxed_unsync());

    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + spec.response_header_timeout;
    let mut resent = false;
    let result = loop {
        match tokio::time::timeout_at(deadline, lease.send(outgoing)).await {
            Err(_) => break Err(Failed::Timeout),
            Ok(Ok(resp)) => break Ok(resp),
            // A pooled connection the upstream closed just before the request left: nothing was
            // sent, so it goes on a fresh connection once, whatever its method. This is the
            // keep-alive race every pool has, not a retry.
            Ok(Err(SendError::NotSent(e, req))) if lease.reused && !resent => {
                resent = true;
                tracing::debug!(upstream = %name, server = %pool.server.0, error = %e, "pooled connection closed before the request left; sending on a new one");
                lease.fate = "upstream_closed";
                lease = match pool.checkout().await {
                    Ok(l) if l.wire == wire => l,
                    Ok(mut l) => {
                        l.fate = "error";
                        break Err(Failed::Hyper(e));
                    }
                    Err(ce) => break Err(Failed::Connect(ce)),
                };
                outgoing = *req;
            }
            Ok(Err(SendError::NotSent(e, _) | SendError::Failed(e))) => break Err(Failed::Hyper(e)),
            Ok(Err(SendError::Released)) => break Err(Failed::Released),
        }
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(failed) => {
            watch.disarm();
            lease.fate = "error";
            return failed.answer(
                &pool,
                &body_state,
                lease.first_h2_exchange(),
                &spec.response_header_timeout,
            );
        }
    };
    pool.observe_latency(started.elapsed());
    record_sent(&pool, lease.reused, resp.status().as_str());

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        watch.disarm();
        let Some(client) = client_upgrade else {
            lease.fate = "error";
            return failure(
                &pool,
                StatusCode::BAD_GATEWAY,
                "bad_response",
                "101 Switching Protocols to a request that asked for no upgrade",
            );
        };
        let upstream_io = hyper::upgrade::on(&mut resp);
        lease.consume();
        upgrade::tunnel(client, upstream_io, pool.upstream.clone(), pool.server.clone());
        let (mut parts, _) = resp.into_parts();
        headers::to_client(&mut parts, true);
        return Response::from_parts(parts, ResponseBody::empty());
    }

    let (mut parts, incoming) = resp.into_parts();
    let fate = Arc::new(OnceLock::new());
    if wire == Wire::Http11 {
        let keep_alive = if parts.version == Version::HTTP_10 {
            headers::connection_has(&parts.headers, "keep-alive")
        } else {
            !headers::connection_has(&parts.headers, "close")
        };
        lease.release_h1(!keep_alive, fate.clone());
    }
    headers::to_client(&mut parts, false);
    watch.disarm();
    let body = UpstreamBody::new(
        incoming,
        Exchange {
            pool: pool.clone(),
            lease,
            in_flight,
            fate,
        },
    );
    Response::from_parts(parts, ResponseBody::Upstream(body))
}

/// Why no response head came back.
enum Failed {
    Timeout,
    Connect(ConnectError),
    Hyper(hyper::Error),
    Released,
}

impl Failed {
    fn answer(
        self,
        pool: &ServerPool,
        body: &BodyState,
        first_h2: bool,
        timeout: &std::time::Duration,
    ) -> Response<ResponseBody> {
        if let Some(fault) = body.fault() {
            // The client's body failed (too large, stalled, aborted): the pipeline answers with
            // 413/408/400 from the body's state; the upstream did nothing wrong.
            record_status(pool, "cancelled");
            tracing::debug!(upstream = %pool.upstream.0, server = %pool.server.0, ?fault, "request body failed while it streamed upstream");
            let mut r = crate::handlers::text(StatusCode::BAD_REQUEST, "request body failed\n");
            r.extensions_mut()
                .insert(AccessLogError(format!("proxy:request_body {fault:?}")));
            return r;
        }
        match self {
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
            Failed::Hyper(e) => {
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
        }
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

fn record_status(pool: &ServerPool, status: &str) {
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
fn record_sent(pool: &ServerPool, reused: bool, status: &str) {
    record_status(pool, status);
    let m = pool.metrics();
    let labels = UpstreamLabels {
        upstream: pool.upstream.clone(),
    };
    let all = m.sent.get_or_create(&labels).inc() + 1;
    let reused_count = if reused {
        m.sent_reused.get_or_create(&labels).inc() + 1
    } else {
        m.sent_reused.get_or_create(&labels).get()
    };
    m.reuse_ratio
        .get_or_create(&labels)
        .set(reused_count as f64 / all as f64);
}

/// gatehouse's answer for an exchange that failed: counted, logged, and named in the access log.
fn failure(pool: &ServerPool, status: StatusCode, cause: &'static str, detail: &str) -> Response<ResponseBody> {
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
fn refusal(status: StatusCode, body: &'static str, error: &str) -> Response<ResponseBody> {
    let mut r = crate::handlers::text(status, body);
    r.extensions_mut().insert(AccessLogError(error.to_string()));
    r
}

/// Counts and logs a client that went away (or `timeouts.request` expired) before the upstream's
/// response head: the exchange is dropped, which cancels it upstream (HTTP/1.1: the connection
/// closes; HTTP/2: RST_STREAM(CANCEL)).
struct Abandoned<'a> {
    pool: &'a ServerPool,
    armed: bool,
}

impl<'a> Abandoned<'a> {
    fn new(pool: &'a ServerPool) -> Self {
        Abandoned { pool, armed: true }
    }
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        record_status(self.pool, "cancelled");
        self.pool
            .metrics()
            .cancelled
            .get_or_create(&PhaseLabels {
                upstream: self.pool.upstream.clone(),
                phase: "response_headers",
            })
            .inc();
        tracing::info!(
            upstream = %self.pool.upstream.0,
            server = %self.pool.server.0,
            "client went away before the upstream answered; upstream request cancelled"
        );
    }
}
