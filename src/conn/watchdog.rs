//! The per-connection timer for phases that hyper does not bound the way SPEC.md names them:
//! `first_request`, `header_read` (HTTP/1.1, every request), `idle` (HTTP/1.1 and HTTP/2) and
//! `write` (every state: a busy connection is exactly where a client stops reading).
//!
//! It is one timer per connection. Rather than re-arming it on every read (a timer operation per
//! packet), it wakes at most every `poll` interval and recomputes the deadline from timestamps the
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
        .min(t.write.get())
        .max(Duration::from_millis(50));
    let phase = match info.state() {
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
    let write = write_stalled_since(info, http1).map(|since| (since + t.write.get(), CloseReason::WriteTimeout));
    // The earlier deadline decides; a write stall wins a tie since it needs an abrupt close.
    let deadline = match (phase, write) {
        (Some(p), Some(w)) => Some(if p.0 < w.0 { p } else { w }),
        (p, w) => p.or(w),
    };
    match deadline {
        Some((at, reason)) if now >= at => Verdict::Expired(reason),
        Some((at, _)) => Verdict::Recheck(at.min(now + poll)),
        None => Verdict::Recheck(now + poll),
    }
}

/// Since when the peer has accepted no response bytes while we had some to send, if it has not.
///
/// HTTP/1.1 and TLS: the transport refused a write. HTTP/2 adds flow control: a peer can hold a
/// stream's window at zero, so hyper never writes and the socket never blocks; there the stall
/// starts when a response hands hyper data it cannot send, and ends with any accepted byte.
fn write_stalled_since(info: &ConnInfo, http1: bool) -> Option<Instant> {
    let blocked = info.write_blocked_since();
    if http1 {
        return blocked;
    }
    match (blocked, info.peer_stalled_since()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::ConnState;
    use std::sync::Arc;

    fn conn() -> ConnInfo {
        let a = "127.0.0.1:1".parse().expect("addr");
        ConnInfo::new(1, Arc::from("l"), a, a, ConnState::Idle)
    }

    fn timeouts(write_ms: u64) -> Timeouts {
        Timeouts {
            write: crate::config::Span(Duration::from_millis(write_ms)),
            ..Timeouts::default()
        }
    }

    #[test]
    fn a_blocked_write_expires_in_a_busy_state() {
        let info = conn();
        info.request_started();
        info.note_write_blocked();
        let t = timeouts(100);
        let now = Instant::now();
        assert!(matches!(check(&info, true, &t, now), Verdict::Recheck(_)));
        assert_eq!(
            check(&info, true, &t, now + Duration::from_millis(150)),
            Verdict::Expired(CloseReason::WriteTimeout)
        );
        // Accepted bytes end the stall.
        info.note_write_progress();
        assert!(matches!(
            check(&info, true, &t, now + Duration::from_millis(150)),
            Verdict::Recheck(_)
        ));
    }

    #[test]
    fn http2_peer_wait_counts_only_while_a_response_waits() {
        let info = conn();
        info.request_started();
        let t = timeouts(100);
        let later = Instant::now() + Duration::from_millis(150);
        assert!(matches!(check(&info, false, &t, later), Verdict::Recheck(_)));
        info.peer_wait_started();
        assert_eq!(
            check(&info, false, &t, later),
            Verdict::Expired(CloseReason::WriteTimeout)
        );
        // HTTP/1.1 never uses the flow-control rule: its socket tells the truth.
        assert!(matches!(check(&info, true, &t, later), Verdict::Recheck(_)));
        info.peer_wait_ended();
        assert!(matches!(check(&info, false, &t, later), Verdict::Recheck(_)));
    }
}
