//! Request-head checks hyper leaves to the server: Host and `:authority`, the request-target, its
//! length, and the transfer codings hyper lets through.
//!
//! hyper's HTTP/1.1 parser already refuses what it cannot frame (a bad request line or header
//! line, bare CR, obs-fold, NUL, differing `Content-Length` values, a `Transfer-Encoding` whose
//! last coding is not `chunked`) with its own 400/414/431 and a close; `conn::parse_error` makes
//! those visible. What reaches the pipeline parsed cleanly, so each refusal here is a request whose
//! framing is still known: see [`Refusal::close`] for when the connection is closed anyway.

use crate::config::Limits;
use crate::conn::Protocol;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};

/// Why a request was refused before any handler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request-target is longer than `limits.max_uri_bytes` (414).
    UriTooLong,
    /// An HTTP/1.1 request without Host (RFC 9112 §3.2).
    MissingHost,
    /// More than one Host field line (RFC 9112 §3.2).
    SeveralHosts,
    /// A Host value that is not `uri-host[:port]` (RFC 9112 §3.2, RFC 3986 §3.2.2).
    InvalidHost,
    /// userinfo (`user@`) in Host, the request-target or `:authority` (RFC 9110 §4.2.4).
    Userinfo,
    /// The request-target's authority (absolute-form, or HTTP/2 `:authority`) names another host
    /// than Host.
    AuthorityMismatch,
    /// An HTTP/2 request with neither `:authority` nor Host (RFC 9113 §8.3.1).
    MissingAuthority,
    /// authority-form without CONNECT, or `*` without OPTIONS (RFC 9112 §3.2.3, §3.2.4).
    TargetFormMismatch,
    /// `chunked` applied more than once (RFC 9112 §7): the body length is not reliable.
    ChunkedTwice,
    /// A transfer coding other than `chunked` before the final `chunked` (RFC 9112 §6.1).
    UnsupportedTransferCoding,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            // RFC 9112 §6.1: "a transfer coding it does not understand SHOULD respond with 501".
            // The framing itself (the final chunked) is sound, so this is not a 400.
            Refusal::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The access log's `error` field.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UriTooLong => "limit:max_uri_bytes",
            Refusal::MissingHost => "malformed_request:missing_host",
            Refusal::SeveralHosts => "malformed_request:several_hosts",
            Refusal::InvalidHost => "malformed_request:invalid_host",
            Refusal::Userinfo => "malformed_request:userinfo",
            Refusal::AuthorityMismatch => "malformed_request:authority_mismatch",
            Refusal::MissingAuthority => "malformed_request:missing_authority",
            Refusal::TargetFormMismatch => "malformed_request:target_form",
            Refusal::ChunkedTwice => "malformed_request:chunked_twice",
            Refusal::UnsupportedTransferCoding => "malformed_request:transfer_coding",
        }
    }

    /// The body text of the answer: what was wrong, for the person reading it.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::UriTooLong => "request-target exceeds limits.max_uri_bytes\n",
            Refusal::MissingHost => "HTTP/1.1 request without a Host header\n",
            Refusal::SeveralHosts => "more than one Host header\n",
            Refusal::InvalidHost => "Host is not a valid host[:port]\n",
            Refusal::Userinfo => "userinfo (user@) is not allowed in the authority\n",
            Refusal::AuthorityMismatch => "Host differs from the authority in the request-target or :authority\n",
            Refusal::MissingAuthority => "HTTP/2 request with neither :authority nor Host\n",
            Refusal::TargetFormMismatch => "request-target form does not fit the method\n",
            Refusal::ChunkedTwice => "chunked transfer coding applied more than once\n",
            Refusal::UnsupportedTransferCoding => "only the chunked transfer coding is implemented\n",
        }
    }

    /// Whether the connection must close whatever else holds. A doubtful Transfer-Encoding means
    /// the body's end is not trustworthy (RFC 9112 §6.1: close after such a request). For the
    /// other refusals framing is intact, and the pipeline closes only when a body is left unread:
    /// refusing a request should not cost reading an upload that nobody will look at.
    pub fn close(self) -> bool {
        matches!(self, Refusal::ChunkedTwice | Refusal::UnsupportedTransferCoding)
    }
}

/// Which of `names` `headers` carries, bit `i` for `names[i]`, found in one pass over its field
/// names. A lookup by name hashes the name and probes the map (about ninety instructions), and
/// most heads carry few of the fields a caller asks about; comparing a field name with a
/// well-known one is an integer compare.
pub fn fields_present(headers: &HeaderMap, names: &[HeaderName]) -> u8 {
    debug_assert!(names.len() <= 8);
    headers.keys().fold(0, |present, k| {
        names.iter().position(|n| n == k).map_or(present, |i| present | 1 << i)
    })
}

/// Which of the fields the pipeline reads are present, and the Host value, found in one pass
/// over the field lines: a request usually carries none of them but Host, those absent are never
/// looked up, and Host (always there) is not looked up a second time by hashing its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Present<'a> {
    bits: u8,
    /// The first Host line; with [`Present::SEVERAL_HOSTS`] set when there is more than one.
    host: Option<&'a HeaderValue>,
}

/// The fields [`Present`] looks for, in the order of their bits (a `static`: a `const` array is
/// built afresh at each use).
static PRESENT_NAMES: [HeaderName; 5] = [
    header::HOST,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
];

impl<'a> Present<'a> {
    pub const HOST: u8 = 1;
    pub const CONNECTION: u8 = 1 << 1;
    pub const TRANSFER_ENCODING: u8 = 1 << 2;
    pub const UPGRADE: u8 = 1 << 3;
    pub const CONTENT_LENGTH: u8 = 1 << 4;
    /// More than one Host line (RFC 9112 §3.2 makes that a 400).
    const SEVERAL_HOSTS: u8 = 1 << 7;

    pub fn scan(headers: &'a HeaderMap) -> Present<'a> {
        let mut p = Present { bits: 0, host: None };
        // `iter` yields every line, a repeated name once per line, so a second Host shows here.
        for (name, value) in headers {
            let Some(i) = PRESENT_NAMES.iter().position(|n| n == name) else {
                continue;
            };
            let bit = 1 << i;
            if bit == Self::HOST {
                if p.host.is_some() {
                    p.bits |= Self::SEVERAL_HOSTS;
                } else {
                    p.host = Some(value);
                }
            }
            p.bits |= bit;
        }
        p
    }

    pub fn has(self, field: u8) -> bool {
        self.bits & field != 0
    }

    /// The one Host value, `None` when absent; several field lines are an error.
    fn single_host(self) -> Result<Option<&'a [u8]>, Refusal> {
        if self.has(Self::SEVERAL_HOSTS) {
            return Err(Refusal::SeveralHosts);
        }
        Ok(self.host.map(HeaderValue::as_bytes))
    }
}

/// Checks a request head against RFC 9110/9112/9113 and `limits.max_uri_bytes`.
pub fn check_head<B>(req: &Request<B>, protocol: Protocol, limits: &Limits) -> Result<(), Refusal> {
    check_head_present(req, protocol, limits, Present::scan(req.headers()))
}

/// [`check_head`] for a request whose fields were already scanned.
pub fn check_head_present<B>(
    req: &Request<B>,
    protocol: Protocol,
    limits: &Limits,
    present: Present<'_>,
) -> Result<(), Refusal> {
    let uri = req.uri();
    let h2 = protocol.is_h2();
    if target_len(uri, h2) as u64 > limits.max_uri_bytes.get() {
        return Err(Refusal::UriTooLong);
    }
    let host = present.single_host()?;
    if let Some(host) = host {
        if !valid_host(host) {
            // `user@host` fails the grammar too; name it, since it is a deliberate rule.
            return Err(if host.contains(&b'@') {
                Refusal::Userinfo
            } else {
                Refusal::InvalidHost
            });
        }
    }
    let authority = uri.authority().map(|a| a.as_str());
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(Refusal::Userinfo);
    }
    if h2 {
        // RFC 9113 §8.3.1: a Host that identifies another entity than :authority is malformed.
        return match (authority, host) {
            (None, None) => Err(Refusal::MissingAuthority),
            (Some(a), Some(h)) if !same_authority(a, h, uri.scheme_str()) => Err(Refusal::AuthorityMismatch),
            _ => Ok(()),
        };
    }
    if req.version() == Version::HTTP_11 && host.is_none() {
        return Err(Refusal::MissingHost);
    }
    check_target_form(req.method(), uri)?;
    // RFC 9112 §3.2.2 tells a server to ignore Host when the target is in absolute-form. We refuse
    // a disagreement instead: the client broke a MUST (§3.2: Host identical to the target's
    // authority), and two authorities in one request is how a front proxy that routes on Host and
    // a server that routes on the target are made to disagree (cache poisoning, routing bypass).
    // No honest client sends it, so a 400 costs nothing and removes the ambiguity.
    if let (Some(a), Some(h)) = (authority, host) {
        if !same_authority(a, h, uri.scheme_str()) {
            return Err(Refusal::AuthorityMismatch);
        }
    }
    if present.has(Present::TRANSFER_ENCODING) {
        check_transfer_coding(req.headers())?;
    }
    Ok(())
}

/// The request-target's length as the client sent it: the path and query, plus scheme and
/// authority for an HTTP/1.1 absolute- or authority-form target. HTTP/2 carries the authority in
/// `:authority`, bounded by the header list size, so only `:path` counts there.
fn target_len(uri: &Uri, h2: bool) -> usize {
    let pq = uri.path_and_query().map_or(0, |p| p.as_str().len());
    if h2 {
        return pq;
    }
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + "://".len());
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    scheme + authority + pq
}

/// RFC 9112 §3.2.3/§3.2.4: authority-form is only for CONNECT, asterisk-form only for OPTIONS.
fn check_target_form(method: &Method, uri: &Uri) -> Result<(), Refusal> {
    let authority_form = uri.scheme().is_none() && uri.authority().is_some();
    let asterisk_form = uri.path() == "*";
    if authority_form != (method == Method::CONNECT) || (asterisk_form && method != Method::OPTIONS) {
        return Err(Refusal::TargetFormMismatch);
    }
    Ok(())
}

/// hyper accepts any Transfer-Encoding whose last coding is `chunked` and decodes only the
/// chunked framing. A coding before it (`gzip, chunked`) would hand the handler undecoded bytes,
/// and `chunked, chunked` is forbidden (RFC 9112 §7), so only a lone `chunked` passes.
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), Refusal> {
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        // hyper already refused values that are not visible ASCII (its own 400).
        let Ok(value) = value.to_str() else {
            return Err(Refusal::UnsupportedTransferCoding);
        };
        // RFC 9110 §5.6.1: empty list elements are allowed and ignored.
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                return Err(Refusal::UnsupportedTransferCoding);
            }
        }
    }
    if chunked > 1 {
        return Err(Refusal::ChunkedTwice);
    }
    Ok(())
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2-3), with a host that is not empty.
/// RFC 9112 §3.2 has a client send an empty Host when its target URI has no authority, but every
/// URI this server answers is `http` or `https`, and an `http` URI with an empty host is invalid:
/// RFC 9110 §4.2.1 has its recipient reject it (nginx answers 400 too).
fn valid_host(v: &[u8]) -> bool {
    let (host, port) = split_host_port(v);
    let port_ok = port.is_none_or(|p| p.iter().all(u8::is_ascii_digit));
    port_ok && !host.is_empty() && (host.starts_with(b"[") && valid_ip_literal(host) || valid_reg_name(host))
}

/// Splits off `:port`; an IP literal keeps its brackets and colons.
fn split_host_port(v: &[u8]) -> (&[u8], Option<&[u8]>) {
    let host_end = if v.starts_with(b"[") {
        v.iter().position(|&b| b == b']').map_or(v.len(), |i| i + 1)
    } else {
        v.iter().position(|&b| b == b':').unwrap_or(v.len())
    };
    let (host, rest) = v.split_at(host_end);
    match rest.split_first() {
        None => (host, None),
        Some((b':', port)) => (host, Some(port)),
        // Something after `]` that is not `:port`: keep it in the host so the check fails.
        Some(_) => (v, None),
    }
}

/// reg-name = *( unreserved / pct-encoded / sub-delims ); IPv4 addresses match it too.
fn valid_reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        match h[i] {
            b'%' => {
                let hex = |j: usize| h.get(j).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if REG_NAME[usize::from(b)] => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// IP-literal = "[" ( IPv6address / IPvFuture ) "]".
fn valid_ip_literal(h: &[u8]) -> bool {
    let Some(inner) = h.strip_prefix(b"[").and_then(|r| r.strip_suffix(b"]")) else {
        return false;
    };
    if let Some(future) = inner.strip_prefix(b"v").or_else(|| inner.strip_prefix(b"V")) {
        // IPvFuture = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
        let Some(dot) = future.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (ver, rest) = (&future[..dot], &future[dot + 1..]);
        return !ver.is_empty()
            && ver.iter().all(u8::is_ascii_hexdigit)
            && !rest.is_empty()
            && rest.iter().all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':');
    }
    std::str::from_utf8(inner).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// unreserved / sub-delims, by byte: one load per byte of every request's Host.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~')
            || matches!(
                c,
                b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            );
        b += 1;
    }
    t
};

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Whether two `host[:port]` authorities name the same origin server: the host compared without
/// case, and a missing port equal to the scheme's default (RFC 9110 §4.2.3 normalisation).
fn same_authority<'a>(target: &'a str, host: &'a [u8], scheme: Option<&str>) -> bool {
    let (th, tp) = split_host_port(target.as_bytes());
    let (hh, hp) = split_host_port(host);
    let default: &'a [u8] = match scheme {
        Some(s) if s.eq_ignore_ascii_case("https") => b"443",
        _ => b"80",
    };
    // An empty port (`host:`) is the default port too (RFC 3986 §3.2.3).
    let norm = |p: Option<&'a [u8]>| match p {
        None | Some(b"") => default,
        Some(p) => p,
    };
    th.eq_ignore_ascii_case(hh) && norm(tp) == norm(hp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_name_table_is_unreserved_or_sub_delims() {
        for b in 0..=255u8 {
            assert_eq!(
                REG_NAME[usize::from(b)],
                is_unreserved(b) || is_sub_delim(b),
                "byte {b:#04x}"
            );
        }
    }

    #[test]
    fn present_names_the_fields_found() {
        let mut h = HeaderMap::new();
        assert_eq!(Present::scan(&h), Present { bits: 0, host: None });
        h.insert(header::HOST, "a".parse().unwrap());
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        h.append(header::CONNECTION, "close".parse().unwrap());
        h.append(header::CONNECTION, "te".parse().unwrap());
        h.insert("x-upgrade", "h2c".parse().unwrap());
        let p = Present::scan(&h);
        assert!(p.has(Present::HOST) && p.has(Present::CONNECTION));
        assert!(!p.has(Present::UPGRADE) && !p.has(Present::TRANSFER_ENCODING) && !p.has(Present::CONTENT_LENGTH));
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "1".parse().unwrap());
        let p = Present::scan(&h);
        assert!(p.has(Present::UPGRADE) && p.has(Present::TRANSFER_ENCODING) && p.has(Present::CONTENT_LENGTH));
        assert_eq!(p.single_host(), Ok(Some(&b"a"[..])));
        h.append(header::HOST, "b".parse().unwrap());
        assert_eq!(Present::scan(&h).single_host(), Err(Refusal::SeveralHosts));
    }

    fn check(
        raw: &[(&str, &str)],
        method: Method,
        uri: &str,
        version: Version,
        protocol: Protocol,
    ) -> Result<(), Refusal> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for (k, v) in raw {
            b = b.header(*k, *v);
        }
        check_head(&b.body(()).unwrap(), protocol, &Limits::default())
    }

    fn h1(headers: &[(&str, &str)], uri: &str) -> Result<(), Refusal> {
        check(headers, Method::GET, uri, Version::HTTP_11, Protocol::Http11)
    }

    #[test]
    fn host_values() {
        for ok in [
            "example.com",
            "example.com:8080",
            "EXAMPLE.com:",
            "127.0.0.1",
            "[::1]:443",
            "[v1.fe]",
            "a%20b",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?} should be valid");
        }
        for bad in [
            "exa mple.com",
            "example.com:80a",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "a%2",
            "a/b",
            "é.example",
            "host:1:2",
            "",
            ":80",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn http11_host_rules() {
        assert_eq!(h1(&[("host", "a")], "/"), Ok(()));
        assert_eq!(h1(&[], "/"), Err(Refusal::MissingHost));
        assert_eq!(h1(&[("host", "a"), ("host", "a")], "/"), Err(Refusal::SeveralHosts));
        assert_eq!(h1(&[("host", "a b")], "/"), Err(Refusal::InvalidHost));
        assert_eq!(h1(&[("host", "u@a")], "/"), Err(Refusal::Userinfo));
        assert_eq!(check(&[], Method::GET, "/", Version::HTTP_10, Protocol::Http11), Ok(()));
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        assert_eq!(h1(&[("host", "A.example:80")], "http://a.example/x"), Ok(()));
        assert_eq!(h1(&[("host", "a.example")], "https://a.example:443/x"), Ok(()));
        assert_eq!(
            h1(&[("host", "b.example")], "http://a.example/x"),
            Err(Refusal::AuthorityMismatch)
        );
        assert_eq!(
            h1(&[("host", "a.example:81")], "http://a.example/x"),
            Err(Refusal::AuthorityMismatch)
        );
        assert_eq!(
            h1(&[("host", "a.example")], "http://u@a.example/x"),
            Err(Refusal::Userinfo)
        );
    }

    #[test]
    fn target_forms_fit_methods() {
        assert_eq!(h1(&[("host", "a:1")], "a:1"), Err(Refusal::TargetFormMismatch));
        let connect = check(
            &[("host", "a:1")],
            Method::CONNECT,
            "a:1",
            Version::HTTP_11,
            Protocol::Http11,
        );
        assert_eq!(connect, Ok(()));
        assert_eq!(h1(&[("host", "a")], "*"), Err(Refusal::TargetFormMismatch));
        let options = check(
            &[("host", "a")],
            Method::OPTIONS,
            "*",
            Version::HTTP_11,
            Protocol::Http11,
        );
        assert_eq!(options, Ok(()));
    }

    #[test]
    fn transfer_codings() {
        let te = |v: &str| h1(&[("host", "a"), ("transfer-encoding", v)], "/");
        assert_eq!(te("chunked"), Ok(()));
        assert_eq!(te("Chunked ,"), Ok(()));
        assert_eq!(te("gzip, chunked"), Err(Refusal::UnsupportedTransferCoding));
        assert_eq!(te("chunked, chunked"), Err(Refusal::ChunkedTwice));
    }

    #[test]
    fn http2_authority_and_host() {
        let h2 = |headers: &[(&str, &str)], uri: &str| check(headers, Method::GET, uri, Version::HTTP_2, Protocol::H2);
        assert_eq!(h2(&[], "https://a/"), Ok(()));
        assert_eq!(h2(&[("host", "a")], "/"), Ok(()));
        assert_eq!(h2(&[("host", "a:443")], "https://a/"), Ok(()));
        assert_eq!(h2(&[("host", "b")], "https://a/"), Err(Refusal::AuthorityMismatch));
        assert_eq!(h2(&[], "/"), Err(Refusal::MissingAuthority));
    }

    #[test]
    fn long_targets() {
        let limits = Limits {
            max_uri_bytes: crate::config::Size(10),
            ..Limits::default()
        };
        let req = |uri: &str| Request::builder().uri(uri).header("host", "a").body(()).unwrap();
        assert_eq!(check_head(&req("/123456789"), Protocol::Http11, &limits), Ok(()));
        assert_eq!(
            check_head(&req("/1234567890"), Protocol::Http11, &limits),
            Err(Refusal::UriTooLong)
        );
        assert_eq!(
            check_head(&req("http://a/12345"), Protocol::Http11, &limits),
            Err(Refusal::UriTooLong)
        );
    }
}
