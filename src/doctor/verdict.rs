//! The verdict: each finding names its cause and the change that fixes it in the servers people
//! run (nginx, Go, Caddy, h2o, gatehouse), and decides the exit code.

use super::report::{Finding, Report};

/// Fewer concurrent streams than RFC 9113 §6.5.2 recommends (at least 100) serialises clients.
const MIN_RECOMMENDED_STREAMS: u32 = 100;
/// A certificate expiring sooner than this is worth a warning: renewal jobs run weekly or monthly.
const EXPIRY_WARNING_DAYS: i64 = 14;

const ENABLE_H2: &str = "nginx: `listen 443 ssl http2;` (nginx 1.25.1 and later: `http2 on;` in the server block); \
Go: add \"h2\" to `TLSConfig.NextProtos` (or leave NextProtos unset so net/http adds it); \
Caddy: global option `servers { protocols h1 h2 h3 }`; h2o: HTTP/2 is on for every TLS listener, so look for a TLS terminator in front; \
gatehouse: `protocols = [\"h2\", \"http/1.1\"]`";

fn add(r: &mut Vec<Finding>, id: &'static str, severity: &'static str, cause: String, fix: &str) {
    r.push(Finding {
        id,
        severity,
        cause,
        fix: fix.to_string(),
    });
}

/// Fills `report.findings` and `report.exit_code`.
pub fn judge(report: &mut Report) {
    let mut f = Vec::new();
    let asked = report.asked.clone();
    let mut cannot_connect = report.error.is_some();

    if let Some(t) = &report.tls {
        if let Some(e) = &t.handshake_error {
            if e.contains("no_application_protocol") {
                let offered = t.alpn_offered.join(", ");
                let fix = if t.alpn_offered == ["http/1.1"] {
                    "offer h2 in the client, or add http/1.1 to the listener (gatehouse: `protocols = [\"h2\", \"http/1.1\"]`; nginx and Go always accept http/1.1)".to_string()
                } else if t.alpn_offered == ["h2"] {
                    format!("offer http/1.1 in the client, or enable HTTP/2 on the server: {ENABLE_H2}")
                } else {
                    "make the client and the listener share a protocol".to_string()
                };
                add(
                    &mut f,
                    "alpn_no_overlap",
                    "problem",
                    format!(
                        "the server refused every protocol offered ({offered}) with a no_application_protocol alert"
                    ),
                    &fix,
                );
            } else {
                add(
                    &mut f,
                    "tls_handshake_failed",
                    "problem",
                    format!("TLS handshake failed: {e}"),
                    "check that the port speaks TLS (for a cleartext port use http://) and the server's TLS logs",
                );
            }
        } else {
            match (t.alpn_chosen.as_deref(), asked.as_str()) {
                (Some("h2"), _) => {}
                (Some("http/1.1"), "http/1.1") => {}
                (Some("http/1.1"), _) => {
                    if t.h2_only_client.as_deref() == Some("accepted") {
                        add(&mut f, "alpn_prefers_http1", "problem",
                            "the server chose http/1.1 although the client offered h2 first; it does speak h2 to a client that offers only h2: its ALPN preference puts http/1.1 first".into(),
                            "list h2 before http/1.1 (gatehouse: `protocols = [\"h2\", \"http/1.1\"]`; Go: `NextProtos = []string{\"h2\", \"http/1.1\"}`)");
                    } else {
                        add(
                            &mut f,
                            "alpn_http1_only",
                            "problem",
                            "server offers ALPN http/1.1 only: HTTP/2 is not enabled on this listener".into(),
                            ENABLE_H2,
                        );
                    }
                }
                (None, _) => add(
                    &mut f,
                    "alpn_ignored",
                    "problem",
                    "the server selected no ALPN protocol: clients must assume HTTP/1.1 (RFC 9113 §3.2 requires ALPN h2 for HTTP/2 over TLS)".into(),
                    &format!("enable ALPN with h2 on the TLS terminator: {ENABLE_H2}"),
                ),
                (Some(other), _) => add(
                    &mut f,
                    "alpn_unexpected",
                    "problem",
                    format!("the server selected ALPN `{other}`, which is not HTTP"),
                    "check which service listens on this port",
                ),
            }
            if !t.validates {
                let problem = t.validation_problem.as_deref().unwrap_or("invalid");
                let (id, fix) = match problem {
                    "expired" => ("tls_expired", "renew the certificate and reload the server (certbot renew; gatehouse: replace the files and `gatehouse reload`)"),
                    "not_yet_valid" => ("tls_not_yet_valid", "check the server's clock, or the certificate's notBefore"),
                    "hostname_mismatch" => ("tls_hostname_mismatch", "issue a certificate whose SANs include this host name, or use the name the certificate is for"),
                    "incomplete_chain" => ("tls_incomplete_chain", "serve the full chain, leaf first then intermediates (nginx: `ssl_certificate` must be fullchain.pem; gatehouse: `cert` holds the full chain; Go: append intermediates to `tls.Certificate.Certificate`)"),
                    _ => ("tls_untrusted", "use a certificate from a CA clients trust, or pass the private CA with --cacert FILE"),
                };
                let severity = if report_insecure(report) { "warning" } else { "problem" };
                add(
                    &mut f,
                    id,
                    severity,
                    format!(
                        "the certificate does not validate: {}",
                        t.validation_error.clone().unwrap_or_default()
                    ),
                    fix,
                );
            } else if let Some(c) = t
                .certificates
                .first()
                .filter(|c| c.days_to_expiry < EXPIRY_WARNING_DAYS)
            {
                add(
                    &mut f,
                    "tls_expires_soon",
                    "warning",
                    format!("the certificate expires in {} days ({})", c.days_to_expiry, c.not_after),
                    "renew it now",
                );
            }
            if t.resumption.as_deref() == Some("not_resumed") {
                add(&mut f, "tls_no_resumption", "warning",
                    "a second connection did not resume the TLS session: every new connection pays a full handshake".into(),
                    "enable session tickets or a session cache (nginx: `ssl_session_cache shared:SSL:10m; ssl_session_tickets on;`; gatehouse: `[listeners.tls] session_tickets = true`)");
            }
            if t.no_alpn_client.as_deref() == Some("rejected") {
                add(&mut f, "no_alpn_rejected", "info",
                    "clients that send no ALPN (old libraries, some health checkers, curl --no-alpn) are refused".into(),
                    "intended if the listener is h2-only; otherwise allow HTTP/1.1 for them (gatehouse: `on_no_alpn = \"http/1.1\"` with \"http/1.1\" in protocols)");
            }
        }
    }
    if report.proxy.intercepting == Some(true) {
        add(&mut f, "proxy_intercepts_tls", "warning",
            format!("the proxy terminates TLS itself (certificate issuer differs from a direct connection): ALPN is negotiated with the proxy (here {}), not with the server (direct: {})",
                report.tls.as_ref().and_then(|t| t.alpn_chosen.clone()).unwrap_or_else(|| "none".into()),
                report.proxy.direct_alpn.clone().unwrap_or_else(|| "unknown".into())),
            "ask for the proxy to pass this host through untouched (or to enable HTTP/2 towards clients), or bypass it with NO_PROXY");
    }
    if let Some(h) = &report.http2 {
        if let Some(e) = &h.error {
            // Over h2c the h2c step below names the cause and the fix.
            if h.via == "alpn" {
                add(
                    &mut f,
                    "h2_broken",
                    "problem",
                    format!("HTTP/2 failed after ALPN chose h2: {e}"),
                    "the server negotiates h2 but does not speak it: check the TLS terminator and the server behind it",
                );
            }
        } else {
            if !h.settings_first {
                add(
                    &mut f,
                    "h2_settings_not_first",
                    "problem",
                    "the server's first frame was not SETTINGS (RFC 9113 §3.4): strict clients close the connection"
                        .into(),
                    "fix or upgrade the server's HTTP/2 implementation",
                );
            } else if !h.settings_on_time {
                add(
                    &mut f,
                    "h2_settings_late",
                    "warning",
                    format!(
                        "the server took {:.0} ms to send SETTINGS: clients wait before their first request",
                        h.settings_ms.unwrap_or_default()
                    ),
                    "check what delays the server after the TLS handshake (CPU, accept queue)",
                );
            }
            if let Some(s) = h.settings.as_ref().and_then(|s| s.max_concurrent_streams) {
                if s < MIN_RECOMMENDED_STREAMS {
                    add(&mut f, "h2_few_streams", if s == 0 { "problem" } else { "warning" },
                        format!("SETTINGS_MAX_CONCURRENT_STREAMS is {s}: clients queue or open extra connections beyond that"),
                        "allow at least 100 (nginx: `http2_max_concurrent_streams 128;`; Go: `http2.Server.MaxConcurrentStreams`; gatehouse: `[http2] max_concurrent_streams = 128`)");
                }
            }
            if let Some(e) = &h.ping_error {
                add(
                    &mut f,
                    "h2_no_ping_ack",
                    "warning",
                    format!("PING: {e}"),
                    "keepalive PINGs from clients will time out and kill connections; fix the server's HTTP/2 stack",
                );
            }
            if let Some(g) = h.goaway.as_ref().filter(|g| g.code != 0) {
                add(
                    &mut f,
                    "h2_goaway",
                    "problem",
                    format!(
                        "the server sent GOAWAY {} ({}) during the probe",
                        g.code_name, g.debug_data
                    ),
                    "look up the error in the server's log",
                );
            }
        }
    }
    if let Some(c) = &report.h2c {
        if !c.prior_knowledge && asked == "h2" {
            add(&mut f, "h2c_unsupported", "problem",
                format!("cleartext HTTP/2 by prior knowledge does not work here: {}", c.prior_knowledge_detail),
                "gatehouse: `protocols = [\"http/1.1\", \"h2c\"]`; Go: wrap the handler in `h2c.NewHandler`; nginx: `listen 80 http2;` (1.25.1+: `http2 on;`) — or use https://");
        }
        if !c.upgrade && (c.prior_knowledge || asked == "h2") {
            add(&mut f, "h2c_upgrade_not_honoured", "info",
                "`Upgrade: h2c` is not honoured: clients that upgrade (curl --http2 on http://) stay on HTTP/1.1; prior-knowledge clients are unaffected".into(),
                "use prior knowledge (curl --http2-prior-knowledge), or gatehouse: `h2c_upgrade = true` (nginx does not support the upgrade)");
        }
        if c.prior_knowledge && asked == "any" {
            add(
                &mut f,
                "h2c_available",
                "info",
                "this cleartext port also speaks HTTP/2 by prior knowledge; rerun with --http2 to test reuse over h2c"
                    .into(),
                "",
            );
        }
    }
    if let Some(r) = &report.reuse {
        // When HTTP/2 itself failed, that finding already says why the requests could not run.
        let h2_failed = report.http2.as_ref().is_some_and(|h| h.error.is_some());
        if let Some(e) = r.error.as_ref().filter(|_| !h2_failed) {
            add(
                &mut f,
                "requests_failed",
                "problem",
                format!("the requests failed: {e}"),
                "check the server's error log for this URL",
            );
        }
        if r.connections > 1 {
            let why: Vec<&str> = r.closes.iter().map(|c| c.reason).collect();
            let first = r.closes.first();
            let (id, cause, fix) = match first.map(|c| c.reason) {
                Some("connection_close") => ("reuse_connection_close",
                    format!("{} requests needed {} connections: the server ends connections with `Connection: close` (after request {})", r.completed, r.connections, first.map_or(0, |c| c.after_request)),
                    "raise the per-connection request limit (nginx: `keepalive_requests 1000;`, and `keepalive_timeout` > 0; Go: do not set `Connection: close` or `DisableKeepAlives`; gatehouse: `[limits] max_requests_per_connection = 1000`) — or check a proxy in between"),
                Some("goaway") => ("reuse_goaway",
                    format!("{} requests needed {} connections: the server sends GOAWAY (after request {})", r.completed, r.connections, first.map_or(0, |c| c.after_request)),
                    "raise the per-connection request limit (nginx: `keepalive_requests 1000;` (http2_max_requests before 1.19.7); Go: check `http2.Server` limits; gatehouse: `[limits] max_requests_per_connection = 1000`)"),
                Some("server_closed_idle") => ("reuse_idle_close",
                    format!("{} requests needed {} connections: the server closes connections between requests", r.completed, r.connections),
                    "raise the idle timeout (nginx: `keepalive_timeout 75s;`; Go: `http.Server.IdleTimeout`; gatehouse: `[timeouts] idle = \"75s\"`)"),
                Some("stream_refused") => ("reuse_stream_refused",
                    format!("{} requests needed {} connections: the server refuses streams (REFUSED_STREAM)", r.completed, r.connections),
                    "raise SETTINGS_MAX_CONCURRENT_STREAMS (see the HTTP/2 step)"),
                _ => ("reuse_broken",
                    format!("{} requests needed {} connections ({})", r.completed, r.connections, why.join(", ")),
                    "check the server's and any proxy's logs for why connections close"),
            };
            add(&mut f, id, "problem", cause, fix);
        }
        if let Some(ms) = r.idle_close_ms {
            let goaway = r
                .idle_close_goaway
                .as_ref()
                .map(|g| format!(" (GOAWAY {})", g.code_name))
                .unwrap_or_default();
            add(&mut f, "idle_timeout_short", "problem",
                format!("the server closes idle connections after {ms:.0} ms{goaway}: a client that pauses longer between requests opens a new connection (and TLS handshake) each time"),
                "raise the idle timeout well above the clients' request gaps (nginx: `keepalive_timeout 75s;`; Go: `http.Server.IdleTimeout = 90 * time.Second`; gatehouse: `[timeouts] idle = \"75s\"`)");
        }
    }
    if report.proxy.used && report.proxy.intercepting != Some(true) {
        add(
            &mut f,
            "proxy_in_path",
            "info",
            format!(
                "requests go through the proxy {} (from {}); ALPN and reuse above are end-to-end through its tunnel",
                report.proxy.url.clone().unwrap_or_default(),
                report.proxy.source.clone().unwrap_or_default()
            ),
            "",
        );
    }
    for v in report.environment.iter().filter(|v| v.disables_http2) {
        add(
            &mut f,
            "env_disables_http2",
            "warning",
            format!("{}={}: {}", v.name, v.value, v.effect),
            &format!("unset {} (or remove the setting) where HTTP/2 is wanted", v.name),
        );
    }
    if report.tcp.is_none() && report.error.is_some() {
        cannot_connect = true;
    }
    report.exit_code = if cannot_connect {
        2
    } else if f.iter().any(|x| x.severity == "problem") {
        1
    } else {
        0
    };
    report.findings = f;
}

fn report_insecure(report: &Report) -> bool {
    report
        .tls
        .as_ref()
        .is_some_and(|t| t.trusted_roots.starts_with("--insecure"))
}
