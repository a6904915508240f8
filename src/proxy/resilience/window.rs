//! A bucketed sliding window of two counters, shared by the breaker and the retry budget.
//!
//! A window of `len` is cut into [`BUCKETS`] buckets; a bucket is reused (and zeroed) when time
//! has moved a whole window past it. Totals therefore cover between `len - len/BUCKETS` and `len`
//! of history: exact enough for ratios over seconds, O(1) memory, and no per-event allocation
//! (a log of timestamps would grow with traffic).

use std::time::{Duration, Instant};

/// Number of buckets a window is cut into: 10 gives a resolution of a tenth of the window.
pub(crate) const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which slice of time (in bucket lengths since `origin`) these counts belong to.
    epoch: u64,
    total: u64,
    marked: u64,
}

/// Counts of `total` events and of the `marked` subset (failures, retries) over a sliding window.
#[derive(Clone, Debug)]
pub(crate) struct SlidingCounts {
    origin: Instant,
    bucket_len: Duration,
    buckets: [Bucket; BUCKETS],
}

/// The totals of a window at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub total: u64,
    pub marked: u64,
}

impl SlidingCounts {
    pub(crate) fn new(window: Duration, now: Instant) -> Self {
        // A zero window would divide by zero; a nanosecond per bucket is the closest honest value.
        let bucket_len = (window / BUCKETS as u32).max(Duration::from_nanos(1));
        SlidingCounts {
            origin: now,
            bucket_len,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        (since.as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let epoch = self.epoch(now);
        let b = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        b
    }

    /// Counts one event, `marked` or not.
    pub(crate) fn record(&mut self, marked: bool, now: Instant) {
        let b = self.bucket(now);
        b.total += 1;
        b.marked += u64::from(marked);
    }

    /// Counts one marked event that is not also a `total` event (a retry is not a new request).
    pub(crate) fn record_marked_only(&mut self, now: Instant) {
        self.bucket(now).marked += 1;
    }

    pub(crate) fn totals(&self, now: Instant) -> Totals {
        let current = self.epoch(now);
        self.buckets
            .iter()
            .filter(|b| b.epoch + BUCKETS as u64 > current && b.epoch <= current)
            .fold(Totals::default(), |t, b| Totals {
                total: t.total + b.total,
                marked: t.marked + b.marked,
            })
    }

    /// Forgets everything, as if created at `now`.
    pub(crate) fn reset(&mut self, now: Instant) {
        let window = self.bucket_len * BUCKETS as u32;
        *self = SlidingCounts::new(window, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_within_the_window_and_forgets_older_buckets() {
        let t0 = Instant::now();
        let mut w = SlidingCounts::new(Duration::from_secs(10), t0);
        w.record(true, t0);
        w.record(false, t0 + Duration::from_secs(5));
        assert_eq!(w.totals(t0 + Duration::from_secs(9)), Totals { total: 2, marked: 1 });
        // 10s later the first bucket has left the window; the second is still in.
        assert_eq!(
            w.totals(t0 + Duration::from_millis(10_500)),
            Totals { total: 1, marked: 0 }
        );
        assert_eq!(w.totals(t0 + Duration::from_secs(16)), Totals::default());
    }

    #[test]
    fn a_reused_bucket_starts_from_zero() {
        let t0 = Instant::now();
        let mut w = SlidingCounts::new(Duration::from_secs(1), t0);
        for _ in 0..5 {
            w.record(true, t0);
        }
        // Same bucket index one full window later.
        let later = t0 + Duration::from_secs(1);
        w.record(false, later);
        assert_eq!(w.totals(later), Totals { total: 1, marked: 0 });
    }

    #[test]
    fn reset_forgets_and_marked_only_does_not_count_as_total() {
        let t0 = Instant::now();
        let mut w = SlidingCounts::new(Duration::from_secs(10), t0);
        w.record(true, t0);
        w.record_marked_only(t0);
        assert_eq!(w.totals(t0), Totals { total: 1, marked: 2 });
        w.reset(t0 + Duration::from_secs(1));
        assert_eq!(w.totals(t0 + Duration::from_secs(1)), Totals::default());
    }
}
