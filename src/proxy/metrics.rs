//! The proxy's metrics: requests per upstream server, connections opened and why, and reuse.
//!
//! Label values are bounded: upstream names and server addresses come from configuration, and
//! statuses, causes and reasons are fixed sets (plus the numeric status codes).

use crate::observe::Name;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub upstream: Name,
    pub server: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub upstream: Name,
    pub server: Name,
    /// The upstream's status code, `error` when no response head arrived, or `cancelled` when
    /// the client went away first.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpenedLabels {
    pub upstream: Name,
    pub server: Name,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub upstream: Name,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub upstream: Name,
    pub server: Name,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub upstream: Name,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnavailableLabels {
    pub upstream: Name,
    /// Why the last server left was not tried: `breaker_open`, `unhealthy` or `ejected`.
    pub reason: &'static str,
}

/// Every proxy series. Cloning is cheap: each field is a shared handle.
#[derive(Clone, Debug, Default)]
pub struct UpstreamMetrics {
    pub requests: Family<StatusLabels, Counter>,
    pub connections_opened: Family<OpenedLabels, Counter>,
    pub new_connection_reasons: Family<ReasonLabels, Counter>,
    pub reuse_ratio: Family<UpstreamLabels, Gauge<f64, AtomicU64>>,
    pub errors: Family<CauseLabels, Counter>,
    pub alpn_fallback: Family<ServerLabels, Counter>,
    pub cancelled: Family<PhaseLabels, Counter>,
    /// 1 while active health checks hold the server healthy, 0 while they hold it unhealthy.
    pub server_healthy: Family<ServerLabels, Gauge>,
    pub ejections: Family<ServerLabels, Counter>,
    pub unavailable: Family<UnavailableLabels, Counter>,
    // Not exposed: the two terms of `reuse_ratio`, kept per upstream across reloads.
    pub(crate) sent: Family<UpstreamLabels, Counter>,
    pub(crate) sent_reused: Family<UpstreamLabels, Counter>,
}

/// The series that one server's responses with one status count in, kept by the server's pool:
/// looking them up by their labels (hashing them, under each family's lock) cost every proxied
/// request about 2,500 instructions (callgrind), four lookups for the same answer each time.
pub(super) struct SentSeries {
    /// The metrics the handles belong to: the pool's are swapped for the server's at start.
    metrics: Arc<UpstreamMetrics>,
    status: http::StatusCode,
    requests: Counter,
    sent: Counter,
    sent_reused: Counter,
    reuse_ratio: Gauge<f64, AtomicU64>,
}

impl SentSeries {
    pub(super) fn new(
        metrics: &Arc<UpstreamMetrics>,
        upstream: &Name,
        server: &Name,
        status: http::StatusCode,
    ) -> Self {
        let labels = UpstreamLabels {
            upstream: upstream.clone(),
        };
        SentSeries {
            metrics: metrics.clone(),
            status,
            requests: metrics
                .requests
                .get_or_create(&StatusLabels {
                    upstream: upstream.clone(),
                    server: server.clone(),
                    status: status.as_str().to_string(),
                })
                .clone(),
            sent: metrics.sent.get_or_create(&labels).clone(),
            sent_reused: metrics.sent_reused.get_or_create(&labels).clone(),
            reuse_ratio: metrics.reuse_ratio.get_or_create(&labels).clone(),
        }
    }

    /// Whether these are the series for `status` in `metrics`.
    pub(super) fn counts_for(&self, metrics: &Arc<UpstreamMetrics>, status: http::StatusCode) -> bool {
        self.status == status && Arc::ptr_eq(&self.metrics, metrics)
    }

    /// Counts one response head, and the connection it came on for the reuse ratio.
    pub(super) fn count(&self, reused: bool) {
        self.requests.inc();
        let all = self.sent.inc() + 1;
        let reused_count = if reused {
            self.sent_reused.inc() + 1
        } else {
            self.sent_reused.get()
        };
        self.reuse_ratio.set(reused_count as f64 / all as f64);
    }
}

impl UpstreamMetrics {
    /// Registers every exposed series under `registry` (which carries the `gatehouse` prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "upstream_requests",
            "Requests sent to upstream servers, by the status they answered (error: no response; cancelled: the client left first)",
            self.requests.clone(),
        );
        r.register(
            "upstream_connections_opened",
            "Connections opened to upstream servers, by the protocol they speak",
            self.connections_opened.clone(),
        );
        r.register(
            "upstream_new_connection_reasons",
            "Why a request could not use a pooled upstream connection and a new one was opened",
            self.new_connection_reasons.clone(),
        );
        r.register(
            "upstream_connection_reuse_ratio",
            "Per upstream since start: requests sent on a connection that had carried a request before / all requests sent",
            self.reuse_ratio.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream exchanges that failed, by cause",
            self.errors.clone(),
        );
        r.register(
            "upstream_alpn_fallback",
            "Connections of a protocol = \"auto\" upstream on which the server chose http/1.1 over h2",
            self.alpn_fallback.clone(),
        );
        r.register(
            "upstream_cancelled",
            "Upstream requests abandoned because the client went away, by phase (response_headers, response_body)",
            self.cancelled.clone(),
        );
        r.register(
            "upstream_server_healthy",
            "Active health checks: 1 while the server is healthy, 0 while unhealthy ([upstreams.health] only)",
            self.server_healthy.clone(),
        );
        r.register(
            "upstream_ejections",
            "Servers taken out of rotation for a while after consecutive failed requests (passive health)",
            self.ejections.clone(),
        );
        r.register(
            "upstream_unavailable",
            "Requests for which no server of the upstream could be tried, by why the last one was skipped",
            self.unavailable.clone(),
        );
    }
}
