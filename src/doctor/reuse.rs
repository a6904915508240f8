//! Connection reuse: N sequential requests, counting the connections they need and why each one
//! that ended did (a `Connection: close`, an idle close, a GOAWAY, a refused stream).

use super::h2::{self, StreamEnd};
use super::net::Io;
use super::Dialer;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Bound on one request, response and body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long doctor keeps the last connection idle to see whether the server closes it. Clients
/// keep idle connections for a minute or more (Go: 90s, curl: 118s, browsers: minutes); a server
/// that closes within two seconds defeats reuse for any client that pauses between requests,
/// and a longer watch would make every run slower.
pub const IDLE_WATCH: Duration = Duration::from_secs(2);

/// What the reuse test found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Reuse {
    pub protocol: String,
    pub requests: u32,
    pub completed: u32,
    pub connections: u32,
    /// Status of each completed request (`null` when an HTTP/2 status could not be decoded).
    pub statuses: Vec<Option<u16>>,
    /// The `Server` response header, when sent (HTTP/1.1).
    pub server: Option<String>,
    pub closes: Vec<Close>,
    /// The server closed the last connection after this long idle, within the idle watch.
    pub idle_close_ms: Option<f64>,
    /// The GOAWAY that ended the idle connection, if one did.
    pub idle_close_goaway: Option<h2::GoAway>,
    pub error: Option<String>,
}

/// One connection that ended before the requests were done.
#[derive(Clone, Debug, Serialize)]
pub struct Close {
    /// The last request served on the connection (0: none).
    pub after_request: u32,
    /// `connection_close`, `server_closed_idle`, `goaway`, `stream_refused`, `closed`.
    pub reason: &'static str,
    pub detail: String,
    pub goaway: Option<h2::GoAway>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    ended: tokio::sync::oneshot::Receiver<Instant>,
}

async fn h1_start(io: Box<dyn Io>) -> Result<H1, String> {
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    let (tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = tx.send(Instant::now());
    });
    Ok(H1 { sender, ended })
}

/// Runs `n` requests over HTTP/1.1 keep-alive, starting on `first`.
pub async fn http1(dialer: &Dialer, first: Box<dyn Io>, n: u32) -> Reuse {
    let mut r = Reuse {
        protocol: "http/1.1".into(),
        requests: n,
        connections: 1,
        ..Reuse::default()
    };
    let mut cur = match h1_start(first).await {
        Ok(c) => Some(c),
        Err(e) => {
            r.error = Some(e);
            return r;
        }
    };
    let mut last_done = Instant::now();
    for k in 1..=n {
        let mut retried = false;
        loop {
            if let Some(c) = cur.as_mut() {
                if let Ok(at) = c.ended.try_recv() {
                    r.closes.push(Close {
                        after_request: k - 1,
                        reason: "server_closed_idle",
                        detail: format!(
                            "the server closed the idle connection {:.0} ms after the last response",
                            ms(at.saturating_duration_since(last_done))
                        ),
                        goaway: None,
                    });
                    cur = None;
                }
            }
            let c = match cur.as_mut() {
                Some(c) => c,
                None => match dialer.open_stream().await.map(|(io, _)| io) {
                    Ok(io) => match h1_start(io).await {
                        Ok(c) => {
                            r.connections += 1;
                            cur.insert(c)
                        }
                        Err(e) => {
                            r.error = Some(e);
                            return r;
                        }
                    },
                    Err(e) => {
                        r.error = Some(format!("opening connection {}: {e}", r.connections + 1));
                        return r;
                    }
                },
            };
            let req = http::Request::get(&dialer.target.path)
                .header(http::header::HOST, dialer.target.authority())
                .header(http::header::USER_AGENT, super::USER_AGENT)
                .body(Empty::<Bytes>::new());
            let req = match req {
                Ok(q) => q,
                Err(e) => {
                    r.error = Some(format!("cannot build a request for {}: {e}", dialer.target.path));
                    return r;
                }
            };
            let exchange = async {
                let resp = c.sender.send_request(req).await?;
                let (parts, mut body) = resp.into_parts();
                // Drained frame by frame, not collected: the URL may be a large download.
                while let Some(frame) = body.frame().await {
                    frame?;
                }
                Ok::<_, hyper::Error>(parts)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(parts)) => {
                    last_done = Instant::now();
                    r.completed += 1;
                    r.statuses.push(Some(parts.status.as_u16()));
                    if let Some(s) = parts.headers.get(http::header::SERVER).and_then(|v| v.to_str().ok()) {
                        r.server = Some(s.to_string());
                    }
                    let close = parts
                        .headers
                        .get_all(http::header::CONNECTION)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(|v| v.split(','))
                        .any(|t| t.trim().eq_ignore_ascii_case("close"));
                    if close || parts.version == http::Version::HTTP_10 {
                        r.closes.push(Close {
                            after_request: k,
                            reason: "connection_close",
                            detail: if close {
                                format!("response {k} carried `Connection: close`")
                            } else {
                                format!("response {k} was HTTP/1.0 (no keep-alive)")
                            },
                            goaway: None,
                        });
                        cur = None;
                    }
                    break;
                }
                Ok(Err(e)) if !retried && (e.is_incomplete_message() || e.is_canceled() || e.is_closed()) => {
                    // The server closed the idle connection as this request went out.
                    retried = true;
                    r.closes.push(Close {
                        after_request: k - 1,
                        reason: "server_closed_idle",
                        detail: format!(
                            "the server closed the idle connection {:.0} ms after the last response, as request {k} was sent",
                            ms(last_done.elapsed())
                        ),
                        goaway: None,
                    });
                    cur = None;
                }
                Ok(Err(e)) => {
                    r.error = Some(format!("request {k}: {e}"));
                    return r;
                }
                Err(_) => {
                    r.error = Some(format!("request {k}: no complete response within {REQUEST_TIMEOUT:?}"));
                    return r;
                }
            }
        }
    }
    if let Some(c) = cur.as_mut() {
        if let Ok(Ok(at)) = tokio::time::timeout(IDLE_WATCH, &mut c.ended).await {
            r.idle_close_ms = Some(ms(at.saturating_duration_since(last_done)));
        }
    }
    r
}

/// Runs `n` GETs over HTTP/2, starting on `first` (already past the server's SETTINGS).
pub async fn http2(dialer: &Dialer, first: h2::Conn, n: u32) -> Reuse {
    let mut r = Reuse {
        protocol: if dialer.target.tls { "h2" } else { "h2c" }.into(),
        requests: n,
        connections: 1,
        ..Reuse::default()
    };
    let mut cur = Some(first);
    let authority = dialer.target.authority();
    // Requests served on the current connection, and on the last one the server ended with
    // GOAWAY: when the final connection ends after as many requests, that is the same request
    // limit again, not an idle timeout.
    let mut served = 0u32;
    let mut limit_seen = None;
    for k in 1..=n {
        let mut retried = false;
        loop {
            if let Some(c) = cur.as_mut() {
                if !c.usable().await {
                    let (reason, detail) = match &c.goaway {
                        Some(g) => (
                            "goaway",
                            format!("the server sent GOAWAY {} after request {}", g.code_name, k - 1),
                        ),
                        None => (
                            "server_closed_idle",
                            "the server closed the idle connection".to_string(),
                        ),
                    };
                    r.closes.push(Close {
                        after_request: k - 1,
                        reason,
                        detail,
                        goaway: c.goaway.clone(),
                    });
                    if reason == "goaway" {
                        limit_seen = Some(served);
                    }
                    if let Some(c) = cur.take() {
                        c.close().await;
                    }
                }
            }
            let c = match cur.as_mut() {
                Some(c) => c,
                None => {
                    let opened = match dialer.open_stream().await {
                        Ok((io, _)) => io,
                        Err(e) => {
                            r.error = Some(format!("opening connection {}: {e}", r.connections + 1));
                            return r;
                        }
                    };
                    let mut c = match h2::Conn::start(opened).await {
                        Ok(c) => c,
                        Err(e) => {
                            r.error = Some(format!("starting HTTP/2 on connection {}: {e}", r.connections + 1));
                            return r;
                        }
                    };
                    if let Err(e) = c.await_settings().await {
                        r.error = Some(format!("connection {}: {e}", r.connections + 1));
                        return r;
                    }
                    r.connections += 1;
                    served = 0;
                    cur.insert(c)
                }
            };
            match c
                .get(dialer.target.tls, &authority, &dialer.target.path, REQUEST_TIMEOUT)
                .await
            {
                StreamEnd::Done(status) => {
                    r.completed += 1;
                    served += 1;
                    r.statuses.push(status);
                    break;
                }
                StreamEnd::NotProcessed | StreamEnd::Reset(7) if !retried => {
                    retried = true;
                    let g = c.goaway.clone();
                    let (reason, detail) = match &g {
                        Some(g) => (
                            "goaway",
                            format!(
                                "the server sent GOAWAY {} before request {k} was processed",
                                g.code_name
                            ),
                        ),
                        None => (
                            "stream_refused",
                            format!("the server refused request {k}'s stream (REFUSED_STREAM)"),
                        ),
                    };
                    r.closes.push(Close {
                        after_request: k - 1,
                        reason,
                        detail,
                        goaway: g,
                    });
                    if reason == "goaway" {
                        limit_seen = Some(served);
                    }
                    if let Some(c) = cur.take() {
                        c.close().await;
                    }
                }
                StreamEnd::Closed(e) if !retried => {
                    retried = true;
                    r.closes.push(Close {
                        after_request: k - 1,
                        reason: if c.goaway.is_some() { "goaway" } else { "closed" },
                        detail: format!("the connection ended during request {k}: {e}"),
                        goaway: c.goaway.clone(),
                    });
                    cur = None;
                }
                StreamEnd::Reset(code) => {
                    r.error = Some(format!(
                        "request {k}: the server reset the stream with {}",
                        h2::error_name(code)
                    ));
                    return r;
                }
                StreamEnd::NotProcessed | StreamEnd::Closed(_) => {
                    r.error = Some(format!("request {k} failed twice, on two connections"));
                    return r;
                }
            }
        }
    }
    if let Some(mut c) = cur.take() {
        if let Some(t) = c.watch_idle(IDLE_WATCH).await {
            if c.goaway.is_some() && limit_seen == Some(served) {
                r.closes.push(Close {
                    after_request: n,
                    reason: "goaway",
                    detail: format!("the server sent GOAWAY after request {n}, as on the previous connection"),
                    goaway: c.goaway.clone(),
                });
            } else {
                r.idle_close_ms = Some(ms(t));
                r.idle_close_goaway = c.goaway.clone();
            }
        }
        c.close().await;
    }
    r
}
