//! `[tracing]`: OpenTelemetry span export, and its validation.

use super::{Findings, Span};
use serde::{Deserialize, Serialize};

/// The name collectors group gatehouse's spans under unless told otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "gatehouse";
/// Every trace is kept: an operator who configures an endpoint expects to see traces, and
/// sampling down is a decision about their traffic and their backend's cost that gatehouse
/// cannot make for them (OpenTelemetry's default sampler is also "always on, parent-based").
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
/// The OTLP exporter default (`OTEL_EXPORTER_OTLP_TIMEOUT`): a collector that needs longer is
/// down, and the flush at shutdown waits at most this long.
pub const DEFAULT_EXPORT_TIMEOUT: Span = Span::secs(10);
/// Spans reach the backend about a second after their request, while light traffic still
/// sends at most one export a second (OpenTelemetry's batch processor waits 5s).
pub const DEFAULT_BATCH_DELAY: Span = Span::secs(1);
/// OpenTelemetry's batch processor default: one export stays well under collectors' 4MiB
/// default request limit at ~1KiB a span.
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// OpenTelemetry's batch processor default: about 2MiB of encoded spans, a few seconds of a
/// busy server's requests while the collector is slow, before spans are dropped and counted.
pub const DEFAULT_QUEUE_SIZE: usize = 2048;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP base URL (`http://host:4318`); spans are posted to `{otlp_endpoint}/v1/traces`.
    /// Tracing is off, at no cost to requests, when absent.
    pub otlp_endpoint: Option<String>,
    /// Resource attribute `service.name`.
    pub service_name: String,
    /// Share of new traces recorded, 0 to 1; a request with a valid `traceparent` follows its
    /// caller's `sampled` flag instead.
    pub sample_ratio: f64,
    /// Bound on one export (connect, send, answer) and on the flush at shutdown.
    pub export_timeout: Span,
    /// Longest a finished span waits for its batch to fill.
    pub batch_delay: Span,
    /// Spans per export request.
    pub batch_size: usize,
    /// Finished spans waiting for export; beyond it they are dropped and counted.
    pub queue_size: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: DEFAULT_SERVICE_NAME.to_string(),
            sample_ratio: DEFAULT_SAMPLE_RATIO,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
            batch_delay: DEFAULT_BATCH_DELAY,
            batch_size: DEFAULT_BATCH_SIZE,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

impl TracingConfig {
    pub(super) fn validate(&self, f: &mut Findings) {
        if let Some(url) = &self.otlp_endpoint {
            if let Err(problem) = crate::observe::otel::Endpoint::parse(url) {
                let fix = if url.starts_with("https://") {
                    "use http:// to a collector on this host or network (an OpenTelemetry Collector \
                     sidecar can forward over TLS), or remove otlp_endpoint"
                } else {
                    "write it like \"http://127.0.0.1:4318\" (OTLP/HTTP; /v1/traces is appended)"
                };
                f.error("tracing.otlp_endpoint", problem, fix);
            }
        }
        if self.service_name.trim().is_empty() {
            f.error(
                "tracing.service_name",
                "is empty",
                "name the service, like \"gatehouse\"",
            );
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            f.error(
                "tracing.sample_ratio",
                format!("{} is not between 0 and 1", self.sample_ratio),
                "use 1.0 to record every trace, 0.1 for one in ten, 0 for only those a caller samples",
            );
        }
        for (key, zero) in [
            ("tracing.export_timeout", self.export_timeout.is_zero()),
            ("tracing.batch_delay", self.batch_delay.is_zero()),
            ("tracing.batch_size", self.batch_size == 0),
            ("tracing.queue_size", self.queue_size == 0),
        ] {
            if zero {
                f.error(key, "must be greater than zero", "remove it to use the default");
            }
        }
        if self.batch_size > self.queue_size && self.queue_size > 0 {
            f.warning(
                "tracing.batch_size",
                format!(
                    "{} is larger than tracing.queue_size ({}): batches never fill",
                    self.batch_size, self.queue_size
                ),
                "make queue_size at least batch_size",
            );
        }
        let defaults = TracingConfig::default();
        if self.otlp_endpoint.is_none() && *self != defaults {
            f.warning(
                "tracing",
                "settings have no effect: tracing is off without tracing.otlp_endpoint",
                "set otlp_endpoint, or remove the [tracing] section",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, Severity};

    fn findings(toml: &str) -> Vec<(String, Severity)> {
        let c = load_str(&format!("[tracing]\n{toml}")).unwrap();
        c.validate()
            .iter()
            .filter(|f| f.key.starts_with("tracing"))
            .map(|f| (f.key.clone(), f.severity))
            .collect()
    }

    #[test]
    fn a_plain_endpoint_is_valid_and_defaults_apply() {
        assert_eq!(findings("otlp_endpoint = \"http://127.0.0.1:4318\""), []);
        let c = load_str("").unwrap();
        assert_eq!(c.tracing.service_name, "gatehouse");
        assert_eq!(c.tracing.sample_ratio, 1.0);
    }

    #[test]
    fn refuses_bad_settings_naming_the_key() {
        let errors = findings(
            "otlp_endpoint = \"https://collector:4318\"\nservice_name = \" \"\nsample_ratio = 1.5\nbatch_size = 0\n",
        );
        for key in [
            "tracing.otlp_endpoint",
            "tracing.service_name",
            "tracing.sample_ratio",
            "tracing.batch_size",
        ] {
            assert!(
                errors.contains(&(key.to_string(), Severity::Error)),
                "{key}: {errors:?}"
            );
        }
        assert!(findings("otlp_endpoint = \"http://c:4318\"\nsample_ratio = -0.1")
            .contains(&("tracing.sample_ratio".to_string(), Severity::Error)));
    }

    #[test]
    fn settings_without_an_endpoint_warn() {
        assert_eq!(
            findings("sample_ratio = 0.5"),
            [("tracing".to_string(), Severity::Warning)]
        );
    }
}
