//! The shutdown phase every task watches: running, handed over (binary upgrade), draining, forced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Where the server is in its shutdown. Phases only move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Binary upgrade: the listening sockets now belong to a new process, which accepts on them.
    /// Stop accepting; HTTP/2 gets GOAWAY; HTTP/1.1 answers its next request with
    /// `Connection: close`, and idle or fresh connections are left a grace to send it, because
    /// closing them now would reset a request already on its way. Only reached through a handover.
    HandedOver,
    /// Stop accepting, finish in-flight work, close idle connections.
    Draining,
    /// Close everything now.
    Forced,
}

/// A handle tasks use to learn of shutdown. Cheap to clone.
///
/// A listener's connections watch two phases: the server's, and their listener's own (a listener
/// removed by a reload drains alone). They act on whichever is further along.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
    handed_over: Arc<AtomicBool>,
    /// The listener's own phase. Holding the sender keeps a scope that nobody advances from
    /// reading as "reached" (a closed watch channel does), which would close its connections.
    scope: Option<ShutdownTrigger>,
}

/// Moves the server through its shutdown phases.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    tx: Arc<watch::Sender<Phase>>,
    /// Set before `HandedOver` is published and never cleared: whether the phases went through a
    /// handover, which a watcher that only sees the latest phase cannot tell.
    handed_over: Arc<AtomicBool>,
}

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(Phase::Running);
        let handed_over = Arc::new(AtomicBool::new(false));
        (
            ShutdownTrigger {
                tx: Arc::new(tx),
                handed_over: handed_over.clone(),
            },
            Shutdown {
                rx,
                handed_over,
                scope: None,
            },
        )
    }
    /// Advances to `phase`; never goes back. `HandedOver` is only taken from `Running`. Returns
    /// whether the phase changed.
    pub fn advance(&self, phase: Phase) -> bool {
        self.tx.send_if_modified(|cur| {
            if phase == Phase::HandedOver {
                if *cur != Phase::Running {
                    return false;
                }
                self.handed_over.store(true, Ordering::SeqCst);
            }
            if phase > *cur {
                *cur = phase;
                true
            } else {
                false
            }
        })
    }
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }
    /// Whether the listening sockets were handed to a new process (a binary upgrade).
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
            handed_over: self.handed_over.clone(),
            scope: None,
        }
    }
}

impl Shutdown {
    /// This handle, also following `scope`: it reaches a phase when either the server or `scope`
    /// does. Used for one listener's connections, so that the listener can drain on its own. A
    /// scope only drains (a handover is the whole process's), so [`Shutdown::handed_over`] still
    /// follows the server alone.
    pub fn scoped(&self, scope: ShutdownTrigger) -> Shutdown {
        Shutdown {
            rx: self.rx.clone(),
            handed_over: self.handed_over.clone(),
            scope: Some(scope),
        }
    }
    pub fn phase(&self) -> Phase {
        let own = *self.rx.borrow();
        self.scope.as_ref().map_or(own, |s| own.max(s.phase()))
    }
    async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: the server is going away, so treat it as reached.
        let server = rx.wait_for(|p| *p >= phase);
        match &self.scope {
            None => {
                let _ = server.await;
            }
            Some(scope) => {
                // `scope` holds the sender, so this channel cannot close while we wait on it.
                let mut scope = scope.tx.subscribe();
                tokio::select! {
                    _ = server => {}
                    _ = scope.wait_for(|p| *p >= phase) => {}
                }
            }
        }
    }
    /// Resolves once this process stops taking new connections: a handover or a drain.
    pub async fn stop_accepting(&self) {
        self.reached(Phase::HandedOver).await
    }
    /// Resolves once the listening sockets were handed to a new process. Never resolves for a
    /// plain drain (while the trigger exists).
    pub async fn handed_over(&self) {
        let mut rx = self.rx.clone();
        let flag = &self.handed_over;
        let _ = rx
            .wait_for(|p| *p >= Phase::HandedOver && flag.load(Ordering::SeqCst))
            .await;
    }
    /// Resolves once draining has begun.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }
    /// Resolves once connections must close at once.
    pub async fn forced(&self) {
        self.reached(Phase::Forced).await
    }
}

/// Answers the process owes before it exits, even once its connections have drained: above all
/// the admin API's answer to `POST /upgrade`, whose request is what ends the old process.
#[derive(Clone, Debug)]
pub struct Owed {
    count: Arc<watch::Sender<usize>>,
}

/// Held while an answer is owed; dropping it settles the debt.
#[derive(Debug)]
pub struct OwedGuard {
    count: Arc<watch::Sender<usize>>,
}

impl Default for Owed {
    fn default() -> Self {
        Owed {
            count: Arc::new(watch::channel(0).0),
        }
    }
}

impl Owed {
    pub fn hold(&self) -> OwedGuard {
        self.count.send_modify(|n| *n += 1);
        OwedGuard {
            count: self.count.clone(),
        }
    }
    /// Resolves when nothing is owed.
    pub async fn settled(&self) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for OwedGuard {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handover_is_remembered_and_only_taken_from_running() {
        let (trigger, shutdown) = ShutdownTrigger::new();
        trigger.advance(Phase::Draining);
        trigger.advance(Phase::HandedOver);
        assert_eq!(trigger.phase(), Phase::Draining);
        assert!(!trigger.is_handed_over(), "a drain is not a handover");

        let (trigger, shutdown2) = ShutdownTrigger::new();
        trigger.advance(Phase::HandedOver);
        trigger.advance(Phase::Draining);
        // A watcher that only sees the latest phase still learns it went through a handover.
        tokio::time::timeout(std::time::Duration::from_secs(1), shutdown2.handed_over())
            .await
            .expect("handed_over resolves after the phase moved on");
        assert!(trigger.is_handed_over());
        tokio::time::timeout(std::time::Duration::from_secs(1), shutdown.stop_accepting())
            .await
            .expect("a drain stops accepting");
    }
}
