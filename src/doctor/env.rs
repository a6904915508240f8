//! Environment variables that switch HTTP/2 off or change negotiation in common clients, listed
//! with what they do: the hidden switches behind "it works with curl but not from my service".

use serde::Serialize;

/// One variable that is set, and its effect.
#[derive(Clone, Debug, Serialize)]
pub struct EnvVar {
    pub name: String,
    /// The value, or `(set)` where it may hold a secret or a path to one.
    pub value: String,
    pub effect: String,
    /// Whether it turns HTTP/2 off in some client (a warning in the verdict).
    pub disables_http2: bool,
}

/// The variables doctor knows about, in a stable order.
pub fn scan(lookup: &dyn Fn(&str) -> Option<String>) -> Vec<EnvVar> {
    let mut out = Vec::new();
    let mut add = |name: &str, value: String, effect: String, disables_http2: bool| {
        out.push(EnvVar {
            name: name.to_string(),
            value,
            effect,
            disables_http2,
        })
    };
    if let Some(v) = lookup("GODEBUG") {
        let settings: Vec<&str> = v.split(',').map(str::trim).collect();
        let mut effects = Vec::new();
        let mut off = false;
        if settings.contains(&"http2client=0") {
            effects.push("Go programs' net/http clients never use HTTP/2 (http2client=0)");
            off = true;
        }
        if settings.contains(&"http2server=0") {
            effects.push("Go programs' net/http servers never offer HTTP/2 (http2server=0)");
            off = true;
        }
        if settings.iter().any(|s| s.starts_with("http2debug=")) {
            effects.push("Go's HTTP/2 debug logging is on (http2debug)");
        }
        if settings.iter().any(|s| s.starts_with("tls")) {
            effects.push("Go's TLS defaults are changed (tls* settings)");
        }
        let effect = if effects.is_empty() {
            "Go runtime settings; none known to change HTTP negotiation".to_string()
        } else {
            effects.join("; ")
        };
        add("GODEBUG", v, effect, off);
    }
    if let Some(v) = lookup("NODE_OPTIONS") {
        let tls = v.contains("--tls-");
        add(
            "NODE_OPTIONS",
            v,
            if tls {
                "options for every Node.js process; includes --tls-* flags that change TLS versions or ciphers".into()
            } else {
                "options for every Node.js process (Node's http/https modules speak HTTP/1.1 only; HTTP/2 needs the http2 module)".into()
            },
            false,
        );
    }
    if let Some(v) = lookup("NODE_TLS_REJECT_UNAUTHORIZED").filter(|v| v == "0") {
        add(
            "NODE_TLS_REJECT_UNAUTHORIZED",
            v,
            "Node.js accepts any certificate: certificate problems are hidden from Node clients".into(),
            false,
        );
    }
    if lookup("SSLKEYLOGFILE").is_some() {
        add(
            "SSLKEYLOGFILE",
            "(set)".into(),
            "curl, Firefox, Chrome and others write TLS session secrets to this file: useful to decrypt a capture, a risk anywhere else".into(),
            false,
        );
    }
    for (name, effect) in [
        (
            "SSL_CERT_FILE",
            "OpenSSL-based clients (curl, Python, Ruby) trust only this CA bundle",
        ),
        (
            "SSL_CERT_DIR",
            "OpenSSL-based clients read trusted CAs from this directory",
        ),
        ("CURL_CA_BUNDLE", "curl trusts only this CA bundle"),
        (
            "CURL_HOME",
            "curl reads .curlrc from here: check it for --http1.1, --proxy or --insecure",
        ),
        (
            "CURL_SSL_BACKEND",
            "selects curl's TLS library, which changes ciphers and ALPN support",
        ),
        (
            "REQUESTS_CA_BUNDLE",
            "Python requests trusts only this CA bundle (requests speaks HTTP/1.1 only)",
        ),
        ("NODE_EXTRA_CA_CERTS", "Node.js adds these CAs to its trust store"),
    ] {
        if let Some(v) = lookup(name) {
            add(name, v, effect.to_string(), false);
        }
    }
    for name in [
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        if let Some(v) = lookup(name) {
            let effect = if name.eq_ignore_ascii_case("no_proxy") {
                "hosts that bypass the proxy"
            } else {
                "clients send matching requests through this proxy; a proxy in the path decides the protocol on each side"
            };
            // Credentials in a proxy URL are not printed.
            let shown = match v.split_once('@') {
                Some((left, right)) if left.contains("://") => {
                    format!("{}://***@{right}", left.split("://").next().unwrap_or("http"))
                }
                Some((_, right)) => format!("***@{right}"),
                None => v,
            };
            add(name, shown, effect.to_string(), false);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn godebug_http2_off_and_proxy_credentials_masked() {
        let env = |k: &str| match k {
            "GODEBUG" => Some("x509sha1=1,http2client=0".to_string()),
            "HTTPS_PROXY" => Some("http://user:secret@proxy:3128".to_string()),
            _ => None,
        };
        let vars = scan(&env);
        assert!(vars[0].disables_http2 && vars[0].effect.contains("http2client=0"));
        assert_eq!(vars[1].value, "http://***@proxy:3128");
    }
}
