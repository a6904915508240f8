//! Fallbacks for when no server can answer: the last good response of a GET from a bounded
//! in-memory cache (`stale`), then the configured response (`respond`).
//!
//! Shape and reasons:
//! - Only **200** responses to **GET** are stored. RFC 9111 §4.2.2 lets caches store 203, 204,
//!   206, 300, 301, 308, 404, 405, 410, 414 and 501 heuristically, but this is a fallback, not a
//!   cache: serving a remembered 404 or redirect during an outage would turn a temporary failure
//!   into a wrong answer, and 206 is a fragment. "Last good response" means 200.
//! - What a shared cache must not store is not stored (RFC 9111 §3, §3.5, §5.2): responses with
//!   `Cache-Control: no-store` or `private`, requests with `Cache-Control: no-store`, requests
//!   with `Authorization` unless the response says `public`, `s-maxage` or `must-revalidate`,
//!   and `Vary: *`. Responses with `Set-Cookie` are not stored either: replaying one client's
//!   cookie to another is a session leak even when the origin forgot to say `private`.
//! - **Vary**: the request header values a response varies on are part of the key, so a
//!   `Vary: Accept-Encoding` response stored for a gzip client is never served to one without.
//! - **Bounds**: entries, total bytes and one body's size are capped; least recently used
//!   entries go first. A body over the cap is not stored at all (caching the head of it would
//!   be a corrupt answer).
//! - **Serving** within `stale_for` of storage, with `Age` (seconds since stored, plus the
//!   `Age` it had), `Warning: 110 - "Response is Stale"` and `x-gatehouse-fallback: stale`.
//!   RFC 9111 obsoleted the `Warning` field (RFC 7234 §5.5); it is still sent because the issue
//!   asks for it and because some clients and tools still show it; the `x-gatehouse-fallback`
//!   header is the reliable mark.

use super::{whole_seconds_up, FALLBACK_HEADER};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default `stale_for`: long enough to cover a deploy or a short outage, short enough that
/// content served is still recognisably current.
pub const DEFAULT_STALE_FOR: Duration = Duration::from_secs(300);
/// Default entry cap: a busy route's working set of distinct URLs.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// Default total size cap: a bounded, small share of a proxy's memory.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Default largest body stored: pages and API answers, not downloads.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The `Warning` value of a stale answer (RFC 7234 §5.5.1; `-` because the agent is us).
pub const WARNING_STALE: &str = "110 - \"Response is Stale\"";

/// Settings of the stale cache: `stale_for` is `[upstreams.fallback] stale_for`; the bounds
/// are not configuration keys (the `DEFAULT_*` constants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleSettings {
    pub stale_for: Duration,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_body_bytes: usize,
}

impl StaleSettings {
    /// Settings from `[upstreams.fallback] stale_for`, with the default bounds.
    pub fn from_keys(stale_for: Duration) -> Self {
        StaleSettings {
            stale_for,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) never replayed from the cache.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

#[derive(Debug)]
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at: Instant,
    /// The `Age` the response already had when stored.
    age_at_store: u64,
    weight: usize,
    /// Position in the LRU order.
    tick: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// `host + path-and-query` → the request headers its last stored response varied on.
    vary: HashMap<String, Vec<HeaderName>>,
    entries: HashMap<String, Entry>,
    lru: BTreeMap<u64, String>,
    next_tick: u64,
    bytes: usize,
}

/// The last good GET responses of one upstream.
#[derive(Debug)]
pub struct StaleCache {
    settings: StaleSettings,
    inner: Mutex<Inner>,
}

fn has_directive(headers: &HeaderMap, directives: &[&str]) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
        .any(|d| directives.iter().any(|want| d.eq_ignore_ascii_case(want)))
}

/// The request header names a response varies on; `None` for `Vary: *` (never storable).
fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            return None;
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                return None;
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

/// `host` + `path?query`: the primary key.
fn primary_key(host: &str, path_and_query: &str) -> String {
    let mut k = String::with_capacity(host.len() + path_and_query.len() + 1);
    k.push_str(&host.to_ascii_lowercase());
    k.push(' ');
    k.push_str(path_and_query);
    k
}

/// The primary key plus each varied request header's values (absent and empty differ).
fn full_key(primary: &str, vary: &[HeaderName], request: &HeaderMap) -> String {
    let mut k = primary.to_owned();
    for name in vary {
        k.push('\n');
        k.push_str(name.as_str());
        let mut values = request.get_all(name).iter().peekable();
        if values.peek().is_none() {
            k.push('!');
            continue;
        }
        k.push(':');
        for (i, v) in values.enumerate() {
            if i > 0 {
                k.push(',');
            }
            // Non-UTF-8 bytes are kept exact via lossless escaping of each byte.
            for &b in v.as_bytes() {
                if b.is_ascii_graphic() || b == b' ' {
                    k.push(b as char);
                } else {
                    k.push_str(&format!("\\x{b:02x}"));
                }
            }
        }
    }
    k
}

impl StaleCache {
    pub fn new(settings: StaleSettings) -> Self {
        StaleCache {
            settings,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation keeps the maps consistent before it can panic (none of them can), so
        // a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a response if it may be served later as a stale fallback; returns whether it
    /// was stored. `host` and `path_and_query` identify the resource; `request` is the client's
    /// request headers (for `Vary`, `Authorization` and `Cache-Control`).
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &self,
        method: &Method,
        host: &str,
        path_and_query: &str,
        request: &HeaderMap,
        status: StatusCode,
        response: &HeaderMap,
        body: &Bytes,
        now: Instant,
    ) -> bool {
        if method != Method::GET
            || status != StatusCode::OK
            || body.len() > self.settings.max_body_bytes
            || has_directive(response, &["no-store", "private"])
            || has_directive(request, &["no-store"])
            || response.contains_key(header::SET_COOKIE)
            || (request.contains_key(header::AUTHORIZATION)
                && !has_directive(response, &["public", "s-maxage", "must-revalidate"]))
        {
            return false;
        }
        let Some(vary) = vary_names(response) else {
            return false;
        };
        let mut headers = response.clone();
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
        let age_at_store = headers
            .remove(header::AGE)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let primary = primary_key(host, path_and_query);
        let key = full_key(&primary, &vary, request);
        let header_bytes: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 2).sum();
        let weight = body.len() + header_bytes + 2 * key.len() + 64;
        if weight > self.settings.max_bytes || self.settings.max_entries == 0 {
            return false;
        }

        let mut inner = self.lock();
        inner.remove(&key);
        while inner.entries.len() >= self.settings.max_entries || inner.bytes + weight > self.settings.max_bytes {
            let Some((_, oldest)) = inner.lru.pop_first() else {
                break;
            };
            inner.remove(&oldest);
        }
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.lru.insert(tick, key.clone());
        inner.bytes += weight;
        inner.vary.insert(primary, vary);
        inner.entries.insert(
            key,
            Entry {
                status,
                headers,
                body: body.clone(),
                stored_at: now,
                age_at_store,
                weight,
                tick,
            },
        );
        true
    }

    /// The stale response for a GET, if one was stored within `stale_for`, marked as stale.
    pub fn lookup(
        &self,
        method: &Method,
        host: &str,
        path_and_query: &str,
        request: &HeaderMap,
        now: Instant,
    ) -> Option<Response<Bytes>> {
        if method != Method::GET {
            return None;
        }
        let primary = primary_key(host, path_and_query);
        let mut inner = self.lock();
        let key = full_key(&primary, inner.vary.get(&primary)?, request);
        let entry = inner.entries.get(&key)?;
        let elapsed = now.saturating_duration_since(entry.stored_at);
        if elapsed > self.settings.stale_for {
            inner.remove(&key);
            return None;
        }
        let age = entry.age_at_store.saturating_add(elapsed.as_secs());
        let mut response = Response::new(entry.body.clone());
        *response.status_mut() = entry.status;
        *response.headers_mut() = entry.headers.clone();
        let old_tick = entry.tick;
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.lru.remove(&old_tick);
        inner.lru.insert(tick, key.clone());
        if let Some(e) = inner.entries.get_mut(&key) {
            e.tick = tick;
        }
        drop(inner);
        let h = response.headers_mut();
        h.insert(header::AGE, HeaderValue::from(age));
        h.append(header::WARNING, HeaderValue::from_static(WARNING_STALE));
        h.insert(FALLBACK_HEADER, HeaderValue::from_static("stale"));
        Some(response)
    }

    /// Entries and bytes held, for tests and the debug API.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.lru.remove(&e.tick);
            self.bytes -= e.weight;
        }
    }
}

/// The `respond` fallback: `[upstreams.fallback] respond = { status, body, retry_after }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespondFallback {
    pub status: StatusCode,
    pub body: Bytes,
    pub retry_after: Option<Duration>,
}

impl RespondFallback {
    /// From the `respond` table; `retry_after` absent sends no `Retry-After`.
    pub fn from_keys(status: StatusCode, body: impl Into<Bytes>, retry_after: Option<Duration>) -> Self {
        RespondFallback {
            status,
            body: body.into(),
            retry_after,
        }
    }

    /// The configured answer, marked `x-gatehouse-fallback: respond`, never cached downstream.
    pub fn response(&self) -> Response<Bytes> {
        let mut response = Response::new(self.body.clone());
        *response.status_mut() = self.status;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(whole_seconds_up(after)));
        }
        h.insert(FALLBACK_HEADER, HeaderValue::from_static("respond"));
        response
    }
}

/// Which fallback answered: the `kind` label of `gatehouse_fallback_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackKind {
    Stale,
    Respond,
}

impl FallbackKind {
    pub fn as_label(self) -> &'static str {
        match self {
            FallbackKind::Stale => "stale",
            FallbackKind::Respond => "respond",
        }
    }
}

/// An upstream's fallbacks, tried in order: stale, then respond.
#[derive(Debug, Default)]
pub struct Fallback {
    pub stale: Option<StaleCache>,
    pub respond: Option<RespondFallback>,
}

impl Fallback {
    /// The fallback answer for a request no server could answer, if any is configured and
    /// applies; `None` leaves the caller's own error (502/503/504) to be sent.
    pub fn answer(
        &self,
        method: &Method,
        host: &str,
        path_and_query: &str,
        request: &HeaderMap,
        now: Instant,
    ) -> Option<(FallbackKind, Response<Bytes>)> {
        if let Some(r) = self
            .stale
            .as_ref()
            .and_then(|c| c.lookup(method, host, path_and_query, request, now))
        {
            return Some((FallbackKind::Stale, r));
        }
        self.respond.as_ref().map(|r| (FallbackKind::Respond, r.response()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn cache() -> StaleCache {
        StaleCache::new(StaleSettings::from_keys(Duration::from_secs(300)))
    }

    fn store(c: &StaleCache, path: &str, req: &HeaderMap, resp: &HeaderMap, body: &str, now: Instant) -> bool {
        c.store(
            &Method::GET,
            "Example.com",
            path,
            req,
            StatusCode::OK,
            resp,
            &Bytes::from(body.to_owned()),
            now,
        )
    }

    #[test]
    fn serves_within_stale_for_with_age_warning_and_mark() {
        let c = cache();
        let t0 = Instant::now();
        let resp = hm(&[("content-type", "text/plain"), ("age", "3"), ("connection", "close")]);
        assert!(store(&c, "/a?x=1", &HeaderMap::new(), &resp, "hello", t0));
        let r = c
            .lookup(
                &Method::GET,
                "example.com",
                "/a?x=1",
                &HeaderMap::new(),
                t0 + Duration::from_secs(42),
            )
            .expect("served");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.body(), "hello");
        assert_eq!(r.headers()["age"], "45");
        assert_eq!(r.headers()["warning"], WARNING_STALE);
        assert_eq!(r.headers()["x-gatehouse-fallback"], "stale");
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert!(!r.headers().contains_key("connection"), "hop-by-hop dropped");
        assert!(c
            .lookup(&Method::GET, "example.com", "/a?x=2", &HeaderMap::new(), t0)
            .is_none());
        assert!(c
            .lookup(&Method::HEAD, "example.com", "/a?x=1", &HeaderMap::new(), t0)
            .is_none());
        assert!(
            c.lookup(
                &Method::GET,
                "example.com",
                "/a?x=1",
                &HeaderMap::new(),
                t0 + Duration::from_secs(301)
            )
            .is_none(),
            "expired past stale_for"
        );
        assert_eq!(c.usage().0, 0, "expired entry removed");
    }

    #[test]
    fn refuses_what_a_shared_cache_must_not_store() {
        let c = cache();
        let t0 = Instant::now();
        let none = HeaderMap::new();
        assert!(!store(
            &c,
            "/",
            &none,
            &hm(&[("cache-control", "max-age=0, no-store")]),
            "x",
            t0
        ));
        assert!(!store(&c, "/", &none, &hm(&[("cache-control", "Private")]), "x", t0));
        assert!(!store(&c, "/", &hm(&[("cache-control", "no-store")]), &none, "x", t0));
        assert!(!store(&c, "/", &none, &hm(&[("set-cookie", "s=1")]), "x", t0));
        assert!(!store(&c, "/", &none, &hm(&[("vary", "accept, *")]), "x", t0));
        let auth = hm(&[("authorization", "Bearer t")]);
        assert!(!store(&c, "/", &auth, &none, "x", t0));
        assert!(store(&c, "/", &auth, &hm(&[("cache-control", "public")]), "x", t0));
        assert!(!c.store(
            &Method::GET,
            "h",
            "/",
            &none,
            StatusCode::NOT_FOUND,
            &none,
            &Bytes::new(),
            t0
        ));
        assert!(!c.store(&Method::POST, "h", "/", &none, StatusCode::OK, &none, &Bytes::new(), t0));
        let big = Bytes::from(vec![b'x'; DEFAULT_MAX_BODY_BYTES + 1]);
        assert!(!c.store(&Method::GET, "h", "/", &none, StatusCode::OK, &none, &big, t0));
    }

    #[test]
    fn vary_keys_on_the_request_header_values() {
        let c = cache();
        let t0 = Instant::now();
        let vary = hm(&[("vary", "Accept-Encoding")]);
        let gzip = hm(&[("accept-encoding", "gzip")]);
        assert!(store(&c, "/v", &gzip, &vary, "zipped", t0));
        let r = c
            .lookup(&Method::GET, "example.com", "/v", &gzip, t0)
            .expect("same variant");
        assert_eq!(r.body(), "zipped");
        assert!(c
            .lookup(&Method::GET, "example.com", "/v", &HeaderMap::new(), t0)
            .is_none());
        assert!(c
            .lookup(&Method::GET, "example.com", "/v", &hm(&[("accept-encoding", "br")]), t0)
            .is_none());
        assert!(store(&c, "/v", &HeaderMap::new(), &vary, "plain", t0));
        let r = c
            .lookup(&Method::GET, "example.com", "/v", &HeaderMap::new(), t0)
            .unwrap();
        assert_eq!(r.body(), "plain");
        assert_eq!(
            c.lookup(&Method::GET, "example.com", "/v", &gzip, t0).unwrap().body(),
            "zipped"
        );
    }

    #[test]
    fn bounded_by_entries_and_bytes_evicting_least_recently_used() {
        let t0 = Instant::now();
        let c = StaleCache::new(StaleSettings {
            max_entries: 2,
            ..StaleSettings::from_keys(Duration::from_secs(300))
        });
        let none = HeaderMap::new();
        store(&c, "/1", &none, &none, "1", t0);
        store(&c, "/2", &none, &none, "2", t0);
        // Touch /1 so /2 is the least recently used.
        assert!(c.lookup(&Method::GET, "example.com", "/1", &none, t0).is_some());
        store(&c, "/3", &none, &none, "3", t0);
        assert_eq!(c.usage().0, 2);
        assert!(c.lookup(&Method::GET, "example.com", "/2", &none, t0).is_none());
        assert!(c.lookup(&Method::GET, "example.com", "/1", &none, t0).is_some());
        assert!(c.lookup(&Method::GET, "example.com", "/3", &none, t0).is_some());

        let c = StaleCache::new(StaleSettings {
            max_bytes: 1000,
            ..StaleSettings::from_keys(Duration::from_secs(300))
        });
        let body = "x".repeat(400);
        for p in ["/a", "/b", "/c"] {
            assert!(store(&c, p, &none, &none, &body, t0));
        }
        let (entries, bytes) = c.usage();
        assert_eq!(entries, 2, "the third evicted the first");
        assert!(bytes <= 1000);
        assert!(c.lookup(&Method::GET, "example.com", "/a", &none, t0).is_none());
        // Replacing a key does not double count it.
        assert!(store(&c, "/c", &none, &none, &body, t0));
        assert_eq!(c.usage(), (2, bytes));
    }

    #[test]
    fn respond_fallback_and_the_chain() {
        let respond = RespondFallback::from_keys(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily unavailable",
            Some(Duration::from_millis(4500)),
        );
        let r = respond.response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.body(), "temporarily unavailable");
        assert_eq!(r.headers()["retry-after"], "5");
        assert_eq!(r.headers()["x-gatehouse-fallback"], "respond");

        let t0 = Instant::now();
        let fb = Fallback {
            stale: Some(cache()),
            respond: Some(respond),
        };
        let none = HeaderMap::new();
        store(fb.stale.as_ref().unwrap(), "/s", &none, &none, "old", t0);
        let (kind, r) = fb.answer(&Method::GET, "example.com", "/s", &none, t0).unwrap();
        assert_eq!((kind.as_label(), r.body().as_ref()), ("stale", &b"old"[..]));
        let (kind, r) = fb.answer(&Method::GET, "example.com", "/other", &none, t0).unwrap();
        assert_eq!((kind, r.status().as_u16()), (FallbackKind::Respond, 503));
        assert!(Fallback::default()
            .answer(&Method::GET, "example.com", "/s", &none, t0)
            .is_none());
    }
}
