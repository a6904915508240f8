//! `[[upstreams]]`, `[[traffic_classes]]` and `[[rate_limits]]`: the reverse proxy's configuration.
//!
//! Every key of the proxy issue is parsed here, so a misspelt key is an error and wiring a
//! section later is a small change. Sections whose behaviour this build does not have yet
//! (none at present) would be parsed and then refused by validation, never silently accepted.
//! Traffic classes and rate limits are validated in `admission.rs`.

use super::Span;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A connect that takes longer than this on a LAN means the server is down or overloaded.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Span = Span::secs(2);
/// Generous for slow application endpoints, short enough that a hung upstream frees its client.
pub const DEFAULT_UPSTREAM_RESPONSE_HEADER_TIMEOUT: Span = Span::secs(15);
/// Enough warm connections for a busy service; more only hold upstream sockets open.
pub const DEFAULT_UPSTREAM_MAX_IDLE_PER_SERVER: u32 = 64;
/// Below the common application server keep-alive timeouts (65-75s), so gatehouse closes an idle
/// connection before the upstream does and never sends a request into a closing socket.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Span = Span::secs(60);

/// The protocol gatehouse speaks to an upstream's servers.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive (over TLS when `tls` is set).
    #[default]
    #[serde(rename = "http/1.1")]
    Http11,
    /// Cleartext HTTP/2 by prior knowledge.
    #[serde(rename = "h2c")]
    H2c,
    /// HTTP/2 over TLS; a server that does not select `h2` by ALPN is an error.
    #[serde(rename = "h2")]
    H2,
    /// TLS offering `h2` and `http/1.1`; ALPN decides per connection, and a fall back to
    /// HTTP/1.1 is counted.
    #[serde(rename = "auto")]
    Auto,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http11 => "http/1.1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Auto => "auto",
        }
    }
}

/// How a request picks one of an upstream's servers.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The server with the fewest requests in flight from this process.
    LeastRequests,
    /// Power of two choices: of two random servers, the lower EWMA latency x (in flight + 1).
    P2cEwma,
}

/// TLS to an upstream: `tls = { server_name = "api.internal", ca = "ca.pem" }`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// The name sent in SNI and checked against the certificate. Default: each server's host.
    pub server_name: Option<String>,
    /// PEM file of the CA certificates to trust. Default: the system's CA bundle.
    pub ca: Option<PathBuf>,
}

/// `[[upstreams]]`: a named set of servers behind one proxy route or more.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `"host:port"` each; names are resolved at every connect.
    pub servers: Vec<String>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Span,
    #[serde(default = "default_response_header_timeout")]
    pub response_header_timeout: Span,
    #[serde(default = "default_max_idle")]
    pub max_idle_per_server: u32,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Span,
    /// The `Host` sent upstream: `"preserve"` (the client's, default), `"upstream"` (the
    /// server's `host:port`), or a literal value.
    #[serde(default = "default_host")]
    pub host: String,
    /// Requests in flight to this upstream (all its servers) from which it counts as saturated:
    /// traffic classes below the highest `shed_order` are shed. 0 = never saturated.
    #[serde(default)]
    pub saturation_in_flight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackConfig>,
}

fn default_connect_timeout() -> Span {
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT
}
fn default_response_header_timeout() -> Span {
    DEFAULT_UPSTREAM_RESPONSE_HEADER_TIMEOUT
}
fn default_max_idle() -> u32 {
    DEFAULT_UPSTREAM_MAX_IDLE_PER_SERVER
}
fn default_idle_timeout() -> Span {
    DEFAULT_UPSTREAM_IDLE_TIMEOUT
}
fn default_host() -> String {
    "preserve".to_string()
}

/// `[upstreams.health]`: active health checks.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Span,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/healthz".into(),
            interval: Span::secs(5),
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }
}

/// `[upstreams.breaker]`: a circuit breaker per server.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window: Span,
    pub open_for: Span,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_ratio: 0.5,
            min_requests: 20,
            window: Span::secs(10),
            open_for: Span::secs(5),
            half_open_probes: 3,
        }
    }
}

/// `[upstreams.retry]`: retries of idempotent requests within a budget.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub attempts: u32,
    pub budget: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 2,
            budget: 0.2,
        }
    }
}

/// `[upstreams.fallback]`: what answers when no server can.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    pub stale_for: Option<Span>,
    pub respond: Option<FallbackResponse>,
}

/// `respond = { status = 503, body = "temporarily unavailable", retry_after = "5s" }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub retry_after: Option<Span>,
}

/// `[[traffic_classes]]`: requests matched by a header, limited and shed by class.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrafficClassConfig {
    pub name: String,
    /// Required, except in an entry named `standard` (which configures unmatched requests).
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub max_in_flight: u32,
    /// Default: the standard class's, so a class declared for its `max_in_flight` alone is
    /// shed neither before nor after unmatched traffic.
    #[serde(default = "default_shed_order")]
    pub shed_order: u32,
}

fn default_shed_order() -> u32 {
    crate::proxy::resilience::classes::DEFAULT_STANDARD_SHED_ORDER
}

/// `[[rate_limits]]`: a keyed rate limit that routes refer to by name.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub name: String,
    /// `"client_ip"` or `"header:NAME"`.
    pub key: String,
    /// `"100/s"`, `"6000/m"`.
    pub rate: String,
    /// Requests that may pass at once. Default: the rate's count (`"100/s"`: 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl super::Config {
    /// `[[upstreams]]` and the proxy routes that use them.
    pub(super) fn validate_upstreams(&self, f: &mut super::Findings) {
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            if u.name.trim().is_empty() {
                f.error(format!("{key}.name"), "is empty", "give every upstream a unique name");
            } else if !names.insert(u.name.as_str()) {
                f.error(
                    format!("{key}.name"),
                    format!("`{}` is used by an earlier upstream", u.name),
                    "give every upstream a unique name (routes refer to it, metrics are labelled by it)",
                );
            }
            if u.servers.is_empty() {
                f.error(
                    format!("{key}.servers"),
                    "is empty, so every request would fail",
                    "list at least one server as \"host:port\"",
                );
            }
            let mut seen = std::collections::HashSet::new();
            for (j, s) in u.servers.iter().enumerate() {
                if let Err(why) = check_server(s) {
                    f.error(
                        format!("{key}.servers[{j}]"),
                        format!("`{s}` {why}"),
                        "write it as \"host:port\", e.g. \"127.0.0.1:9000\" or \"api.internal:8080\"",
                    );
                } else if !seen.insert(s.as_str()) {
                    f.error(
                        format!("{key}.servers[{j}]"),
                        format!("`{s}` is listed twice"),
                        "list each server once",
                    );
                }
            }
            match (u.protocol, &u.tls) {
                (UpstreamProtocol::H2c, Some(_)) => f.error(
                    format!("{key}.tls"),
                    "is set, but \"h2c\" is HTTP/2 without TLS",
                    "use protocol = \"h2\" (or \"auto\") for HTTP/2 over TLS, or remove tls",
                ),
                (_, Some(tls)) => {
                    if let Some(name) = &tls.server_name {
                        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                            f.error(
                                format!("{key}.tls.server_name"),
                                format!("`{name}` is not a DNS name or an IP address"),
                                "write the name the upstream's certificate is issued for",
                            );
                        }
                    }
                }
                _ => {}
            }
            for (name, v) in [
                ("connect_timeout", u.connect_timeout),
                ("response_header_timeout", u.response_header_timeout),
                ("idle_timeout", u.idle_timeout),
            ] {
                if v.is_zero() {
                    f.error(
                        format!("{key}.{name}"),
                        "is 0, which would leave this phase unbounded",
                        "set a positive duration such as \"2s\"",
                    );
                }
            }
            if u.max_idle_per_server == 0 {
                f.warning(
                    format!("{key}.max_idle_per_server"),
                    "is 0: no connection is kept between requests, so every request opens a new one",
                    "set a positive value (default 64) unless that is what you want",
                );
            }
            if !matches!(u.host.as_str(), "preserve" | "upstream")
                && (u.host.is_empty() || u.host.parse::<http::uri::Authority>().is_err())
            {
                f.error(
                    format!("{key}.host"),
                    format!("`{}` is neither \"preserve\", \"upstream\" nor a host name", u.host),
                    "use \"preserve\" (the client's Host), \"upstream\" (the server's address) or a name such as \"api.internal\"",
                );
            }
            validate_resilience(&key, u, f);
            if !self.routes.iter().any(|r| r.proxy.as_deref() == Some(u.name.as_str())) {
                f.warning(
                    key.clone(),
                    format!("no route proxies to upstream `{}`", u.name),
                    "add a [[routes]] entry with proxy = its name, or remove it",
                );
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(name) = &r.proxy {
                if !self.upstreams.iter().any(|u| &u.name == name) {
                    f.error(
                        format!("routes[{i}].proxy"),
                        format!("no upstream is named `{name}`"),
                        "add an [[upstreams]] table with that name, or use one that exists",
                    );
                }
            }
        }
    }
}

/// `[upstreams.health]`, `[upstreams.breaker]`, `[upstreams.retry]` and `[upstreams.fallback]`:
/// values the proxy could not act on sensibly are refused, each under its own key.
fn validate_resilience(key: &str, u: &UpstreamConfig, f: &mut super::Findings) {
    if let Some(h) = &u.health {
        if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
            f.error(
                format!("{key}.health.path"),
                format!("`{}` is not an absolute path", h.path),
                "write the path the checker requests, starting with /, e.g. \"/healthz\"",
            );
        }
        if h.interval.is_zero() {
            f.error(
                format!("{key}.health.interval"),
                "is 0, which would probe without pause",
                "set a positive duration such as \"5s\"",
            );
        }
        for (name, v) in [
            ("unhealthy_after", h.unhealthy_after),
            ("healthy_after", h.healthy_after),
        ] {
            if v == 0 {
                f.error(
                    format!("{key}.health.{name}"),
                    "is 0: a run of no results cannot change a server's health",
                    "set 1 or more",
                );
            }
        }
    }
    if let Some(b) = &u.breaker {
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            f.error(
                format!("{key}.breaker.failure_ratio"),
                format!("{} is not in (0, 1]", b.failure_ratio),
                "set the share of failed requests that opens the breaker, e.g. 0.5",
            );
        }
        for (name, v) in [
            ("min_requests", b.min_requests),
            ("half_open_probes", b.half_open_probes),
        ] {
            if v == 0 {
                f.error(format!("{key}.breaker.{name}"), "is 0", "set 1 or more");
            }
        }
        for (name, v) in [("window", b.window), ("open_for", b.open_for)] {
            if v.is_zero() {
                f.error(
                    format!("{key}.breaker.{name}"),
                    "is 0",
                    "set a positive duration such as \"5s\"",
                );
            }
        }
    }
    if let Some(r) = &u.retry {
        if r.attempts == 0 {
            f.error(
                format!("{key}.retry.attempts"),
                "is 0, but the first try is an attempt",
                "set 1 (no retries) or more; 2 is one retry",
            );
        }
        if !(r.budget.is_finite() && r.budget >= 0.0) {
            f.error(
                format!("{key}.retry.budget"),
                format!("{} is not a non-negative number", r.budget),
                "set the share of extra load retries may add, e.g. 0.2",
            );
        }
    }
    if let Some(fb) = &u.fallback {
        if fb.stale_for.is_none() && fb.respond.is_none() {
            f.warning(
                format!("{key}.fallback"),
                "has neither stale_for nor respond, so it never answers",
                "set stale_for, respond, or both, or remove the section",
            );
        }
        if fb.stale_for.is_some_and(|s| s.is_zero()) {
            f.error(
                format!("{key}.fallback.stale_for"),
                "is 0, so nothing stored could ever be served",
                "set a positive duration such as \"5m\", or remove it",
            );
        }
        if let Some(r) = &fb.respond {
            if !(200..=599).contains(&r.status) {
                f.error(
                    format!("{key}.fallback.respond.status"),
                    format!("{} is not a final status from 200 to 599", r.status),
                    "use e.g. 503",
                );
            }
        }
    }
}

/// `host:port` with a port and a plausible host (an IP literal, IPv6 in brackets, or a DNS name).
fn check_server(s: &str) -> Result<(), &'static str> {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("has no port");
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("does not end in a port from 1 to 65535");
    }
    let dns = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if dns {
        Ok(())
    } else {
        Err("is not a host name or an IP address with a port")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, Severity};

    fn errors(toml: &str) -> Vec<(String, String)> {
        let c = load_str(toml).unwrap();
        c.validate()
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| (f.key.clone(), f.problem.clone()))
            .collect()
    }

    #[test]
    fn every_key_of_the_issue_parses() {
        let c = load_str(
            r#"
[[upstreams]]
name = "api"
servers = ["127.0.0.1:9000", "api.internal:9001"]
protocol = "auto"
tls = { server_name = "api.internal", ca = "ca.pem" }
balance = "p2c_ewma"
connect_timeout = "2s"
response_header_timeout = "15s"
max_idle_per_server = 64
idle_timeout = "60s"
host = "upstream"
[upstreams.health]
path = "/healthz"
interval = "5s"
unhealthy_after = 3
healthy_after = 2
[upstreams.breaker]
failure_ratio = 0.5
min_requests = 20
window = "10s"
open_for = "5s"
half_open_probes = 3
[upstreams.retry]
attempts = 2
budget = 0.2
[upstreams.fallback]
stale_for = "5m"
respond = { status = 503, body = "temporarily unavailable", retry_after = "5s" }
[[traffic_classes]]
name = "premium"
header = "x-traffic-class"
value = "premium"
max_in_flight = 0
shed_order = 2
[[routes]]
path = "/api"
proxy = "api"
rate_limit = "per-client"
[[rate_limits]]
name = "per-client"
key = "client_ip"
rate = "100/s"
burst = 200
"#,
        )
        .unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.protocol, crate::config::UpstreamProtocol::Auto);
        assert_eq!(u.breaker.as_ref().unwrap().half_open_probes, 3);
        assert_eq!(
            u.fallback.as_ref().unwrap().respond.as_ref().unwrap().retry_after,
            Some(crate::config::Span::secs(5))
        );
        // Parsed, and every section of the issue is accepted: none is refused as unavailable.
        let findings = c.validate().0;
        for f in &findings {
            assert!(!f.problem.contains("not available"), "refused: {findings:?}");
        }
        for k in [
            "upstreams[0].health",
            "upstreams[0].breaker",
            "upstreams[0].retry",
            "upstreams[0].fallback",
            "traffic_classes",
            "rate_limits",
            "routes[0].rate_limit",
        ] {
            let errors: Vec<_> = findings
                .iter()
                .filter(|f| f.key.starts_with(k) && f.severity == crate::config::Severity::Error)
                .collect();
            assert!(errors.is_empty(), "{k} refused: {errors:?}");
        }
    }

    #[test]
    fn upstream_mistakes_name_their_key() {
        let e = errors(
            r#"
[[upstreams]]
name = "api"
servers = ["127.0.0.1", "x:0", "127.0.0.1:1", "127.0.0.1:1"]
protocol = "h2c"
tls = {}
connect_timeout = "0s"
host = "a b"
[[upstreams]]
name = "api"
servers = []
[[routes]]
proxy = "nope"
"#,
        );
        let keys: Vec<&str> = e.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "upstreams[0].servers[0]",
            "upstreams[0].servers[1]",
            "upstreams[0].servers[3]",
            "upstreams[0].tls",
            "upstreams[0].connect_timeout",
            "upstreams[0].host",
            "upstreams[1].name",
            "upstreams[1].servers",
            "routes[0].proxy",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
    }

    #[test]
    fn resilience_values_name_their_key() {
        let e = errors(
            r#"
[[upstreams]]
name = "api"
servers = ["127.0.0.1:1"]
[upstreams.health]
path = "healthz"
interval = "0s"
unhealthy_after = 0
[upstreams.breaker]
failure_ratio = 1.5
min_requests = 0
open_for = "0s"
[upstreams.retry]
attempts = 0
budget = -1.0
[upstreams.fallback]
stale_for = "0s"
respond = { status = 42 }
[[routes]]
proxy = "api"
"#,
        );
        let keys: Vec<&str> = e.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "upstreams[0].health.path",
            "upstreams[0].health.interval",
            "upstreams[0].health.unhealthy_after",
            "upstreams[0].breaker.failure_ratio",
            "upstreams[0].breaker.min_requests",
            "upstreams[0].breaker.open_for",
            "upstreams[0].retry.attempts",
            "upstreams[0].retry.budget",
            "upstreams[0].fallback.stale_for",
            "upstreams[0].fallback.respond.status",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
    }

    #[test]
    fn a_plain_proxy_route_is_valid() {
        let e = errors(
            "[[listeners]]\nname = \"w\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"api\"\nservers = [\"[::1]:9000\"]\n[[routes]]\nproxy = \"api\"\n",
        );
        assert!(e.is_empty(), "{e:?}");
    }
}
