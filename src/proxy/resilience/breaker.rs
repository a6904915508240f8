//! Per-server circuit breaker: closed → open → half_open → closed, with the figures behind
//! every transition.
//!
//! Shape and reasons:
//! - **Closed** counts outcomes in a bucketed sliding window of `window`. After a failure, if the
//!   window holds at least `min_requests` outcomes and `failures / requests ≥ failure_ratio`, the
//!   breaker opens. The minimum stops one failed request in a quiet minute (ratio 1.0) from
//!   cutting a server off.
//! - **Open** refuses every request for `open_for`, then becomes half-open on the next request
//!   (or [`Breaker::poll`]): time-driven, so no timer task per server.
//! - **HalfOpen** admits exactly `half_open_probes` requests as probes. When all of them succeed
//!   the breaker closes with an empty window; the first failed probe reopens it for another
//!   `open_for`. A probe whose permit is dropped without an outcome (the client went away)
//!   frees its slot for another probe instead of wedging the breaker half-open forever.
//! - Outcomes of requests admitted in an earlier state (a slow request admitted while closed
//!   that finishes after the breaker opened) never count as probes: each permit carries the
//!   generation it was admitted in.
//!
//! What counts as a failure (connect error, timeout, 5xx) is the caller's decision.
//!
//! Concurrency: one `std::sync::Mutex` per server. The critical section is a handful of integer
//! operations with no allocation or I/O, so it is held for nanoseconds and contended only by
//! requests to the same server; a lock-free design would need a multi-word CAS to keep the
//! window and the state consistent, which buys nothing measurable at proxy request rates (each
//! request already costs a syscall or more). The transition observer runs under the lock so
//! that observed transitions (and the gauge it sets) are strictly ordered.

use super::window::SlidingCounts;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default `failure_ratio`: half the requests failing is well past noise and clearly a sick server.
pub const DEFAULT_FAILURE_RATIO: f64 = 0.5;
/// Default `min_requests`: fewer outcomes than this in a window say nothing reliable about a ratio.
pub const DEFAULT_MIN_REQUESTS: u32 = 20;
/// Default `window`: long enough to gather `min_requests` at modest traffic, short enough to react.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Default `open_for`: long enough for a restarting server to come back, short enough to notice.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(5);
/// Default `half_open_probes`: a few concurrent successes, so one lucky request does not close it.
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 3;

/// Breaker settings: the `[upstreams.breaker]` keys.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerSettings {
    /// `failure_ratio`: open when failures / requests in the window reach this (0.0..=1.0).
    pub failure_ratio: f64,
    /// `min_requests`: outcomes the window must hold before the ratio is trusted.
    pub min_requests: u32,
    /// `window`: how far back outcomes count.
    pub window: Duration,
    /// `open_for`: how long an open breaker refuses everything before probing.
    pub open_for: Duration,
    /// `half_open_probes`: probes admitted while half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_ratio: DEFAULT_FAILURE_RATIO,
            min_requests: DEFAULT_MIN_REQUESTS,
            window: DEFAULT_WINDOW,
            open_for: DEFAULT_OPEN_FOR,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
        }
    }
}

impl BreakerSettings {
    /// Settings from the `[upstreams.breaker]` keys, in the order they appear in the issue:
    /// `failure_ratio`, `min_requests`, `window`, `open_for`, `half_open_probes`.
    ///
    /// Out-of-range values are clamped rather than refused (config validation reports them):
    /// the ratio to 0.0..=1.0 (NaN → the default), `min_requests` and `half_open_probes` to ≥ 1.
    pub fn from_keys(
        failure_ratio: f64,
        min_requests: u32,
        window: Duration,
        open_for: Duration,
        half_open_probes: u32,
    ) -> Self {
        let failure_ratio = if failure_ratio.is_nan() {
            DEFAULT_FAILURE_RATIO
        } else {
            failure_ratio.clamp(0.0, 1.0)
        };
        BreakerSettings {
            failure_ratio,
            min_requests: min_requests.max(1),
            window,
            open_for,
            half_open_probes: half_open_probes.max(1),
        }
    }
}

/// The state of a breaker, as reported in logs and in `gatehouse_upstream_breaker_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The gauge encoding: 0 closed, 1 open, 2 half_open.
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Why a transition happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionCause {
    /// Closed → open: the window's failure ratio reached `failure_ratio`.
    FailureRatio,
    /// Open → half_open: `open_for` elapsed.
    OpenElapsed,
    /// Half_open → open: a probe failed.
    ProbeFailed,
    /// Half_open → closed: every probe succeeded.
    ProbesSucceeded,
}

impl TransitionCause {
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionCause::FailureRatio => "failure_ratio",
            TransitionCause::OpenElapsed => "open_elapsed",
            TransitionCause::ProbeFailed => "probe_failed",
            TransitionCause::ProbesSucceeded => "probes_succeeded",
        }
    }
}

/// One state change and the figures that caused it: for `failure_ratio` the window's requests
/// and failures; for probe outcomes the probes finished and failed; for `open_elapsed` zeros.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub cause: TransitionCause,
    pub requests: u64,
    pub failures: u64,
    /// `failures / requests`, 0.0 when there were no requests.
    pub ratio: f64,
}

impl Transition {
    /// Logs the transition with its figures: a warning when the breaker opens (traffic to the
    /// server stops), info otherwise.
    pub fn log(&self, upstream: &str, server: &str) {
        if self.to == BreakerState::Open {
            tracing::warn!(
                upstream,
                server,
                from = self.from.as_str(),
                to = self.to.as_str(),
                cause = self.cause.as_str(),
                requests = self.requests,
                failures = self.failures,
                ratio = self.ratio,
                "circuit breaker opened"
            );
        } else {
            tracing::info!(
                upstream,
                server,
                from = self.from.as_str(),
                to = self.to.as_str(),
                cause = self.cause.as_str(),
                requests = self.requests,
                failures = self.failures,
                ratio = self.ratio,
                "circuit breaker state changed"
            );
        }
    }
}

/// Called with every transition, under the breaker's lock (so calls are ordered): log it and set
/// the gauge; it must not call back into the same breaker.
pub type TransitionObserver = Arc<dyn Fn(&Transition) + Send + Sync>;

/// The refusal of a request by an open (or fully probing half-open) breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerRefused {
    /// The state that refused: `Open`, or `HalfOpen` when every probe slot is taken.
    pub state: BreakerState,
    /// How long until an open breaker admits probes (zero while half-open).
    pub retry_in: Duration,
}

#[derive(Debug)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// Probes admitted and not yet finished or dropped.
        in_flight: u32,
        /// Probes that succeeded.
        succeeded: u32,
    },
}

#[derive(Debug)]
struct Inner {
    state: State,
    window: SlidingCounts,
    /// Incremented on every transition; a permit only affects the state it was admitted in.
    generation: u64,
}

/// A per-server circuit breaker. Share it with `Arc`; permits hold a reference.
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    observer: TransitionObserver,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("settings", &self.settings)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Permission to send one request; report its outcome with [`success`](Self::success) or
/// [`failure`](Self::failure). Dropping it unreported (the request was cancelled) records
/// nothing and frees a half-open probe slot.
#[derive(Debug)]
#[must_use = "report the request's outcome, or the breaker learns nothing"]
pub struct BreakerPermit {
    breaker: Arc<Breaker>,
    generation: u64,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub fn new(settings: BreakerSettings, now: Instant, observer: TransitionObserver) -> Arc<Self> {
        Arc::new(Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: SlidingCounts::new(settings.window, now),
                generation: 0,
            }),
            settings,
            observer,
        })
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding this lock cannot leave the counters in a state that
        // is unsafe to read, so a poisoned lock is recovered rather than propagated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state, after applying an elapsed `open_for` (so the gauge is not stuck at
    /// open when no request arrives).
    pub fn poll(&self, now: Instant) -> BreakerState {
        let mut inner = self.lock();
        self.expire_open(&mut inner, now);
        inner.public_state()
    }

    /// Asks to send a request to this server.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Result<BreakerPermit, BreakerRefused> {
        let mut inner = self.lock();
        self.expire_open(&mut inner, now);
        let probe = match &mut inner.state {
            State::Closed => false,
            State::Open { until } => {
                return Err(BreakerRefused {
                    state: BreakerState::Open,
                    retry_in: until.saturating_duration_since(now),
                })
            }
            State::HalfOpen { in_flight, succeeded } => {
                if *in_flight + *succeeded >= self.settings.half_open_probes {
                    return Err(BreakerRefused {
                        state: BreakerState::HalfOpen,
                        retry_in: Duration::ZERO,
                    });
                }
                *in_flight += 1;
                true
            }
        };
        Ok(BreakerPermit {
            breaker: Arc::clone(self),
            generation: inner.generation,
            probe,
            reported: false,
        })
    }

    fn expire_open(&self, inner: &mut Inner, now: Instant) {
        if let State::Open { until } = inner.state {
            if now >= until {
                self.transition(
                    inner,
                    State::HalfOpen {
                        in_flight: 0,
                        succeeded: 0,
                    },
                    TransitionCause::OpenElapsed,
                    0,
                    0,
                    now,
                );
            }
        }
    }

    fn transition(
        &self,
        inner: &mut Inner,
        to: State,
        cause: TransitionCause,
        requests: u64,
        failures: u64,
        now: Instant,
    ) {
        let from = inner.public_state();
        if matches!(to, State::Closed) {
            inner.window.reset(now);
        }
        inner.state = to;
        inner.generation += 1;
        let ratio = if requests == 0 {
            0.0
        } else {
            failures as f64 / requests as f64
        };
        (self.observer)(&Transition {
            from,
            to: inner.public_state(),
            cause,
            requests,
            failures,
            ratio,
        });
    }

    fn report(&self, generation: u64, probe: bool, outcome: Outcome, now: Instant) {
        let mut inner = self.lock();
        let current = generation == inner.generation;
        match (&mut inner.state, outcome) {
            (State::Closed, Outcome::Cancelled) => {}
            (State::Closed, Outcome::Success) => inner.window.record(false, now),
            (State::Closed, Outcome::Failure) => {
                inner.window.record(true, now);
                let totals = inner.window.totals(now);
                if totals.total >= u64::from(self.settings.min_requests)
                    && totals.marked as f64 >= self.settings.failure_ratio * totals.total as f64
                {
                    let until = now + self.settings.open_for;
                    self.transition(
                        &mut inner,
                        State::Open { until },
                        TransitionCause::FailureRatio,
                        totals.total,
                        totals.marked,
                        now,
                    );
                }
            }
            (State::HalfOpen { in_flight, succeeded }, outcome) if current && probe => {
                *in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Cancelled => {}
                    Outcome::Success => {
                        *succeeded += 1;
                        if *succeeded >= self.settings.half_open_probes {
                            let probes = u64::from(*succeeded);
                            self.transition(
                                &mut inner,
                                State::Closed,
                                TransitionCause::ProbesSucceeded,
                                probes,
                                0,
                                now,
                            );
                        }
                    }
                    Outcome::Failure => {
                        let probes = u64::from(*succeeded) + 1;
                        let until = now + self.settings.open_for;
                        self.transition(
                            &mut inner,
                            State::Open { until },
                            TransitionCause::ProbeFailed,
                            probes,
                            1,
                            now,
                        );
                    }
                }
            }
            // Open, or a late outcome of a request admitted before the last transition: the
            // state it could have informed no longer exists.
            _ => {}
        }
    }
}

impl Inner {
    fn public_state(&self) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Success,
    Failure,
    Cancelled,
}

impl BreakerPermit {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self, now: Instant) {
        self.reported = true;
        self.breaker.report(self.generation, self.probe, Outcome::Success, now);
    }

    pub fn failure(mut self, now: Instant) {
        self.reported = true;
        self.breaker.report(self.generation, self.probe, Outcome::Failure, now);
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            // The time is irrelevant for a cancellation: it changes no window.
            self.breaker
                .report(self.generation, true, Outcome::Cancelled, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> (TransitionObserver, Arc<Mutex<Vec<Transition>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let observer: TransitionObserver = Arc::new(move |t: &Transition| {
            sink.lock().unwrap().push(*t);
        });
        (observer, log)
    }

    fn settings() -> BreakerSettings {
        BreakerSettings::from_keys(0.5, 4, Duration::from_secs(10), Duration::from_secs(5), 2)
    }

    fn outcome(b: &Arc<Breaker>, ok: bool, now: Instant) {
        let p = b.try_acquire(now).expect("admitted");
        if ok {
            p.success(now)
        } else {
            p.failure(now)
        }
    }

    #[test]
    fn stays_closed_below_min_requests_even_at_full_failure() {
        let t0 = Instant::now();
        let (obs, log) = recorder();
        let b = Breaker::new(settings(), t0, obs);
        for _ in 0..3 {
            outcome(&b, false, t0);
        }
        assert_eq!(b.poll(t0), BreakerState::Closed);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn opens_at_the_ratio_with_the_figures_that_caused_it() {
        let t0 = Instant::now();
        let (obs, log) = recorder();
        let b = Breaker::new(settings(), t0, obs);
        outcome(&b, true, t0);
        outcome(&b, true, t0);
        outcome(&b, false, t0);
        assert_eq!(b.poll(t0), BreakerState::Closed, "1/3 and below min");
        outcome(&b, false, t0);
        assert_eq!(b.poll(t0), BreakerState::Open);
        let t = log.lock().unwrap()[0];
        assert_eq!(
            (t.from, t.to, t.cause),
            (BreakerState::Closed, BreakerState::Open, TransitionCause::FailureRatio)
        );
        assert_eq!((t.requests, t.failures, t.ratio), (4, 2, 0.5));
        let refused = b.try_acquire(t0 + Duration::from_secs(1)).unwrap_err();
        assert_eq!(refused.state, BreakerState::Open);
        assert_eq!(refused.retry_in, Duration::from_secs(4));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let (obs, _) = recorder();
        let b = Breaker::new(settings(), t0, obs);
        outcome(&b, false, t0);
        outcome(&b, false, t0);
        outcome(&b, false, t0);
        let later = t0 + Duration::from_secs(11);
        outcome(&b, false, later);
        assert_eq!(b.poll(later), BreakerState::Closed, "only 1 outcome in window");
    }

    fn open_breaker(t0: Instant) -> (Arc<Breaker>, Arc<Mutex<Vec<Transition>>>) {
        let (obs, log) = recorder();
        let b = Breaker::new(settings(), t0, obs);
        for _ in 0..4 {
            outcome(&b, false, t0);
        }
        assert_eq!(b.poll(t0), BreakerState::Open);
        (b, log)
    }

    #[test]
    fn half_open_admits_exactly_the_probes_and_closes_when_all_succeed() {
        let t0 = Instant::now();
        let (b, log) = open_breaker(t0);
        let t1 = t0 + Duration::from_secs(5);
        let p1 = b.try_acquire(t1).expect("probe 1");
        let p2 = b.try_acquire(t1).expect("probe 2");
        assert!(p1.is_probe() && p2.is_probe());
        assert_eq!(
            b.try_acquire(t1).unwrap_err().state,
            BreakerState::HalfOpen,
            "a third concurrent probe is refused"
        );
        p1.success(t1);
        assert_eq!(
            b.try_acquire(t1).unwrap_err().state,
            BreakerState::HalfOpen,
            "a finished probe does not free a slot: exactly 2 probes per half-open period"
        );
        assert_eq!(b.poll(t1), BreakerState::HalfOpen);
        p2.success(t1);
        assert_eq!(b.poll(t1), BreakerState::Closed);
        let log = log.lock().unwrap();
        let causes: Vec<_> = log.iter().map(|t| t.cause).collect();
        assert_eq!(
            causes,
            [
                TransitionCause::FailureRatio,
                TransitionCause::OpenElapsed,
                TransitionCause::ProbesSucceeded
            ]
        );
        assert_eq!((log[2].requests, log[2].failures), (2, 0));
        // Closing starts from an empty window: one failure does not reopen it.
        drop(log);
        outcome(&b, false, t1);
        assert_eq!(b.poll(t1), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_open_for() {
        let t0 = Instant::now();
        let (b, log) = open_breaker(t0);
        let t1 = t0 + Duration::from_secs(6);
        let p1 = b.try_acquire(t1).unwrap();
        let p2 = b.try_acquire(t1).unwrap();
        p1.failure(t1);
        assert_eq!(b.poll(t1), BreakerState::Open);
        // The other probe's late success belongs to a past half-open period.
        p2.success(t1);
        assert_eq!(b.poll(t1), BreakerState::Open);
        assert_eq!(b.poll(t1 + Duration::from_millis(4999)), BreakerState::Open);
        assert_eq!(b.poll(t1 + Duration::from_secs(5)), BreakerState::HalfOpen);
        let log = log.lock().unwrap();
        let reopen = log[2];
        assert_eq!(reopen.cause, TransitionCause::ProbeFailed);
        assert_eq!((reopen.requests, reopen.failures), (1, 1));
    }

    #[test]
    fn a_dropped_probe_frees_its_slot() {
        let t0 = Instant::now();
        let (b, _) = open_breaker(t0);
        let t1 = t0 + Duration::from_secs(5);
        let p1 = b.try_acquire(t1).unwrap();
        let p2 = b.try_acquire(t1).unwrap();
        drop(p1);
        let p3 = b.try_acquire(t1).expect("slot freed by the dropped probe");
        p2.success(t1);
        p3.success(t1);
        assert_eq!(b.poll(t1), BreakerState::Closed);
    }

    #[test]
    fn late_outcome_from_the_closed_era_is_not_a_probe() {
        let t0 = Instant::now();
        let (obs, _) = recorder();
        let b = Breaker::new(settings(), t0, obs);
        let slow = b.try_acquire(t0).unwrap();
        for _ in 0..4 {
            outcome(&b, false, t0);
        }
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.poll(t1), BreakerState::HalfOpen);
        slow.success(t1);
        // Still needs both real probes.
        let p1 = b.try_acquire(t1).unwrap();
        let p2 = b.try_acquire(t1).unwrap();
        p1.success(t1);
        assert_eq!(b.poll(t1), BreakerState::HalfOpen);
        p2.success(t1);
        assert_eq!(b.poll(t1), BreakerState::Closed);
    }

    #[test]
    fn gauge_encoding_and_clamped_settings() {
        assert_eq!(BreakerState::Closed.gauge_value(), 0);
        assert_eq!(BreakerState::Open.gauge_value(), 1);
        assert_eq!(BreakerState::HalfOpen.gauge_value(), 2);
        let s = BreakerSettings::from_keys(f64::NAN, 0, DEFAULT_WINDOW, DEFAULT_OPEN_FOR, 0);
        assert_eq!(s.failure_ratio, DEFAULT_FAILURE_RATIO);
        assert_eq!((s.min_requests, s.half_open_probes), (1, 1));
        assert_eq!(
            BreakerSettings::from_keys(7.0, 1, DEFAULT_WINDOW, DEFAULT_OPEN_FOR, 1).failure_ratio,
            1.0
        );
    }
}
