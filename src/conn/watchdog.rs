//! The per-connection timer for phases that hyper does not bound the way SPEC.md names them:
//! `first_request`, `header_read` (HTTP/1.1, every request) and `idle` (HTTP/1.1 and HTTP/2).
//!
//! It is one timer per connection. Rather than re-arming it on every read (a timer operation per
//! packet), it wakes at most every `header_read` and recomputes the deadline from timestamps the
//! connection keeps anyway, so expiry is exact and the cost is a few wakeups per minute.

use super::{CloseReason, ConnInfo, ConnState};
use crate::config::Timeouts;
use std::time::{Duration, Instant};

/// What the watchdog decided at a wakeup.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing expired; check again at this instant.
    Recheck(Instant),
    Expired(CloseReason),
}

/// Evaluates `info` at `now`.
pub fn check(info: &ConnInfo, http1: bool, t: &Timeouts, now: Instant) -> Verdict {
    // Any phase can begin between two wakeups; none is shorter than this.
    let poll = t
        .header_read
        .get()
        .min(t.first_request.get())
        .min(t.idle.get())
        .max(Duration::from_millis(50));
    let deadline = match info.state() {
        ConnState::Idle => {
            if let (true, Some(started)) = (http1, info.head_started()) {
                Some((started + t.header_read.get(), CloseReason::HeaderTimeout))
            } else if info.requests() == 0 {
                Some((info.opened + t.first_request.get(), CloseReason::FirstRequestTimeout))
            } else {
                Some((info.idle_since() + t.idle.get(), CloseReason::IdleTimeout))
            }
        }
        _ => None,
    };
    match deadline {
        Some((at, reason)) if now >= at => Verdict::Expired(reason),
        Some((at, _)) => Verdict::Recheck(at.min(now + poll)),
        None => Verdict::Recheck(now + poll),
    }
}
