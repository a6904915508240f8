//! The doctor report: one structure with stable field names, printed as JSON (`--json`) or as
//! the step-by-step text a person reads.

use super::env::EnvVar;
use super::h2::{GoAway, Settings};
use super::reuse::Reuse;
use super::tls::CertInfo;
use serde::Serialize;
use std::fmt::Write;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub url: String,
    /// `any`, `http/1.1` or `h2`: what the run asked for (`--http1`, `--http2`).
    pub asked: String,
    pub dns: Option<Dns>,
    pub proxy: Proxy,
    pub tcp: Option<Tcp>,
    pub tls: Option<Tls>,
    pub http2: Option<Http2>,
    pub h2c: Option<H2c>,
    pub reuse: Option<Reuse>,
    pub environment: Vec<EnvVar>,
    pub findings: Vec<Finding>,
    /// Why doctor could not connect at all (exit code 2).
    pub error: Option<String>,
    pub exit_code: i32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Dns {
    pub host: String,
    pub addresses: Vec<String>,
    pub used: Option<String>,
    pub ms: f64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Proxy {
    pub used: bool,
    /// `--proxy` or the variable that chose it.
    pub source: Option<String>,
    pub url: Option<String>,
    /// A proxy variable is set but this `NO_PROXY` rule excludes the host.
    pub excluded_by: Option<String>,
    pub connect_ms: Option<f64>,
    /// `true`: the TLS peer behind the tunnel is not the origin (a different certificate issuer
    /// than on a direct connection). `null`: not compared.
    pub intercepting: Option<bool>,
    pub direct_issuer: Option<String>,
    pub direct_alpn: Option<String>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Tcp {
    pub address: String,
    pub ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Tls {
    pub handshake_error: Option<String>,
    pub version: Option<String>,
    pub cipher_suite: Option<String>,
    pub key_exchange_group: Option<String>,
    /// The name sent as SNI; `null` for an IP address (no SNI is sent for addresses).
    pub sni: Option<String>,
    pub alpn_offered: Vec<String>,
    pub alpn_chosen: Option<String>,
    pub handshake_ms: Option<f64>,
    pub certificates: Vec<CertInfo>,
    pub trusted_roots: String,
    pub validates: bool,
    /// `expired`, `not_yet_valid`, `hostname_mismatch`, `incomplete_chain`, `untrusted`, `invalid`.
    pub validation_problem: Option<String>,
    pub validation_error: Option<String>,
    pub chain_complete: bool,
    pub hostname_match: bool,
    pub ocsp_stapled: bool,
    /// `resumed`, `not_resumed`, or `failed: ...` for a second connection with the same client.
    pub resumption: Option<String>,
    /// What a client offering no ALPN gets: `accepted` (HTTP/1.1) or `rejected`.
    pub no_alpn_client: Option<String>,
    /// Asked only when `http/1.1` was chosen although `h2` was offered: does an h2-only client
    /// get h2 (`accepted`: the server prefers http/1.1) or is it `rejected` (no h2 at all)?
    pub h2_only_client: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Http2 {
    /// `alpn` (TLS) or `prior_knowledge` (h2c).
    pub via: String,
    pub settings_first: bool,
    pub settings_ms: Option<f64>,
    pub settings_on_time: bool,
    pub settings: Option<Settings>,
    pub ping_ms: Option<f64>,
    pub ping_error: Option<String>,
    pub goaway: Option<GoAway>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct H2c {
    pub prior_knowledge: bool,
    pub prior_knowledge_detail: String,
    pub upgrade: bool,
    pub upgrade_status: Option<u16>,
    pub upgrade_detail: String,
}

/// One line of the verdict: what is wrong (or notable), and what to change.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Stable identifier, e.g. `alpn_http1_only`.
    pub id: &'static str,
    /// `problem` (exit 1), `warning` or `info`.
    pub severity: &'static str,
    pub cause: String,
    pub fix: String,
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "none".to_string(), |v| v.to_string())
}

impl Report {
    /// The text report: one block per step, then the verdict.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "gatehouse doctor {} (asked: {})", self.url, self.asked);
        let _ = writeln!(o);
        if let Some(d) = &self.dns {
            match &d.error {
                Some(e) => {
                    let _ = writeln!(o, "DNS          {e}");
                }
                None => {
                    let used = match &d.used {
                        Some(a) => format!("; using {a}"),
                        None if p_used(self) => "; connecting through the proxy instead".to_string(),
                        None => String::new(),
                    };
                    let _ = writeln!(
                        o,
                        "DNS          {} -> {} ({:.1} ms){used}",
                        d.host,
                        d.addresses.join(", "),
                        d.ms
                    );
                }
            }
        }
        let p = &self.proxy;
        if p.used {
            let _ = writeln!(
                o,
                "Proxy        {} from {} (HTTP CONNECT{})",
                opt(&p.url),
                opt(&p.source),
                p.connect_ms
                    .map(|m| format!(", tunnel up in {m:.1} ms"))
                    .unwrap_or_default()
            );
            match p.intercepting {
                Some(true) => {
                    let _ = writeln!(
                        o,
                        "             TLS is intercepted: the proxy presents its own certificate (direct: issuer {}, ALPN {})",
                        opt(&p.direct_issuer),
                        opt(&p.direct_alpn)
                    );
                }
                Some(false) => {
                    let _ = writeln!(
                        o,
                        "             end-to-end TLS: the same certificate as on a direct connection"
                    );
                }
                None => {}
            }
            if let Some(n) = &p.note {
                let _ = writeln!(o, "             {n}");
            }
        } else if let Some(rule) = &p.excluded_by {
            let _ = writeln!(
                o,
                "Proxy        none: {} is set, but NO_PROXY rule `{rule}` excludes this host",
                opt(&p.source)
            );
        } else {
            let _ = writeln!(o, "Proxy        none (no --proxy, and no proxy variable applies)");
        }
        if let Some(t) = &self.tcp {
            let _ = writeln!(o, "TCP          connected to {} in {:.1} ms", t.address, t.ms);
        }
        if let Some(t) = &self.tls {
            self.render_tls(&mut o, t);
        }
        if let Some(h) = &self.http2 {
            render_h2(&mut o, h);
        }
        if let Some(c) = &self.h2c {
            let _ = writeln!(
                o,
                "h2c          prior knowledge: {}; Upgrade: h2c: {}",
                if c.prior_knowledge { "works" } else { "no" },
                if c.upgrade { "honoured (101)" } else { "not honoured" }
            );
            let _ = writeln!(o, "             {}; {}", c.prior_knowledge_detail, c.upgrade_detail);
        }
        if let Some(r) = &self.reuse {
            render_reuse(&mut o, r);
        }
        if self.environment.is_empty() {
            let _ = writeln!(o, "Environment  no variable known to change HTTP negotiation is set");
        } else {
            let _ = writeln!(o, "Environment");
            for v in &self.environment {
                let _ = writeln!(o, "             {}={}: {}", v.name, v.value, v.effect);
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "Verdict");
        if let Some(e) = &self.error {
            let _ = writeln!(o, "  could not connect: {e}");
        }
        if self.findings.is_empty() && self.error.is_none() {
            let _ = writeln!(o, "  OK: the server negotiates what was asked and reuses connections");
        }
        for f in &self.findings {
            let tag = match f.severity {
                "problem" => "PROBLEM",
                "warning" => "WARNING",
                _ => "NOTE",
            };
            let _ = writeln!(o, "  {tag}: {}", f.cause);
            if !f.fix.is_empty() {
                let _ = writeln!(o, "      fix: {}", f.fix);
            }
        }
        o
    }

    fn render_tls(&self, o: &mut String, t: &Tls) {
        if let Some(e) = &t.handshake_error {
            let _ = writeln!(
                o,
                "TLS          handshake failed: {e} (offered ALPN {})",
                t.alpn_offered.join(", ")
            );
            return;
        }
        let _ = writeln!(
            o,
            "TLS          TLS {}, {}, key exchange {}, {:.1} ms",
            opt(&t.version),
            opt(&t.cipher_suite),
            opt(&t.key_exchange_group),
            t.handshake_ms.unwrap_or_default()
        );
        let _ = writeln!(
            o,
            "             SNI {}; ALPN offered {}; chosen {}",
            t.sni.as_deref().unwrap_or("none (IP address)"),
            t.alpn_offered.join(", "),
            match &t.alpn_chosen {
                Some(a) => a.clone(),
                None => "none (the server ignored ALPN: clients fall back to HTTP/1.1)".into(),
            }
        );
        for (i, c) in t.certificates.iter().enumerate() {
            let _ = writeln!(o, "             cert[{i}] subject {}", c.subject);
            let _ = writeln!(
                o,
                "                     issuer {}; valid {} .. {} ({} days left)",
                c.issuer, c.not_before, c.not_after, c.days_to_expiry
            );
            if !c.sans.is_empty() {
                let _ = writeln!(o, "                     SANs {}", c.sans.join(", "));
            }
        }
        let _ = writeln!(
            o,
            "             validates: {}; chain complete: {}; hostname match: {}; OCSP stapled: {}",
            if t.validates {
                "yes".to_string()
            } else {
                format!("no ({})", opt(&t.validation_error))
            },
            yes(t.chain_complete),
            yes(t.hostname_match),
            yes(t.ocsp_stapled)
        );
        let _ = writeln!(o, "             trusted roots: {}", t.trusted_roots);
        let _ = writeln!(
            o,
            "             resumption on a second connection: {}; client without ALPN: {}",
            opt(&t.resumption),
            opt(&t.no_alpn_client)
        );
        if let Some(h) = &t.h2_only_client {
            let _ = writeln!(o, "             client offering only h2: {h}");
        }
    }
}

fn p_used(r: &Report) -> bool {
    r.proxy.used
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn render_h2(o: &mut String, h: &Http2) {
    let _ = writeln!(
        o,
        "HTTP/2       via {}: SETTINGS first: {}{}",
        h.via,
        yes(h.settings_first),
        h.settings_ms.map(|m| format!(" ({m:.1} ms)")).unwrap_or_default()
    );
    if let Some(s) = &h.settings {
        let _ = writeln!(
            o,
            "             max_concurrent_streams {}, initial_window_size {}, max_frame_size {}, max_header_list_size {}, header_table_size {}",
            s.max_concurrent_streams.map_or("unlimited".into(), |v| v.to_string()),
            s.initial_window_size,
            s.max_frame_size,
            s.max_header_list_size.map_or("unlimited".into(), |v| v.to_string()),
            s.header_table_size
        );
    }
    match (&h.ping_ms, &h.ping_error) {
        (Some(m), _) => {
            let _ = writeln!(o, "             PING answered in {m:.1} ms");
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "             PING: {e}");
        }
        _ => {}
    }
    if let Some(g) = &h.goaway {
        let _ = writeln!(
            o,
            "             GOAWAY {} (last stream {}){}",
            g.code_name,
            g.last_stream_id,
            if g.debug_data.is_empty() {
                String::new()
            } else {
                format!(", debug data `{}`", g.debug_data)
            }
        );
    }
    if let Some(e) = &h.error {
        let _ = writeln!(o, "             {e}");
    }
}

fn render_reuse(o: &mut String, r: &Reuse) {
    let statuses: Vec<String> = r
        .statuses
        .iter()
        .map(|s| s.map_or("?".into(), |s| s.to_string()))
        .collect();
    let _ = writeln!(
        o,
        "Reuse        {} request{} over {}: {} completed on {} connection{} (statuses {})",
        r.requests,
        if r.requests == 1 { "" } else { "s" },
        r.protocol,
        r.completed,
        r.connections,
        if r.connections == 1 { "" } else { "s" },
        statuses.join(" ")
    );
    if let Some(s) = &r.server {
        let _ = writeln!(o, "             server: {s}");
    }
    for c in &r.closes {
        let _ = writeln!(
            o,
            "             new connection after request {}: {} ({})",
            c.after_request, c.reason, c.detail
        );
    }
    match r.idle_close_ms {
        Some(m) => {
            let _ = writeln!(o, "             the server closed the idle connection after {m:.0} ms");
        }
        None if r.error.is_none() => {
            let _ = writeln!(
                o,
                "             the last connection stayed open through {}s idle",
                super::reuse::IDLE_WATCH.as_secs()
            );
        }
        None => {}
    }
    if let Some(e) = &r.error {
        let _ = writeln!(o, "             {e}");
    }
}
