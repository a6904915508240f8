//! What a request must pass before its route's handler runs: the route's rate limit (any route
//! kind) and, on proxy routes, traffic-class admission (load shedding).
//!
//! Built with the route table from `[[rate_limits]]`, `[[traffic_classes]]`,
//! `limits.max_proxy_in_flight` and `upstreams[].saturation_in_flight`. With none of them
//! configured the request path pays one branch per check: a route without `rate_limit` holds
//! `None`, and without classes or a global limit there is nothing to shed (`classes` is `None`).
//!
//! State survives a reload ([`Admission::continue_from`]): a rate limit whose definition is
//! unchanged keeps its buckets (a reload must not hand every client a fresh burst), and the
//! traffic classes keep counting requests admitted under the old configuration.

use crate::config::Config;
use crate::http::body::ResponseBody;
use crate::http::AccessLogError;
use crate::observe::Name;
use crate::proxy::resilience::classes::{ClassSpec, InFlight, Shed, TrafficClasses};
use crate::proxy::resilience::metrics::ResilienceMetrics;
use crate::proxy::resilience::ratelimit::{KeyedRateLimit, RateDecision, RateLimitSpec, HOUSEKEEPING_INTERVAL};
use crate::proxy::Upstream;
use arc_swap::ArcSwap;
use http::{HeaderMap, Request, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Once};

/// One `[[rate_limits]]` entry as running.
#[derive(Debug)]
struct RouteLimit {
    limit: Arc<KeyedRateLimit>,
    /// Starts the periodic sweep of idle keys on first use: the table is built before the
    /// server's runtime exists (and by `gatehouse check`, which has none).
    housekeeping: Once,
}

/// The admission state of one route table.
#[derive(Clone, Debug, Default)]
pub struct Admission {
    /// `[[rate_limits]]` in configuration order; a route holds an index into it.
    limits: Vec<Arc<RouteLimit>>,
    /// `None` when nothing can be shed: no class and no global limit.
    classes: Option<TrafficClasses>,
    /// `saturation_in_flight` of the upstreams that set one.
    saturation: HashMap<Arc<str>, usize>,
}

/// A request a rate limit let through: its RateLimit fields go on the response.
#[derive(Debug)]
pub struct RateAdmitted {
    limit: Arc<RouteLimit>,
    decision: RateDecision,
}

impl RateAdmitted {
    /// Adds `RateLimit-Policy` and `RateLimit` so that clients can pace themselves before they
    /// are refused (draft-ietf-httpapi-ratelimit-headers: servers send them on any response).
    pub fn add_headers(&self, headers: &mut HeaderMap) {
        self.limit.limit.add_headers(&self.decision, headers);
    }
}

impl Admission {
    /// From the validated configuration; entries validation refused are left out (the table is
    /// not used then).
    pub fn build(config: &Config) -> Admission {
        let limits = config
            .rate_limits
            .iter()
            .filter_map(|l| {
                let burst = l.burst.unwrap_or(0);
                let mut spec = RateLimitSpec::from_keys(&l.name, &l.key, &l.rate, burst).ok()?;
                if l.burst.is_none() {
                    spec.burst = spec.rate.count;
                }
                Some(Arc::new(RouteLimit {
                    limit: Arc::new(KeyedRateLimit::new(spec)),
                    housekeeping: Once::new(),
                }))
            })
            .collect();
        let specs: Vec<ClassSpec> = config
            .traffic_classes
            .iter()
            .filter_map(|c| {
                let standard = c.name == crate::proxy::resilience::classes::STANDARD;
                Some(ClassSpec {
                    name: c.name.as_str().into(),
                    header: match standard {
                        true => http::HeaderName::from_static("x-unused"),
                        false => http::HeaderName::from_bytes(c.header.as_bytes()).ok()?,
                    },
                    value: match standard {
                        true => http::HeaderValue::from_static(""),
                        false => http::HeaderValue::from_str(&c.value).ok()?,
                    },
                    max_in_flight: c.max_in_flight as usize,
                    shed_order: c.shed_order,
                })
            })
            .collect();
        let global = config.limits.max_proxy_in_flight as usize;
        let classes = (!specs.is_empty() || global > 0).then(|| TrafficClasses::new(&specs, global));
        let saturation = config
            .upstreams
            .iter()
            .filter(|u| u.saturation_in_flight > 0)
            .map(|u| (Arc::from(u.name.as_str()), u.saturation_in_flight as usize))
            .collect();
        Admission {
            limits,
            classes,
            saturation,
        }
    }

    /// The index routes use for the rate limit called `name`.
    pub fn limit_index(&self, name: &str) -> Option<usize> {
        self.limits.iter().position(|l| &**l.limit.name() == name)
    }

    /// Takes over `previous`'s state: rate limits with the same definition (name, key, rate,
    /// burst) keep their buckets; traffic classes keep their in-flight counts.
    pub fn continue_from(&mut self, previous: &Admission) {
        for l in &mut self.limits {
            if let Some(old) = previous.limits.iter().find(|o| o.limit.spec() == l.limit.spec()) {
                *l = Arc::clone(old);
            }
        }
        // Shedding switched on by this reload starts counting from the requests it admits.
        if let (Some(new), Some(old)) = (&self.classes, &previous.classes) {
            self.classes = Some(new.clone().continuing(old));
        }
    }

    /// Applies rate limit `index` to `req` from `client` (the peer's address; behind the
    /// pipeline every request has one, a bare service shares one key): `Ok` with the fields for
    /// the response, or the 429 answer (counted and named in the access log).
    pub fn check_rate<B>(
        &self,
        index: usize,
        req: &Request<B>,
        client: IpAddr,
        metrics: &ArcSwap<ResilienceMetrics>,
    ) -> Result<Option<RateAdmitted>, Box<Response<ResponseBody>>> {
        let Some(entry) = self.limits.get(index) else {
            return Ok(None);
        };
        if !entry.housekeeping.is_completed() && tokio::runtime::Handle::try_current().is_ok() {
            entry.housekeeping.call_once(|| {
                entry.limit.spawn_housekeeping(HOUSEKEEPING_INTERVAL);
            });
        }
        match entry.limit.check(client, req.headers()) {
            decision @ RateDecision::Allowed { .. } => Ok(Some(RateAdmitted {
                limit: Arc::clone(entry),
                decision,
            })),
            RateDecision::Limited { retry_after } => {
                let name = entry.limit.name();
                metrics.load().rate_limited(&Name(Arc::clone(name)));
                tracing::debug!(
                    limit = &**name,
                    retry_after_ms = retry_after.as_millis() as u64,
                    "rate limited"
                );
                let mut r = entry.limit.limited_response(retry_after).map(ResponseBody::from);
                r.extensions_mut()
                    .insert(AccessLogError(format!("rate_limited limit={name}")));
                Err(Box::new(r))
            }
        }
    }

    /// Admits a request to `upstream` by its traffic class: `Ok(None)` when nothing can be shed,
    /// `Ok(Some(slot))` to hold until the response ends, or the 503 answer (counted and named
    /// in the access log).
    pub fn admit(
        &self,
        upstream: &Upstream,
        headers: &HeaderMap,
        metrics: &ArcSwap<ResilienceMetrics>,
    ) -> Result<Option<InFlight>, Box<Response<ResponseBody>>> {
        let Some(classes) = &self.classes else {
            return Ok(None);
        };
        let name = &upstream.spec.name.0;
        let saturated = self
            .saturation
            .get(name)
            .is_some_and(|&at| upstream.servers.iter().map(|s| s.in_flight()).sum::<usize>() >= at);
        classes
            .admit(classes.classify(headers), saturated)
            .map(Some)
            .map_err(|shed| shed_answer(&shed, name, metrics))
    }
}

fn shed_answer(shed: &Shed, upstream: &str, metrics: &ArcSwap<ResilienceMetrics>) -> Box<Response<ResponseBody>> {
    metrics.load().shed(&Name(Arc::clone(&shed.class)));
    let reason = shed.reason.as_str();
    tracing::debug!(class = &*shed.class, reason, upstream, "request shed");
    let mut r = shed.response().map(ResponseBody::from);
    r.extensions_mut().insert(AccessLogError(format!(
        "shed class={} reason={reason} upstream={upstream}",
        shed.class
    )));
    Box::new(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn admission(toml: &str) -> Admission {
        Admission::build(&load_str(toml).unwrap())
    }

    const ANY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    fn get() -> Request<()> {
        Request::new(())
    }

    #[test]
    fn nothing_configured_costs_nothing() {
        let a = admission("");
        assert!(a.limits.is_empty() && a.classes.is_none() && a.saturation.is_empty());
    }

    #[test]
    fn burst_defaults_to_the_rate_count_and_reload_keeps_buckets() {
        let limit = "[[rate_limits]]\nname = \"l\"\nkey = \"client_ip\"\nrate = \"3/h\"\n";
        let m = ArcSwap::from_pointee(ResilienceMetrics::default());
        let a = admission(limit);
        for _ in 0..3 {
            assert!(a.check_rate(0, &get(), ANY, &m).is_ok());
        }
        let refused = a.check_rate(0, &get(), ANY, &m).unwrap_err();
        assert_eq!(refused.status(), 429);
        // An unchanged definition keeps its state across a reload; a changed one starts afresh.
        let mut same = admission(limit);
        same.continue_from(&a);
        assert!(same.check_rate(0, &get(), ANY, &m).is_err());
        let mut changed = admission(&limit.replace("3/h", "4/h"));
        changed.continue_from(&a);
        assert!(changed.check_rate(0, &get(), ANY, &m).is_ok());
    }
}
