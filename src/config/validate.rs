//! Validation of a parsed configuration: every problem at once, each naming its key and the fix.
//!
//! This checks what can be checked from the configuration alone (and the file system for
//! static directories). Certificates and keys are checked by `tls::CertStore` when they load;
//! `gatehouse check` and `serve` report both lists together before binding anything.

use super::{Config, OnNoAlpn, Protocol};
use std::collections::HashSet;
use std::fmt;

/// The longest request-target hyper's HTTP/1.1 parser and `http::Uri` accept (`u16::MAX - 1`).
const MAX_URI_BYTES_CEILING: u64 = u16::MAX as u64 - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// One problem found in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// The key path, like `listeners[0].tls.key`.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}: {}", self.key, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every finding from one validation pass.
#[derive(Clone, Debug, Default)]
pub struct Findings(pub Vec<Finding>);

impl Findings {
    pub fn error(&mut self, key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.push(Severity::Error, key, problem, fix);
    }
    pub fn warning(&mut self, key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.push(Severity::Warning, key, problem, fix);
    }
    fn push(&mut self, severity: Severity, key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.0.push(Finding {
            severity,
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|f| f.severity == Severity::Error)
    }
    pub fn extend(&mut self, other: Findings) {
        self.0.extend(other.0);
    }
    pub fn iter(&self) -> impl Iterator<Item = &Finding> {
        self.0.iter()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.0 {
            writeln!(f, "{finding}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Checks the configuration without touching the network. Certificates are checked separately.
    pub fn validate(&self) -> Findings {
        let mut f = Findings::default();
        self.validate_listeners(&mut f);
        self.validate_bounds(&mut f);
        self.validate_routes(&mut f);
        self.validate_upstreams(&mut f);
        self.validate_admission(&mut f);
        self.validate_admin_and_log(&mut f);
        self.validate_static_cache(&mut f);
        f
    }

    fn validate_static_cache(&self, f: &mut Findings) {
        let c = &self.static_cache;
        if c.max_entries == 0 {
            return;
        }
        if c.validity.is_zero() {
            f.error(
                "static_cache.validity",
                "is 0s, which would check the file system on every request and cache nothing",
                "set a validity such as \"1s\", or turn the cache off with static_cache.max_entries = 0",
            );
        }
        if c.max_file_size.0 > c.max_bytes.0 {
            f.error(
                "static_cache.max_file_size",
                format!(
                    "{} is larger than static_cache.max_bytes ({})",
                    c.max_file_size, c.max_bytes
                ),
                "raise static_cache.max_bytes or lower static_cache.max_file_size",
            );
        }
    }

    fn validate_listeners(&self, f: &mut Findings) {
        if self.listeners.is_empty() {
            f.error(
                "listeners",
                "no listener is configured, so nothing would be served",
                "add a [[listeners]] table with a name and an address",
            );
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            if l.name.trim().is_empty() {
                f.error(format!("{key}.name"), "is empty", "give every listener a unique name");
            } else if !names.insert(l.name.as_str()) {
                f.error(
                    format!("{key}.name"),
                    format!("`{}` is used by an earlier listener", l.name),
                    "give every listener a unique name (it labels metrics and logs)",
                );
            }
            // Port 0 asks the kernel for a free port, so two such listeners never collide.
            if l.address.port() != 0 && !addrs.insert(l.address) {
                f.error(
                    format!("{key}.address"),
                    format!("{} is used by an earlier listener", l.address),
                    "give every listener its own address",
                );
            }
            let protocols = l.effective_protocols();
            if protocols.is_empty() {
                f.error(
                    format!("{key}.protocols"),
                    "is empty, so this listener could not serve anything",
                    "list at least one protocol",
                );
            }
            let mut seen = HashSet::new();
            for p in &protocols {
                if !seen.insert(*p) {
                    f.error(
                        format!("{key}.protocols"),
                        format!("lists \"{}\" twice", p.as_str()),
                        "list each protocol once",
                    );
                }
            }
            match &l.tls {
                Some(tls) => {
                    if protocols.contains(&Protocol::H2c) {
                        f.error(
                            format!("{key}.protocols"),
                            "\"h2c\" is HTTP/2 without TLS, but this listener has [tls]",
                            "use \"h2\" for HTTP/2 over TLS",
                        );
                    }
                    if l.h2c_upgrade {
                        f.error(
                            format!("{key}.h2c_upgrade"),
                            "applies to cleartext listeners only, but this listener has [tls]",
                            "remove h2c_upgrade; ALPN negotiates HTTP/2 over TLS",
                        );
                    }
                    let tkey = format!("{key}.tls");
                    let has_files = tls.cert.is_some() || tls.key.is_some();
                    match (&tls.self_signed, has_files) {
                        (Some(_), true) => f.error(
                            tkey.clone(),
                            "sets both cert/key and self_signed",
                            "use cert and key for a real certificate, or self_signed for development, not both",
                        ),
                        (Some(names), false) if names.is_empty() => f.error(
                            format!("{tkey}.self_signed"),
                            "is empty",
                            "list the host names the certificate is for, e.g. [\"localhost\"]",
                        ),
                        (None, _) => {
                            if tls.cert.is_none() {
                                f.error(
                                    format!("{tkey}.cert"),
                                    "is missing",
                                    "set cert to a PEM file holding the full chain, leaf first (or use self_signed = [\"localhost\"])",
                                );
                            }
                            if tls.key.is_none() {
                                f.error(
                                    format!("{tkey}.key"),
                                    "is missing",
                                    "set key to the PEM file holding the certificate's private key",
                                );
                            }
                        }
                        _ => {}
                    }
                }
                None => {
                    if protocols.contains(&Protocol::H2) {
                        f.error(
                            format!("{key}.protocols"),
                            "\"h2\" is HTTP/2 over TLS, but this listener has no [tls]",
                            "add a [listeners.tls] table, or use \"h2c\" for cleartext HTTP/2",
                        );
                    }
                    if l.on_no_alpn == OnNoAlpn::Reject {
                        f.warning(
                            format!("{key}.on_no_alpn"),
                            "has no effect on a cleartext listener (ALPN is part of TLS)",
                            "remove it, or add [listeners.tls]",
                        );
                    }
                    if l.h2c_upgrade && !protocols.contains(&Protocol::H2c) {
                        f.error(
                            format!("{key}.h2c_upgrade"),
                            "is true but protocols does not include \"h2c\"",
                            "add \"h2c\" to protocols, or set h2c_upgrade = false",
                        );
                    }
                    if l.h2c_upgrade && !protocols.contains(&Protocol::Http11) {
                        f.error(
                            format!("{key}.h2c_upgrade"),
                            "is true but protocols does not include \"http/1.1\", which carries the Upgrade request",
                            "add \"http/1.1\" to protocols, or set h2c_upgrade = false",
                        );
                    }
                }
            }
        }
    }

    fn validate_bounds(&self, f: &mut Findings) {
        let t = &self.timeouts;
        for (name, v) in [
            ("tls_handshake", t.tls_handshake),
            ("header_read", t.header_read),
            ("body_read", t.body_read),
            ("write", t.write),
            ("idle", t.idle),
            ("request", t.request),
            ("first_request", t.first_request),
        ] {
            if v.is_zero() {
                f.error(
                    format!("timeouts.{name}"),
                    "is 0, which would leave this phase unbounded",
                    "set a positive duration such as \"30s\" (gatehouse always bounds every phase)",
                );
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("max_connections", u64::from(l.max_connections)),
            ("max_connections_per_ip", u64::from(l.max_connections_per_ip)),
            ("max_requests_per_connection", u64::from(l.max_requests_per_connection)),
            ("max_header_bytes", l.max_header_bytes.get()),
            ("max_uri_bytes", l.max_uri_bytes.get()),
        ] {
            if v == 0 {
                f.error(
                    format!("limits.{name}"),
                    "is 0, which would refuse all traffic",
                    "set a positive value",
                );
            }
        }
        if l.idle_release_after.get() >= t.idle.get() {
            f.warning(
                "limits.idle_release_after",
                format!(
                    "{} is not shorter than timeouts.idle ({}), so idle HTTP/1.1 connections are closed before they release their buffers",
                    l.idle_release_after, t.idle
                ),
                "set it below timeouts.idle (default \"0s\")",
            );
        }
        if l.max_header_bytes.get() < 1024 {
            f.error(
                "limits.max_header_bytes",
                format!("{} cannot hold an ordinary browser request", l.max_header_bytes),
                "set at least \"1KiB\" (default \"16KiB\")",
            );
        }
        // hyper and the `http` crate cannot represent a longer request-target at all.
        if l.max_uri_bytes.get() > MAX_URI_BYTES_CEILING {
            f.error(
                "limits.max_uri_bytes",
                format!(
                    "{} exceeds {MAX_URI_BYTES_CEILING} bytes, the longest URI the HTTP parser accepts",
                    l.max_uri_bytes
                ),
                "set at most \"63KiB\" (default \"8KiB\")",
            );
        } else if l.max_uri_bytes.get() > l.max_header_bytes.get() {
            f.warning(
                "limits.max_uri_bytes",
                format!(
                    "{} is larger than limits.max_header_bytes ({}), which also bounds the request line",
                    l.max_uri_bytes, l.max_header_bytes
                ),
                "a longer URI is answered 431 rather than 414; raise max_header_bytes or lower max_uri_bytes",
            );
        }
        let h = &self.http2;
        if h.max_concurrent_streams == 0 {
            f.error(
                "http2.max_concurrent_streams",
                "is 0, so no HTTP/2 request could ever be served",
                "set at least 1 (RFC 9113 recommends at least 100)",
            );
        }
        let fs = h.max_frame_size.get();
        if !(16_384..=16_777_215).contains(&fs) {
            f.error(
                "http2.max_frame_size",
                format!("{} is outside 16KiB..16MiB-1 (RFC 9113 §6.5.2)", h.max_frame_size),
                "use a value in that range; \"16KiB\" is the usual choice",
            );
        }
        for (name, v) in [
            ("initial_stream_window", h.initial_stream_window.get()),
            ("initial_connection_window", h.initial_connection_window.get()),
        ] {
            if v > 0x7fff_ffff {
                f.error(
                    format!("http2.{name}"),
                    "exceeds 2^31-1 bytes, the largest HTTP/2 flow-control window (RFC 9113 §6.9.1)",
                    "use at most \"1GiB\"",
                );
            } else if v < 65_535 {
                f.error(
                    format!("http2.{name}"),
                    "is below 65535 bytes, which would stall uploads on the protocol's default",
                    "use at least \"64KiB\"",
                );
            }
        }
        if h.keepalive_interval.is_zero() || h.keepalive_timeout.is_zero() {
            f.error(
                "http2.keepalive_interval",
                "keepalive_interval and keepalive_timeout must both be positive; dead HTTP/2 peers would otherwise never be detected",
                "set durations such as \"30s\" and \"10s\"",
            );
        }
        self.validate_h2_abuse_bounds(f);
        if self.shutdown.drain_timeout.is_zero() {
            f.error(
                "shutdown.drain_timeout",
                "is 0, so every in-flight request would be cut at shutdown",
                "set a positive duration such as \"30s\"",
            );
        }
        if self.shutdown.upgrade_timeout.is_zero() {
            f.error(
                "shutdown.upgrade_timeout",
                "is 0, so every binary upgrade would fail before the new process could start",
                "set a positive duration such as \"30s\"",
            );
        }
    }

    /// The HTTP/2 abuse bounds: each must exist (0 would disable the protection or every client).
    fn validate_h2_abuse_bounds(&self, f: &mut Findings) {
        let h = &self.http2;
        if h.max_control_frames_per_second < 10 {
            f.error(
                "http2.max_control_frames_per_second",
                format!(
                    "{} would close ordinary clients: connection setup alone sends several SETTINGS, PING and WINDOW frames",
                    h.max_control_frames_per_second
                ),
                "set at least 10 (default 1000)",
            );
        }
        for (name, v, default) in [
            (
                "max_pending_reset_streams",
                h.max_pending_reset_streams,
                super::DEFAULT_H2_MAX_PENDING_RESET_STREAMS,
            ),
            (
                "max_local_reset_streams",
                h.max_local_reset_streams,
                super::DEFAULT_H2_MAX_LOCAL_RESET_STREAMS,
            ),
        ] {
            if v == 0 {
                f.error(
                    format!("http2.{name}"),
                    "is 0, so the first reset stream would close the whole connection",
                    format!("set a positive value (default {default})"),
                );
            }
        }
        let sb = h.max_send_buffer.get();
        if sb < 16_384 || sb > u64::from(u32::MAX) {
            f.error(
                "http2.max_send_buffer",
                format!("{} is outside 16KiB..4GiB", h.max_send_buffer),
                "use a value in that range (default \"400KiB\")",
            );
        }
    }

    fn validate_routes(&self, f: &mut Findings) {
        if self.routes.is_empty() {
            f.warning(
                "routes",
                "no route is configured, so every request will be answered 404",
                "add a [[routes]] table",
            );
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let handlers = [
                r.static_dir.is_some(),
                r.proxy.is_some(),
                r.redirect.is_some(),
                r.respond.is_some(),
                r.builtin.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if handlers != 1 {
                f.error(
                    key.clone(),
                    format!("has {handlers} handlers"),
                    "set exactly one of static, proxy, redirect, respond or builtin",
                );
            }
            if !r.path.starts_with('/') {
                f.error(
                    format!("{key}.path"),
                    format!("`{}` does not start with /", r.path),
                    "write a path prefix such as \"/\" or \"/assets\"",
                );
            }
            let host = r.host.as_str();
            let host_ok = host == "*"
                || (!host.is_empty()
                    && host.trim_start_matches("*.").chars().all(|c| {
                        c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':' || c == '[' || c == ']'
                    })
                    && !host.trim_start_matches("*.").contains('*'));
            if !host_ok {
                f.error(
                    format!("{key}.host"),
                    format!("`{host}` is not a host pattern"),
                    "use an exact name, \"*.example.com\", or \"*\"",
                );
            }
            if let Some(dir) = &r.static_dir {
                if !dir.is_dir() {
                    f.error(
                        format!("{key}.static"),
                        format!("{} is not a readable directory", dir.display()),
                        "create it, or point static at the directory to serve",
                    );
                }
            }
            if let Some(target) = &r.redirect {
                if target.parse::<http::Uri>().is_err() || target.is_empty() {
                    f.error(
                        format!("{key}.redirect"),
                        format!("`{target}` is not a URI"),
                        "write an absolute URL such as \"https://example.com\" or a path",
                    );
                }
            }
            if let Some(s) = r.redirect_status {
                if ![301, 302, 303, 307, 308].contains(&s) {
                    f.error(
                        format!("{key}.redirect_status"),
                        format!("{s} is not a redirect status"),
                        "use 301, 302, 303, 307 or 308",
                    );
                }
                if r.redirect.is_none() {
                    f.warning(
                        format!("{key}.redirect_status"),
                        "is set on a route that does not redirect",
                        "remove it",
                    );
                }
            }
            if let Some(resp) = &r.respond {
                if !(200..=599).contains(&resp.status) {
                    f.error(
                        format!("{key}.respond.status"),
                        format!("{} is not a final HTTP status", resp.status),
                        "use a status from 200 to 599",
                    );
                }
                if let Some(ct) = &resp.content_type {
                    if http::HeaderValue::from_str(ct).is_err() {
                        f.error(
                            format!("{key}.respond.content_type"),
                            "is not a valid header value",
                            "use a media type such as \"text/plain\"",
                        );
                    }
                }
            }
        }
    }

    fn validate_admin_and_log(&self, f: &mut Findings) {
        if let Some(every) = self.server.watch_certificates {
            if every.get() < super::MIN_WATCH_CERTIFICATES.get() {
                f.error(
                    "server.watch_certificates",
                    format!("{every} is shorter than {}", super::MIN_WATCH_CERTIFICATES),
                    "use a few seconds (\"5s\"), or leave the key out to turn watching off",
                );
            }
        }
        let a = &self.admin;
        if !a.address.is_empty() {
            match a.address.parse::<std::net::SocketAddr>() {
                Err(_) => f.error(
                    "admin.address",
                    format!("`{}` is not an address", a.address),
                    "write it as \"127.0.0.1:9901\", or \"\" to turn the admin API off",
                ),
                Ok(addr) => {
                    if !addr.ip().is_loopback() && a.token_file.is_none() {
                        f.error(
                            "admin.token_file",
                            format!("the admin API on {addr} would be reachable from other hosts without a token"),
                            "set token_file to a file holding a bearer token, or bind admin.address to 127.0.0.1",
                        );
                    }
                    // Port 0 asks for an ephemeral port: two of those never clash.
                    if addr.port() != 0 && self.listeners.iter().any(|l| l.address == addr) {
                        f.error(
                            "admin.address",
                            format!("{addr} is also a listener's address"),
                            "give the admin API its own port",
                        );
                    }
                }
            }
        }
        if let Some(tf) = &a.token_file {
            match std::fs::read_to_string(tf) {
                Ok(t) if t.trim().is_empty() => f.error(
                    "admin.token_file",
                    format!("{} is empty", tf.display()),
                    "write a long random token into it",
                ),
                Ok(_) => {}
                Err(e) => f.error(
                    "admin.token_file",
                    format!("cannot read {}: {e}", tf.display()),
                    "make the file readable by the user gatehouse runs as",
                ),
            }
        }
        let log = &self.log;
        if !matches!(log.access_log.as_str(), "stdout" | "off" | "stderr") {
            let p = std::path::Path::new(&log.access_log);
            let parent = p
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            if !parent.is_dir() {
                f.error(
                    "log.access_log",
                    format!("the directory {} does not exist", parent.display()),
                    "create it, or use \"stdout\" or \"off\"",
                );
            }
        }
        if let Some(kf) = &log.hash_key_file {
            match std::fs::read(kf) {
                Ok(k) if k.trim_ascii().is_empty() => f.error(
                    "log.hash_key_file",
                    format!("{} is empty", kf.display()),
                    "write a long random secret into it, e.g. `head -c 32 /dev/urandom | xxd -p -c 64`",
                ),
                Ok(_) => {}
                Err(e) => f.error(
                    "log.hash_key_file",
                    format!("cannot read {}: {e}", kf.display()),
                    "make the file readable by the user gatehouse runs as",
                ),
            }
        }
        let known: Vec<&str> = crate::observe::Switch::ALL.iter().map(|s| s.as_str()).collect();
        for (i, s) in self.debug.switches.iter().enumerate() {
            if crate::observe::Switch::parse(s).is_none() {
                f.error(
                    format!("debug.switches[{i}]"),
                    format!("`{s}` is not a debug switch"),
                    format!("use one of {}", known.join(", ")),
                );
            }
        }
        if let Some(l) = &self.debug.listener {
            if !self.listeners.iter().any(|x| &x.name == l) {
                f.error(
                    "debug.listener",
                    format!("no listener is named `{l}`"),
                    "use the name of a [[listeners]] entry",
                );
            }
        }
        if let Some(p) = &self.debug.peer {
            if crate::observe::PeerFilter::parse(p).is_err() {
                f.error(
                    "debug.peer",
                    format!("`{p}` is not an address or CIDR block"),
                    "write it like \"203.0.113.7/32\"",
                );
            }
        }
        self.tracing.validate(f);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load_str;

    #[test]
    fn reports_every_problem_with_its_key() {
        let c = load_str(
            r#"
[[listeners]]
name = "a"
address = "127.0.0.1:1"
protocols = ["h2"]
[[listeners]]
name = "a"
address = "127.0.0.1:1"
[listeners.tls]
cert = "c.pem"
[timeouts]
idle = "0s"
[[routes]]
path = "x"
"#,
        )
        .unwrap();
        let f = c.validate();
        let keys: Vec<_> = f.iter().map(|x| x.key.as_str()).collect();
        for k in [
            "listeners[0].protocols",
            "listeners[1].name",
            "listeners[1].address",
            "listeners[1].tls.key",
            "timeouts.idle",
            "routes[0]",
            "routes[0].path",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
    }

    #[test]
    fn max_uri_bytes_is_bounded() {
        let severity = |v: &str| {
            let c = load_str(&format!("[limits]\nmax_uri_bytes = \"{v}\"\n")).unwrap();
            c.validate()
                .iter()
                .find(|x| x.key == "limits.max_uri_bytes")
                .map(|x| x.severity)
        };
        assert_eq!(severity("8KiB"), None);
        assert_eq!(severity("0B"), Some(super::Severity::Error));
        assert_eq!(severity("64KiB"), Some(super::Severity::Error));
        // Larger than max_header_bytes (16KiB): allowed, but it cannot take effect.
        assert_eq!(severity("32KiB"), Some(super::Severity::Warning));
    }

    #[test]
    fn h2_abuse_bounds_must_be_positive() {
        let c = load_str(
            r#"
[http2]
max_control_frames_per_second = 0
max_pending_reset_streams = 0
max_local_reset_streams = 0
max_send_buffer = "1KiB"
"#,
        )
        .unwrap();
        let f = c.validate();
        let keys: Vec<_> = f.iter().map(|x| x.key.as_str()).collect();
        for k in [
            "http2.max_control_frames_per_second",
            "http2.max_pending_reset_streams",
            "http2.max_local_reset_streams",
            "http2.max_send_buffer",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = crate::config::Config::embedded_default(false);
        assert!(!c.validate().has_errors(), "{}", c.validate());
    }
}
