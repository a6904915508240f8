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
///
/// A listener's connections watch two phases: the server's, and their listener's own (a listener
/// removed by a reload drains alone). They act on whichever is further along.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
    /// The listener's own phase. Holding the sender keeps a scope that nobody advances from
    /// reading as "reached" (a closed watch channel does), which would close its connections.
    scope: Option<ShutdownTrigger>,
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
            Shutdown { rx, scope: None },
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
            scope: None,
        }
    }
}

impl Shutdown {
    /// This handle, also following `scope`: it reaches a phase when either the server or `scope`
    /// does. Used for one listener's connections, so that the listener can drain on its own.
    pub fn scoped(&self, scope: ShutdownTrigger) -> Shutdown {
        Shutdown {
            rx: self.rx.clone(),
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
    /// Resolves once draining has begun.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }
    /// Resolves once connections must close at once.
    pub async fn forced(&self) {
        self.reached(Phase::Forced).await
    }
}
