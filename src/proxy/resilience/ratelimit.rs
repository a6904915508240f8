//! Keyed rate limits (`[[rate_limits]]`): GCRA via `governor`, bounded key memory, and the 429
//! answer with `Retry-After` and RateLimit headers.
//!
//! Shape and reasons:
//! - **Algorithm**: GCRA (`governor`), equivalent to a token bucket of `burst` tokens refilled at
//!   `rate`, but one timestamp per key instead of a count and a time, updated with one CAS.
//! - **Keys**: `client_ip` keys IPv4 clients by address and IPv6 clients by their /64 (one
//!   subscriber usually holds a whole /64, so per-address keys would let a client rotate
//!   addresses to escape its limit); IPv4-mapped IPv6 counts as IPv4. `header:NAME` keys by the
//!   header's value, stored as a 64-bit keyed SipHash digest (bounded memory per key whatever
//!   the value's size, and no API key kept in memory in clear); a request **without the header
//!   is keyed by its client address** instead, so omitting the header is not a way around the
//!   limit.
//! - **Bounded memory**: keys whose bucket is full again are indistinguishable from new ones and
//!   are dropped by [`KeyedRateLimit::housekeeping`] (run periodically). At most `max_keys` are
//!   held: when a new key arrives at the cap, housekeeping runs first (at most once a second);
//!   if the table is still full, the new key shares a single `overflow` bucket with every other
//!   key that did not fit, which is logged. Overflowing keys are thus still limited, as a group:
//!   neither unlimited (a flood of random keys would then switch limiting off) nor refused
//!   outright (which would lock out every new client while the table is full). The check and
//!   the insertion are two steps, so requests for new keys racing on different threads can
//!   exceed the cap by at most the number of threads: still a bound.
//! - **Headers**: draft-ietf-httpapi-ratelimit-headers-10 (the current draft, whose form has
//!   been stable since -08): `RateLimit-Policy: "NAME";q=COUNT;w=SECONDS` states the configured
//!   rate, and `RateLimit: "NAME";r=REMAINING;t=SECONDS` the requests that would pass now and
//!   the seconds until the quota is fully available again (on a 429: until the next request
//!   can pass, the same value as `Retry-After`). Sent on 429s; callers may also add them to
//!   admitted responses with [`KeyedRateLimit::add_headers`].

use super::whole_seconds_up;
use bytes::Bytes;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::{HashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{RateLimiter, StateStore};
use governor::Quota;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Keys held per limit unless configured: ~100 bytes each, so about 10 MB at the cap.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// How often housekeeping runs: often enough that idle keys do not pile up between runs.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two housekeeping runs triggered by a full table: a sweep is O(keys)
/// under the table's lock, so a key flood must not trigger one per request.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// `rate` or `key` that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimitError {
    #[error("rate {0:?} is not COUNT/UNIT: write it like \"100/s\", \"6000/m\" or \"10/h\"")]
    Rate(String),
    #[error("rate {0:?} is more than one request per nanosecond; lower it")]
    RateTooHigh(String),
    #[error("key {0:?} is neither \"client_ip\" nor \"header:NAME\" with a valid header name")]
    Key(String),
}

/// A parsed `rate`: `count` requests per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    /// Parses `"100/s"`, `"6000/m"`, `"10/h"`.
    pub fn parse(text: &str) -> Result<Rate, RateLimitError> {
        let err = || RateLimitError::Rate(text.to_owned());
        let (count, unit) = text.split_once('/').ok_or_else(err)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| err())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(err()),
        };
        if (per / count.get()).is_zero() {
            return Err(RateLimitError::RateTooHigh(text.to_owned()));
        }
        Ok(Rate { count, per })
    }
}

/// What a limit is keyed by: the `key` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// `"client_ip"`.
    ClientIp,
    /// `"header:NAME"`.
    Header(HeaderName),
}

impl KeySpec {
    pub fn parse(text: &str) -> Result<KeySpec, RateLimitError> {
        if text == "client_ip" {
            return Ok(KeySpec::ClientIp);
        }
        text.strip_prefix("header:")
            .and_then(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .map(KeySpec::Header)
            .ok_or_else(|| RateLimitError::Key(text.to_owned()))
    }
}

/// One `[[rate_limits]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitSpec {
    /// `name`: the `limit` label of `gatehouse_rate_limited_total` and the policy name.
    pub name: Arc<str>,
    pub key: KeySpec,
    pub rate: Rate,
    /// `burst`: requests that may pass at once after a quiet period.
    pub burst: NonZeroU32,
    /// Keys held at most (not a key: [`DEFAULT_MAX_KEYS`]).
    pub max_keys: usize,
}

impl RateLimitSpec {
    /// From the `name`, `key`, `rate` and `burst` keys. A `burst` of 0 is refused by config
    /// validation; here it is raised to 1.
    pub fn from_keys(name: &str, key: &str, rate: &str, burst: u32) -> Result<Self, RateLimitError> {
        Ok(RateLimitSpec {
            name: name.into(),
            key: KeySpec::parse(key)?,
            rate: Rate::parse(rate)?,
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            max_keys: DEFAULT_MAX_KEYS,
        })
    }
}

/// The identity a request is limited under.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum RateKey {
    Ip(IpAddr),
    /// Keyed SipHash of the header value.
    Header(u64),
    /// The shared bucket of keys that did not fit in the table.
    Overflow,
}

/// The key table, shared between the limiter (which updates it) and the cap check.
type Table = HashMapStateStore<RateKey>;

/// The state store handed to `governor`: the shared table, by reference count.
#[derive(Debug)]
struct SharedTable(Arc<Table>);

impl StateStore for SharedTable {
    type Key = RateKey;

    fn measure_and_replace<T, F, E>(&self, key: &RateKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<RateKey> for SharedTable {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }
    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit()
    }
    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }
    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

/// The verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// Passed; `remaining` more would pass now; the quota is full again after `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Refused; the next request can pass after `retry_after`.
    Limited { retry_after: Duration },
}

/// One rate limit and its keys.
pub struct KeyedRateLimit<C: Clock = MonotonicClock> {
    spec: RateLimitSpec,
    table: Arc<Table>,
    limiter: RateLimiter<RateKey, SharedTable, C, StateInformationMiddleware>,
    hasher: RandomState,
    last_sweep: Mutex<Option<Instant>>,
    policy: HeaderValue,
}

impl<C: Clock> std::fmt::Debug for KeyedRateLimit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedRateLimit")
            .field("spec", &self.spec)
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}

/// `s` as a structured-field string (RFC 8941 §3.3.3): quoted, `"` and `\` escaped, anything
/// outside printable ASCII replaced by `_` (config names are not expected to need it).
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c)
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

impl KeyedRateLimit<MonotonicClock> {
    pub fn new(spec: RateLimitSpec) -> Self {
        KeyedRateLimit::with_clock(spec, MonotonicClock)
    }
}

impl<C: Clock> KeyedRateLimit<C> {
    /// A limit on an injected clock (tests use `governor::clock::FakeRelativeClock`).
    pub fn with_clock(spec: RateLimitSpec, clock: C) -> Self {
        let period = spec.rate.per / spec.rate.count.get();
        // `Rate::parse` refuses a zero period; a hand-built zero `Rate` gets the finest one.
        let quota = Quota::with_period(period)
            .or_else(|| Quota::with_period(Duration::from_nanos(1)))
            .map(|q| q.allow_burst(spec.burst));
        let table: Arc<Table> = Arc::new(Table::new(HashMap::new()));
        let limiter = RateLimiter::<_, _, _, NoOpMiddleware<C::Instant>>::new(
            quota.unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)),
            SharedTable(Arc::clone(&table)),
            clock,
        )
        .with_middleware::<StateInformationMiddleware>();
        let policy = format!(
            "{};q={};w={}",
            sf_string(&spec.name),
            spec.rate.count,
            spec.rate.per.as_secs()
        );
        KeyedRateLimit {
            policy: HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("\"limit\"")),
            spec,
            table,
            limiter,
            hasher: RandomState::new(),
            last_sweep: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.spec.name
    }

    /// The definition this limit runs (a reload keeps the limit when it is unchanged).
    pub fn spec(&self) -> &RateLimitSpec {
        &self.spec
    }

    /// Keys held now (the overflow bucket included).
    pub fn keys(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.table)
    }

    /// The key a request is limited under (before the table's cap is applied).
    pub fn key_for(&self, client: IpAddr, headers: &HeaderMap) -> RateKey {
        if let KeySpec::Header(name) = &self.spec.key {
            if let Some(value) = headers.get(name) {
                return RateKey::Header(self.hasher.hash_one(value.as_bytes()));
            }
        }
        RateKey::Ip(match client {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        })
    }

    fn is_known_or_fits(&self, key: &RateKey) -> bool {
        let map = self.table.lock();
        map.contains_key(key) || map.len() < self.spec.max_keys
    }

    /// Applies the cap: the key itself when it is held or fits, else [`RateKey::Overflow`].
    fn admit_key(&self, key: RateKey) -> RateKey {
        if self.is_known_or_fits(&key) {
            return key;
        }
        let sweep = {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= MIN_SWEEP_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if sweep {
            self.housekeeping();
            if self.is_known_or_fits(&key) {
                return key;
            }
            tracing::warn!(
                limit = &*self.spec.name,
                max_keys = self.spec.max_keys,
                "rate limit key table full: new keys share the overflow bucket"
            );
        }
        RateKey::Overflow
    }

    /// Decides on one request from `client` with `headers`.
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> RateDecision {
        let key = self.admit_key(self.key_for(client, headers));
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = self.spec.burst.get().saturating_sub(remaining);
                RateDecision::Allowed {
                    remaining,
                    reset: self.limiter_period().saturating_mul(missing),
                }
            }
            Err(not_until) => RateDecision::Limited {
                retry_after: not_until.wait_time_from(self.limiter.clock().now()),
            },
        }
    }

    fn limiter_period(&self) -> Duration {
        self.spec.rate.per / self.spec.rate.count.get()
    }

    /// Drops keys whose bucket has refilled (they are indistinguishable from new keys).
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Adds `RateLimit-Policy` and `RateLimit` for `decision` to `headers` (appending, so that
    /// several limits on one request form a list).
    pub fn add_headers(&self, decision: &RateDecision, headers: &mut HeaderMap) {
        let (remaining, t) = match *decision {
            RateDecision::Allowed { remaining, reset } => {
                (remaining, if reset.is_zero() { 0 } else { whole_seconds_up(reset) })
            }
            RateDecision::Limited { retry_after } => (0, whole_seconds_up(retry_after)),
        };
        headers.append(HeaderName::from_static("ratelimit-policy"), self.policy.clone());
        let state = format!("{};r={remaining};t={t}", sf_string(&self.spec.name));
        if let Ok(v) = HeaderValue::from_str(&state) {
            headers.append(HeaderName::from_static("ratelimit"), v);
        }
    }

    /// The 429 answer (RFC 6585 §4) for a `Limited` decision.
    pub fn limited_response(&self, retry_after: Duration) -> Response<Bytes> {
        let mut r = Response::new(Bytes::from_static(b"rate limited, retry later\n"));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(RETRY_AFTER, HeaderValue::from(whole_seconds_up(retry_after)));
        self.add_headers(&RateDecision::Limited { retry_after }, h);
        r
    }
}

impl<C: Clock + Send + Sync + 'static> KeyedRateLimit<C> {
    /// Runs [`housekeeping`](Self::housekeeping) every `every` until the limit is dropped.
    pub fn spawn_housekeeping(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limit) => limit.housekeeping(),
                    None => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limit(key: &str, rate: &str, burst: u32) -> (KeyedRateLimit<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let spec = RateLimitSpec::from_keys("per-client", key, rate, burst).unwrap();
        (KeyedRateLimit::with_clock(spec, clock.clone()), clock)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_rates_and_keys() {
        let r = Rate::parse("100/s").unwrap();
        assert_eq!((r.count.get(), r.per), (100, Duration::from_secs(1)));
        assert_eq!(Rate::parse("6000/m").unwrap().per, Duration::from_secs(60));
        assert_eq!(Rate::parse(" 10 / h ").unwrap().count.get(), 10);
        for bad in ["100", "0/s", "-1/s", "100/d", "x/s", "100/"] {
            assert_eq!(Rate::parse(bad), Err(RateLimitError::Rate(bad.into())), "{bad}");
        }
        assert!(matches!(
            Rate::parse("2000000000/s"),
            Err(RateLimitError::RateTooHigh(_))
        ));
        assert_eq!(KeySpec::parse("client_ip"), Ok(KeySpec::ClientIp));
        assert_eq!(
            KeySpec::parse("header:X-Api-Key"),
            Ok(KeySpec::Header(HeaderName::from_static("x-api-key")))
        );
        assert!(KeySpec::parse("header:").is_err());
        assert!(KeySpec::parse("cookie:x").is_err());
    }

    #[test]
    fn burst_then_rate_per_key() {
        let (l, clock) = limit("client_ip", "10/s", 3);
        let h = HeaderMap::new();
        let a = ip("192.0.2.1");
        for expected in [2, 1, 0] {
            match l.check(a, &h) {
                RateDecision::Allowed { remaining, .. } => assert_eq!(remaining, expected),
                other => panic!("{other:?}"),
            }
        }
        let RateDecision::Limited { retry_after } = l.check(a, &h) else {
            panic!("4th request of a burst of 3 must be limited");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert!(
            matches!(l.check(ip("192.0.2.2"), &h), RateDecision::Allowed { .. }),
            "other key"
        );
        clock.advance(Duration::from_millis(100));
        assert!(matches!(l.check(a, &h), RateDecision::Allowed { remaining: 0, .. }));
        assert!(matches!(l.check(a, &h), RateDecision::Limited { .. }));
    }

    #[test]
    fn ipv6_keys_by_64_and_mapped_v4_is_v4() {
        let (l, _) = limit("client_ip", "1/s", 1);
        let h = HeaderMap::new();
        assert!(matches!(
            l.check(ip("2001:db8:1:2::1"), &h),
            RateDecision::Allowed { .. }
        ));
        assert!(
            matches!(l.check(ip("2001:db8:1:2:ffff::9"), &h), RateDecision::Limited { .. }),
            "same /64"
        );
        assert!(matches!(
            l.check(ip("2001:db8:1:3::1"), &h),
            RateDecision::Allowed { .. }
        ));
        assert!(matches!(l.check(ip("198.51.100.7"), &h), RateDecision::Allowed { .. }));
        assert!(matches!(
            l.check(ip("::ffff:198.51.100.7"), &h),
            RateDecision::Limited { .. }
        ));
    }

    #[test]
    fn header_keys_and_missing_header_falls_back_to_client_ip() {
        let (l, _) = limit("header:x-api-key", "1/s", 1);
        let mut k1 = HeaderMap::new();
        k1.insert("x-api-key", HeaderValue::from_static("k1"));
        let mut k2 = HeaderMap::new();
        k2.insert("x-api-key", HeaderValue::from_static("k2"));
        let none = HeaderMap::new();
        let a = ip("192.0.2.1");
        assert!(matches!(l.check(a, &k1), RateDecision::Allowed { .. }));
        assert!(matches!(l.check(a, &k1), RateDecision::Limited { .. }));
        assert!(
            matches!(l.check(a, &k2), RateDecision::Allowed { .. }),
            "same client, other key"
        );
        assert!(matches!(l.check(a, &none), RateDecision::Allowed { .. }));
        assert!(
            matches!(l.check(a, &none), RateDecision::Limited { .. }),
            "keyed by address"
        );
        assert!(matches!(l.check(ip("192.0.2.9"), &none), RateDecision::Allowed { .. }));
    }

    #[test]
    fn key_table_is_bounded_with_a_shared_overflow_bucket() {
        let clock = FakeRelativeClock::default();
        let mut spec = RateLimitSpec::from_keys("per-client", "client_ip", "1/s", 1).unwrap();
        spec.max_keys = 3;
        let l = KeyedRateLimit::with_clock(spec, clock.clone());
        let h = HeaderMap::new();
        for i in 1..=3 {
            assert!(matches!(
                l.check(ip(&format!("192.0.2.{i}")), &h),
                RateDecision::Allowed { .. }
            ));
        }
        assert_eq!(l.keys(), 3);
        // Table full of live keys: the 4th client goes to the overflow bucket, the 5th shares it.
        assert!(matches!(l.check(ip("192.0.2.4"), &h), RateDecision::Allowed { .. }));
        assert!(matches!(l.check(ip("192.0.2.5"), &h), RateDecision::Limited { .. }));
        assert_eq!(l.keys(), 4, "3 keys + the overflow bucket, never more");
        for i in 6..50 {
            l.check(ip(&format!("192.0.2.{i}")), &h);
        }
        assert_eq!(l.keys(), 4);
        // Known keys keep their own bucket while the table is full.
        clock.advance(Duration::from_secs(1));
        assert!(matches!(l.check(ip("192.0.2.1"), &h), RateDecision::Allowed { .. }));
        // Once buckets have refilled, housekeeping frees the table.
        clock.advance(Duration::from_secs(5));
        l.housekeeping();
        assert_eq!(l.keys(), 0);
        assert!(matches!(l.check(ip("192.0.2.60"), &h), RateDecision::Allowed { .. }));
        assert_eq!(l.keys(), 1);
    }

    #[test]
    fn a_full_table_sweeps_before_overflowing() {
        let clock = FakeRelativeClock::default();
        let mut spec = RateLimitSpec::from_keys("per-client", "client_ip", "1/s", 1).unwrap();
        spec.max_keys = 2;
        let l = KeyedRateLimit::with_clock(spec, clock.clone());
        let h = HeaderMap::new();
        l.check(ip("192.0.2.1"), &h);
        l.check(ip("192.0.2.2"), &h);
        clock.advance(Duration::from_secs(2));
        // The two idle keys are swept on demand, so the new client gets its own bucket.
        assert!(matches!(l.check(ip("192.0.2.3"), &h), RateDecision::Allowed { .. }));
        assert!(matches!(l.check(ip("192.0.2.3"), &h), RateDecision::Limited { .. }));
        assert!(!l.table.lock().contains_key(&RateKey::Overflow));
    }

    #[test]
    fn limited_response_has_retry_after_and_ratelimit_fields() {
        let (l, _) = limit("client_ip", "100/s", 200);
        let r = l.limited_response(Duration::from_millis(1200));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["ratelimit-policy"], "\"per-client\";q=100;w=1");
        assert_eq!(r.headers()["ratelimit"], "\"per-client\";r=0;t=2");

        let (l, _) = limit("client_ip", "6000/m", 10);
        let h = HeaderMap::new();
        let d = l.check(ip("192.0.2.1"), &h);
        assert_eq!(
            d,
            RateDecision::Allowed {
                remaining: 9,
                reset: Duration::from_millis(10)
            }
        );
        let mut out = HeaderMap::new();
        l.add_headers(&d, &mut out);
        assert_eq!(out["ratelimit-policy"], "\"per-client\";q=6000;w=60");
        assert_eq!(out["ratelimit"], "\"per-client\";r=9;t=1");
        assert_eq!(sf_string("a\"b\\c\u{e9}"), "\"a\\\"b\\\\c_\"");
    }

    #[tokio::test]
    async fn housekeeping_task_ends_with_the_limit() {
        let l = Arc::new(KeyedRateLimit::new(
            RateLimitSpec::from_keys("x", "client_ip", "1/s", 1).unwrap(),
        ));
        let task = l.spawn_housekeeping(Duration::from_millis(5));
        drop(l);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task ends once the limit is dropped")
            .expect("no panic");
    }
}
