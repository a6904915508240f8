//! The listening sockets in force: which listener owns which socket, starting accept loops on the
//! ones a reload adds, and draining, alone, the ones it removes.
//!
//! This is the one place that knows every live socket. A reload swaps entries in and out of it;
//! a binary upgrade reads [`ListenerSet::sockets`] to hand them on, so what it hands over is what
//! serves at that moment. The set's descriptors are the ones kept open for that handover: a
//! listener taken out of the set closes its copy as its drain begins, and [`ListenerSet::close_all`]
//! closes them all when the process stops accepting.

use crate::config::ListenerConfig;
use crate::conn::{ConnSettings, ListenerShared, ProtocolPolicy, Registry};
use crate::lifecycle::{Phase, Shutdown, ShutdownTrigger, TaskCount, TaskGuard};
use crate::observe::{AccessLog, Metrics, Name, Switches, Tracer};
use crate::tls::TlsServer;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a reload waits for a removed listener's accept loops to let go of its socket, so
/// that the port is closed when the reload answers. They stop at their next poll; this bound only
/// matters if a worker is stuck in a long synchronous step.
const ACCEPT_STOP_WAIT: Duration = Duration::from_secs(2);

/// After a listener's drain deadline, how long its connections get to record their close reason.
const FORCED_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Where a listener's socket came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// gatehouse bound it: this process, or the one it took over from in a binary upgrade.
    Bound,
    /// Passed by the service manager (socket activation), directly or through binary upgrades:
    /// only the service manager can bind another address.
    Inherited,
}

/// Starts the accept loops of one listener (one per worker); installed when serving begins.
pub type StartAccepting = Arc<dyn Fn(&BoundListener) -> Result<(), String> + Send + Sync>;

/// What every listener of a server shares, to build a new one during a reload.
#[derive(Clone, Debug)]
pub struct ListenerCommon {
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    /// The server's shutdown; each listener adds its own scope to it.
    pub shutdown: Shutdown,
    pub debug: Switches,
    /// Set when `[tracing]` exports spans.
    pub tracer: Option<Tracer>,
}

/// One listener in force: its socket and what its connections share.
pub struct BoundListener {
    pub shared: Arc<ListenerShared>,
    pub socket: std::net::TcpListener,
    /// The address as configured (a port of 0 stays 0): what a reload compares.
    pub configured: SocketAddr,
    pub origin: Origin,
    /// This listener's own phase: advanced to drain it alone.
    scope: ShutdownTrigger,
    /// Its accept loops, which hold clones of `socket`.
    accepting: TaskCount,
}

impl std::fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundListener")
            .field("name", &self.shared.name.0)
            .field("socket", &self.socket)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl BoundListener {
    /// A listener for `config`, serving on `socket`.
    pub fn new(
        config: &ListenerConfig,
        socket: std::net::TcpListener,
        origin: Origin,
        tls: Option<TlsServer>,
        settings: Arc<ConnSettings>,
        access_log: Arc<AccessLog>,
        common: &ListenerCommon,
    ) -> BoundListener {
        let (scope, shutdown) = common.shutdown.scope();
        let shared = Arc::new(ListenerShared {
            name: Name(Arc::from(config.name.as_str())),
            policy: ArcSwap::from_pointee(ProtocolPolicy::from_config(config)),
            tls: tls.map(ArcSwap::from_pointee),
            settings: ArcSwap::new(settings),
            metrics: common.metrics.clone(),
            access_log: ArcSwap::new(access_log),
            registry: common.registry.clone(),
            shutdown,
            debug: common.debug.clone(),
            tracer: common.tracer.clone(),
            open: TaskCount::default(),
        });
        BoundListener {
            shared,
            socket,
            configured: config.address,
            origin,
            scope,
            accepting: TaskCount::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name.0
    }

    /// Counts one accept loop until the guard drops: a removed listener's port is closed once
    /// every loop has dropped its clone of the socket.
    pub fn accept_loop_guard(&self) -> TaskGuard {
        self.accepting.enter()
    }

    /// Stops accepting and starts draining this listener's connections, as a server drain does
    /// for all: idle connections close, HTTP/1.1 answers `Connection: close`, HTTP/2 gets GOAWAY.
    pub fn close(self) -> ClosingListener {
        let BoundListener {
            shared,
            socket,
            scope,
            accepting,
            ..
        } = self;
        drop(socket);
        scope.advance(Phase::Draining);
        ClosingListener {
            shared,
            scope,
            accepting,
        }
    }
}

/// A listener taken out of service: its socket is closing, its connections draining.
pub struct ClosingListener {
    shared: Arc<ListenerShared>,
    scope: ShutdownTrigger,
    accepting: TaskCount,
}

impl std::fmt::Debug for ClosingListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClosingListener")
            .field("name", &self.shared.name.0)
            .field("open", &self.shared.open.len())
            .finish_non_exhaustive()
    }
}

impl ClosingListener {
    /// Resolves once its accept loops have dropped the socket (bounded): the port is closed then,
    /// and new connection attempts are refused by the kernel.
    pub async fn accept_stopped(&self) {
        if tokio::time::timeout(ACCEPT_STOP_WAIT, self.accepting.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = %self.shared.name.0,
                loops = self.accepting.len(),
                "a removed listener's accept loops have not stopped yet; its port closes when they do"
            );
        }
    }

    /// Waits for the listener's connections to finish, up to `timeout`, then closes the rest
    /// (each counted as `drain_forced` by its own task). Returns how many had to be forced.
    pub async fn drain(self, timeout: Duration) -> usize {
        let name = &self.shared.name.0;
        let open = &self.shared.open;
        tracing::info!(
            listener = %name,
            open = open.len(),
            timeout_ms = timeout.as_millis() as u64,
            "listener removed: draining its connections"
        );
        if tokio::time::timeout(timeout, open.wait_empty()).await.is_ok() {
            tracing::info!(listener = %name, forced = 0, "listener drained");
            return 0;
        }
        let forced = open.len();
        tracing::warn!(
            listener = %name,
            connections = forced,
            reason = "drain_forced",
            "listener drain deadline reached; closing its remaining connections"
        );
        self.scope.advance(Phase::Forced);
        let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, open.wait_empty()).await;
        tracing::info!(listener = %name, forced, "listener drained");
        forced
    }
}

/// Every listener in force, and how to start accepting on one.
#[derive(Default)]
pub struct ListenerSet {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: Vec<BoundListener>,
    /// `None` until serving starts; listeners added before then start with the rest.
    start: Option<StartAccepting>,
    /// The server drains: the sockets are closed and no listener is added any more.
    closed: bool,
}

impl std::fmt::Debug for ListenerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lock().live.iter()).finish()
    }
}

impl ListenerSet {
    pub fn new(live: Vec<BoundListener>) -> ListenerSet {
        ListenerSet {
            inner: Mutex::new(Inner {
                live,
                start: None,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock was held cannot leave the list half-edited: each edit is one push
        // or one remove.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts accepting on every listener, and from now on on each one [`ListenerSet::insert`] adds.
    pub fn start_accepting(&self, start: StartAccepting) -> Result<(), String> {
        let mut inner = self.lock();
        for l in &inner.live {
            start(l)?;
        }
        inner.start = Some(start);
        Ok(())
    }

    /// Puts `listener` in force, accepting at once if the server is serving.
    pub fn insert(&self, listener: BoundListener) {
        let mut inner = self.lock();
        if inner.closed {
            // The process stopped accepting (a drain or a handover) while this reload was applied.
            tracing::info!(
                listener = listener.name(),
                "not accepting on the reloaded listener: this process stopped accepting meanwhile"
            );
            return;
        }
        if let Some(start) = &inner.start {
            if let Err(e) = start(&listener) {
                // Kept open without every accept loop, its port would queue connections that some
                // workers never take: close it, so that they are refused instead.
                tracing::error!(listener = listener.name(), error = %e, "cannot start accepting on a reloaded listener; closing it");
                drop(listener.close());
                return;
            }
        }
        inner.live.push(listener);
    }

    /// Takes listener `name` out of the set; its accept loops run until it is closed.
    pub fn remove(&self, name: &str) -> Option<BoundListener> {
        let mut inner = self.lock();
        let i = inner.live.iter().position(|l| l.name() == name)?;
        Some(inner.live.remove(i))
    }

    /// Closes every socket this set holds, for a process that stops accepting (its drain, or a
    /// binary upgrade's handover); the accept loops drop their own copies on the same signal.
    /// Listeners a reload adds afterwards are closed at once.
    pub fn close_all(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.live.clear();
    }

    /// The shared state of listener `name`.
    pub fn shared(&self, name: &str) -> Option<Arc<ListenerShared>> {
        self.lock()
            .live
            .iter()
            .find(|l| l.name() == name)
            .map(|l| l.shared.clone())
    }

    /// The address listener `name` is bound to (the real port when configured with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.lock()
            .live
            .iter()
            .find(|l| l.name() == name)
            .and_then(|l| l.socket.local_addr().ok())
    }

    /// Where listener `name`'s socket came from and the address it was configured with.
    pub fn origin(&self, name: &str) -> Option<(Origin, SocketAddr)> {
        self.lock()
            .live
            .iter()
            .find(|l| l.name() == name)
            .map(|l| (l.origin, l.configured))
    }

    /// A second descriptor for listener `name`'s socket, so a replacement can accept on it.
    pub fn dup_socket(&self, name: &str) -> Option<std::io::Result<std::net::TcpListener>> {
        self.lock()
            .live
            .iter()
            .find(|l| l.name() == name)
            .map(|l| l.socket.try_clone())
    }

    /// Each listener in force with its shared state and bound address, in order.
    pub fn snapshot(&self) -> Vec<(Arc<ListenerShared>, Option<SocketAddr>)> {
        self.lock()
            .live
            .iter()
            .map(|l| (l.shared.clone(), l.socket.local_addr().ok()))
            .collect()
    }

    /// Every listening socket in force as (listener name, a new descriptor for it, where it came
    /// from): what a process taking over (binary upgrade) needs. A socket that cannot be
    /// duplicated (out of descriptors) is an error, since handing on a partial set would silently
    /// drop a listener. Empty once the set is closed.
    pub fn sockets(&self) -> std::io::Result<Vec<(String, std::net::TcpListener, Origin)>> {
        self.lock()
            .live
            .iter()
            .map(|l| Ok((l.name().to_string(), l.socket.try_clone()?, l.origin)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
