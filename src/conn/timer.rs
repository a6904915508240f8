//! A tokio `Sleep` that is polled only when it can have fired.
//!
//! A connection's timers (the watchdog in `serve::drive`, HTTP/1.1's idle release) sit beside the
//! connection itself, so a plain `select!` polls them on every wake of the connection's task: in
//! HTTP/1.1 that is every request, about two hundred instructions a timer each time (the entry's
//! waker registered again, the task budget checked; callgrind). Once a poll has returned
//! `Pending`, tokio holds the task's waker in the timer entry and wakes the task when the
//! deadline passes; until then `Sleep::is_elapsed` is false, and a poll could only say `Pending`
//! again, so it is skipped.
//!
//! Firing consumes the stored waker, so after any reset the next check polls for real. The waker
//! kept is that of the task that polled last; a connection's futures are only ever polled by
//! their own task.

use std::future::Future;
use std::ops::DerefMut;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

pub(crate) struct LazySleep<P> {
    sleep: Pin<P>,
    /// A poll returned `Pending` since the last reset: the entry holds this task's waker.
    armed: bool,
}

impl<P: DerefMut<Target = Sleep>> LazySleep<P> {
    pub(crate) fn new(sleep: Pin<P>) -> Self {
        LazySleep { sleep, armed: false }
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    pub(crate) fn reset(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = false;
    }

    /// `Ready` once the deadline has passed, as `Sleep::poll`.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        let polled = self.sleep.as_mut().poll(cx);
        self.armed = polled.is_pending();
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_at_its_deadline_and_after_a_reset() {
        let start = Instant::now();
        let mut t = LazySleep::new(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
        // Polled again and again before the deadline: pending throughout, then ready once.
        for _ in 0..3 {
            assert!(std::future::poll_fn(|cx| Poll::Ready(t.poll_expired(cx)))
                .await
                .is_pending());
        }
        std::future::poll_fn(|cx| t.poll_expired(cx)).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Reset after firing: the wake was consumed, so this must register again to fire.
        let again = Instant::now();
        t.reset(again + Duration::from_millis(20));
        std::future::poll_fn(|cx| t.poll_expired(cx)).await;
        assert!(again.elapsed() >= Duration::from_millis(20));
        // Moved later while armed: it does not fire at the old deadline.
        let later = Instant::now();
        t.reset(later + Duration::from_millis(10));
        assert!(std::future::poll_fn(|cx| Poll::Ready(t.poll_expired(cx)))
            .await
            .is_pending());
        t.reset(later + Duration::from_millis(40));
        std::future::poll_fn(|cx| t.poll_expired(cx)).await;
        assert!(later.elapsed() >= Duration::from_millis(40));
    }
}
