//! The shutdown phase every task watches: running, handed over (binary upgrade), draining, forced.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

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

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Running,
            1 => Phase::HandedOver,
            2 => Phase::Draining,
            _ => Phase::Forced,
        }
    }
}

/// A handle tasks use to learn of shutdown. Cheap to clone.
///
/// A listener's connections watch two phases: the server's, and their listener's own (a listener
/// removed by a reload drains alone). They act on whichever is further along.
#[derive(Clone, Debug)]
pub struct Shutdown {
    server: Arc<PhaseState>,
    /// The listener's own phase. Holding the trigger keeps a scope that nobody advances from
    /// reading as "reached" (a dropped trigger does), which would close its connections.
    scope: Option<ShutdownTrigger>,
    wake: Arc<Wake>,
}

/// Moves the server (or one listener's scope) through its shutdown phases.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    inner: Arc<TriggerInner>,
}

/// One trigger's phase, shared with its subscribers.
#[derive(Debug, Default)]
struct PhaseState {
    /// A [`Phase`], read without a lock: every request asks whether this process is leaving.
    phase: AtomicU8,
    /// Set before `HandedOver` is published and never cleared: whether the phases went through a
    /// handover, which a watcher that only sees the latest phase cannot tell.
    handed_over: AtomicBool,
    /// Every copy of the trigger is gone: the server is going away, so every phase counts as
    /// reached.
    gone: AtomicBool,
    /// Held while the phase moves, so that the check and the move are one step.
    advancing: Mutex<()>,
}

#[derive(Debug)]
struct TriggerInner {
    state: Arc<PhaseState>,
    wake: Arc<Wake>,
}

impl Drop for TriggerInner {
    fn drop(&mut self) {
        self.state.gone.store(true, Ordering::SeqCst);
        self.wake.all();
    }
}

/// Wakes the tasks waiting for a phase ([`Reached`]). The server and its listeners' scopes share
/// one, so a waiter needs a single registration whichever of them moves.
///
/// Every idle connection waits here for its whole life, so a waiter is kept small: a
/// [`Notified`] (64 bytes) where a `watch` wait on two channels took 424. Waiters spread over a
/// few lanes by worker thread, so that connections opening and closing on different cores do not
/// all take one lock.
#[derive(Debug, Default)]
struct Wake {
    lanes: [Notify; LANES],
    /// Counts the wakes, twice each: odd while one is under way, even between. A waiter that
    /// registered with no wake under way, and has seen the count unchanged since, is still
    /// registered and has nothing to check (see [`Reached`]).
    generation: AtomicU32,
}

const LANES: usize = 8;

impl Wake {
    fn all(&self) {
        // Raised before the wakes and after the change they announce, so a waiter that sees the
        // new count also sees the change; and again after them, so that a count read while they
        // were under way (odd) never passes for one that no wake can have overtaken.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.notify_lanes();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
    fn notify_lanes(&self) {
        for lane in &self.lanes {
            lane.notify_waiters();
        }
    }
    fn lane(&self) -> &Notify {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static LANE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % LANES;
        }
        &self.lanes[LANE.with(|l| *l)]
    }
}

impl PhaseState {
    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }
}

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let trigger = ShutdownTrigger::with_wake(Arc::new(Wake::default()));
        let shutdown = trigger.subscribe();
        (trigger, shutdown)
    }
    fn with_wake(wake: Arc<Wake>) -> ShutdownTrigger {
        ShutdownTrigger {
            inner: Arc::new(TriggerInner {
                state: Arc::default(),
                wake,
            }),
        }
    }
    /// Advances to `phase`; never goes back. `HandedOver` is only taken from `Running`. Returns
    /// whether the phase changed.
    pub fn advance(&self, phase: Phase) -> bool {
        let state = &self.inner.state;
        {
            let _one_at_a_time = state.advancing.lock().unwrap_or_else(|p| p.into_inner());
            let cur = state.phase();
            if phase <= cur || (phase == Phase::HandedOver && cur != Phase::Running) {
                return false;
            }
            if phase == Phase::HandedOver {
                state.handed_over.store(true, Ordering::SeqCst);
            }
            state.phase.store(phase as u8, Ordering::SeqCst);
        }
        self.inner.wake.all();
        true
    }
    pub fn phase(&self) -> Phase {
        self.inner.state.phase()
    }
    /// Whether the listening sockets were handed to a new process (a binary upgrade).
    pub fn is_handed_over(&self) -> bool {
        self.inner.state.handed_over.load(Ordering::SeqCst)
    }
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            server: self.inner.state.clone(),
            scope: None,
            wake: self.inner.wake.clone(),
        }
    }
}

impl Shutdown {
    /// A scope of this handle: a trigger of its own, and a handle that reaches a phase when
    /// either the server or the scope does. Used for one listener's connections, so that the
    /// listener can drain on its own. A scope only drains (a handover is the whole process's), so
    /// [`Shutdown::handed_over`] still follows the server alone.
    pub fn scope(&self) -> (ShutdownTrigger, Shutdown) {
        let trigger = ShutdownTrigger::with_wake(self.wake.clone());
        let scoped = Shutdown {
            server: self.server.clone(),
            scope: Some(trigger.clone()),
            wake: self.wake.clone(),
        };
        (trigger, scoped)
    }
    pub fn phase(&self) -> Phase {
        let own = self.server.phase();
        self.scope.as_ref().map_or(own, |s| own.max(s.phase()))
    }
    /// Resolves once this handle has reached `phase`, or the server's trigger is gone (the server
    /// is going away, so every phase counts as reached). One future type for every phase.
    pub fn reached(&self, phase: Phase) -> Reached<'_> {
        Reached {
            shutdown: self,
            phase,
            handover_only: false,
            registered_at: None,
            notified: self.wake.lane().notified(),
        }
    }
    /// Resolves once this process stops taking new connections: a handover or a drain.
    pub fn stop_accepting(&self) -> Reached<'_> {
        self.reached(Phase::HandedOver)
    }
    /// Resolves once the listening sockets were handed to a new process. Never resolves for a
    /// plain drain (while the trigger exists).
    pub fn handed_over(&self) -> Reached<'_> {
        Reached {
            handover_only: true,
            ..self.reached(Phase::HandedOver)
        }
    }
    /// Resolves once draining has begun.
    pub fn draining(&self) -> Reached<'_> {
        self.reached(Phase::Draining)
    }
    /// Resolves once connections must close at once.
    pub fn forced(&self) -> Reached<'_> {
        self.reached(Phase::Forced)
    }
    fn is_reached(&self, phase: Phase, handover_only: bool) -> bool {
        if self.server.gone.load(Ordering::SeqCst) {
            return true;
        }
        if handover_only {
            self.server.phase() >= phase && self.server.handed_over.load(Ordering::SeqCst)
        } else {
            self.phase() >= phase
        }
    }
}

pin_project_lite::pin_project! {
    /// A wait for a [`Shutdown`] phase; see [`Shutdown::reached`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Reached<'a> {
        shutdown: &'a Shutdown,
        phase: Phase,
        handover_only: bool,
        // `Some(count)`: the last poll left `notified` registered with this task's waker, and
        // read the wake count, even (no wake under way), before registering. A wake that reaches
        // the registration (and ends it) starts after that read, so it moves the count; until the
        // count moves the registration stands and nothing can have changed, and a poll (which
        // takes the `Notify`'s lock) is skipped: a connection's task polls this on every wake, in
        // HTTP/1.1 on every request. A future is only ever polled by the task that owns it.
        registered_at: Option<u32>,
        // Made before the phase is first checked, so an advance in between still wakes it.
        #[pin]
        notified: Notified<'a>,
    }
}

impl Future for Reached<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let generation = this.shutdown.wake.generation.load(Ordering::SeqCst);
        if *this.registered_at == Some(generation) {
            return Poll::Pending;
        }
        *this.registered_at = None;
        loop {
            if this.shutdown.is_reached(*this.phase, *this.handover_only) {
                return Poll::Ready(());
            }
            if this.notified.as_mut().poll(cx).is_pending() {
                // Read while a wake was under way, the count cannot tell whether that wake came
                // before the registration or will end it: poll again next time.
                *this.registered_at = (generation % 2 == 0).then_some(generation);
                return Poll::Pending;
            }
            // Woken: register again before checking, for the same reason as at the start.
            this.notified.set(this.shutdown.wake.lane().notified());
        }
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

    #[tokio::test]
    async fn a_scope_drains_alone_and_the_server_drains_every_scope() {
        let (server, shutdown) = ShutdownTrigger::new();
        let (scope_a, a) = shutdown.scope();
        let (_scope_b, b) = shutdown.scope();
        let wait = std::time::Duration::from_secs(1);
        // Waits made before the advance, as a connection's are.
        let (a_draining, b_draining) = (a.draining(), b.draining());
        let a_forced = a.forced();
        tokio::pin!(b_draining);
        assert!(scope_a.advance(Phase::Draining));
        tokio::time::timeout(wait, a_draining)
            .await
            .expect("the scope's own drain wakes its waiters");
        assert_eq!(a.phase(), Phase::Draining);
        assert_eq!(b.phase(), Phase::Running, "another scope is not drained");
        assert_eq!(shutdown.phase(), Phase::Running);
        assert!(futures_util::poll!(b_draining.as_mut()).is_pending());

        server.advance(Phase::Forced);
        tokio::time::timeout(wait, b_draining)
            .await
            .expect("the server's phase reaches every scope");
        tokio::time::timeout(wait, a_forced)
            .await
            .expect("and moves a scope further on");
        assert_eq!(b.phase(), Phase::Forced);
        // A wait made after the phase was reached resolves at once.
        tokio::time::timeout(wait, b.stop_accepting())
            .await
            .expect("already reached");
    }

    #[tokio::test]
    async fn a_dropped_trigger_counts_as_every_phase_reached() {
        let (trigger, shutdown) = ShutdownTrigger::new();
        let (_scope, scoped) = shutdown.scope();
        let forced = scoped.forced();
        let handed_over = shutdown.handed_over();
        drop(trigger);
        let wait = std::time::Duration::from_secs(1);
        tokio::time::timeout(wait, forced)
            .await
            .expect("the server is going away");
        tokio::time::timeout(wait, handed_over)
            .await
            .expect("even a handover wait ends");
    }

    #[tokio::test]
    async fn handed_over_waits_for_a_handover_not_a_drain() {
        let (trigger, shutdown) = ShutdownTrigger::new();
        let handed_over = shutdown.handed_over();
        tokio::pin!(handed_over);
        trigger.advance(Phase::Draining);
        assert!(futures_util::poll!(handed_over.as_mut()).is_pending());
        trigger.advance(Phase::Forced);
        assert!(futures_util::poll!(handed_over.as_mut()).is_pending());
    }

    #[tokio::test]
    async fn a_wait_polled_often_still_sees_each_advance() {
        let (trigger, shutdown) = ShutdownTrigger::new();
        let forced = shutdown.forced();
        tokio::pin!(forced);
        // Polls with no wake in between skip the `Notify`; they must not lose its registration.
        for _ in 0..3 {
            assert!(futures_util::poll!(forced.as_mut()).is_pending());
        }
        // A wake for another phase: checked, registered again, still pending.
        trigger.advance(Phase::Draining);
        for _ in 0..3 {
            assert!(futures_util::poll!(forced.as_mut()).is_pending());
        }
        // Woken from another task while this one waits.
        let advance = tokio::spawn(async move {
            tokio::task::yield_now().await;
            trigger.advance(Phase::Forced);
            trigger
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), forced)
            .await
            .expect("the forced phase wakes the wait");
        drop(advance.await);
    }

    /// The interleaving that lost a wake when the count was raised only before the wakes: the
    /// wait reads the count after a wake began, registers, and only then is that wake delivered,
    /// which ends the registration. The next poll must register again, or the next advance would
    /// find nobody to wake (a worker thread waited for `Forced` for ever after a binary upgrade).
    #[test]
    fn a_wake_under_way_while_the_wait_registers_does_not_leave_it_unregistered() {
        use std::sync::atomic::AtomicUsize;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let (trigger, shutdown) = ShutdownTrigger::new();
        let wake = trigger.inner.wake.clone();
        let mut forced = std::pin::pin!(shutdown.forced());

        // A wake for another phase begins: the phase has moved and the count is raised...
        trigger.inner.state.phase.store(Phase::Draining as u8, Ordering::SeqCst);
        wake.generation.fetch_add(1, Ordering::SeqCst);
        // ...the wait reads the count and registers...
        assert!(forced.as_mut().poll(&mut cx).is_pending());
        // ...and the wake is delivered, ending the registration; the woken wait runs before the
        // wake has finished.
        wake.notify_lanes();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(forced.as_mut().poll(&mut cx).is_pending());
        wake.generation.fetch_add(1, Ordering::SeqCst);

        trigger.advance(Phase::Forced);
        assert_eq!(woken.0.load(Ordering::SeqCst), 2, "the advance to Forced woke nobody");
        assert!(forced.as_mut().poll(&mut cx).is_ready());
    }
}
