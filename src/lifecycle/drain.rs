//! Graceful drain: stop accepting, let in-flight work finish, force-close what remains at the deadline.

use super::{Phase, ShutdownTrigger};
use crate::conn::{ConnState, Registry};
use std::time::Duration;

/// What a drain did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub open_at_start: u64,
    pub busy_at_start: u64,
    pub forced: u64,
}

/// Moves to `Draining`, waits for every connection to close or for `timeout`, then forces the rest.
/// A second call to `force_now` (a second signal) cuts the wait short.
pub async fn drain(
    trigger: &ShutdownTrigger,
    registry: &Registry,
    timeout: Duration,
    force_now: impl std::future::Future<Output = ()>,
) -> DrainReport {
    let snapshot = registry.snapshot();
    let busy = snapshot.iter().filter(|c| c.state() == ConnState::Busy).count() as u64;
    let report = DrainReport {
        open_at_start: snapshot.len() as u64,
        busy_at_start: busy,
        forced: 0,
    };
    drop(snapshot);
    tracing::info!(
        open = report.open_at_start,
        busy = report.busy_at_start,
        timeout_ms = timeout.as_millis() as u64,
        "draining"
    );
    trigger.advance(Phase::Draining);
    let finished = tokio::select! {
        _ = tokio::time::timeout(timeout, registry.wait_empty()) => !registry.is_empty(),
        _ = force_now => true,
    };
    let forced = if finished { registry.len() } else { 0 };
    if forced > 0 {
        tracing::warn!(
            connections = forced,
            reason = "drain_forced",
            "drain deadline reached; closing the remaining connections"
        );
    }
    trigger.advance(Phase::Forced);
    // Forced closes are immediate drops; give the tasks a moment to record their close reason.
    let _ = tokio::time::timeout(Duration::from_secs(1), registry.wait_empty()).await;
    tracing::info!(forced, "drain complete");
    DrainReport { forced, ..report }
}

/// Counts live tasks of one kind (a listener's connections, its accept loops) so that a drain can
/// wait for them to end without polling. Cheap to clone; clones count together.
#[derive(Clone, Debug, Default)]
pub struct TaskCount(std::sync::Arc<TaskCountInner>);

#[derive(Debug, Default)]
struct TaskCountInner {
    live: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

/// One counted task; dropping it ends the task's count.
#[derive(Debug)]
pub struct TaskGuard(TaskCount);

impl TaskCount {
    /// Counts one more task until the guard is dropped.
    pub fn enter(&self) -> TaskGuard {
        self.0.live.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        TaskGuard(self.clone())
    }
    pub fn len(&self) -> usize {
        self.0.live.load(std::sync::atomic::Ordering::Acquire)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Resolves once no counted task is live.
    pub async fn wait_empty(&self) {
        loop {
            let ended = self.0.ended.notified();
            if self.is_empty() {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0 .0.live.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.0 .0.ended.notify_waiters();
        }
    }
}
