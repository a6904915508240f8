//! `gatehouse doctor URL`: explains, step by step, why a server (any server) downgrades to
//! HTTP/1.1 or fails to reuse connections: DNS, proxy, TCP, TLS and ALPN, HTTP/2 settings, reuse.
//!
//! Every probe is bounded in time and reports instead of failing: a bad certificate, a refused
//! protocol or a closed connection is a finding with a cause and a fix, never an abort. The exit
//! code follows the SPEC: 0 when the target negotiates what was asked and reuses connections, 1
//! when doctor found a problem it explains, 2 when it could not connect.

pub mod env;
mod h2;
pub mod net;
pub mod report;
mod reuse;
pub mod target;
mod tls;
mod verdict;

use net::{Io, Route};
use report::{Dns, H2c, Http2, Proxy, Report, Tcp, Tls};
use std::path::PathBuf;
use std::time::Duration;
use target::{ProxyDecision, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sent in every request doctor makes, so that server logs show where the probe came from.
pub const USER_AGENT: &str = concat!("gatehouse-doctor/", env!("CARGO_PKG_VERSION"));

/// Requests sent for the reuse test unless `--requests` says otherwise: enough to see a
/// per-connection limit or an idle close, few enough to be harmless to any server.
pub const DEFAULT_REQUESTS: u32 = 5;

/// The protocol the user asked doctor to test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Offer h2 and http/1.1 (TLS), as browsers do; HTTP/1.1 on cleartext.
    Any,
    Http1,
    Http2,
}

/// Everything from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    pub url: String,
    pub requests: u32,
    pub want: Want,
    pub proxy: Option<String>,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}

/// Opens fresh connections to the target along the chosen route, TLS included.
pub struct Dialer {
    pub target: Target,
    route: Route,
    tls: Option<tls::Client>,
}

impl Dialer {
    /// A new connection, ready for HTTP: the stream and the ALPN protocol chosen (TLS).
    pub async fn open_stream(&self) -> Result<(Box<dyn Io>, Option<String>), String> {
        let opened = net::open(&self.route, &self.target).await.map_err(|e| e.to_string())?;
        match &self.tls {
            None => Ok((Box::new(opened.stream), None)),
            Some(client) => {
                let (s, _) = client.handshake(opened.stream, &self.target.host).await?;
                let alpn = s
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                Ok((Box::new(s), alpn))
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs the whole diagnosis. Never panics on what the network does; the report carries the
/// exit code.
pub fn run(opts: &Options) -> Report {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return Report {
                url: opts.url.clone(),
                error: Some(format!("cannot start the async runtime: {e}")),
                exit_code: 2,
                ..Report::default()
            }
        }
    };
    let lookup = |k: &str| std::env::var(k).ok();
    let mut report = runtime.block_on(diagnose(opts, &lookup));
    verdict::judge(&mut report);
    report
}

async fn diagnose(opts: &Options, lookup: &dyn Fn(&str) -> Option<String>) -> Report {
    let mut report = Report {
        url: opts.url.clone(),
        asked: match opts.want {
            Want::Any => "any",
            Want::Http1 => "http/1.1",
            Want::Http2 => "h2",
        }
        .into(),
        environment: env::scan(lookup),
        ..Report::default()
    };
    let target = match Target::parse(&opts.url) {
        Ok(t) => t,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    report.url = target.url.clone();
    let decision = match target::decide(&target, opts.proxy.as_deref(), lookup) {
        Ok(d) => d,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    // DNS for the origin: shown always; used for the connection unless a proxy tunnels.
    let origin_dns = net::resolve(&target.host, target.port).await;
    report.dns = Some(match &origin_dns {
        Ok(r) => Dns {
            host: target.host.clone(),
            addresses: r.addresses.iter().map(|a| a.ip().to_string()).collect(),
            used: None,
            ms: ms(r.elapsed),
            error: None,
        },
        Err(e) => Dns {
            host: target.host.clone(),
            addresses: vec![],
            used: None,
            ms: 0.0,
            error: Some(e.clone()),
        },
    });
    let proxy = match decision {
        ProxyDecision::Use(p) => Some(p),
        ProxyDecision::Excluded { variable, rule } => {
            report.proxy = Proxy {
                source: Some(variable),
                excluded_by: Some(rule),
                ..Proxy::default()
            };
            None
        }
        ProxyDecision::None => None,
    };
    // Candidate first hops: the proxy's addresses, or the origin's, in resolver order.
    let candidates: Vec<Route> = match &proxy {
        Some(p) => {
            report.proxy = Proxy {
                used: true,
                source: Some(p.source.clone()),
                url: Some(p.shown.clone()),
                ..Proxy::default()
            };
            match net::resolve(&p.host, p.port).await {
                Ok(r) => r
                    .addresses
                    .into_iter()
                    .map(|addr| Route::Proxy { proxy: p.clone(), addr })
                    .collect(),
                Err(e) => {
                    report.error = Some(format!("proxy {}: {e}", p.shown));
                    return report;
                }
            }
        }
        None => match &origin_dns {
            Ok(r) => r.addresses.iter().map(|a| Route::Direct(*a)).collect(),
            Err(e) => {
                report.error = Some(e.clone());
                return report;
            }
        },
    };
    let mut opened = None;
    let mut last_err = String::new();
    for route in candidates {
        match net::open(&route, &target).await {
            Ok(o) => {
                opened = Some((route, o));
                break;
            }
            Err(net::OpenError::ProxyRefused(status, line)) => {
                report.error = Some(format!(
                    "the proxy answered CONNECT {} with {status}: {line}",
                    target.host_port()
                ));
                return report;
            }
            Err(e) => last_err = e.to_string(),
        }
    }
    let Some((route, opened)) = opened else {
        report.error = Some(last_err);
        return report;
    };
    let addr = match &route {
        Route::Direct(a) | Route::Proxy { addr: a, .. } => *a,
    };
    if let (Some(d), Route::Direct(a)) = (report.dns.as_mut(), &route) {
        d.used = Some(a.ip().to_string());
    }
    report.proxy.connect_ms = opened.tunnel.map(ms);
    report.tcp = Some(Tcp {
        address: addr.to_string(),
        ms: ms(opened.tcp),
    });
    let requests = opts.requests.max(1);
    if target.tls {
        tls_path(opts, &mut report, target, route, opened.stream, requests).await;
    } else {
        cleartext_path(opts, &mut report, target, route, opened.stream, requests).await;
    }
    report
}

async fn tls_path(
    opts: &Options,
    report: &mut Report,
    target: Target,
    route: Route,
    tcp: tokio::net::TcpStream,
    requests: u32,
) {
    let roots = match tls::load_roots(opts.cacert.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            report.error = Some(e);
            return;
        }
    };
    let alpn: &[&str] = match opts.want {
        Want::Any => &["h2", "http/1.1"],
        Want::Http1 => &["http/1.1"],
        Want::Http2 => &["h2"],
    };
    let client = match tls::Client::new(&roots, alpn) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(e);
            return;
        }
    };
    let mut t = Tls {
        sni: target
            .host
            .parse::<std::net::IpAddr>()
            .is_err()
            .then(|| target.host.clone()),
        alpn_offered: client.alpn.clone(),
        trusted_roots: if opts.insecure {
            format!("--insecure (validity reported, not enforced; roots: {})", roots.source)
        } else {
            roots.source.clone()
        },
        ..Tls::default()
    };
    let (stream, took) = match client.handshake(tcp, &target.host).await {
        Ok(s) => s,
        Err(e) => {
            t.handshake_error = Some(e);
            report.tls = Some(t);
            return;
        }
    };
    let n = tls::negotiated(stream.get_ref().1);
    t.version = Some(n.version);
    t.cipher_suite = Some(n.cipher_suite);
    t.key_exchange_group = n.key_exchange_group;
    t.alpn_chosen = n.alpn.clone();
    t.handshake_ms = Some(ms(took));
    if let Some(p) = client.take_presented() {
        t.certificates = p.chain.iter().filter_map(tls::describe_cert).collect();
        t.hostname_match = p.hostname_ok;
        t.ocsp_stapled = p.ocsp_stapled;
        match &p.error {
            None => {
                t.validates = true;
                t.chain_complete = true;
            }
            Some(e) => {
                let (kind, text) = tls::classify(e, &t.certificates);
                t.chain_complete = kind != "incomplete_chain";
                t.validation_problem = Some(kind.to_string());
                t.validation_error = Some(text);
            }
        }
    }
    let dialer = Dialer {
        target: target.clone(),
        route: route.clone(),
        tls: Some(client.clone()),
    };
    if let Route::Proxy { .. } = route {
        compare_direct(report, &target, &roots, alpn, &t).await;
    }
    report.tls = Some(t);

    let io: Box<dyn Io> = Box::new(stream);
    report.reuse = Some(if n.alpn.as_deref() == Some("h2") {
        let (h, conn) = h2_probe(io, "alpn").await;
        report.http2 = Some(h);
        match conn {
            Some(c) => reuse::http2(&dialer, c, requests).await,
            None => reuse::Reuse {
                protocol: "h2".into(),
                requests,
                error: Some("HTTP/2 did not start; see the HTTP/2 step".into()),
                ..reuse::Reuse::default()
            },
        }
    } else {
        reuse::http1(&dialer, io, requests).await
    });

    // Extra handshakes: resumption with the same client (its session store), a client offering
    // no ALPN, and (after an http/1.1 choice) a client offering only h2.
    let resumption = match net::open(&route, &target).await {
        Ok(o) => match client.handshake(o.stream, &target.host).await {
            Ok((s, _)) => {
                let resumed = tls::negotiated(s.get_ref().1).resumed;
                if resumed { "resumed" } else { "not_resumed" }.to_string()
            }
            Err(e) => format!("failed: {e}"),
        },
        Err(e) => format!("failed: {e}"),
    };
    let no_alpn = probe_alpn(&route, &target, &roots, &[]).await;
    let h2_only = if n.alpn.as_deref() == Some("http/1.1") && opts.want == Want::Any {
        Some(probe_alpn(&route, &target, &roots, &["h2"]).await)
    } else {
        None
    };
    if let Some(t) = report.tls.as_mut() {
        t.resumption = Some(resumption);
        t.no_alpn_client = Some(no_alpn);
        t.h2_only_client = h2_only;
    }
}

/// One handshake offering `alpn`: `accepted` or `rejected` (with why).
async fn probe_alpn(route: &Route, target: &Target, roots: &tls::Roots, alpn: &[&str]) -> String {
    let client = match tls::Client::new(roots, alpn) {
        Ok(c) => c,
        Err(e) => return format!("not tested: {e}"),
    };
    match net::open(route, target).await {
        Ok(o) => match client.handshake(o.stream, &target.host).await {
            Ok((s, _)) => {
                let chosen = s
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                match (alpn.is_empty(), chosen) {
                    (_, Some(p)) if alpn.iter().any(|a| a.as_bytes() == p.as_bytes()) => "accepted".into(),
                    (true, _) => "accepted".into(),
                    (false, other) => format!(
                        "rejected: the server chose {}",
                        other.unwrap_or_else(|| "no protocol".into())
                    ),
                }
            }
            Err(e) if e.contains("no_application_protocol") => "rejected".into(),
            Err(e) => format!("rejected: {e}"),
        },
        Err(e) => format!("not tested: {e}"),
    }
}

/// Through a proxy: a direct connection to the origin, to tell a tunnel from TLS interception.
async fn compare_direct(report: &mut Report, target: &Target, roots: &tls::Roots, alpn: &[&str], via_proxy: &Tls) {
    let addrs = match net::resolve(&target.host, target.port).await {
        Ok(r) => r.addresses,
        Err(e) => {
            report.proxy.note = Some(format!("not compared with a direct connection: {e}"));
            return;
        }
    };
    let Ok(client) = tls::Client::new(roots, alpn) else {
        return;
    };
    let direct = Route::Direct(addrs[0]);
    let result = match net::open(&direct, target).await {
        Ok(o) => client.handshake(o.stream, &target.host).await,
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok((s, _)) => {
            let alpn = s
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let issuer = client
                .take_presented()
                .and_then(|p| p.chain.first().and_then(tls::describe_cert))
                .map(|c| c.issuer);
            let proxied_issuer = via_proxy.certificates.first().map(|c| c.issuer.clone());
            report.proxy.intercepting = Some(issuer.is_some() && issuer != proxied_issuer);
            report.proxy.direct_issuer = issuer;
            report.proxy.direct_alpn = alpn;
        }
        Err(e) => {
            report.proxy.note = Some(format!(
                "not compared with a direct connection ({e}); interception not ruled out"
            ));
        }
    }
}

/// The HTTP/2 preface exchange on `io`: SETTINGS first and on time, their values, PING. Returns
/// the connection when it is usable for requests.
async fn h2_probe(io: Box<dyn Io>, via: &str) -> (Http2, Option<h2::Conn>) {
    let mut h = Http2 {
        via: via.into(),
        ..Http2::default()
    };
    let mut conn = match h2::Conn::start(io).await {
        Ok(c) => c,
        Err(e) => {
            h.error = Some(format!("cannot send the connection preface: {e}"));
            return (h, None);
        }
    };
    match conn.await_settings().await {
        Ok(took) => {
            h.settings_first = true;
            h.settings_ms = Some(ms(took));
            h.settings_on_time = took <= h2::SETTINGS_ON_TIME;
            h.settings = conn.settings.clone();
        }
        Err(e) => {
            h.settings = conn.settings.clone();
            h.goaway = conn.goaway.clone();
            if conn.closed || conn.settings.is_none() {
                h.error = Some(e);
                return (h, None);
            }
            h.error = Some(e);
        }
    }
    match conn.ping().await {
        Ok(rtt) => h.ping_ms = Some(ms(rtt)),
        Err(e) => h.ping_error = Some(e),
    }
    h.goaway = conn.goaway.clone();
    if conn.closed || conn.goaway.is_some() {
        return (h, None);
    }
    (h, Some(conn))
}

async fn cleartext_path(
    opts: &Options,
    report: &mut Report,
    target: Target,
    route: Route,
    tcp: tokio::net::TcpStream,
    requests: u32,
) {
    let dialer = Dialer {
        target: target.clone(),
        route: route.clone(),
        tls: None,
    };
    let mut c = H2c::default();
    if opts.want == Want::Http2 {
        let (h, conn) = h2_probe(Box::new(tcp), "prior_knowledge").await;
        c.prior_knowledge = h.error.is_none();
        c.prior_knowledge_detail = prior_knowledge_detail(&h);
        report.reuse = Some(match conn {
            Some(conn) => reuse::http2(&dialer, conn, requests).await,
            None => reuse::Reuse {
                protocol: "h2c".into(),
                requests,
                error: Some("HTTP/2 by prior knowledge did not start".into()),
                ..reuse::Reuse::default()
            },
        });
        report.http2 = Some(h);
    } else {
        report.reuse = Some(reuse::http1(&dialer, Box::new(tcp), requests).await);
        if opts.want == Want::Any {
            match dialer.open_stream().await {
                Ok((io, _)) => {
                    let (h, conn) = h2_probe(io, "prior_knowledge").await;
                    c.prior_knowledge = h.error.is_none();
                    c.prior_knowledge_detail = prior_knowledge_detail(&h);
                    if let Some(conn) = conn {
                        conn.close().await;
                    }
                    if c.prior_knowledge {
                        report.http2 = Some(h);
                    }
                }
                Err(e) => c.prior_knowledge_detail = format!("not tested: {e}"),
            }
        }
    }
    if opts.want != Want::Http1 {
        match dialer.open_stream().await {
            Ok((io, _)) => upgrade_probe(io, &target, &mut c).await,
            Err(e) => c.upgrade_detail = format!("not tested: {e}"),
        }
    }
    if opts.want != Want::Http1 {
        report.h2c = Some(c);
    }
}

fn prior_knowledge_detail(h: &Http2) -> String {
    match &h.error {
        None => "the server answered the HTTP/2 preface with SETTINGS".into(),
        Some(e) => e.clone(),
    }
}

/// Sends an `Upgrade: h2c` request (RFC 7540 §3.2) and reads the status line.
async fn upgrade_probe(mut io: Box<dyn Io>, target: &Target, c: &mut H2c) {
    // HTTP2-Settings: the SETTINGS payload curl sends, base64url-encoded (max concurrent streams
    // 100, initial window 10 MiB, push off), so the server sees what a real upgrading client sends.
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {USER_AGENT}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        target.path,
        target.authority()
    );
    if let Err(e) = io.write_all(req.as_bytes()).await {
        c.upgrade_detail = format!("not tested: {e}");
        return;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n") && head.len() < 1024 {
            if io.read(&mut byte).await? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(reuse::REQUEST_TIMEOUT, read).await;
    let line = String::from_utf8_lossy(&head).trim().to_string();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
    c.upgrade_status = status;
    c.upgrade = status == Some(101);
    c.upgrade_detail = match status {
        Some(101) => "the server switched to h2c (101 Switching Protocols)".into(),
        Some(s) => format!("the server answered the upgrade request with {s}, staying on HTTP/1.1"),
        None if line.is_empty() => "the server closed the connection without answering the upgrade request".into(),
        None => format!("the server answered `{line}`"),
    };
    let _ = io.shutdown().await;
}
