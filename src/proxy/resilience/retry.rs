//! Retries: which requests may be retried, how many attempts each gets, and the budget that
//! stops retries from multiplying the load on a struggling upstream.
//!
//! Shape and reasons:
//! - **Idempotency** (RFC 9110 §9.2.2): only GET, HEAD, OPTIONS, TRACE, PUT and DELETE are
//!   retried; repeating a POST or PATCH may repeat its effect. And never once the request body
//!   has been consumed: the bytes taken from the client's stream cannot be sent again, so the
//!   caller passes `body_consumed` (true as soon as any body byte was read for an attempt).
//! - **Attempts**: `attempts` counts every try, the first one included (`attempts = 2` is one
//!   retry), like nginx's `proxy_next_upstream_tries`: the number an operator multiplies by the
//!   timeout to bound a request's worst case.
//! - **Budget** (the Finagle/Linkerd retry budget): over a sliding [`BUDGET_WINDOW`], retries may
//!   not exceed `budget × requests + MIN_RETRIES_PER_SEC × window`. The ratio caps the extra
//!   load retries add when everything fails (a retry storm makes an outage worse); the small
//!   floor lets a quiet upstream, where 20% of a handful of requests rounds to nothing, still
//!   ride through a single server restart. Per-request attempt limits alone cannot do this:
//!   with `attempts = 3` a full outage would triple the load.

use super::window::SlidingCounts;
use http::Method;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default `attempts`: one retry, the usual sweet spot (a second retry rarely finds a server
/// the first did not).
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// Default `budget`: retries add at most 20% to upstream load, as in Finagle and Linkerd.
pub const DEFAULT_BUDGET: f64 = 0.2;
/// Retries always allowed per second regardless of traffic: Finagle's and Linkerd's default of
/// 10, small next to any upstream's capacity yet enough for low-traffic routes to retry at all.
pub const MIN_RETRIES_PER_SEC: u32 = 10;
/// The window over which requests and retries are compared (Finagle's default TTL).
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retry settings: the `[upstreams.retry]` keys.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// `attempts`: tries per request, the first included; 1 disables retries.
    pub attempts: u32,
    /// `budget`: retries as a fraction of requests over [`BUDGET_WINDOW`].
    pub budget: f64,
    /// Retries always allowed per second (not a key: [`MIN_RETRIES_PER_SEC`]).
    pub min_retries_per_sec: u32,
    /// Sliding window of the budget (not a key: [`BUDGET_WINDOW`]).
    pub window: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings::from_keys(DEFAULT_ATTEMPTS, DEFAULT_BUDGET)
    }
}

impl RetrySettings {
    /// Settings from `[upstreams.retry]`: `attempts` (raised to ≥ 1) and `budget` (clamped to
    /// ≥ 0.0; NaN → the default).
    pub fn from_keys(attempts: u32, budget: f64) -> Self {
        RetrySettings {
            attempts: attempts.max(1),
            budget: if budget.is_nan() {
                DEFAULT_BUDGET
            } else {
                budget.max(0.0)
            },
            min_retries_per_sec: MIN_RETRIES_PER_SEC,
            window: BUDGET_WINDOW,
        }
    }
}

/// Whether `method` is idempotent per RFC 9110 §9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Why a failed attempt is not retried. [`as_label`](Self::as_label) is the `result` label of
/// `gatehouse_retries_total` (a granted retry is `attempted`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDenied {
    /// The method is not idempotent.
    NotIdempotent,
    /// Request body bytes were already consumed and cannot be replayed.
    BodyConsumed,
    /// The request has used all its `attempts`.
    AttemptsExhausted,
    /// Retries in the window already reached the budget.
    BudgetExhausted,
}

impl RetryDenied {
    pub fn as_label(self) -> &'static str {
        match self {
            RetryDenied::NotIdempotent => "not_idempotent",
            RetryDenied::BodyConsumed => "body_consumed",
            RetryDenied::AttemptsExhausted => "attempts_exhausted",
            RetryDenied::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// The `result` label of a granted retry.
pub const RETRY_ATTEMPTED: &str = "attempted";

/// Requests and retries to one upstream over a sliding window.
#[derive(Debug)]
pub struct RetryBudget {
    settings: RetrySettings,
    /// `total` = requests, `marked` = retries.
    window: Mutex<SlidingCounts>,
}

/// A snapshot of a budget, for logs: requests and retries in the window, and retries allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetFigures {
    pub requests: u64,
    pub retries: u64,
    pub allowed: u64,
}

impl RetryBudget {
    pub fn new(settings: RetrySettings, now: Instant) -> Self {
        RetryBudget {
            window: Mutex::new(SlidingCounts::new(settings.window, now)),
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlidingCounts> {
        // Plain counters: always consistent, so a poisoned lock is safe to reuse.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new request (not a retry) and returns its attempt accounting.
    pub fn start(&self, method: &Method, now: Instant) -> Attempts {
        self.lock().record(false, now);
        Attempts {
            made: 1,
            max: self.settings.attempts,
            idempotent: is_idempotent(method),
        }
    }

    fn allowed(&self, requests: u64) -> u64 {
        let floor = u64::from(self.settings.min_retries_per_sec).saturating_mul(self.settings.window.as_secs().max(1));
        (self.settings.budget * requests as f64) as u64 + floor
    }

    /// The budget's figures at `now`.
    pub fn figures(&self, now: Instant) -> BudgetFigures {
        let t = self.lock().totals(now);
        BudgetFigures {
            requests: t.total,
            retries: t.marked,
            allowed: self.allowed(t.total),
        }
    }

    /// Takes one retry from the budget if it has room.
    fn withdraw(&self, now: Instant) -> bool {
        let mut w = self.lock();
        let t = w.totals(now);
        if t.marked >= self.allowed(t.total) {
            return false;
        }
        w.record_marked_only(now);
        true
    }
}

/// One request's attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    made: u32,
    max: u32,
    idempotent: bool,
}

impl Attempts {
    /// Attempts made so far, the first included.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// After a failed attempt: may the request be tried again? On `Ok` the retry has been taken
    /// from the budget and counted as attempt number [`made`](Self::made).
    pub fn retry(&mut self, budget: &RetryBudget, body_consumed: bool, now: Instant) -> Result<(), RetryDenied> {
        if !self.idempotent {
            return Err(RetryDenied::NotIdempotent);
        }
        if body_consumed {
            return Err(RetryDenied::BodyConsumed);
        }
        if self.made >= self.max {
            return Err(RetryDenied::AttemptsExhausted);
        }
        if !budget.withdraw(now) {
            return Err(RetryDenied::BudgetExhausted);
        }
        self.made += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_per_rfc9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
    }

    #[test]
    fn denials_in_order_and_attempts_counted() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(RetrySettings::from_keys(3, 0.2), t0);
        let mut post = budget.start(&Method::POST, t0);
        assert_eq!(post.retry(&budget, false, t0), Err(RetryDenied::NotIdempotent));
        let mut put = budget.start(&Method::PUT, t0);
        assert_eq!(put.retry(&budget, true, t0), Err(RetryDenied::BodyConsumed));
        assert_eq!(put.retry(&budget, false, t0), Ok(()));
        assert_eq!(put.retry(&budget, false, t0), Ok(()));
        assert_eq!(put.made(), 3);
        assert_eq!(put.retry(&budget, false, t0), Err(RetryDenied::AttemptsExhausted));
        assert_eq!(budget.figures(t0).retries, 2);
    }

    #[test]
    fn attempts_one_never_retries() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(RetrySettings::from_keys(0, 0.2), t0);
        let mut get = budget.start(&Method::GET, t0);
        assert_eq!(get.retry(&budget, false, t0), Err(RetryDenied::AttemptsExhausted));
    }

    #[test]
    fn budget_caps_retries_at_ratio_plus_floor() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(RetrySettings::from_keys(2, 0.2), t0);
        // 1000 requests in the window: 200 from the ratio + 100 from the floor (10/s × 10s).
        let mut requests: Vec<Attempts> = (0..1000).map(|_| budget.start(&Method::GET, t0)).collect();
        let granted = requests
            .iter_mut()
            .map(|a| a.retry(&budget, false, t0))
            .filter(Result::is_ok)
            .count();
        assert_eq!(granted, 300);
        assert_eq!(
            budget.figures(t0),
            BudgetFigures {
                requests: 1000,
                retries: 300,
                allowed: 300
            }
        );
        let mut one_more = budget.start(&Method::GET, t0);
        // 1001 × 0.2 = 200.2 → still 300 allowed.
        assert_eq!(one_more.retry(&budget, false, t0), Err(RetryDenied::BudgetExhausted));
        // Once the window has moved on, the budget is available again.
        let later = t0 + BUDGET_WINDOW + Duration::from_secs(1);
        let mut fresh = budget.start(&Method::GET, later);
        assert_eq!(fresh.retry(&budget, false, later), Ok(()));
    }

    #[test]
    fn low_traffic_can_still_retry_thanks_to_the_floor() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(RetrySettings::from_keys(2, 0.2), t0);
        let mut only = budget.start(&Method::GET, t0);
        assert_eq!(only.retry(&budget, false, t0), Ok(()), "0.2 × 1 rounds to 0");
        let none = RetryBudget::new(
            RetrySettings {
                min_retries_per_sec: 0,
                ..RetrySettings::from_keys(2, 0.2)
            },
            t0,
        );
        let mut only = none.start(&Method::GET, t0);
        assert_eq!(
            only.retry(&none, false, t0),
            Err(RetryDenied::BudgetExhausted),
            "without the floor a lone request could never retry"
        );
    }

    #[test]
    fn labels() {
        assert_eq!(RetryDenied::BudgetExhausted.as_label(), "budget_exhausted");
        assert_eq!(RetryDenied::NotIdempotent.as_label(), "not_idempotent");
        assert_eq!(RETRY_ATTEMPTED, "attempted");
    }
}
