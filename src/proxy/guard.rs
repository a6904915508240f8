//! One upstream server's resilience state on the request path: its health (active checks and
//! passive ejection) and its circuit breaker, asked before a request goes to the server and told
//! how the request ended.
//!
//! What counts as what, in one place:
//! - **Transport failure**: no usable response head (connect failed or timed out, TLS or HTTP
//!   handshake failed, the connection was reset or the stream refused before the head, bad HTTP,
//!   `response_header_timeout`), or a response body that broke off mid-way. It counts towards
//!   passive ejection and, when it happens before the head, as a breaker failure.
//! - **5xx response**: a breaker failure, but a passive *success*: the server is reachable and
//!   speaks HTTP, and whether it answers errors too often is a ratio, the breaker's question,
//!   not a run of consecutive failures.
//! - Any other response head: a success for both.
//! - A request the client abandoned, or whose own body failed, tells nothing about the server.
//!
//! The breaker learns the outcome at the response head, so a long streamed response never
//! holds a half-open probe slot; passive ejection also hears of a body that fails afterwards.

use super::metrics::ServerLabels;
use super::pool::ServerPool;
use super::resilience::breaker::{Breaker, BreakerPermit};
use super::resilience::health::ServerHealth;
use std::sync::Arc;
use std::time::Instant;

/// One server's health and breaker, kept across a reload when the server and the settings that
/// shape them stay the same.
#[derive(Debug)]
pub struct ServerGuard {
    pub health: Arc<ServerHealth>,
    /// `None` without `[upstreams.breaker]`.
    pub breaker: Option<Arc<Breaker>>,
}

/// How one attempt on a server ended, as the guard counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response head under 500 (or a 101).
    Success,
    /// A 5xx response head.
    ServerError,
    /// No usable response head: connect, handshake, reset, bad HTTP, timeout.
    Transport,
}

impl ServerGuard {
    /// Why this server must be skipped now (`unhealthy`, `ejected`), or `None`.
    pub fn unavailable(&self, now: Instant) -> Option<&'static str> {
        self.health.unavailable(now)
    }

    /// Asks the breaker for a permit: `Err("breaker_open")` when it refuses (open, or every
    /// half-open probe slot taken); `Ok(None)` when there is no breaker.
    pub fn admit(&self, now: Instant) -> Result<Option<BreakerPermit>, &'static str> {
        match &self.breaker {
            None => Ok(None),
            Some(b) => b.try_acquire(now).map(Some).map_err(|_| "breaker_open"),
        }
    }

    /// Records how an attempt ended with the breaker (through its permit) and passive health.
    pub fn report(&self, pool: &ServerPool, permit: Option<BreakerPermit>, outcome: Outcome) {
        let now = Instant::now();
        if let Some(p) = permit {
            match outcome {
                Outcome::Success => p.success(now),
                Outcome::ServerError | Outcome::Transport => p.failure(now),
            }
        }
        self.passive(pool, outcome != Outcome::Transport, now);
    }

    /// A response body that broke off after its head: a transport failure for passive health.
    pub fn failed_mid_body(&self, pool: &ServerPool) {
        self.passive(pool, false, Instant::now());
    }

    fn passive(&self, pool: &ServerPool, ok: bool, now: Instant) {
        if let Some(event) = self.health.record_request(ok, now) {
            event.log(&pool.upstream.0, &pool.server.0, None);
            pool.metrics()
                .ejections
                .get_or_create(&ServerLabels {
                    upstream: pool.upstream.clone(),
                    server: pool.server.clone(),
                })
                .inc();
        }
    }
}
