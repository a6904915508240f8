//! Resilience building blocks of the reverse proxy: breakers, health, retries, fallbacks,
//! traffic classes and rate limits.
//!
//! Each block is a small, synchronous state machine that takes the current time as an argument
//! (or, for rate limits, a `governor` clock) instead of reading a global clock. That keeps every
//! decision reproducible in a unit test without sleeping, and keeps the blocks independent of
//! how the proxy wires them: the proxy feeds them outcomes and asks them questions, and each
//! returns the figures that explain its answer so the caller can log and count it.
//!
//! The settings structs mirror the `[upstreams.*]`, `[[traffic_classes]]` and `[[rate_limits]]`
//! configuration keys (see `docs/proxy.md`); each documents which key sets which field.

pub mod breaker;
pub mod classes;
pub mod health;
pub mod metrics;
pub mod ratelimit;
pub mod retry;
pub mod stale;
mod window;

use std::time::Duration;

/// Response header that marks every answer gatehouse made up instead of the upstream
/// (`stale` or `respond`), so that a client or an operator can tell a fallback from the real thing.
pub const FALLBACK_HEADER: &str = "x-gatehouse-fallback";

/// Whole seconds for a `Retry-After` (RFC 9110 §10.2.3) or a RateLimit `t` value: rounded up,
/// because a client that comes back a fraction of a second early is refused again, and never 0,
/// which would invite an immediate retry.
pub fn whole_seconds_up(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_round_up_and_never_zero() {
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_secs(5)), 5);
        assert_eq!(whole_seconds_up(Duration::from_millis(5001)), 6);
    }
}
