//! Active health checks of the running upstreams: a checker task per upstream with
//! `[upstreams.health]`, probing each server with a real `GET path`, started with the server,
//! replaced on every reload and stopped at shutdown.
//!
//! A probe opens its own connection with the upstream's connection code (TCP, TLS and ALPN as
//! configured, HTTP/1.1 or HTTP/2) and closes it after the response head. It does not borrow a
//! pooled connection: a check must prove that a *new* connection works (a server whose accept
//! queue is stuck still answers on old connections), and probes must not skew the pool's reuse
//! metrics. One connection per server per `interval` is negligible load.

use super::connect::{self, Sender, UpBody};
use super::pool::MetricsSlot;
use super::resilience::health::{
    spawn_checker, CheckedServer, CheckerHandle, Health, HealthObserver, Probe, ProbeResult,
};
use super::upstream::{HostRewrite, Upstream, UpstreamSpec};
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// `User-Agent` of probes, so an upstream's access log tells checks from traffic.
const PROBE_USER_AGENT: &str = concat!("gatehouse-health-check/", env!("CARGO_PKG_VERSION"));

/// The checker tasks of the live upstreams.
#[derive(Debug, Default)]
pub struct HealthChecks {
    inner: Mutex<Checks>,
}

#[derive(Debug, Default)]
struct Checks {
    /// Set once the server runs: where checkers are spawned.
    runtime: Option<tokio::runtime::Handle>,
    running: Vec<CheckerHandle>,
}

impl HealthChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Checks> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts checkers for `live` on the current runtime; later reloads start theirs there too.
    /// Outside a runtime it does nothing (a library user serving without one has no checks).
    pub fn start(&self, live: &HashMap<Arc<str>, Arc<Upstream>>, metrics: &Arc<MetricsSlot>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!("active health checks need a tokio runtime; none is running, so none is started");
            return;
        };
        self.lock().runtime = Some(rt);
        self.replace(live, metrics);
    }

    /// Stops the checkers of the previous upstream set and starts one per upstream of `live`
    /// with `[upstreams.health]`, once started.
    pub fn replace(&self, live: &HashMap<Arc<str>, Arc<Upstream>>, metrics: &Arc<MetricsSlot>) {
        let mut checks = self.lock();
        // Dropping a handle tells its task to stop at its next await: no task outlives a reload.
        checks.running.clear();
        let Some(rt) = checks.runtime.clone() else { return };
        let _entered = rt.enter();
        for u in live.values() {
            let Some(settings) = u.spec.health.clone() else {
                continue;
            };
            let servers = u
                .servers
                .iter()
                .zip(&u.guards)
                .map(|(p, g)| CheckedServer {
                    name: p.server.0.clone(),
                    health: g.health.clone(),
                })
                .collect();
            let probe = Arc::new(HttpProbe { spec: u.spec.clone() });
            let checker = spawn_checker(settings, servers, probe, observer(u, metrics.clone()));
            checks.running.push(checker);
        }
    }

    /// Takes every running checker, to be stopped (at shutdown); none is started afterwards.
    pub fn stop(&self) -> Vec<CheckerHandle> {
        let mut checks = self.lock();
        checks.runtime = None;
        std::mem::take(&mut checks.running)
    }
}

/// Logs each change of a server's health and keeps `gatehouse_upstream_server_healthy` current.
fn observer(u: &Upstream, metrics: Arc<MetricsSlot>) -> HealthObserver {
    let upstream = u.spec.name.clone();
    Arc::new(move |server, event, error| {
        event.log(&upstream.0, &server.name, error);
        let labels = super::metrics::ServerLabels {
            upstream: upstream.clone(),
            server: crate::observe::Name(server.name.clone()),
        };
        let up = server.health.health() == Health::Healthy;
        metrics.load().server_healthy.get_or_create(&labels).set(i64::from(up));
    })
}

/// `GET path` to one server over a new connection; a 2xx or 3xx head is healthy.
struct HttpProbe {
    spec: Arc<UpstreamSpec>,
}

impl Probe for HttpProbe {
    fn probe(&self, server: usize, path: &str) -> Pin<Box<dyn Future<Output = ProbeResult> + Send>> {
        let spec = self.spec.clone();
        let path = path.to_owned();
        Box::pin(async move {
            let Some(addr) = spec.servers.get(server) else {
                return Err("no such server".to_owned());
            };
            let host = match &spec.host {
                HostRewrite::Fixed(v) => v.clone(),
                HostRewrite::Preserve | HostRewrite::Upstream => {
                    HeaderValue::from_str(addr).map_err(|_| "the server address is not a Host value".to_owned())?
                }
            };
            let c = connect::connect(&spec.connect, addr).await.map_err(|e| e.to_string())?;
            let body: UpBody = Empty::new().map_err(|e| match e {}).boxed_unsync();
            let head = Request::get(&path).header(header::USER_AGENT, PROBE_USER_AGENT);
            let status = match c.sender {
                Sender::H1(mut conn) => {
                    let (mut parts, ()) = head
                        .header(header::HOST, host)
                        .body(())
                        .map_err(|e| format!("cannot build the request: {e}"))?
                        .into_parts();
                    parts.version = http::Version::HTTP_11;
                    let req = super::h1::Request::new(&parts, &[], body)
                        .map_err(|e| format!("cannot build the request: {e}"))?;
                    match super::h1::send(&mut conn, req, false).await {
                        Ok(sent) => sent.status(),
                        Err(super::h1::Failure::Resend(e, _) | super::h1::Failure::Failed(e)) => {
                            return Err(format!("request failed: {e}"));
                        }
                    }
                }
                Sender::H2(mut h2) => {
                    let scheme = if spec.tls() { "https" } else { "http" };
                    let host = host.to_str().map_err(|_| "the Host is not visible ASCII".to_owned())?;
                    let req = head
                        .uri(format!("{scheme}://{host}{path}"))
                        .version(http::Version::HTTP_2)
                        .body(body)
                        .map_err(|e| format!("cannot build the request: {e}"))?;
                    h2.sender
                        .send_request(req)
                        .await
                        .map_err(|e| format!("request failed: {e}"))?
                        .status()
                }
            };
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("status {}", status.as_u16()))
            }
        })
    }
}
