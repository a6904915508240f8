//! The shutdown phase every task watches: running, draining, then forced.

use tokio::sync::watch;

/// Where the server is in its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Stop accepting, finish in-flight work, close idle connections.
    Draining,
    /// Close everything now.
    Forced,
}

/// A handle tasks use to learn of shutdown. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

/// Moves the server through its shutdown phases.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    tx: std::sync::Arc<watch::Sender<Phase>>,
}

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(Phase::Running);
        (
            ShutdownTrigger {
                tx: std::sync::Arc::new(tx),
            },
            Shutdown { rx },
        )
    }
    /// Advances to `phase`; never goes back.
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|cur| {
            if phase > *cur {
                *cur = phase;
                true
            } else {
                false
            }
        });
    }
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }
    async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: the server is going away, so treat it as reached.
        let _ = rx.wait_for(|p| *p >= phase).await;
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
