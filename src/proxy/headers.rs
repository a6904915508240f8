//! Header rewriting between client and upstream: hop-by-hop removal (RFC 9110 §7.6.1),
//! `X-Forwarded-*`, `Forwarded` (RFC 7239), `Via` (RFC 9110 §7.6.3), `Host`, trace context.

use super::upstream::{HostRewrite, UpstreamSpec};
use crate::http::RequestContext;
use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

/// Fields that describe one connection, never the message (RFC 9110 §7.6.1), plus the
/// pre-standard `Proxy-Connection` and `Keep-Alive` that old clients still send. A `static`,
/// not a `const`: a `const` array is built afresh at each use and its custom names dropped after.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The bit of `Connection` in [`hop_by_hop_fields`]' answer.
const CONNECTION_BIT: u8 = 1;
/// The bit of `TE` in [`hop_by_hop_fields`]' answer.
const TE_BIT: u8 = 1 << 3;

/// Which of [`HOP_BY_HOP`] `headers` carries, bit `i` for entry `i`. Most heads carry none (or
/// only `Connection`): removing all six by name cost a proxied request about 900 instructions.
fn hop_by_hop_fields(headers: &HeaderMap) -> u8 {
    crate::http::fields_present(headers, &HOP_BY_HOP)
}

/// Removes the hop-by-hop fields and every field that `Connection` names. Returns whether the
/// message asked for `TE: trailers`, the one `TE` value that means something end to end (the
/// sender accepts trailers) and that HTTP/2 allows.
///
/// Runs twice per proxied request, so the usual case looks nothing up and allocates nothing:
/// `Connection` mostly lists only `keep-alive` or `upgrade`, fields that go anyway, and only a
/// token naming another field is collected.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let present = hop_by_hop_fields(headers);
    strip_fields(headers, present)
}

/// [`strip_hop_by_hop`] for the fields `present` says the head carries.
fn strip_fields(headers: &mut HeaderMap, present: u8) -> bool {
    if present == 0 {
        return false;
    }
    let named: Vec<HeaderName> = if present & CONNECTION_BIT == 0 {
        Vec::new()
    } else {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h.as_str())))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    };
    let te_trailers = present & TE_BIT != 0
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
    te_trailers
}

/// The forwarding fields this proxy writes whose names have a `-` that a backend may read as `_`.
const FORWARDING_DASHED: [&str; 2] = ["x-forwarded-for", "x-forwarded-proto"];

/// Whether `name` is one of [`FORWARDING_DASHED`] spelled with `_` for some `-`.
fn forwarding_lookalike(name: &str) -> bool {
    // Only names of those lengths are looked at: the check costs a request next to nothing.
    FORWARDING_DASHED.iter().any(|f| {
        f.len() == name.len()
            && name.contains('_')
            && f.bytes()
                .zip(name.bytes())
                .all(|(f, n)| n == f || (f == b'-' && n == b'_'))
    })
}

/// Removes a client's `X_Forwarded_For` and the like. CGI-style backends (WSGI, Rack, PHP) fold
/// `-` and `_` into one variable (`HTTP_X_FORWARDED_FOR`), so such a field would pass there for
/// the value this proxy sets, or replace it: a spoofed client address. nginx drops every field
/// with `_` in its name by default; these are the ones that can impersonate this proxy's own.
fn strip_forwarding_lookalikes(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| forwarding_lookalike(k.as_str())) {
        return;
    }
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| forwarding_lookalike(k.as_str()))
        .cloned()
        .collect();
    for name in &spoofed {
        headers.remove(name);
    }
}

/// Whether a `Connection` field lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Via` pseudonym: RFC 9110 §7.6.3 allows one in place of a host name.
const VIA_NAME: &str = "gatehouse";

/// This hop's `Via` values, checked once at compile time: `from_static` at run time validates the
/// bytes on every call, twice per proxied request.
const VIA_2: HeaderValue = HeaderValue::from_static("2 gatehouse");
const VIA_10: HeaderValue = HeaderValue::from_static("1.0 gatehouse");
const VIA_11: HeaderValue = HeaderValue::from_static("1.1 gatehouse");

fn via_value(version: Version) -> HeaderValue {
    match version {
        Version::HTTP_2 => VIA_2,
        Version::HTTP_10 => VIA_10,
        _ => VIA_11,
    }
}

/// Appends this hop to `Via`, as received in `version`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let via = via_value(version);
    debug_assert!(via.as_bytes().ends_with(VIA_NAME.as_bytes()));
    // The usual case, on every request and response, is the first hop: no copy of the value.
    append(headers, header::VIA, via);
}

/// Appends `value` to a list field, folding every earlier line of it into one (RFC 9110 §5.3).
/// The first hop (the usual case) inserts `value` as it is. One lookup of `name` either way.
fn append(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(slot) => {
            slot.insert(value);
        }
        header::Entry::Occupied(mut lines) => {
            let mut joined = Vec::new();
            for line in lines
                .iter()
                .map(|v| v.as_bytes().trim_ascii())
                .filter(|v| !v.is_empty())
            {
                joined.extend_from_slice(line);
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                lines.insert(v);
            }
        }
    }
}

/// Writes `ip` in dotted decimal: `Display` for `Ipv4Addr` goes through the formatter's padding
/// support, about 900 instructions on every proxied request (callgrind); this is a tenth of that.
fn push_ipv4(out: &mut BytesMut, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.put_u8(b'.');
        }
        if octet >= 100 {
            out.put_u8(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.put_u8(b'0' + octet / 10 % 10);
        }
        out.put_u8(b'0' + octet % 10);
    }
}

/// RFC 9110 §5.6.2 `tchar`, by byte: a table, because a search of the punctuation list for each
/// byte of the host cost every proxied request about 250 instructions (callgrind).
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        b += 1;
    }
    t
};

/// Writes a `Forwarded` parameter value to `out`: a token as is, anything else as a quoted
/// string (RFC 7239 §4), which IPv6 addresses (in brackets) and `host:port` always need.
fn push_forwarded_value(out: &mut BytesMut, v: &[u8]) {
    let token = !v.is_empty() && v.iter().all(|&b| TCHAR[usize::from(b)]);
    if token {
        out.put_slice(v);
        return;
    }
    out.put_u8(b'"');
    for &b in v {
        if matches!(b, b'\\' | b'"') {
            out.put_u8(b'\\');
        }
        out.put_u8(b);
    }
    out.put_u8(b'"');
}

/// The client's host as it asked for it: HTTP/2 `:authority`, else `Host`.
pub fn client_host(uri: &Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => headers.get(header::HOST).cloned(),
    }
}

/// Fields this proxy adds to a request head that the client's head does not already carry: the
/// forwarding fields, `Via`, and `Host` when the client sent none (HTTP/2, HTTP/1.0). On
/// HTTP/1.1 they are written after the client's fields (see [`super::h1::Request::new`]) instead of
/// inserted into its map: the map was sized for the client's fields, and four more rebuild it
/// (a reallocation and every field hashed again, about 600 instructions per request, callgrind).
pub type Added = Vec<(HeaderName, HeaderValue)>;

/// The fields [`to_upstream`] adds, in the order of the bits that say which the head has already.
static ADDED_FIELDS: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-proto"),
    header::VIA,
    header::HOST,
];

/// Where [`to_upstream`] puts a field it adds.
struct Adder {
    /// HTTP/1.1: fields the head lacks go here; `None` (HTTP/2) puts every one in the map.
    added: Option<Added>,
    /// Which of [`ADDED_FIELDS`] the head carries (after hop-by-hop removal).
    present: u8,
}

impl Adder {
    /// Adds field `ADDED_FIELDS[index]` with `value`: appended to the head's own line(s) for a
    /// list field (`list`), else in place of them.
    fn put(&mut self, headers: &mut HeaderMap, index: usize, value: HeaderValue, list: bool) {
        let name = ADDED_FIELDS[index].clone();
        match self.added.as_mut() {
            Some(added) if self.present & 1 << index == 0 => added.push((name, value)),
            _ if list => append(headers, name, value),
            _ => {
                headers.insert(name, value);
            }
        }
    }
}

/// Rewrites a client request's head for the upstream: hop-by-hop fields out, forwarding fields
/// in, `Host` per the upstream's `host` option, the URI in the form the upstream protocol uses.
/// `upgrade` is the client's `Upgrade` value when the request is to be tunnelled. Returns the
/// fields to write after the head's own (HTTP/1.1, see [`Added`]; empty for HTTP/2).
pub fn to_upstream(
    parts: &mut http::request::Parts,
    ctx: Option<&RequestContext>,
    spec: &UpstreamSpec,
    server: &str,
    h2: bool,
    upgrade: Option<HeaderValue>,
) -> Result<Added, &'static str> {
    let received = parts.version;
    let original_host = client_host(&parts.uri, &parts.headers);
    let hop = hop_by_hop_fields(&parts.headers);
    // Only a `Connection` field can make the stripping below take the trace context.
    let trace = if hop & CONNECTION_BIT != 0 {
        trace_context(&parts.headers)
    } else {
        [None, None]
    };
    let te_trailers = strip_fields(&mut parts.headers, hop);
    strip_forwarding_lookalikes(&mut parts.headers);
    if te_trailers {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let mut adder = Adder {
        added: (!h2).then(|| Vec::with_capacity(ADDED_FIELDS.len())),
        present: if h2 {
            0
        } else {
            crate::http::fields_present(&parts.headers, &ADDED_FIELDS)
        },
    };
    let tls = ctx.is_some_and(|c| c.conn.tls().is_some());
    let proto = if tls { "https" } else { "http" };
    if let Some(ctx) = ctx {
        let ip = ctx.conn.peer.ip();
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        // Both values are written into one buffer, `X-Forwarded-For`'s being a slice of
        // `Forwarded`'s (no intermediate strings, one allocation): this runs for every proxied
        // request.
        let mut fwd = BytesMut::with_capacity(96);
        fwd.put_slice(b"for=");
        match ip {
            // Dotted digits are a token; an IPv6 node is `"[...]"`, a quoted string.
            IpAddr::V4(v4) => push_ipv4(&mut fwd, v4),
            IpAddr::V6(v6) => {
                let _ = write!(fwd, "\"[{v6}]\"");
            }
        }
        let node = match ip {
            IpAddr::V4(_) => "for=".len()..fwd.len(),
            IpAddr::V6(_) => "for=\"[".len()..fwd.len() - "]\"".len(),
        };
        fwd.put_slice(b";proto=");
        fwd.put_slice(proto.as_bytes());
        // Visible ASCII only: a host with other bytes is left out rather than passed on.
        if let Some(h) = original_host.as_ref().filter(|h| h.to_str().is_ok()) {
            fwd.put_slice(b";host=");
            push_forwarded_value(&mut fwd, h.as_bytes());
        }
        let fwd = fwd.freeze();
        if let Ok(node) = HeaderValue::from_maybe_shared(fwd.slice(node)) {
            adder.put(&mut parts.headers, 0, node, true);
        }
        if let Ok(fwd) = HeaderValue::from_maybe_shared(fwd) {
            adder.put(&mut parts.headers, 1, fwd, true);
        }
    }
    adder.put(&mut parts.headers, 2, HeaderValue::from_static(proto), false);
    adder.put(&mut parts.headers, 3, via_value(received), true);
    restore_trace_context(&mut parts.headers, trace);

    let host = match (&spec.host, original_host) {
        (HostRewrite::Fixed(v), _) => v.clone(),
        (HostRewrite::Preserve, Some(h)) => h,
        // An HTTP/1.0 request may come without a Host; the request made from it is HTTP/1.1 (or
        // 2) and needs one, and the server it goes to is the authority it is sent to.
        (HostRewrite::Preserve | HostRewrite::Upstream, _) => {
            HeaderValue::from_str(server).map_err(|_| "the server address is not a Host value")?
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if h2 {
        // HTTP/2 carries the host in `:authority`, taken from the URI; a `Host` field beside it
        // would only be a second, possibly conflicting, copy (RFC 9113 §8.3.1).
        parts.headers.remove(header::HOST);
        let scheme = if spec.tls() { "https" } else { "http" };
        let host = host.to_str().map_err(|_| "the Host is not visible ASCII")?;
        parts.uri = format!("{scheme}://{host}{path}")
            .parse()
            .map_err(|_| "the Host cannot form a URI")?;
        parts.version = Version::HTTP_2;
    } else {
        adder.put(&mut parts.headers, 4, host, false);
        // An HTTP/1.1 client's URI is already in origin form: only an absolute-form (or HTTP/2)
        // URI needs rebuilding.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = path.parse().map_err(|_| "the path cannot form a URI")?;
        }
        parts.version = Version::HTTP_11;
        if let Some(up) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, up);
        }
    }
    Ok(adder.added.unwrap_or_default())
}

/// Rewrites an upstream response's head for the client: hop-by-hop fields out (a `101` keeps
/// `Connection: upgrade` and `Upgrade`, which the client needs to switch), `Via` appended.
pub fn to_client(parts: &mut http::response::Parts, switching: bool) {
    let upgrade = if switching {
        parts.headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers);
    if switching {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = upgrade {
            parts.headers.insert(header::UPGRADE, u);
        }
    }
    append_via(&mut parts.headers, parts.version);
}

/// W3C trace context (`traceparent`, `tracestate`) is passed on unchanged. Kept in this one
/// place so that a tracer can make gatehouse a span here (rewriting the parent id) later.
fn trace_context(headers: &HeaderMap) -> [Option<HeaderValue>; 2] {
    [headers.get("traceparent").cloned(), headers.get("tracestate").cloned()]
}

fn restore_trace_context(headers: &mut HeaderMap, trace: [Option<HeaderValue>; 2]) {
    for (name, value) in ["traceparent", "tracestate"].into_iter().zip(trace) {
        if let Some(v) = value {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_fields_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(strip_hop_by_hop(&mut h));
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    fn forwarded_value(v: &str) -> String {
        let mut out = BytesMut::new();
        push_forwarded_value(&mut out, v.as_bytes());
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn forwarded_quotes_what_is_not_a_token() {
        assert_eq!(forwarded_value("192.0.2.1"), "192.0.2.1");
        assert_eq!(forwarded_value("[2001:db8::1]"), "\"[2001:db8::1]\"");
        assert_eq!(forwarded_value("example.com:8080"), "\"example.com:8080\"");
        assert_eq!(forwarded_value("a~b!c"), "a~b!c");
        assert_eq!(forwarded_value("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn the_token_table_is_the_grammar() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(TCHAR[usize::from(b)], tchar, "byte {b:#04x}");
        }
    }

    #[test]
    fn ipv4_is_written_as_display_writes_it() {
        for ip in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [9, 10, 99, 100],
            [255, 255, 255, 255],
            [10, 200, 3, 45],
        ] {
            let ip = Ipv4Addr::from(ip);
            let mut out = BytesMut::from("for=");
            push_ipv4(&mut out, ip);
            assert_eq!(&out[..], format!("for={ip}").as_bytes());
        }
    }

    #[test]
    fn only_the_hop_by_hop_fields_present_are_found() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-keep-alive", HeaderValue::from_static("1"));
        assert_eq!(hop_by_hop_fields(&h), 0);
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 2);
        let mut c = h.clone();
        c.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert_eq!(hop_by_hop_fields(&c), CONNECTION_BIT);
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        assert_eq!(hop_by_hop_fields(&h), 1 << 2 | TE_BIT);
        assert!(strip_hop_by_hop(&mut h));
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "x-keep-alive"]);
    }

    #[test]
    fn via_is_appended_to_the_earlier_hops() {
        let mut h = HeaderMap::new();
        append_via(&mut h, Version::HTTP_11);
        assert_eq!(h[header::VIA], "1.1 gatehouse");
        let mut h = HeaderMap::new();
        h.append(header::VIA, HeaderValue::from_static("1.0 fred"));
        h.append(header::VIA, HeaderValue::from_static(" 1.1 p.example.net "));
        append_via(&mut h, Version::HTTP_2);
        assert_eq!(h.get_all(header::VIA).iter().count(), 1);
        assert_eq!(h[header::VIA], "1.0 fred, 1.1 p.example.net, 2 gatehouse");
    }

    #[test]
    fn appending_joins_every_previous_line() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        append(
            &mut h,
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("10.0.0.3"),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 10.0.0.3");
    }

    #[test]
    fn forwarding_lookalikes_are_the_underscore_spellings_only() {
        for spoof in [
            "x_forwarded_for",
            "x-forwarded_for",
            "x_forwarded-proto",
            "x_forwarded_proto",
        ] {
            assert!(forwarding_lookalike(spoof), "{spoof}");
        }
        for fine in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x_forwarded_fox",
            "x_real_ip",
            "my_header",
            "x-forwarded_host",
        ] {
            assert!(!forwarding_lookalike(fine), "{fine}");
        }
        let mut h = HeaderMap::new();
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("my_header", HeaderValue::from_static("kept"));
        strip_forwarding_lookalikes(&mut h);
        assert!(h.get("x_forwarded_for").is_none());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["my_header"], "kept");
    }
}
