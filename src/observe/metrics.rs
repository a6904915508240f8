//! Prometheus metrics: every `gatehouse_*` series from SPEC.md, and their exposition.
//!
//! Label values are bounded: listener names come from configuration, methods outside the
//! standard set collapse to `OTHER`, and no path or client address is ever a label.

use crate::conn::{CloseReason, Registry};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;
use std::collections::HashMap;
use std::sync::Arc;

/// A configuration-defined name used as a label value (listener, upstream).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub listener: Name,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: Name,
    pub result: &'static str,
    pub tls_version: &'static str,
    pub alpn: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: Name,
    pub protocol: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub listener: Name,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub listener: Name,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    pub listener: Name,
    pub frame: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpenLabels {
    listener: Name,
    protocol: &'static str,
    state: &'static str,
}

fn duration_histogram() -> Histogram {
    // 100µs .. ~52s: covers cached static files through slow upstreams.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 20,
    ))
}

/// The request series a connection counted last.
///
/// A `Family` lookup hashes the whole label set (SipHash, listener name included) under a lock:
/// the two per request were about 750 of an HTTP/1.1 request's 19,000 user-space instructions
/// (callgrind). A keep-alive connection's requests mostly share method and status, so the
/// connection keeps the last pair of handles; series are never removed from these families, so
/// a kept handle always counts into the exposed series. Boxed, and dropped when an idle
/// connection parks: such a connection pays one pointer for it.
#[derive(Debug, Default)]
pub struct RequestMetricsCache(std::sync::Mutex<Option<Box<RequestSeries>>>);

#[derive(Debug)]
struct RequestSeries {
    protocol: &'static str,
    method: &'static str,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

impl RequestMetricsCache {
    /// Drops the kept handles (an idle connection parks with as little as it can).
    pub fn forget(&self) {
        if let Ok(mut slot) = self.0.try_lock() {
            *slot = None;
        }
    }
}

impl RequestSeries {
    fn observe(&self, secs: f64) {
        self.requests.inc();
        self.duration.observe(secs);
    }
}

/// Every metric the server records. Cloning is cheap: each field is a shared handle.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub connections_accepted: Family<ListenerLabels, Counter>,
    pub connections_rejected: Family<ReasonLabels, Counter>,
    pub connections_closed: Family<ReasonLabels, Counter>,
    pub accept_errors: Family<ReasonLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub alpn_fallback: Family<ReasonLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<ProtocolLabels, Histogram, fn() -> Histogram>,
    pub timeouts: Family<TimeoutLabels, Counter>,
    pub panics: Family<ListenerLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    /// Binary upgrades, by result (`ok`: a new process took over; `failed`: this one kept serving).
    pub upgrades: Family<ResultLabels, Counter>,
    pub reload_timestamp: Family<ResultLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub ready: Gauge,
    pub h2_goaway_sent: Family<ReasonLabels, Counter>,
    pub h2_resets_sent: Family<ReasonLabels, Counter>,
    pub h2_flood: Family<FrameLabels, Counter>,
    pub access_log_dropped: Counter,
    pub trace: crate::observe::otel::TraceMetrics,
    /// The reverse proxy's series (`gatehouse_upstream_*`).
    pub upstream: crate::proxy::UpstreamMetrics,
    /// The proxy's resilience series (breaker state, retries, fallbacks, shedding, rate limits).
    pub resilience: crate::proxy::resilience::metrics::ResilienceMetrics,
    registry: Arc<PromRegistry>,
}

impl Metrics {
    /// Creates every series and registers the live-connection collector over `conns`.
    pub fn new(conns: Arc<Registry>) -> Metrics {
        // The standard `process_*` series carry no prefix: dashboards and alerts expect them so.
        let mut root = PromRegistry::default();
        root.register_collector(Box::new(super::process::ProcessCollector));
        let r = root.sub_registry_with_prefix("gatehouse");
        let m = Metrics {
            connections_accepted: Family::default(),
            connections_rejected: Family::default(),
            connections_closed: Family::default(),
            accept_errors: Family::default(),
            tls_handshakes: Family::default(),
            alpn_fallback: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            timeouts: Family::default(),
            panics: Family::default(),
            reloads: Family::default(),
            upgrades: Family::default(),
            reload_timestamp: Family::default(),
            ready: Gauge::default(),
            h2_goaway_sent: Family::default(),
            h2_resets_sent: Family::default(),
            h2_flood: Family::default(),
            access_log_dropped: Counter::default(),
            trace: Default::default(),
            upstream: crate::proxy::UpstreamMetrics::default(),
            resilience: Default::default(),
            registry: Arc::new(PromRegistry::default()),
        };
        r.register(
            "connections_accepted",
            "Connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_rejected",
            "Connections refused at accept (max_connections, per_ip, draining)",
            m.connections_rejected.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed, by close reason",
            m.connections_closed.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accepts, by reason (emfile, enfile, enomem, enobufs: backed off; econnaborted, other)",
            m.accept_errors.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes, by result, version and negotiated ALPN",
            m.tls_handshakes.clone(),
        );
        r.register(
            "alpn_fallback",
            "Connections served HTTP/1.1 although HTTP/2 was configured, by reason",
            m.alpn_fallback.clone(),
        );
        r.register("requests", "Requests answered", m.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from request headers to the end of the response body",
            prometheus_client::registry::Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register("timeouts", "Timeouts that fired, by phase", m.timeouts.clone());
        r.register("panics", "Handler panics turned into 500 responses", m.panics.clone());
        r.register("reloads", "Configuration reloads, by result", m.reloads.clone());
        r.register(
            "upgrades",
            "Binary upgrades, by result (ok: a new process took over; failed: this one kept serving)",
            m.upgrades.clone(),
        );
        for result in ["ok", "failed"] {
            let _ = m.upgrades.get_or_create(&ResultLabels { result });
        }
        r.register(
            "ready",
            "1 when the server is ready for traffic, 0 while starting or draining",
            m.ready.clone(),
        );
        r.register(
            "h2_goaway_sent",
            "HTTP/2 GOAWAY frames sent, by reason",
            m.h2_goaway_sent.clone(),
        );
        r.register(
            "h2_resets_sent",
            "HTTP/2 RST_STREAM frames sent, by error code",
            m.h2_resets_sent.clone(),
        );
        r.register(
            "h2_flood",
            "HTTP/2 connections closed for exceeding max_control_frames_per_second, by the frame type that overflowed",
            m.h2_flood.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access log lines dropped because the sink was too slow",
            m.access_log_dropped.clone(),
        );
        m.trace.register(r);
        r.register_with_unit(
            "reload_last_timestamp",
            "When the last reload with this result finished, in seconds since the epoch",
            prometheus_client::registry::Unit::Seconds,
            m.reload_timestamp.clone(),
        );
        m.upstream.register(r);
        m.resilience.register(r);
        r.register_collector(Box::new(OpenConnections { conns }));
        Metrics {
            registry: Arc::new(root),
            ..m
        }
    }

    /// The OpenMetrics text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format (version 0.0.4) of every series, for scrapers that do not ask
    /// for OpenMetrics (curl, `promtool check metrics`, older Prometheus servers).
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }

    pub fn connection_closed(&self, listener: &Name, reason: CloseReason) {
        self.connections_closed
            .get_or_create(&ReasonLabels {
                listener: listener.clone(),
                reason: reason.as_str(),
            })
            .inc();
        // A body timeout is counted where it fires, in the request pipeline: on HTTP/2 it ends
        // one stream, not the connection, so counting it at close would miss those.
        if let Some(kind) = reason.timeout_kind().filter(|_| reason != CloseReason::BodyTimeout) {
            self.timeout(listener, kind);
        }
    }

    /// Counts one answered request and its duration. `cache` is the connection's: see
    /// [`RequestMetricsCache`].
    pub fn request_done(
        &self,
        cache: &RequestMetricsCache,
        listener: &Name,
        protocol: &'static str,
        method: &'static str,
        status: u16,
        secs: f64,
    ) {
        // An HTTP/2 stream finishing while another of the connection's holds the cache looks
        // the series up instead of waiting.
        let Ok(mut slot) = cache.0.try_lock() else {
            return self.request_series(listener, protocol, method, status).observe(secs);
        };
        match &mut *slot {
            Some(c) if c.status == status && c.method == method && c.protocol == protocol => c.observe(secs),
            kept => {
                let c = self.request_series(listener, protocol, method, status);
                c.observe(secs);
                match kept {
                    Some(b) => **b = c,
                    None => *slot = Some(Box::new(c)),
                }
            }
        }
    }

    fn request_series(
        &self,
        listener: &Name,
        protocol: &'static str,
        method: &'static str,
        status: u16,
    ) -> RequestSeries {
        let requests = self
            .requests
            .get_or_create(&RequestLabels {
                listener: listener.clone(),
                protocol,
                method,
                status,
            })
            .clone();
        let duration = self
            .request_duration
            .get_or_create(&ProtocolLabels {
                listener: listener.clone(),
                protocol,
            })
            .clone();
        RequestSeries {
            protocol,
            method,
            status,
            requests,
            duration,
        }
    }

    pub fn timeout(&self, listener: &Name, kind: &'static str) {
        self.timeouts
            .get_or_create(&TimeoutLabels {
                listener: listener.clone(),
                kind,
            })
            .inc();
    }

    pub fn rejected(&self, listener: &Name, reason: &'static str) {
        self.connections_rejected
            .get_or_create(&ReasonLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn accept_error(&self, listener: &Name, reason: &'static str) {
        self.accept_errors
            .get_or_create(&ReasonLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn alpn_fallback(&self, listener: &Name, reason: &'static str) {
        self.alpn_fallback
            .get_or_create(&ReasonLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn h2_reset_sent(&self, listener: &Name, reason: &'static str) {
        self.h2_resets_sent
            .get_or_create(&ReasonLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn h2_flood(&self, listener: &Name, frame: &'static str) {
        self.h2_flood
            .get_or_create(&FrameLabels {
                listener: listener.clone(),
                frame,
            })
            .inc();
    }

    pub fn goaway(&self, listener: &Name, reason: &'static str) {
        self.h2_goaway_sent
            .get_or_create(&ReasonLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }
}

/// Rewrites an OpenMetrics exposition into the Prometheus text format: the two differ only in
/// how a counter family is named (OpenMetrics `x` with `x_total` samples; text `x_total`
/// throughout), in `# UNIT` lines and in the closing `# EOF`, which the text format lacks.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut lines = om.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .is_some_and(|t| t == format!("{name} counter"));
            if counter {
                lines.next();
                out.push_str(&format!("# HELP {name}_total {help}\n# TYPE {name}_total counter\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A method as a bounded label value.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// `gatehouse_connections_open{listener,protocol,state}`, counted from the registry at scrape
/// time so that the request path never touches a gauge.
#[derive(Debug)]
struct OpenConnections {
    conns: Arc<Registry>,
}

impl Collector for OpenConnections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut counts: HashMap<OpenLabels, i64> = HashMap::new();
        for c in self.conns.snapshot() {
            let labels = OpenLabels {
                listener: Name(c.listener.clone()),
                protocol: c.protocol().as_str(),
                state: c.state().as_str(),
            };
            *counts.entry(labels).or_default() += 1;
        }
        let mut metric = encoder.encode_descriptor(
            "connections_open",
            "Open connections, by listener, protocol and state",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let mut rows: Vec<_> = counts.into_iter().collect();
        rows.sort_by(|a, b| {
            (&a.0.listener.0, a.0.protocol, a.0.state).cmp(&(&b.0.listener.0, b.0.protocol, b.0.state))
        });
        for (labels, n) in rows {
            ConstGauge::new(n).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn openmetrics_counters_become_text_format_counters() {
        let om = "# HELP a_b Requests.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n# HELP t Time.\n# TYPE t_seconds gauge\n# UNIT t_seconds seconds\nt_seconds 1.5\n# EOF\n";
        assert_eq!(
            super::openmetrics_to_text(om),
            "# HELP a_b_total Requests.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# HELP t Time.\n# TYPE t_seconds gauge\nt_seconds 1.5\n"
        );
    }
}
