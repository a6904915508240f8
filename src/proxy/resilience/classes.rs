//! Traffic classes and load shedding: which class a request belongs to, per-class in-flight
//! limits, and who is refused first when the proxy is overloaded.
//!
//! Shape and reasons:
//! - **Matching**: classes are tried in configuration order and the first whose `header` has
//!   exactly `value` wins; unmatched requests are [`STANDARD`]. A configured class named
//!   `standard` sets the default class's limit and shed order instead of adding a class.
//! - **Class limit**: a class with `max_in_flight > 0` never has more requests in flight.
//! - **Shedding under a global limit G**: requests already in flight are never cancelled, so
//!   "lowest `shed_order` first" is made true by keeping headroom for the higher levels. With
//!   the K distinct `shed_order` values ranked 0 (shed first) to K−1, a request of rank r is
//!   admitted only while the total in flight is below `G − (K−1−r) × R`, where
//!   `R = max(1, ⌈G × SHED_RESERVE⌉)` (at least 1 admitted at every rank). As load rises the
//!   lowest rank is refused first, then the next, and the highest rank can use all of G; a
//!   flood of a low class cannot take the slots a higher class needs. The price is that a
//!   lone low class never uses the top `(K−1−r) × R` slots, the headroom that makes the
//!   guarantee possible without preempting anyone.
//! - **Upstream saturation** (the caller says the upstream's pool is at its limit): every rank
//!   but the highest is refused, so what capacity there is goes to the most important traffic.
//! - Counting uses atomics: admission is `fetch_add` then compare, undone on refusal, so the
//!   limits hold exactly under concurrency and the hot path takes no lock. An admitted request
//!   holds an [`InFlight`] guard that gives its slots back when dropped.
//! - **Reload**: [`TrafficClasses::continuing`] builds the new classes on the old counters (the
//!   global one, and each class's by name), so requests admitted before a reload still count
//!   against the limits after it and give their slots back to the counters that are in force.

use super::whole_seconds_up;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The class of requests no configured class matched.
pub const STANDARD: &str = "standard";
/// `shed_order` of the standard class unless configured: above 0 so that a "bulk" class can
/// be declared to go first, below the `2` the premium example uses.
pub const DEFAULT_STANDARD_SHED_ORDER: u32 = 1;
/// Headroom per shed rank, as a fraction of the global limit: 10% keeps a meaningful reserve
/// for the classes above while costing lower classes little when they are alone.
pub const SHED_RESERVE: f64 = 0.1;
/// `Retry-After` on a shed request: overload is measured in seconds, so ask for one.
pub const DEFAULT_SHED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One `[[traffic_classes]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    /// `name`: the `class` label of `gatehouse_shed_total`.
    pub name: Arc<str>,
    /// `header`: the request header to look at.
    pub header: HeaderName,
    /// `value`: the exact value that selects this class.
    pub value: HeaderValue,
    /// `max_in_flight`: 0 = unlimited.
    pub max_in_flight: usize,
    /// `shed_order`: under overload, lower is shed first.
    pub shed_order: u32,
}

/// Why a request was refused: logged with the class; each refusal counts in
/// `gatehouse_shed_total{class}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// The class's own `max_in_flight` was reached.
    ClassLimit,
    /// The global limit (less the headroom kept for higher classes) was reached.
    GlobalLimit,
    /// The upstream is saturated and this class is not the highest shed order.
    UpstreamSaturated,
}

impl ShedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::ClassLimit => "class_limit",
            ShedReason::GlobalLimit => "global_limit",
            ShedReason::UpstreamSaturated => "upstream_saturated",
        }
    }
}

/// Identifies a class inside one [`TrafficClasses`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassId(usize);

#[derive(Clone, Debug)]
struct Class {
    name: Arc<str>,
    matcher: Option<(HeaderName, HeaderValue)>,
    max_in_flight: usize,
    shed_order: u32,
    /// Admission threshold on the global in-flight count (usize::MAX without a global limit).
    global_threshold: usize,
    top_rank: bool,
    /// Shared with the same class of the configuration before a reload (see `continuing`).
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Shared {
    /// Configured classes in order, then the standard class last.
    classes: Vec<Class>,
    in_flight: Arc<AtomicUsize>,
}

/// The classes and their in-flight counts. Cheap to clone (an `Arc`).
#[derive(Clone, Debug)]
pub struct TrafficClasses {
    shared: Arc<Shared>,
    retry_after: Duration,
}

/// A refusal: which class, why, and when to come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shed {
    pub class: Arc<str>,
    pub reason: ShedReason,
    pub retry_after: Duration,
}

impl Shed {
    /// 503 with `Retry-After` (RFC 9110 §15.6.4).
    pub fn response(&self) -> Response<Bytes> {
        let mut r = Response::new(Bytes::from_static(b"overloaded, retry later\n"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(whole_seconds_up(self.retry_after)),
        );
        r
    }
}

/// An admitted request's slots; dropping it gives them back.
#[derive(Debug)]
pub struct InFlight {
    shared: Arc<Shared>,
    class: usize,
}

impl InFlight {
    pub fn class(&self) -> &Arc<str> {
        &self.shared.classes[self.class].name
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.classes[self.class].in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TrafficClasses {
    /// Builds the classes from `[[traffic_classes]]` (in order) and the global in-flight limit
    /// (0 = none). A spec named `standard` configures the default class.
    pub fn new(specs: &[ClassSpec], global_limit: usize) -> Self {
        let mut classes: Vec<Class> = Vec::with_capacity(specs.len() + 1);
        let mut standard = (0, DEFAULT_STANDARD_SHED_ORDER);
        for s in specs {
            if &*s.name == STANDARD {
                standard = (s.max_in_flight, s.shed_order);
                continue;
            }
            classes.push(Class {
                name: Arc::clone(&s.name),
                matcher: Some((s.header.clone(), s.value.clone())),
                max_in_flight: s.max_in_flight,
                shed_order: s.shed_order,
                global_threshold: usize::MAX,
                top_rank: false,
                in_flight: Arc::default(),
            });
        }
        classes.push(Class {
            name: STANDARD.into(),
            matcher: None,
            max_in_flight: standard.0,
            shed_order: standard.1,
            global_threshold: usize::MAX,
            top_rank: false,
            in_flight: Arc::default(),
        });

        let mut orders: Vec<u32> = classes.iter().map(|c| c.shed_order).collect();
        orders.sort_unstable();
        orders.dedup();
        let levels = orders.len();
        let reserve = ((global_limit as f64 * SHED_RESERVE).ceil() as usize).max(1);
        for c in &mut classes {
            let rank = orders.partition_point(|&o| o < c.shed_order);
            let above = levels - 1 - rank;
            c.top_rank = above == 0;
            if global_limit > 0 {
                c.global_threshold = global_limit.saturating_sub(above.saturating_mul(reserve)).max(1);
            }
        }
        TrafficClasses {
            shared: Arc::new(Shared {
                classes,
                in_flight: Arc::default(),
            }),
            retry_after: DEFAULT_SHED_RETRY_AFTER,
        }
    }

    /// These classes counting on `previous`'s counters: the global in-flight count, and each
    /// class's count when `previous` has a class of the same name. Used on reload, so that
    /// requests admitted under the old configuration keep counting until they end instead of
    /// the new limits starting from zero while the old requests still run.
    pub fn continuing(self, previous: &TrafficClasses) -> Self {
        let mut classes = self.shared.classes.clone();
        for c in &mut classes {
            if let Some(old) = previous.shared.classes.iter().find(|o| o.name == c.name) {
                c.in_flight = Arc::clone(&old.in_flight);
            }
        }
        TrafficClasses {
            shared: Arc::new(Shared {
                classes,
                in_flight: Arc::clone(&previous.shared.in_flight),
            }),
            retry_after: self.retry_after,
        }
    }

    /// The same classes with another `Retry-After` for shed requests.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The first class whose header has its value; the standard class otherwise.
    pub fn classify(&self, headers: &HeaderMap) -> ClassId {
        let classes = &self.shared.classes;
        let found = classes.iter().position(|c| {
            c.matcher
                .as_ref()
                .is_some_and(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
        });
        ClassId(found.unwrap_or(classes.len() - 1))
    }

    /// The class `id` names; a stale id (from the classes before a reload) is the standard
    /// class rather than a panic.
    fn class(&self, id: ClassId) -> (usize, &Class) {
        let classes = &self.shared.classes;
        let index = if id.0 < classes.len() { id.0 } else { classes.len() - 1 };
        (index, &classes[index])
    }

    pub fn name(&self, id: ClassId) -> &Arc<str> {
        &self.class(id).1.name
    }

    /// The global admission threshold of a class (for `doctor` and tests).
    pub fn threshold(&self, id: ClassId) -> usize {
        self.class(id).1.global_threshold
    }

    /// Requests in flight, all classes.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Admits a request of class `id`, or says why not. `upstream_saturated` is the caller's
    /// signal that the chosen upstream cannot take more (its pool is at its limit).
    pub fn admit(&self, id: ClassId, upstream_saturated: bool) -> Result<InFlight, Shed> {
        let (index, class) = self.class(id);
        let shed = |reason| Shed {
            class: Arc::clone(&class.name),
            reason,
            retry_after: self.retry_after,
        };
        if upstream_saturated && !class.top_rank {
            return Err(shed(ShedReason::UpstreamSaturated));
        }
        if class.max_in_flight > 0 {
            let before = class.in_flight.fetch_add(1, Ordering::AcqRel);
            if before >= class.max_in_flight {
                class.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(shed(ShedReason::ClassLimit));
            }
        } else {
            class.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let before = self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= class.global_threshold {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            class.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(shed(ShedReason::GlobalLimit));
        }
        Ok(InFlight {
            shared: Arc::clone(&self.shared),
            class: index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn spec(name: &str, value: &str, max: usize, order: u32) -> ClassSpec {
        ClassSpec {
            name: name.into(),
            header: HeaderName::from_static("x-traffic-class"),
            value: HeaderValue::from_str(value).unwrap(),
            max_in_flight: max,
            shed_order: order,
        }
    }

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert("x-traffic-class", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn first_match_wins_and_unmatched_is_standard() {
        let tc = TrafficClasses::new(
            &[
                spec("premium", "premium", 0, 2),
                spec("also-premium", "premium", 0, 3),
                spec("bulk", "bulk", 0, 0),
            ],
            0,
        );
        assert_eq!(&**tc.name(tc.classify(&headers(Some("premium")))), "premium");
        assert_eq!(&**tc.name(tc.classify(&headers(Some("bulk")))), "bulk");
        assert_eq!(&**tc.name(tc.classify(&headers(Some("Premium")))), STANDARD);
        assert_eq!(&**tc.name(tc.classify(&headers(None))), STANDARD);
        // An id from the classes before a reload is the standard class, not a panic.
        let stale_id = tc.classify(&headers(Some("bulk")));
        let reloaded = TrafficClasses::new(&[], 0);
        assert_eq!(&**reloaded.name(stale_id), STANDARD);
        assert!(reloaded.admit(stale_id, false).is_ok());
    }

    #[test]
    fn class_limit_holds_and_guards_give_slots_back() {
        let tc = TrafficClasses::new(&[spec("premium", "premium", 2, 2)], 0);
        let p = tc.classify(&headers(Some("premium")));
        let a = tc.admit(p, false).unwrap();
        let _b = tc.admit(p, false).unwrap();
        let shed = tc.admit(p, false).unwrap_err();
        assert_eq!((&*shed.class, shed.reason), ("premium", ShedReason::ClassLimit));
        assert_eq!(tc.in_flight(), 2);
        drop(a);
        assert_eq!(tc.in_flight(), 1);
        assert!(tc.admit(p, false).is_ok());
        // Unlimited standard.
        let s = tc.classify(&headers(None));
        let held: Vec<_> = (0..1000).map(|_| tc.admit(s, false).unwrap()).collect();
        assert_eq!(held.len(), 1000);
    }

    #[test]
    fn thresholds_reserve_headroom_per_rank() {
        let tc = TrafficClasses::new(&[spec("premium", "premium", 0, 2), spec("bulk", "bulk", 0, 0)], 100);
        let id = |v| tc.classify(&headers(v));
        assert_eq!(tc.threshold(id(Some("bulk"))), 80);
        assert_eq!(tc.threshold(id(None)), 90);
        assert_eq!(tc.threshold(id(Some("premium"))), 100);
        // Tiny limits still admit one of each.
        let tiny = TrafficClasses::new(&[spec("premium", "premium", 0, 2), spec("bulk", "bulk", 0, 0)], 2);
        assert_eq!(tiny.threshold(tiny.classify(&headers(Some("bulk")))), 1);
    }

    #[test]
    fn lowest_shed_order_is_refused_first() {
        let tc = TrafficClasses::new(&[spec("premium", "premium", 0, 2)], 10);
        let std_id = tc.classify(&headers(None));
        let prem = tc.classify(&headers(Some("premium")));
        let mut held = Vec::new();
        while let Ok(g) = tc.admit(std_id, false) {
            held.push(g);
        }
        assert_eq!(held.len(), 9, "standard stops at G − R = 9");
        let shed = tc.admit(std_id, false).unwrap_err();
        assert_eq!((&*shed.class, shed.reason), (STANDARD, ShedReason::GlobalLimit));
        let p = tc.admit(prem, false).expect("premium uses the reserve");
        assert_eq!(tc.admit(prem, false).unwrap_err().reason, ShedReason::GlobalLimit);
        drop(p);
        assert!(tc.admit(prem, false).is_ok());
    }

    #[test]
    fn upstream_saturation_sheds_all_but_the_top_rank() {
        let tc = TrafficClasses::new(&[spec("premium", "premium", 0, 2)], 0);
        let std_id = tc.classify(&headers(None));
        let prem = tc.classify(&headers(Some("premium")));
        assert_eq!(
            tc.admit(std_id, true).unwrap_err().reason,
            ShedReason::UpstreamSaturated
        );
        let _held = tc.admit(prem, true).expect("the top rank proceeds");
        assert_eq!(tc.in_flight(), 1, "a refusal holds no slot");
    }

    #[test]
    fn configured_standard_sets_the_default_class() {
        let tc = TrafficClasses::new(
            &[spec("standard", "ignored", 1, 5), spec("premium", "premium", 0, 2)],
            0,
        );
        let s = tc.classify(&headers(Some("ignored")));
        assert_eq!(&**tc.name(s), STANDARD);
        let _g = tc.admit(s, false).unwrap();
        assert_eq!(tc.admit(s, false).unwrap_err().reason, ShedReason::ClassLimit);
        // standard (5) now outranks premium (2): premium is shed on saturation.
        let p = tc.classify(&headers(Some("premium")));
        assert!(tc.admit(p, true).is_err());
    }

    #[test]
    fn a_reload_keeps_counting_requests_admitted_before_it() {
        let old = TrafficClasses::new(&[spec("premium", "premium", 1, 2)], 3);
        let prem = old.classify(&headers(Some("premium")));
        let held_prem = old.admit(prem, false).unwrap();
        let held_std = old.admit(old.classify(&headers(None)), false).unwrap();
        // Same premium class, a new bulk class, a lower global limit.
        let new =
            TrafficClasses::new(&[spec("premium", "premium", 1, 2), spec("bulk", "bulk", 0, 0)], 2).continuing(&old);
        assert_eq!(new.in_flight(), 2, "the old requests still count");
        let p = new.classify(&headers(Some("premium")));
        assert_eq!(new.admit(p, false).unwrap_err().reason, ShedReason::ClassLimit);
        drop(held_prem);
        // Standard's threshold under G = 2 with three ranks is 1, taken by the old request.
        let s = new.classify(&headers(None));
        assert_eq!(new.admit(s, false).unwrap_err().reason, ShedReason::GlobalLimit);
        drop(held_std);
        assert_eq!(
            new.in_flight(),
            0,
            "old guards give their slots back to the new counters"
        );
        assert!(new.admit(s, false).is_ok());
    }

    #[test]
    fn shed_response_is_503_with_retry_after() {
        let tc = TrafficClasses::new(&[], 1).with_retry_after(Duration::from_millis(2500));
        let s = tc.classify(&HeaderMap::new());
        let _g = tc.admit(s, false).unwrap();
        let r = tc.admit(s, false).unwrap_err().response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "3");
    }

    /// Overload simulation: standard offers far more than the global limit, premium a steady
    /// load that fits in its reserve. Every tick each class tries to start its requests, and
    /// requests finish after a fixed number of ticks. Premium must never be refused, standard
    /// must be refused (and counted), and the limit must never be exceeded.
    #[test]
    fn premium_keeps_flowing_while_standard_floods() {
        const LIMIT: usize = 100;
        const DURATION: usize = 3;
        let tc = TrafficClasses::new(&[spec("premium", "premium", 0, 2)], LIMIT);
        let std_id = tc.classify(&headers(None));
        let prem = tc.classify(&headers(Some("premium")));
        let mut running: VecDeque<Vec<InFlight>> = VecDeque::new();
        let (mut std_ok, mut std_shed, mut prem_ok, mut prem_shed) = (0, 0, 0, 0);
        for tick in 0..1000 {
            if running.len() == DURATION {
                running.pop_front();
            }
            let mut started = Vec::new();
            // Interleave arrivals so neither class always goes first within a tick.
            for i in 0..53 {
                if i % 17 == (tick % 17) && i / 17 < 3 {
                    match tc.admit(prem, false) {
                        Ok(g) => {
                            prem_ok += 1;
                            started.push(g)
                        }
                        Err(_) => prem_shed += 1,
                    }
                } else {
                    match tc.admit(std_id, false) {
                        Ok(g) => {
                            std_ok += 1;
                            started.push(g)
                        }
                        Err(_) => std_shed += 1,
                    }
                }
                assert!(tc.in_flight() <= LIMIT);
            }
            running.push_back(started);
        }
        assert_eq!(prem_shed, 0, "premium refused {prem_shed} times");
        assert_eq!(prem_ok, 3000);
        assert!(std_shed > 10_000, "standard was shed: {std_shed}");
        assert!(std_ok > 0);
    }
}
