//! The metric families of the resilience blocks, and the calls that keep them current.
//!
//! Labels are bounded: upstream, server, class and limit names come from configuration, and
//! `kind` and `result` from the fixed sets below. No client address or key is ever a label.

use super::breaker::BreakerState;
use super::retry::{RetryDenied, RETRY_ATTEMPTED};
use super::stale::FallbackKind;
use crate::observe::metrics::Name;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub upstream: Name,
    pub server: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub upstream: Name,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub upstream: Name,
    pub result: &'static str,
}

/// The families; clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct ResilienceMetrics {
    /// `gatehouse_upstream_breaker_state{upstream,server}`: 0 closed, 1 open, 2 half_open.
    pub breaker_state: Family<ServerLabels, Gauge>,
    /// `gatehouse_fallback_total{upstream,kind}`: `kind` is `stale` or `respond`.
    pub fallback: Family<FallbackLabels, Counter>,
    /// `gatehouse_shed_total{class}`.
    pub shed: Family<ClassLabels, Counter>,
    /// `gatehouse_rate_limited_total{limit}`.
    pub rate_limited: Family<LimitLabels, Counter>,
    /// `gatehouse_retries_total{upstream,result}`: `attempted`, `not_idempotent`,
    /// `body_consumed`, `attempts_exhausted` or `budget_exhausted`.
    pub retries: Family<RetryLabels, Counter>,
}

impl ResilienceMetrics {
    /// Registers every family in `r`, which must be the registry prefixed `gatehouse` (as in
    /// `observe::metrics::Metrics::new`); counters get their `_total` suffix from the encoder.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "upstream_breaker_state",
            "Circuit breaker state per upstream server: 0 closed, 1 open, 2 half_open",
            self.breaker_state.clone(),
        );
        r.register(
            "fallback",
            "Answers made by a fallback (stale cache or configured response) instead of an upstream",
            self.fallback.clone(),
        );
        r.register(
            "shed",
            "Requests refused with 503 by load shedding, by traffic class",
            self.shed.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused with 429 by a rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "retries",
            "Retry decisions after a failed upstream attempt, by result",
            self.retries.clone(),
        );
    }

    pub fn breaker(&self, upstream: &Name, server: &Name, state: BreakerState) {
        self.breaker_state
            .get_or_create(&ServerLabels {
                upstream: upstream.clone(),
                server: server.clone(),
            })
            .set(state.gauge_value());
    }

    pub fn fallback(&self, upstream: &Name, kind: FallbackKind) {
        self.fallback
            .get_or_create(&FallbackLabels {
                upstream: upstream.clone(),
                kind: kind.as_label(),
            })
            .inc();
    }

    pub fn shed(&self, class: &Name) {
        self.shed.get_or_create(&ClassLabels { class: class.clone() }).inc();
    }

    pub fn rate_limited(&self, limit: &Name) {
        self.rate_limited
            .get_or_create(&LimitLabels { limit: limit.clone() })
            .inc();
    }

    /// Counts a retry decision: `Ok` is `attempted`.
    pub fn retry(&self, upstream: &Name, decision: Result<(), RetryDenied>) {
        let result = match decision {
            Ok(()) => RETRY_ATTEMPTED,
            Err(denied) => denied.as_label(),
        };
        self.retries
            .get_or_create(&RetryLabels {
                upstream: upstream.clone(),
                result,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name(s.into())
    }

    #[test]
    fn families_encode_with_the_spec_names() {
        let m = ResilienceMetrics::default();
        let mut r = Registry::with_prefix("gatehouse");
        m.register(&mut r);
        let (api, s1) = (name("api"), name("10.0.0.1:80"));
        m.breaker(&api, &s1, BreakerState::HalfOpen);
        m.fallback(&api, FallbackKind::Stale);
        m.fallback(&api, FallbackKind::Stale);
        m.shed(&name("standard"));
        m.rate_limited(&name("per-client"));
        m.retry(&api, Ok(()));
        m.retry(&api, Err(RetryDenied::BudgetExhausted));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for line in [
            "gatehouse_upstream_breaker_state{upstream=\"api\",server=\"10.0.0.1:80\"} 2",
            "gatehouse_fallback_total{upstream=\"api\",kind=\"stale\"} 2",
            "gatehouse_shed_total{class=\"standard\"} 1",
            "gatehouse_rate_limited_total{limit=\"per-client\"} 1",
            "gatehouse_retries_total{upstream=\"api\",result=\"attempted\"} 1",
            "gatehouse_retries_total{upstream=\"api\",result=\"budget_exhausted\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
