//! The admin API: health, readiness, metrics, the live connection table, debug switches, config,
//! reload, binary upgrade.

pub mod client;
mod dashboard;
mod reload;
mod upgrade;

use crate::observe::{Name, PeerFilter, Switch, SwitchSet};
use crate::ServerHandle;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest admin request body (a switch update is a few hundred bytes).
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// What the admin API serves from.
pub struct Admin {
    /// Also the source of the configuration shown: the one in force, reloads included.
    pub handle: ServerHandle,
    pub token: Option<String>,
}

/// Binds the admin address; the caller reports failures with exit code 69.
pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, crate::listen::BindError> {
    crate::listen::bind("admin", address)
}

/// Serves the admin API on `listener` until the server has drained, or has handed the socket to a
/// binary upgrade's new process (whose admin API answers from then on).
pub async fn serve(listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register admin listener");
            return;
        }
    };
    let shutdown = admin.handle.trigger().subscribe();
    let h = &admin.handle;
    // The admin API needs descriptors like any listener: out of them, it must wait, not spin.
    let errors = crate::listen::AcceptErrors::new(Name(Arc::from("admin")), h.metrics.clone(), h.switches.clone());
    let mut acceptor = crate::listen::Acceptor::new(listener, errors);
    let stopped = || {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.forced() => {}
                _ = shutdown.handed_over() => {}
            }
        }
    };
    while let Some((tcp, _)) = acceptor.next(stopped()).await {
        let admin = admin.clone();
        let stopped = stopped();
        tokio::task::spawn_local(async move {
            // The process waits for this answer before it exits: it may be the one reporting
            // the upgrade that ends the process.
            let _owed = admin.handle.owe_answer();
            let svc = hyper::service::service_fn({
                let admin = admin.clone();
                move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&admin, req).await) }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped => {}
            }
            // Idle: closed now. Answering: closed once the answer is written.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", format!("{v}\n"))
}

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Probes (kubelet, load balancers) cannot present a secret, and these two answers reveal only
    // "up" and "ready": they stay open so a token-protected admin API can still be probed.
    // The dashboard page is static and holds no figures: it asks for them itself, with the token.
    let public = req.method() == Method::GET && matches!(req.uri().path(), "/healthz" | "/readyz" | "/");
    if let Some(token) = admin.token.as_ref().filter(|_| !public) {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()));
        if !ok {
            let mut r = respond(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                "a bearer token is required\n",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let h = &admin.handle;
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/") => dashboard::page(),
        (Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        (Method::GET, "/readyz") => {
            if h.is_ready() {
                respond(StatusCode::OK, "text/plain; charset=utf-8", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "not ready\n",
                )
            }
        }
        (Method::GET, "/metrics") => metrics(h, &req),
        (Method::GET, "/debug/connections") => connections(h, req.uri().query().unwrap_or("")),
        (Method::GET, "/debug/switches") => json(StatusCode::OK, switches_json(&h.switches.current())),
        (Method::PUT, "/debug/switches") => put_switches(admin, req).await,
        (Method::POST, "/reload") => reload::post(h).await,
        (Method::POST, "/upgrade") => upgrade::post(h).await,
        (Method::GET, "/config") => match serde_json::to_value(&*h.config()) {
            Ok(v) => json(StatusCode::OK, v),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            ),
        },
        (_, "/" | "/healthz" | "/readyz" | "/metrics" | "/debug/connections" | "/config") => {
            let mut r = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "method not allowed\n",
            );
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
        (_, "/reload" | "/upgrade") => {
            let mut r = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "method not allowed\n",
            );
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    }
}

/// OpenMetrics for a scraper that asks for it (Prometheus does, in its `Accept`), else the
/// Prometheus text format, which every other reader (curl, promtool, older servers) expects.
fn metrics(h: &ServerHandle, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| {
            let mut params = media.split(';').map(str::trim);
            params
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !params.any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0))
        });
    if openmetrics {
        respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            h.metrics.encode(),
        )
    } else {
        respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            h.metrics.encode_text(),
        )
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Values `/debug/connections?state=` and `?protocol=` accept (the registry's own names).
const STATES: &[&str] = &["handshaking", "idle", "busy", "closing", "closed"];
const PROTOCOLS: &[&str] = &["unknown", "http/1.1", "h2", "h2c"];

/// The live connection table, filtered by `listener`, `state` and `protocol`. A filter that names
/// nothing that can exist (a typo) is refused with 400, rather than answered with an empty table
/// that looks like "no such connections".
fn connections(h: &ServerHandle, query: &str) -> Response<Full<Bytes>> {
    let bad = |msg: String| json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": msg }));
    let (mut listener, mut state, mut protocol) = (None, None, None);
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned();
        match k {
            "listener" => {
                if !h.config().listeners.iter().any(|l| l.name == v) {
                    return bad(format!("no listener is named `{v}`"));
                }
                listener = Some(v);
            }
            "state" if STATES.contains(&v.as_str()) => state = Some(v),
            "protocol" if PROTOCOLS.contains(&v.as_str()) => protocol = Some(v),
            "state" => return bad(format!("`{v}` is not a state; use one of {}", STATES.join(", "))),
            "protocol" => return bad(format!("`{v}` is not a protocol; use one of {}", PROTOCOLS.join(", "))),
            other => {
                return bad(format!(
                    "unknown filter `{other}`; filter by listener, state or protocol"
                ))
            }
        }
    }
    let rows: Vec<serde_json::Value> = h
        .registry
        .snapshot()
        .iter()
        .filter(|c| listener.as_deref().is_none_or(|l| *c.listener == *l))
        .filter(|c| state.as_deref().is_none_or(|s| c.state().as_str() == s))
        .filter(|c| protocol.as_deref().is_none_or(|p| c.protocol().as_str() == p))
        .map(|c| {
            let tls = c.tls();
            serde_json::json!({
                "id": c.id,
                "listener": &*c.listener,
                "peer": c.peer.to_string(),
                "protocol": c.protocol().as_str(),
                "tls_version": tls.map(|t| t.version),
                "alpn": tls.and_then(|t| t.alpn.clone()),
                "state": c.state().as_str(),
                "age_ms": c.opened.elapsed().as_millis() as u64,
                "requests": c.requests(),
                "bytes_in": c.bytes_in(),
                "bytes_out": c.bytes_out(),
                "bytes_sendfile": c.bytes_sendfile(),
            })
        })
        .collect();
    json(StatusCode::OK, serde_json::json!({ "connections": rows }))
}

fn switches_json(set: &SwitchSet) -> serde_json::Value {
    serde_json::json!({
        "switches": set.switches().iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "listener": set.listener,
        "peer": set.peer.map(|p| p.to_string()),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchUpdate {
    switches: Vec<String>,
    #[serde(default)]
    listener: Option<String>,
    #[serde(default)]
    peer: Option<String>,
}

async fn put_switches(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let bad = |msg: String| json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": msg }));
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("cannot read body: {e}")),
    };
    let update: SwitchUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return bad(format!(
                "body must be {{\"switches\": [...], \"listener\": ..., \"peer\": ...}}: {e}"
            ))
        }
    };
    let mut switches = Vec::new();
    for s in &update.switches {
        match Switch::parse(s) {
            Some(sw) => switches.push(sw),
            None => {
                let known: Vec<_> = Switch::ALL.iter().map(|s| s.as_str()).collect();
                return bad(format!(
                    "`{s}` is not an available switch; use one of {}",
                    known.join(", ")
                ));
            }
        }
    }
    if let Some(l) = &update.listener {
        if !admin.handle.config().listeners.iter().any(|x| &x.name == l) {
            return bad(format!("no listener is named `{l}`"));
        }
    }
    let peer = match update.peer.as_deref().map(PeerFilter::parse).transpose() {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    let set = SwitchSet::new(&switches, update.listener, peer);
    admin.handle.switches.replace(set.clone());
    tracing::info!(switches = ?update.switches, "debug switches replaced");
    json(StatusCode::OK, switches_json(&set))
}
