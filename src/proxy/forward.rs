//! One proxied request: pick a server its guards allow (health, ejection, breaker), check out a
//! connection, send the request with its body streaming, and answer the client with the
//! upstream's response streaming back. A failed attempt is retried on another server when the
//! request can be replayed and the budget allows; what cannot be made good is answered by a
//! fallback or by a status that says what failed (see [`super::answer`]).

use super::answer::{self, failure, record_sent, record_status, refusal, Failed};
use super::body::{Exchange, StaleRequest, Tee, UpstreamBody};
use super::connect::{ConnectError, UpBody};
use super::guard::Outcome;
use super::headers;
use super::metrics::PhaseLabels;
use super::pool::{Outgoing, SendError, ServerPool, UpIncoming};
use super::resilience::retry::is_idempotent;
use super::upgrade;
use super::upstream::{Chosen, Upstream};
use super::websocket::{self, Extended};
use crate::http::body::ResponseBody;
use crate::http::{AccessLogError, BodyState, RequestBody, RequestContext};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::OnUpgrade;
use std::sync::Arc;
use std::time::Instant;

/// Proxies `req` to `upstream`.
pub async fn forward(upstream: Arc<Upstream>, mut req: Request<RequestBody>) -> Response<ResponseBody> {
    let websocket = match websocket::extended(&req) {
        Some(Extended::WebSocket) => true,
        Some(Extended::Other(protocol)) => {
            return refusal(
                StatusCode::NOT_IMPLEMENTED,
                "this extended CONNECT protocol is not proxied\n",
                &format!("proxy:connect_protocol_not_proxied protocol={protocol}"),
            );
        }
        None if req.method() == Method::CONNECT => {
            return refusal(
                StatusCode::NOT_IMPLEMENTED,
                "CONNECT is not proxied\n",
                "proxy:connect_not_proxied",
            );
        }
        None => false,
    };
    let mut chosen = match upstream.select(&[], Instant::now()) {
        Ok(c) => c,
        Err(why) => {
            let stale = stale_request(&upstream, &req);
            return answer::unavailable(&upstream, why, req.method(), stale.as_ref());
        }
    };
    let ctx = req.body().context().cloned();
    let body_state = req.body().state();
    let upgrade = if websocket {
        Some(HeaderValue::from_static("websocket"))
    } else {
        upgrade::requested(&req)
    };
    let mut client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let method = req.method().clone();
    // An upgrade is never retried: the client's connection is promised to the first upstream
    // that answers 101.
    let mut attempts = match (&upstream.retry, &upgrade) {
        (Some(budget), None) => Some(budget.start(&method, Instant::now())),
        _ => None,
    };
    // Only a request that may be tried again keeps a copy of its head (one allocation per
    // attempt); every other request moves its head into its single attempt.
    let replayable =
        attempts.is_some() && is_idempotent(&method) && upstream.spec.retry.as_ref().is_some_and(|r| r.attempts > 1);
    let mut stale = stale_request(&upstream, &req);
    let (mut parts, body) = req.into_parts();
    let ws_key = match websocket.then(|| websocket::to_handshake(&mut parts)) {
        None => None,
        Some(Ok(key)) => Some(key),
        Some(Err(why)) => {
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error\n",
                &format!("proxy:websocket_handshake {why}"),
            );
        }
    };
    let bodyless = body.is_end_stream();
    let mut body = Some(body);
    let mut head = Some(parts);
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let index = chosen.index;
        let parts = if replayable {
            head.as_ref().map(copy_head)
        } else {
            head.take()
        };
        let Some(parts) = parts else {
            // Unreachable: a request without a head to replay is never retried.
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error\n",
                "proxy:internal no request head left to retry",
            );
        };
        let attempt = Attempt {
            upstream: &upstream,
            ctx: ctx.as_ref(),
            body_state: &body_state,
            upgrade: upgrade.clone(),
            ws_key: ws_key.as_ref(),
        };
        let (answer, transport) = match attempt
            .run(chosen, parts, &mut body, client_upgrade.take(), &mut stale)
            .await
        {
            Attempted::Done(r) => return r,
            Attempted::Failed { answer, transport } => (answer, transport),
        };
        // The body went upstream with the attempt (unless there was none): it cannot be replayed.
        let consumed = !bodyless && body.is_none();
        let next = match attempts.as_mut().zip(upstream.retry.as_ref()) {
            None => None,
            Some((a, budget)) => {
                tried.push(index);
                match upstream.select(&tried, Instant::now()) {
                    Err(_) => None,
                    Ok(next) => {
                        let decision = a.retry(budget, consumed, Instant::now());
                        upstream.resilience().retry(&upstream.spec.name, decision);
                        match decision {
                            Ok(()) => Some(next),
                            Err(denied) => {
                                tracing::debug!(upstream = %upstream.spec.name.0, reason = denied.as_label(), "failed attempt not retried");
                                None
                            }
                        }
                    }
                }
            }
        };
        match next {
            Some(next) => {
                if let ResponseBody::Upstream(b) = answer.into_body() {
                    b.abandon();
                }
                chosen = next;
            }
            None if transport => {
                let error = answer
                    .extensions()
                    .get::<AccessLogError>()
                    .map(|e| e.0.clone())
                    .unwrap_or_default();
                return answer::fallback(&upstream, &method, stale.as_ref(), &error).unwrap_or(answer);
            }
            None => return answer,
        }
    }
}

/// What a GET needs for the stale cache (to store its response, or to be answered from it),
/// when the upstream has one.
fn stale_request(upstream: &Upstream, req: &Request<RequestBody>) -> Option<StaleRequest> {
    if upstream.stale.is_none() || req.method() != Method::GET {
        return None;
    }
    let host = headers::client_host(req.uri(), req.headers())?;
    Some(StaleRequest {
        host: host.to_str().ok()?.to_owned(),
        path_and_query: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        headers: req.headers().clone(),
    })
}

/// A copy of a request head for one more attempt (`Parts` is not `Clone`: its extensions are
/// the client side's business and are not sent upstream anyway).
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

fn empty_body() -> UpBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// How one attempt ended.
enum Attempted {
    /// The answer to send: the upstream's response, or an error that no retry or fallback can
    /// make good (the client's own body failed, an upgrade met HTTP/2).
    Done(Response<ResponseBody>),
    /// The attempt failed in a way another attempt may not: `answer` is what the client gets if
    /// none is made. `transport`: no usable response (a fallback may answer instead); else an
    /// upstream 502/503/504 response, passed on as it is when not retried.
    Failed {
        answer: Response<ResponseBody>,
        transport: bool,
    },
}

/// What every attempt of one request shares.
struct Attempt<'a> {
    upstream: &'a Arc<Upstream>,
    ctx: Option<&'a RequestContext>,
    body_state: &'a BodyState,
    upgrade: Option<HeaderValue>,
    /// The key of the WebSocket handshake made from an HTTP/2 extended CONNECT.
    ws_key: Option<&'a HeaderValue>,
}

impl Attempt<'_> {
    /// One attempt on the chosen server. Takes the request body when it sends it.
    async fn run(
        self,
        chosen: Chosen,
        mut parts: http::request::Parts,
        body: &mut Option<RequestBody>,
        client_upgrade: Option<OnUpgrade>,
        stale: &mut Option<StaleRequest>,
    ) -> Attempted {
        let spec = &self.upstream.spec;
        let name = &spec.name.0;
        let Chosen { index, permit } = chosen;
        let pool = self.upstream.servers[index].clone();
        let guard = self.upstream.guards[index].clone();
        let in_flight = pool.start_request();
        let mut watch = Abandoned::new(&pool);

        let mut lease = match pool.checkout().await {
            Ok(l) => l,
            Err(e) => {
                watch.disarm();
                guard.report(&pool, permit, Outcome::Transport);
                let status = match e {
                    ConnectError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                return Attempted::Failed {
                    answer: failure(&pool, status, e.cause(), &e.to_string()),
                    transport: true,
                };
            }
        };
        if self.upgrade.is_some() && lease.wire.is_h2() {
            watch.disarm();
            lease.fate = "error";
            return Attempted::Done(failure(
                &pool,
                StatusCode::BAD_GATEWAY,
                "upgrade_unsupported",
                "the client asked for an Upgrade, which needs an HTTP/1.1 upstream connection",
            ));
        }
        let wire = lease.wire;
        let added = match headers::to_upstream(
            &mut parts,
            self.ctx,
            spec,
            &pool.server.0,
            wire.is_h2(),
            self.upgrade.clone(),
        ) {
            Ok(added) => added,
            Err(why) => {
                watch.disarm();
                lease.fate = "error";
                return Attempted::Done(failure(&pool, StatusCode::BAD_GATEWAY, "bad_request_head", why));
            }
        };
        let up_body = match body.take() {
            Some(b) if !b.is_end_stream() => b.boxed_unsync(),
            _ => empty_body(),
        };
        let mut outgoing = if wire.is_h2() {
            Outgoing::H2(Box::new(Request::from_parts(parts, up_body)))
        } else {
            match super::h1::Request::new(&parts, &added, up_body) {
                Ok(r) => Outgoing::H1(r),
                Err(why) => {
                    watch.disarm();
                    lease.fate = "error";
                    return Attempted::Done(failure(&pool, StatusCode::BAD_GATEWAY, "bad_request_head", why));
                }
            }
        };

        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started) + spec.response_header_timeout;
        let mut resent = false;
        let result = loop {
            match tokio::time::timeout_at(deadline, lease.send(outgoing)).await {
                Err(_) => break Err(Failed::Timeout),
                Ok(Ok(resp)) => break Ok(resp),
                // A pooled connection the upstream closed just as the request left: it goes on a
                // fresh connection once (HTTP/2: nothing was sent; HTTP/1.1: nothing came back,
                // and the request may be sent again). This is the keep-alive race every pool has,
                // not a retry.
                Ok(Err(SendError::NotSent(e, req))) if lease.reused && !resent => {
                    resent = true;
                    tracing::debug!(upstream = %name, server = %pool.server.0, error = %e, "pooled connection ended before any answer; sending on a new one");
                    // Given up before the new checkout, whose connection is then opened for it.
                    lease.lose("upstream_closed");
                    lease = match pool.checkout().await {
                        Ok(l) if l.wire == wire => l,
                        Ok(mut l) => {
                            l.fate = "error";
                            break Err(Failed::Exchange(e));
                        }
                        Err(ce) => break Err(Failed::Connect(ce)),
                    };
                    outgoing = req;
                }
                Ok(Err(SendError::NotSent(e, _) | SendError::Failed(e))) => break Err(Failed::Exchange(e)),
                Ok(Err(SendError::Released)) => break Err(Failed::Released),
            }
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(failed) => {
                watch.disarm();
                lease.fate = "error";
                let (answer, transport) = failed.answer(
                    &pool,
                    self.body_state,
                    lease.first_h2_exchange(),
                    &spec.response_header_timeout,
                );
                if !transport {
                    // The client's body failed: nothing to learn about the server (the permit
                    // drops unreported).
                    return Attempted::Done(answer);
                }
                guard.report(&pool, permit, Outcome::Transport);
                return Attempted::Failed { answer, transport };
            }
        };
        pool.observe_latency(started.elapsed());
        record_sent(&pool, lease.reused, resp.status());
        let status = resp.status();
        let outcome = if status.is_server_error() {
            Outcome::ServerError
        } else {
            Outcome::Success
        };
        guard.report(&pool, permit, outcome);

        if status == StatusCode::SWITCHING_PROTOCOLS {
            watch.disarm();
            let Some(client) = client_upgrade else {
                lease.fate = "error";
                // Its connection is lost to the upstream's error, not to a client that left.
                if let UpIncoming::H1(b) = resp.body_mut() {
                    b.abandon();
                }
                return Attempted::Done(failure(
                    &pool,
                    StatusCode::BAD_GATEWAY,
                    "bad_response",
                    "101 Switching Protocols to a request that asked for no upgrade",
                ));
            };
            let (mut parts, body) = resp.into_parts();
            let Some(upstream_io) = (match body {
                UpIncoming::H1(b) => b.into_upgraded(),
                UpIncoming::H2(_) => None,
            }) else {
                lease.fate = "error";
                return Attempted::Done(failure(
                    &pool,
                    StatusCode::BAD_GATEWAY,
                    "bad_response",
                    "101 Switching Protocols on a connection that cannot switch",
                ));
            };
            match self.ws_key {
                // RFC 8441: the HTTP/2 stream opens with a 200 once the upstream accepted.
                Some(key) => {
                    if let Err(why) = websocket::to_stream_response(&mut parts, key) {
                        lease.fate = "error";
                        return Attempted::Done(failure(&pool, StatusCode::BAD_GATEWAY, "bad_response", why));
                    }
                    headers::to_client(&mut parts, false);
                }
                None => headers::to_client(&mut parts, true),
            }
            lease.consume();
            upgrade::tunnel(client, upstream_io, pool.upstream.clone(), pool.server.clone());
            return Attempted::Done(Response::from_parts(parts, ResponseBody::empty()));
        }

        // HTTP/1.1: the connection now travels in the body, which pools it again at its end.
        let (mut parts, incoming) = resp.into_parts();
        headers::to_client(&mut parts, false);
        watch.disarm();
        let tee = self.tee(status, &parts.headers, stale);
        let body = UpstreamBody::new(
            incoming,
            Exchange {
                pool: pool.clone(),
                lease,
                in_flight,
                guard,
            },
            tee,
        );
        let resp = Response::from_parts(parts, ResponseBody::Upstream(Box::new(body)));
        if matches!(status.as_u16(), 502..=504) {
            return Attempted::Failed {
                answer: resp,
                transport: false,
            };
        }
        Attempted::Done(resp)
    }

    /// A copy of a 200 response to a GET for the stale cache, unless it is announced larger
    /// than the cache takes or it sets a cookie (which the cache never stores).
    fn tee(&self, status: StatusCode, response: &http::HeaderMap, stale: &mut Option<StaleRequest>) -> Option<Tee> {
        if status != StatusCode::OK {
            return None;
        }
        let (cache, settings) = self.upstream.stale.as_ref().zip(self.upstream.spec.stale.as_ref())?;
        let cap = settings.max_body_bytes;
        let announced = response
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > cap as u64) || response.contains_key(header::SET_COOKIE) {
            return None;
        }
        Some(Tee {
            cache: cache.clone(),
            request: stale.take()?,
            status,
            headers: response.clone(),
            cap,
            chunks: Vec::new(),
            len: 0,
        })
    }
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
