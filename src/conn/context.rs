//! What every connection of a listener shares: its policy, settings, metrics and log sinks.

use super::{CloseReason, ConnInfo, Registry};
use crate::config::{Http2Config, Limits, ListenerConfig, Protocol as ConfigProtocol, Timeouts};
use crate::lifecycle::{Shutdown, TaskCount};
use crate::observe::{AccessLog, Metrics, Name};
use crate::tls::TlsServer;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

/// The per-connection bounds, swapped whole on reload.
#[derive(Clone, Debug, Default)]
pub struct ConnSettings {
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub http2: Http2Config,
}

/// Which protocols a cleartext listener speaks; swapped on reload, read once per new connection.
#[derive(Clone, Debug)]
pub struct ProtocolPolicy {
    pub http1: bool,
    /// Cleartext HTTP/2 by prior knowledge.
    pub h2c: bool,
    pub h2c_upgrade: bool,
}

impl ProtocolPolicy {
    pub fn from_config(l: &ListenerConfig) -> Self {
        let p = l.effective_protocols();
        ProtocolPolicy {
            http1: p.contains(&ConfigProtocol::Http11),
            h2c: p.contains(&ConfigProtocol::H2c),
            h2c_upgrade: l.h2c_upgrade,
        }
    }
}

/// Everything a listener's connections share.
pub struct ListenerShared {
    pub name: Name,
    pub policy: ArcSwap<ProtocolPolicy>,
    pub tls: Option<ArcSwap<TlsServer>>,
    pub settings: ArcSwap<ConnSettings>,
    pub metrics: Metrics,
    pub access_log: ArcSwap<AccessLog>,
    pub registry: Arc<Registry>,
    /// The server's phase and this listener's own: a listener removed by a reload drains alone.
    pub shutdown: Shutdown,
    pub debug: crate::observe::Switches,
    /// Set when `[tracing]` exports spans; `None` costs requests nothing but this test.
    pub tracer: Option<crate::observe::Tracer>,
    /// This listener's open connections, which its drain waits for.
    pub open: TaskCount,
}

/// One connection's shared state: what its request pipeline and its task both see.
pub struct ConnShared {
    pub info: Arc<ConnInfo>,
    pub listener: Arc<ListenerShared>,
    /// Set by the pipeline when the connection should stop taking requests (max requests).
    pub close_requested: tokio::sync::Notify,
    /// An accepted `Upgrade: h2c`, taken by the connection task once HTTP/1.1 hands over.
    pub pending_h2c: Mutex<Option<PendingH2c>>,
    /// Why the connection is closing, when the request pipeline (or the watchdog) knows better
    /// than hyper's result: after a `408` for a stalled body, hyper just sees a finished exchange.
    /// The first cause set wins; shutdown and forced drain still take precedence.
    pub close_cause: OnceLock<CloseReason>,
    /// Whether this connection's HTTP/1.1 state can hand its socket to an upgrade.
    pub upgrades: UpgradeGate,
    /// The request series this connection counted last.
    pub request_metrics: crate::observe::metrics::RequestMetricsCache,
}

/// HTTP/1.1 upgrades (WebSocket, `Upgrade: h2c`, CONNECT) need hyper's upgradeable connection,
/// which can never give its socket back; a cleartext connection starts with the plain one, so
/// that it can release hyper's buffers while idle, and switches for the rest of its life when a
/// request that could upgrade arrives. That request's answer waits here until the switch is
/// made, so hyper cannot complete (and, on the plain connection, refuse) the upgrade first.
#[derive(Debug, Default)]
pub struct UpgradeGate {
    /// The hyper connection supports upgrades (set once, never cleared).
    open: AtomicBool,
    /// A request that could upgrade waits for `open`; the connection task takes this flag.
    wanted: AtomicBool,
    waiter: Mutex<Option<Waker>>,
    /// hyper will end this connection after the current exchange (`Connection: close` either
    /// way, a body left unread): it must not be released as idle, or it would stay open.
    no_release: AtomicBool,
}

impl UpgradeGate {
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
    /// Resolves once the connection supports upgrades; until then asks its task to switch.
    pub fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_open() {
            return Poll::Ready(());
        }
        *self.waiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        self.wanted.store(true, Ordering::Release);
        // The switch may have happened between the first check and the waker being stored.
        if self.is_open() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
    /// Whether a request waits for the switch (the connection task asks after each poll).
    pub fn take_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire) && self.wanted.swap(false, Ordering::AcqRel)
    }
    /// hyper is going to close the connection: never release it.
    pub fn no_release(&self) {
        self.no_release.store(true, Ordering::Relaxed);
    }
    pub fn releasable(&self) -> bool {
        !self.no_release.load(Ordering::Relaxed)
    }
    /// The connection now supports upgrades: lets the waiting request answer.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        if let Some(w) = self.waiter.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// The parts of an `Upgrade: h2c` switch the connection task needs after the 101 is written.
pub struct PendingH2c {
    pub on_upgrade: hyper::upgrade::OnUpgrade,
    pub stream_one: bytes::Bytes,
}
