//! What doctor probes: the URL split into scheme, host, port and path, and the proxy (if any) that
//! applies to it under the same environment rules curl follows.

use std::net::IpAddr;

/// The probed URL, parsed once.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub tls: bool,
    /// Host as written, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path and query sent in requests.
    pub path: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL; a URL without a scheme is taken as `https://`,
    /// as a browser's address bar does.
    pub fn parse(url: &str) -> Result<Target, String> {
        let text = if url.contains("://") {
            url.to_string()
        } else {
            format!("https://{url}")
        };
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("`{url}` is not a URL ({e}); give e.g. https://example.com/"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(other) => {
                return Err(format!(
                    "unsupported scheme `{other}` in `{url}`: use http:// or https://"
                ))
            }
            None => return Err(format!("`{url}` has no scheme: use http:// or https://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{url}` has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_string());
        Ok(Target {
            url: text,
            tls,
            host,
            port,
            path,
        })
    }

    /// `host:port` as a CONNECT request target and `Host` header (IPv6 in brackets).
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = self.bracketed_host();
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `host:port`, always with the port (what CONNECT needs).
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.bracketed_host(), self.port)
    }

    fn bracketed_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// A proxy that applies to the target, and where the choice came from.
#[derive(Clone, Debug)]
pub struct ProxyChoice {
    /// `--proxy` or the environment variable's name, e.g. `HTTPS_PROXY`.
    pub source: String,
    /// The proxy URL with any credentials masked, for output.
    pub shown: String,
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization` value when the URL carries `user:password@`.
    pub authorization: Option<String>,
}

/// Why no proxy is used, or which one is.
#[derive(Clone, Debug)]
pub enum ProxyDecision {
    None,
    /// A proxy variable is set but `NO_PROXY` (named, with the matching rule) excludes the host.
    Excluded {
        variable: String,
        rule: String,
    },
    Use(ProxyChoice),
}

/// Reads an environment variable in lower case first, then upper case (curl's order; curl reads
/// only lower-case `http_proxy`, because `HTTP_PROXY` can be set by a CGI request header).
fn env_var(lookup: &dyn Fn(&str) -> Option<String>, name: &str, upper_allowed: bool) -> Option<(String, String)> {
    let lower = name.to_ascii_lowercase();
    if let Some(v) = lookup(&lower).filter(|v| !v.is_empty()) {
        return Some((lower, v));
    }
    if upper_allowed {
        if let Some(v) = lookup(name).filter(|v| !v.is_empty()) {
            return Some((name.to_string(), v));
        }
    }
    None
}

/// Chooses the proxy for `target`: `--proxy` wins; else `https_proxy`/`http_proxy` by scheme,
/// then `all_proxy`; `no_proxy` excludes hosts (comma-separated: `*`, a host or domain suffix,
/// with or without a leading dot, an IP address, or a CIDR range).
pub fn decide(
    target: &Target,
    flag: Option<&str>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<ProxyDecision, String> {
    if let Some(p) = flag {
        if p.is_empty() {
            return Ok(ProxyDecision::None);
        }
        return parse_proxy(p, "--proxy").map(ProxyDecision::Use);
    }
    let found = if target.tls {
        env_var(lookup, "HTTPS_PROXY", true)
    } else {
        env_var(lookup, "HTTP_PROXY", false)
    }
    .or_else(|| env_var(lookup, "ALL_PROXY", true));
    let Some((variable, value)) = found else {
        return Ok(ProxyDecision::None);
    };
    if let Some((_, no_proxy)) = env_var(lookup, "NO_PROXY", true) {
        if let Some(rule) = no_proxy_match(&no_proxy, &target.host) {
            return Ok(ProxyDecision::Excluded { variable, rule });
        }
    }
    parse_proxy(&value, &variable).map(ProxyDecision::Use)
}

/// The `NO_PROXY` rule that excludes `host`, if any.
pub fn no_proxy_match(no_proxy: &str, host: &str) -> Option<String> {
    let host = host.to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    for rule in no_proxy.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        if rule == "*" {
            return Some(rule.to_string());
        }
        let r = rule.to_ascii_lowercase();
        if let (Some(ip), Some((net, bits))) = (ip, r.split_once('/')) {
            if cidr_contains(net, bits, ip) {
                return Some(rule.to_string());
            }
            continue;
        }
        if let (Some(ip), Ok(rip)) = (ip, r.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()) {
            if ip == rip {
                return Some(rule.to_string());
            }
            continue;
        }
        let suffix = r.trim_start_matches('.');
        if host == suffix || host.ends_with(&format!(".{suffix}")) {
            return Some(rule.to_string());
        }
    }
    None
}

/// Whether `ip` is inside `net/bits`; false for anything unparsable or of the other family.
fn cidr_contains(net: &str, bits: &str, ip: IpAddr) -> bool {
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    let (a, b, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let shift = width - bits;
    // A shift of 128 would overflow: /0 matches everything in the family.
    shift >= 128 || (a >> shift) == (b >> shift)
}

fn parse_proxy(value: &str, source: &str) -> Result<ProxyChoice, String> {
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let (scheme, rest) = text.split_once("://").unwrap_or(("http", text.as_str()));
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "{source}: proxy scheme `{scheme}` is not supported by doctor (only http:// CONNECT proxies)"
        ));
    }
    let rest = rest.split('/').next().unwrap_or("");
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let authority: http::uri::Authority = hostport
        .parse()
        .map_err(|e| format!("{source}: `{hostport}` is not a proxy address ({e})"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(1080);
    let authorization = userinfo.map(|u| {
        let decoded = percent_encoding::percent_decode_str(u).decode_utf8_lossy().into_owned();
        format!("Basic {}", crate::http::base64::encode(decoded.as_bytes()))
    });
    let shown = match userinfo {
        Some(_) => format!("http://***@{hostport}"),
        None => format!("http://{hostport}"),
    };
    Ok(ProxyChoice {
        source: source.to_string(),
        shown,
        host,
        port,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn no_proxy_rules_match_like_curl() {
        assert_eq!(no_proxy_match("*", "a.example"), Some("*".into()));
        assert_eq!(
            no_proxy_match("example.com", "api.example.com"),
            Some("example.com".into())
        );
        assert_eq!(
            no_proxy_match(".example.com", "example.com"),
            Some(".example.com".into())
        );
        assert_eq!(no_proxy_match("example.com", "badexample.com"), None);
        assert_eq!(no_proxy_match("10.0.0.0/8", "10.1.2.3"), Some("10.0.0.0/8".into()));
        assert_eq!(no_proxy_match("127.0.0.1", "127.0.0.1"), Some("127.0.0.1".into()));
        assert_eq!(no_proxy_match("10.0.0.0/8", "11.0.0.1"), None);
    }

    #[test]
    fn scheme_selects_the_variable_and_no_proxy_excludes() {
        let t = Target::parse("https://api.example.com/x").unwrap();
        let d = decide(&t, None, &env(&[("HTTPS_PROXY", "http://u:p@proxy:3128")])).unwrap();
        let ProxyDecision::Use(p) = d else { panic!() };
        assert_eq!(
            (p.host.as_str(), p.port, p.source.as_str()),
            ("proxy", 3128, "HTTPS_PROXY")
        );
        assert_eq!(p.authorization.as_deref(), Some("Basic dTpw"));
        assert_eq!(p.shown, "http://***@proxy:3128");
        let d = decide(
            &t,
            None,
            &env(&[("https_proxy", "proxy:3128"), ("no_proxy", "localhost,.example.com")]),
        )
        .unwrap();
        assert!(matches!(d, ProxyDecision::Excluded { ref rule, .. } if rule == ".example.com"));
        // Upper-case HTTP_PROXY is ignored (curl: it can come from a CGI `Proxy:` header).
        let plain = Target::parse("http://a.test/").unwrap();
        assert!(matches!(
            decide(&plain, None, &env(&[("HTTP_PROXY", "p:1")])).unwrap(),
            ProxyDecision::None
        ));
    }

    #[test]
    fn urls_parse_with_defaults() {
        let t = Target::parse("example.com").unwrap();
        assert!(t.tls && t.port == 443 && t.path == "/");
        let t = Target::parse("http://[::1]:8080/a?b").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 8080, "/a?b"));
        assert_eq!(t.host_port(), "[::1]:8080");
        assert!(Target::parse("ftp://x/").is_err());
    }
}
