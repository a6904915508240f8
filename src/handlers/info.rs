//! The built-in page that tells a visitor how they are connected.

use crate::conn::Protocol;
use crate::http::body::ResponseBody;
use crate::http::RequestContext;
use http::{header, HeaderMap, HeaderValue, Response};

/// Answers with the connection's protocol, TLS version, ALPN, id and request count:
/// JSON when the client accepts `application/json`, HTML otherwise.
pub fn connection_info(ctx: Option<&RequestContext>, headers: &HeaderMap) -> Response<ResponseBody> {
    let (id, protocol, tls_version, alpn, cipher, sni, requests, remote) = match ctx {
        Some(c) => {
            let t = c.conn.tls();
            (
                c.conn.id,
                c.conn.protocol(),
                t.map(|t| t.version).unwrap_or("none"),
                t.and_then(|t| t.alpn.clone()).unwrap_or_else(|| "none".into()),
                t.map(|t| t.cipher.clone()).unwrap_or_else(|| "none".into()),
                t.and_then(|t| t.sni.clone()).unwrap_or_else(|| "none".into()),
                c.seq,
                c.conn.peer.to_string(),
            )
        }
        None => (
            0,
            Protocol::Unknown,
            "none",
            "none".into(),
            "none".into(),
            "none".into(),
            0,
            String::new(),
        ),
    };
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    let (body, ct) = if wants_json {
        let v = serde_json::json!({
            "protocol": protocol.as_str(),
            "tls_version": tls_version,
            "alpn": alpn,
            "cipher": cipher,
            "sni": sni,
            "connection_id": id,
            "requests_on_connection": requests,
            "remote": remote,
        });
        (v.to_string(), "application/json")
    } else {
        let explain = match protocol {
            Protocol::H2 => "HTTP/2 over TLS, negotiated with ALPN.",
            Protocol::H2c => "HTTP/2 over cleartext TCP (h2c).",
            Protocol::Http11 if tls_version != "none" => {
                "HTTP/1.1 over TLS: your client did not negotiate h2 via ALPN (run `gatehouse doctor` against this URL to see why)."
            }
            _ => "HTTP/1.1 over cleartext TCP.",
        };
        let html = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>gatehouse</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;color:#222}}td{{padding:.2em 1em .2em 0}}code{{background:#eee;padding:0 .2em}}</style></head>\
<body><h1>gatehouse is running</h1><p>{explain}</p><table>\
<tr><td>protocol</td><td><code>{}</code></td></tr>\
<tr><td>TLS version</td><td><code>{}</code></td></tr>\
<tr><td>ALPN</td><td><code>{}</code></td></tr>\
<tr><td>cipher suite</td><td><code>{}</code></td></tr>\
<tr><td>connection id</td><td><code>{}</code></td></tr>\
<tr><td>requests on this connection</td><td><code>{}</code></td></tr>\
<tr><td>your address</td><td><code>{}</code></td></tr>\
</table><p>Put files in <code>./public</code> to serve them instead of this page.</p></body></html>\n",
            protocol.as_str(),
            html_escape(tls_version),
            html_escape(&alpn),
            html_escape(&cipher),
            id,
            requests,
            html_escape(&remote),
        );
        (html, "text/html; charset=utf-8")
    };
    let mut r = Response::new(ResponseBody::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
