//! Routing: `[[routes]]` matched by host and path prefix, first match wins.

mod admission;

pub use admission::Admission;

use crate::config::{Builtin, Config, Findings, RouteConfig, StaticCacheConfig};
use crate::handlers::{self, StaticFiles};
use crate::http::body::ResponseBody;
use crate::http::RequestBody;
use crate::proxy::resilience::classes::InFlight;
use crate::proxy::resilience::metrics::ResilienceMetrics;
use crate::proxy::{Gateway, UpstreamSpec};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A host pattern: exact name, `*.example.com` (one or more labels), or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// The suffix including the leading dot: `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> HostPattern {
        let s = s.trim().to_ascii_lowercase();
        if s == "*" {
            HostPattern::Any
        } else if let Some(rest) = s.strip_prefix('*') {
            HostPattern::Wildcard(rest.to_string())
        } else {
            HostPattern::Exact(s)
        }
    }
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(suffix.as_str())
            }
        }
    }
}

/// What a route does with a request.
#[derive(Clone, Debug)]
pub enum Handler {
    Static(StaticFiles),
    Redirect {
        target: String,
        status: StatusCode,
    },
    Respond {
        status: StatusCode,
        body: Bytes,
        content_type: HeaderValue,
    },
    ConnectionInfo,
    /// Forward to the named `[[upstreams]]` entry.
    Proxy {
        upstream: Arc<str>,
    },
}

#[derive(Clone, Debug)]
pub struct Route {
    pub host: HostPattern,
    /// Path prefix without a trailing slash ("" for "/").
    pub prefix: String,
    pub handler: Handler,
    /// Index of the route's `rate_limit` in the table's [`Admission`].
    pub rate_limit: Option<usize>,
}

impl Route {
    /// The part of `path` after this route's prefix, when the prefix matches on a segment boundary.
    fn strip<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.prefix.as_str())?;
        (rest.is_empty() || rest.starts_with('/') || self.prefix.is_empty()).then_some(rest)
    }
}

/// The compiled `[[routes]]`, and the `[[upstreams]]` their proxy routes use.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    pub upstreams: Vec<Arc<UpstreamSpec>>,
    /// Rate limits and traffic classes.
    pub admission: Admission,
}

impl RouteTable {
    /// Compiles the routes and upstreams; problems (a static directory that cannot be opened, an
    /// unreadable CA file) go to `f`.
    pub fn build(config: &Config, f: &mut Findings) -> RouteTable {
        let admission = Admission::build(config);
        let routes = config
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let mut route = compile(i, r, &config.static_cache, f)?;
                route.rate_limit = r.rate_limit.as_deref().and_then(|n| admission.limit_index(n));
                Some(route)
            })
            .collect();
        RouteTable {
            routes,
            upstreams: crate::proxy::compile(config, f),
            admission,
        }
    }
}

fn compile(i: usize, r: &RouteConfig, cache: &StaticCacheConfig, f: &mut Findings) -> Option<Route> {
    let handler = if let Some(dir) = &r.static_dir {
        match StaticFiles::new(dir, cache) {
            Ok(s) => Handler::Static(s),
            Err(e) => {
                f.error(
                    format!("routes[{i}].static"),
                    format!("cannot open {}: {e}", dir.display()),
                    "point static at a readable directory",
                );
                return None;
            }
        }
    } else if let Some(target) = &r.redirect {
        let status = StatusCode::from_u16(r.redirect_status.unwrap_or(308)).ok()?;
        Handler::Redirect {
            target: target.trim_end_matches('/').to_string(),
            status,
        }
    } else if let Some(resp) = &r.respond {
        let ct = resp.content_type.as_deref().unwrap_or("text/plain; charset=utf-8");
        Handler::Respond {
            status: StatusCode::from_u16(resp.status).ok()?,
            body: Bytes::from(resp.body.clone()),
            content_type: HeaderValue::from_str(ct).ok()?,
        }
    } else if let Some(Builtin::ConnectionInfo) = r.builtin {
        Handler::ConnectionInfo
    } else if let Some(name) = &r.proxy {
        Handler::Proxy {
            upstream: Arc::from(name.as_str()),
        }
    } else {
        return None; // a route with no usable handler was reported by Config::validate
    };
    Some(Route {
        host: HostPattern::parse(&r.host),
        prefix: r.path.trim_end_matches('/').to_string(),
        handler,
        rate_limit: None,
    })
}

/// The binary's request handler: a tower service over the live route table and upstreams.
#[derive(Clone, Debug)]
pub struct Router {
    table: Arc<ArcSwap<RouteTable>>,
    gateway: Arc<Gateway>,
    /// Shedding and rate limit series; the server's once it exposes them.
    resilience: Arc<ArcSwap<ResilienceMetrics>>,
}

impl Router {
    pub fn new(table: RouteTable) -> Self {
        let gateway = Arc::new(Gateway::default());
        gateway.apply(&table.upstreams);
        Router {
            table: Arc::new(ArcSwap::from_pointee(table)),
            gateway,
            resilience: Arc::default(),
        }
    }
    /// Replaces the routes and upstreams for new requests; requests in flight keep the table
    /// they started with. Upstream servers that remain keep their pooled connections; rate limits
    /// and traffic classes keep their state (see [`Admission::continue_from`]).
    pub fn replace(&self, mut table: RouteTable) {
        table.admission.continue_from(&self.table.load().admission);
        self.gateway.apply(&table.upstreams);
        self.table.store(Arc::new(table));
    }
    /// Records the proxy's metrics into `metrics` (the server's, which exposes them).
    pub fn set_upstream_metrics(&self, metrics: crate::proxy::UpstreamMetrics) {
        self.gateway.set_metrics(metrics);
    }
    /// Records shedding, rate limiting, breaker states, retries and fallbacks into `metrics`
    /// (the server's, which exposes them).
    pub fn set_resilience_metrics(&self, metrics: ResilienceMetrics) {
        self.gateway.set_resilience_metrics(metrics.clone());
        self.resilience.store(Arc::new(metrics));
    }
    /// Starts the upstreams' active health checks on the current runtime (the server does this
    /// when it starts serving; reloads then replace them).
    pub fn start_health_checks(&self) {
        self.gateway.start_health_checks();
    }
    /// Stops the active health checks (the server does this once drained).
    pub async fn stop_health_checks(&self) {
        self.gateway.stop_health_checks().await;
    }
}

/// The router's answer. A fixed answer, a redirect or a 404 for a request without a body is
/// ready at once; anything that waits (a file, an upstream, a body to read first, a rate limit)
/// is a boxed future. Building the fixed answers in `call` spares them the box and the moves of
/// the large routing future, about 1,000 of an HTTP/1.1 request's 17,000 user-space
/// instructions (callgrind).
pub struct RouterFuture(RouterAnswer);

// The ready answer stays inline on purpose: boxing it would cost the allocation this avoids.
#[allow(clippy::large_enum_variant)]
enum RouterAnswer {
    Ready(std::future::Ready<Result<Response<ResponseBody>, Infallible>>),
    Waiting(Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>),
}

impl Future for RouterFuture {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            RouterAnswer::Ready(r) => Pin::new(r).poll(cx),
            RouterAnswer::Waiting(f) => f.as_mut().poll(cx),
        }
    }
}

impl tower_service::Service<Request<RequestBody>> for Router {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = RouterFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> RouterFuture {
        let table = self.table.load();
        match way(&table, &req) {
            Way::Now(resp) => RouterFuture(RouterAnswer::Ready(std::future::ready(Ok(resp)))),
            Way::File { index, rest_at } => {
                let table = arc_swap::Guard::into_inner(table);
                RouterFuture(RouterAnswer::Waiting(Box::pin(serve_file(table, index, rest_at, req))))
            }
            Way::Proxy { index } => {
                let table = arc_swap::Guard::into_inner(table);
                let gateway = self.gateway.clone();
                let resilience = self.resilience.clone();
                RouterFuture(RouterAnswer::Waiting(Box::pin(async move {
                    Ok(proxy(&table, &gateway, &resilience, index, req).await)
                })))
            }
            Way::Route => {
                let table = arc_swap::Guard::into_inner(table);
                let gateway = self.gateway.clone();
                // The metrics are loaded only by a refusal: a request that passes costs one `Arc` clone.
                let resilience = self.resilience.clone();
                RouterFuture(RouterAnswer::Waiting(Box::pin(async move {
                    Ok(route(&table, &gateway, &resilience, req).await)
                })))
            }
        }
    }
}

/// The route for the request's host and `path` (with its index in the table), and the rest of
/// the path after its prefix. The host is read only when a route names one: most tables match any.
fn lookup<'t, 'p, B>(table: &'t RouteTable, req: &Request<B>, path: &'p str) -> Option<(usize, &'t Route, &'p str)> {
    let mut host = None;
    table.routes.iter().enumerate().find_map(|(i, r)| {
        let matched = match &r.host {
            HostPattern::Any => true,
            pattern => pattern.matches(host.get_or_insert_with(|| request_host(req))),
        };
        if matched {
            r.strip(path).map(|rest| (i, r, rest))
        } else {
            None
        }
    })
}

/// How the router answers a request. Short-lived, returned by value: boxing the answer would
/// cost the allocation the ready path avoids.
#[allow(clippy::large_enum_variant)]
enum Way {
    /// From the request head alone: a fixed answer, a redirect, the connection info, a 404.
    Now(Response<ResponseBody>),
    /// A static file: the route's index, and where the rest of the path starts after its prefix.
    File { index: usize, rest_at: usize },
    /// The proxy, on the route with this index (its body, if any, streams upstream).
    Proxy { index: usize },
    /// With the whole routing future: a body to read first, a rate limit.
    Route,
}

fn way(table: &RouteTable, req: &Request<RequestBody>) -> Way {
    let bodiless = http_body::Body::is_end_stream(req.body());
    let path = req.uri().path();
    let Some((index, route, rest)) = lookup(table, req, path) else {
        if bodiless {
            return Way::Now(handlers::text(StatusCode::NOT_FOUND, "not found\n"));
        }
        return Way::Route;
    };
    if route.rate_limit.is_some() {
        return Way::Route;
    }
    match route.handler {
        Handler::Proxy { .. } => Way::Proxy { index },
        _ if !bodiless => Way::Route,
        Handler::Static(_) => Way::File {
            index,
            rest_at: path.len() - rest.len(),
        },
        _ => answer_from_head(route, rest, req).map_or(Way::Route, Way::Now),
    }
}

/// Serves a file for a [`Way::File`] request: a future of about 500 bytes that holds the
/// request and the file lookup, rather than the whole routing future (2 KiB, every handler's
/// states) boxed and moved for each file.
async fn serve_file(
    table: Arc<RouteTable>,
    index: usize,
    rest_at: usize,
    req: Request<RequestBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let Some(Handler::Static(files)) = table.routes.get(index).map(|r| &r.handler) else {
        return Ok(handlers::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error\n",
        ));
    };
    let rest = req.uri().path().get(rest_at..).unwrap_or("");
    Ok(serve_from(files, rest, &req).await)
}

/// A file for `req` from `files`, sent with `sendfile` where the connection can.
async fn serve_from(files: &StaticFiles, rest: &str, req: &Request<RequestBody>) -> Response<ResponseBody> {
    let mut resp = files.serve(req.method(), rest, req.headers()).await;
    if let ResponseBody::File(body) = resp.body_mut() {
        if let Some(ctx) = req.body().context() {
            body.sendfile_via(&ctx.conn);
        }
    }
    resp
}

/// The client's address; a request that did not come through the pipeline shares one.
fn client_ip(req: &Request<RequestBody>) -> std::net::IpAddr {
    req.body()
        .context()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.conn.peer.ip())
}

/// Fixed answers, redirects and the connection info: built from the request head alone.
fn answer_from_head(route: &Route, rest: &str, req: &Request<RequestBody>) -> Option<Response<ResponseBody>> {
    if req.method() == Method::CONNECT && !matches!(route.handler, Handler::Static(_) | Handler::Proxy { .. }) {
        // A 2xx answer to CONNECT means "tunnel established" (RFC 9110 §9.3.6): hyper would
        // hand the connection over to a tunnel nobody serves, and the client would take a fixed
        // answer for a tunnel. Only the proxy tunnels (WebSocket); these routes do not.
        return Some(handlers::text(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not served by this route\n",
        ));
    }
    Some(match &route.handler {
        Handler::Redirect { target, status } => {
            let mut location = format!(
                "{target}{}",
                if rest.starts_with('/') || rest.is_empty() {
                    rest
                } else {
                    "/"
                }
            );
            if let Some(q) = req.uri().query() {
                location.push('?');
                location.push_str(q);
            }
            let mut r = Response::new(ResponseBody::empty());
            *r.status_mut() = *status;
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    r.headers_mut().insert(header::LOCATION, v);
                    r
                }
                Err(_) => handlers::text(StatusCode::BAD_REQUEST, "bad request path\n"),
            }
        }
        Handler::Respond {
            status,
            body,
            content_type,
        } => {
            let mut r = Response::new(ResponseBody::full(body.clone()));
            *r.status_mut() = *status;
            r.headers_mut().insert(header::CONTENT_TYPE, content_type.clone());
            r
        }
        Handler::ConnectionInfo => handlers::connection_info(req.body().context(), req.headers()),
        Handler::Static(_) | Handler::Proxy { .. } => return None,
    })
}

fn request_host<B>(req: &Request<B>) -> &str {
    let raw = req
        .uri()
        .host()
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    crate::http::strip_port(raw)
}

/// Reads and drops the request body before a built-in handler answers, as nginx does. An unread
/// HTTP/1.1 body leaves the connection unusable for the next request (hyper closes it), and a body
/// that breaks its framing or the size limit must surface: the pipeline turns those into 400/413
/// with `Connection: close` from the body's state, whatever this returns.
async fn discard_body(body: &mut RequestBody) -> Result<(), crate::http::body::BoxError> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

async fn route(
    table: &RouteTable,
    gateway: &Gateway,
    resilience: &ArcSwap<ResilienceMetrics>,
    req: Request<RequestBody>,
) -> Response<ResponseBody> {
    let found = lookup(table, &req, req.uri().path()).map(|(_, r, rest)| (r, rest.to_string()));
    // Before the handler (and before the body is read): a refused request costs nothing more.
    let admitted = match found.as_ref().and_then(|(r, _)| r.rate_limit) {
        None => None,
        Some(limit) => match table.admission.check_rate(limit, &req, client_ip(&req), resilience) {
            Ok(admitted) => admitted,
            Err(limited) => return *limited,
        },
    };
    // One await of `dispatch`, not one per branch: each await point would hold a copy of its
    // (large) future in this one, which the router copies into a box for every request.
    let mut resp = dispatch(table, gateway, resilience, found, req).await;
    if let Some(a) = admitted {
        a.add_headers(resp.headers_mut());
    }
    resp
}

/// Proxies a request on the route at `index` (one without a rate limit, see [`Way::Proxy`]):
/// the proxy's future inline in the one box the router makes, rather than boxed again inside
/// the routing future's box.
async fn proxy(
    table: &RouteTable,
    gateway: &Gateway,
    resilience: &ArcSwap<ResilienceMetrics>,
    index: usize,
    req: Request<RequestBody>,
) -> Response<ResponseBody> {
    let Some(Handler::Proxy { upstream }) = table.routes.get(index).map(|r| &r.handler) else {
        return handlers::text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
    };
    let (u, slot) = match admit(table, gateway, resilience, upstream, &req) {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    hold_slot(crate::proxy::forward(u, req).await, slot)
}

/// An upstream a request may go to, and the slot of its traffic class (when it has classes).
type Admitted = (Arc<crate::proxy::Upstream>, Option<InFlight>);

/// The upstream named `upstream`, and the slot of its traffic class if it has any; or the answer
/// when the class sheds the request.
fn admit(
    table: &RouteTable,
    gateway: &Gateway,
    resilience: &ArcSwap<ResilienceMetrics>,
    upstream: &str,
    req: &Request<RequestBody>,
) -> Result<Admitted, Box<Response<ResponseBody>>> {
    let Some(u) = gateway.get(upstream) else {
        // Only a request racing a reload that removed the upstream can get here.
        return Err(Box::new(handlers::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream not configured\n",
        )));
    };
    let slot = table.admission.admit(&u, req.headers(), resilience)?;
    Ok((u, slot))
}

/// The class slot is held until the response body ends (a streamed response keeps the upstream
/// busy); any other answer is complete here, and the slot drops now.
fn hold_slot(mut resp: Response<ResponseBody>, slot: Option<InFlight>) -> Response<ResponseBody> {
    if let (Some(slot), ResponseBody::Upstream(body)) = (slot, resp.body_mut()) {
        body.hold(slot);
    }
    resp
}

async fn dispatch(
    table: &RouteTable,
    gateway: &Gateway,
    resilience: &ArcSwap<ResilienceMetrics>,
    found: Option<(&Route, String)>,
    mut req: Request<RequestBody>,
) -> Response<ResponseBody> {
    // A proxied body streams to the upstream; every other handler answers without it.
    if let Some((
        Route {
            handler: Handler::Proxy { upstream },
            ..
        },
        _,
    )) = &found
    {
        let (u, slot) = match admit(table, gateway, resilience, upstream, &req) {
            Ok(admitted) => admitted,
            Err(refused) => return *refused,
        };
        // Boxed: the proxy's state is most of a route's, and inline it would make every request's
        // future (a static file's, a fixed answer's) that large, allocated and moved on each call.
        let resp = Box::pin(crate::proxy::forward(u, req)).await;
        return hold_slot(resp, slot);
    }
    if discard_body(req.body_mut()).await.is_err() {
        return handlers::text(StatusCode::BAD_REQUEST, "request body could not be read\n");
    }
    let Some((route, rest)) = found else {
        return handlers::text(StatusCode::NOT_FOUND, "not found\n");
    };
    let rest = rest.as_str();
    if let Handler::Static(files) = &route.handler {
        return serve_from(files, rest, &req).await;
    }
    // The proxy was handled above; every other handler answers from the head.
    answer_from_head(route, rest, &req)
        .unwrap_or_else(|| handlers::text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert!(HostPattern::parse("*").matches("x"));
        assert!(HostPattern::parse("A.example.com").matches("a.EXAMPLE.com"));
        let w = HostPattern::parse("*.example.com");
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
    }

    #[test]
    fn routes_naming_a_host_match_it_and_any_host_routes_match_the_rest() {
        let route = |host: &str, prefix: &str| Route {
            host: HostPattern::parse(host),
            prefix: prefix.into(),
            handler: Handler::ConnectionInfo,
            rate_limit: None,
        };
        let table = RouteTable {
            // An any-host route first: the host is not read for it, but still for the next ones.
            routes: vec![
                route("*", "/any"),
                route("a.example", ""),
                route("*.b.example", ""),
                route("*", ""),
            ],
            upstreams: Vec::new(),
            admission: Admission::build(&Config::default()),
        };
        let index = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            let req = b.body(()).unwrap();
            lookup(&table, &req, req.uri().path()).map(|(i, _, _)| i)
        };
        assert_eq!(index("/any/x", Some("a.example")), Some(0));
        assert_eq!(index("/x", Some("A.Example:8080")), Some(1));
        assert_eq!(index("/x", Some("c.b.example")), Some(2));
        assert_eq!(index("/x", Some("c.example")), Some(3));
        assert_eq!(index("/x", None), Some(3));
        // The target's authority is the host when there is one.
        assert_eq!(index("http://a.example/x", Some("a.example")), Some(1));
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let r = Route {
            host: HostPattern::Any,
            prefix: "/api".into(),
            handler: Handler::ConnectionInfo,
            rate_limit: None,
        };
        assert_eq!(r.strip("/api"), Some(""));
        assert_eq!(r.strip("/api/x"), Some("/x"));
        assert_eq!(r.strip("/apix"), None);
        let root = Route { prefix: "".into(), ..r };
        assert_eq!(root.strip("/anything"), Some("/anything"));
    }
}
