//! The connections to one upstream server: idle HTTP/1.1 keep-alive connections, shared HTTP/2
//! connections, and the reason each new connection had to be opened.
//!
//! A request *checks out* a connection. HTTP/1.1: the most recently used idle one (LIFO keeps
//! few connections warm instead of many lukewarm), which goes back to the idle list once hyper
//! says it is ready for another request, that is after the response body was read to its end.
//! HTTP/2: any connection with a free stream under the server's `SETTINGS_MAX_CONCURRENT_STREAMS`;
//! only when all are full (or gone) is another opened. Connections are opened under a per-server
//! gate for HTTP/2, so a burst of requests shares one new connection instead of opening one each.
//!
//! Every new connection is counted with its reason (`gatehouse_upstream_new_connection_reasons_total`):
//! `pool_empty` (nothing to reuse: first request, or more concurrent requests than idle
//! connections), `connection_close_header` (the upstream answered `Connection: close`),
//! `upstream_closed` (the upstream closed a pooled connection or it failed), `idle_timeout`
//! (gatehouse closed it after `idle_timeout` unused), `goaway` (an HTTP/2 upstream ended the
//! connection), `max_streams` (every HTTP/2 connection was at its stream limit), `h2_refused`
//! (an HTTP/2 connection failed its first exchange), `cancelled` (a client went away mid-exchange
//! on HTTP/1.1, which costs the connection).

use super::connect::{self, ConnectError, ConnectSettings, Sender, UpBody, Wire};
use super::metrics::{OpenedLabels, ReasonLabels, SentSeries, ServerLabels, UpstreamMetrics};
use crate::observe::Name;
use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::client::conn::{http1, http2};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The proxy's metrics, swapped in once the server that exposes them exists.
pub type MetricsSlot = ArcSwap<UpstreamMetrics>;

/// Why a lost connection needs replacing, remembered until the next connection is opened.
/// Bounded: only the most recent reasons matter, and a burst of losses must not grow memory.
const LOST_REASONS_KEPT: usize = 64;

/// Smoothing of the latency EWMA used by `p2c_ewma`: the weight of the past halves every 10s.
const EWMA_HALF_LIFE: Duration = Duration::from_secs(10);

struct IdleH1 {
    sender: http1::SendRequest<UpBody>,
    since: Instant,
    closed: Arc<OnceLock<&'static str>>,
}

struct H2Conn {
    sender: http2::SendRequest<UpBody>,
    streams: Arc<AtomicUsize>,
    max_streams: Arc<AtomicUsize>,
    closed: Arc<OnceLock<&'static str>>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<IdleH1>,
    h2: Vec<H2Conn>,
    lost: VecDeque<&'static str>,
    sweeper: bool,
}

/// Latency EWMA in seconds, decayed by time between samples.
#[derive(Debug, Default)]
struct Ewma {
    value: f64,
    at: Option<Instant>,
}

/// The pool of one upstream server.
pub struct ServerPool {
    pub upstream: Name,
    pub server: Name,
    pub(super) settings: Arc<ConnectSettings>,
    metrics: Arc<MetricsSlot>,
    state: Mutex<PoolState>,
    gate: tokio::sync::Mutex<()>,
    /// Requests to this server from this process, from checkout to the end of the response.
    in_flight: AtomicUsize,
    ewma: Mutex<Ewma>,
    /// An `auto` upstream whose server last chose http/1.1: no HTTP/2 connection to wait for.
    speaks_h1: AtomicBool,
    /// Removed from the configuration by a reload: connections close as they become idle.
    retired: AtomicBool,
    conn_ids: AtomicU64,
    /// The series the last response head was counted in (see [`SentSeries`]).
    sent_series: ArcSwapOption<SentSeries>,
}

impl std::fmt::Debug for ServerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerPool")
            .field("upstream", &self.upstream.0)
            .field("server", &self.server.0)
            .field("in_flight", &self.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// A connection checked out for one request.
pub struct Lease {
    pub pool: Arc<ServerPool>,
    conn: Option<Leased>,
    /// The connection carried a request before this one.
    pub reused: bool,
    pub wire: Wire,
    /// Why the connection is lost if this lease still holds an HTTP/1.1 sender when dropped.
    pub fate: &'static str,
}

enum Leased {
    H1 {
        sender: http1::SendRequest<UpBody>,
        closed: Arc<OnceLock<&'static str>>,
    },
    H2 {
        sender: http2::SendRequest<UpBody>,
        streams: Arc<AtomicUsize>,
    },
}

impl ServerPool {
    pub fn new(upstream: Name, server: &str, settings: Arc<ConnectSettings>, metrics: Arc<MetricsSlot>) -> Self {
        ServerPool {
            upstream,
            server: Name(Arc::from(server)),
            settings,
            metrics,
            state: Mutex::new(PoolState::default()),
            gate: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma::default()),
            speaks_h1: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            conn_ids: AtomicU64::new(0),
            sent_series: ArcSwapOption::empty(),
        }
    }

    pub fn metrics(&self) -> arc_swap::Guard<Arc<UpstreamMetrics>> {
        self.metrics.load()
    }

    /// Runs `f` with the series a response head with `status` counts in: those of the last
    /// response when its status was the same, else looked up and kept for the next.
    pub(super) fn sent_series(&self, status: http::StatusCode, f: impl FnOnce(&SentSeries)) {
        let metrics = self.metrics.load();
        let kept = self.sent_series.load();
        match kept.as_deref() {
            Some(series) if series.counts_for(&metrics, status) => f(series),
            _ => {
                let series = Arc::new(SentSeries::new(&metrics, &self.upstream, &self.server, status));
                f(&series);
                self.sent_series.store(Some(series));
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Counts a request against this server until the returned guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// The latency EWMA in seconds (0 before the first sample).
    pub fn ewma(&self) -> f64 {
        self.ewma.lock().unwrap_or_else(|p| p.into_inner()).value
    }

    /// Feeds one time-to-response-head sample into the EWMA.
    pub fn observe_latency(&self, sample: Duration) {
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let s = sample.as_secs_f64();
        e.value = match e.at {
            None => s,
            Some(at) => {
                let w = 0.5f64.powf(now.duration_since(at).as_secs_f64() / EWMA_HALF_LIFE.as_secs_f64());
                // A sample counts for at least a little, so a burst settles the value quickly.
                let w = w.min(0.9);
                w * e.value + (1.0 - w) * s
            }
        };
        e.at = Some(now);
    }

    /// Remembers why a connection that was busy is gone, for the next connection opened.
    pub(super) fn note_lost(&self, reason: &'static str) {
        let mut st = self.state();
        if st.lost.len() >= LOST_REASONS_KEPT {
            st.lost.pop_front();
        }
        st.lost.push_back(reason);
    }

    /// Closes every idle connection and stops pooling: this server left the configuration.
    /// Busy connections finish their exchange and then close.
    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
        let mut st = self.state();
        st.idle.clear();
        st.h2.clear();
    }

    /// Whether requests share connections (HTTP/2), so that opening one is worth a gate.
    fn multiplexed(&self) -> bool {
        match self.settings.protocol {
            crate::config::UpstreamProtocol::H2 | crate::config::UpstreamProtocol::H2c => true,
            crate::config::UpstreamProtocol::Auto => !self.speaks_h1.load(Relaxed),
            crate::config::UpstreamProtocol::Http11 => false,
        }
    }

    /// A connection for one request: pooled if one can take it, else a new one.
    ///
    /// Opening a connection (TCP, TLS, the HTTP handshake) is a large future, and every
    /// request's future would carry room for it (twice: a request may check out again after a
    /// keep-alive race) and be copied whole into its box by the router. It is boxed here
    /// instead, where a new connection costs far more than one allocation anyway.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, ConnectError> {
        let reason = match self.take_pooled() {
            Ok(lease) => return Ok(lease),
            Err(reason) => reason,
        };
        if self.multiplexed() {
            let _gate = self.gate.lock().await;
            // Whoever held the gate may have just opened a connection this request can share.
            let reason = match self.take_pooled() {
                Ok(lease) => return Ok(lease),
                Err("pool_empty") => reason,
                Err(r) => r,
            };
            Box::pin(self.open(reason)).await
        } else {
            Box::pin(self.open(reason)).await
        }
    }

    /// A pooled connection that can take a request now, or the reason there is none.
    fn take_pooled(self: &Arc<Self>) -> Result<Lease, &'static str> {
        let mut st = self.state();
        let mut reason = None;
        st.h2.retain(|c| {
            let gone = c.closed.get().copied().or(c.sender.is_closed().then_some("goaway"));
            if let Some(why) = gone {
                reason = Some(why);
            }
            gone.is_none()
        });
        for c in &st.h2 {
            let max = c.max_streams.load(Relaxed).max(1);
            if c.sender.is_ready() && c.streams.load(Relaxed) < max {
                c.streams.fetch_add(1, Relaxed);
                let lease = Lease {
                    pool: self.clone(),
                    conn: Some(Leased::H2 {
                        sender: c.sender.clone(),
                        streams: c.streams.clone(),
                    }),
                    reused: true,
                    wire: if self.settings.tls.is_some() {
                        Wire::H2
                    } else {
                        Wire::H2c
                    },
                    fate: "upstream_closed",
                };
                return Ok(lease);
            }
        }
        if !st.h2.is_empty() {
            reason.get_or_insert("max_streams");
        }
        let now = Instant::now();
        let idle_timeout = self.settings.idle_timeout;
        while let Some(idle) = st.idle.pop() {
            if idle.closed.get().is_some() || idle.sender.is_closed() || !idle.sender.is_ready() {
                reason = Some("upstream_closed");
                continue;
            }
            if now.duration_since(idle.since) >= idle_timeout {
                reason = Some("idle_timeout");
                continue;
            }
            return Ok(Lease {
                pool: self.clone(),
                conn: Some(Leased::H1 {
                    sender: idle.sender,
                    closed: idle.closed,
                }),
                reused: true,
                wire: Wire::Http11,
                fate: "upstream_closed",
            });
        }
        Err(reason.or_else(|| st.lost.pop_front()).unwrap_or("pool_empty"))
    }

    /// Opens a new connection for one request, counting it and why it was needed.
    async fn open(self: &Arc<Self>, reason: &'static str) -> Result<Lease, ConnectError> {
        let c = connect::connect(&self.settings, &self.server.0).await?;
        let conn_id = self.conn_ids.fetch_add(1, Relaxed) + 1;
        {
            let m = self.metrics();
            m.connections_opened
                .get_or_create(&OpenedLabels {
                    upstream: self.upstream.clone(),
                    server: self.server.clone(),
                    protocol: c.wire.as_str(),
                })
                .inc();
            m.new_connection_reasons
                .get_or_create(&ReasonLabels {
                    upstream: self.upstream.clone(),
                    reason,
                })
                .inc();
            if c.alpn_fell_back {
                m.alpn_fallback
                    .get_or_create(&ServerLabels {
                        upstream: self.upstream.clone(),
                        server: self.server.clone(),
                    })
                    .inc();
            }
        }
        if c.alpn_fell_back {
            tracing::info!(
                upstream = %self.upstream.0,
                server = %self.server.0,
                "upstream chose http/1.1 over h2 by ALPN (protocol = \"auto\"); each concurrent request needs its own connection"
            );
        }
        self.speaks_h1.store(!c.wire.is_h2(), Relaxed);
        tracing::debug!(
            upstream = %self.upstream.0,
            server = %self.server.0,
            protocol = c.wire.as_str(),
            reason,
            conn = conn_id,
            "opened upstream connection"
        );
        let conn = match c.sender {
            Sender::H1(sender) => Leased::H1 {
                sender,
                closed: c.closed,
            },
            Sender::H2(sender) => {
                let streams = Arc::new(AtomicUsize::new(1));
                if !self.retired.load(Relaxed) {
                    self.state().h2.push(H2Conn {
                        sender: sender.clone(),
                        streams: streams.clone(),
                        max_streams: c.max_streams,
                        closed: c.closed,
                    });
                }
                Leased::H2 { sender, streams }
            }
        };
        Ok(Lease {
            pool: self.clone(),
            conn: Some(conn),
            reused: false,
            wire: c.wire,
            fate: "upstream_closed",
        })
    }

    /// Puts an HTTP/1.1 connection back once hyper says it can take another request (after
    /// the response body was read to its end), unless the pool is full or retired.
    fn put_idle(self: &Arc<Self>, sender: http1::SendRequest<UpBody>, closed: Arc<OnceLock<&'static str>>) {
        if self.retired.load(Relaxed) {
            return;
        }
        let mut st = self.state();
        if st.idle.len() >= self.settings.max_idle {
            return; // dropped: hyper closes a connection whose last sender is gone
        }
        st.idle.push(IdleH1 {
            sender,
            since: Instant::now(),
            closed,
        });
        if !st.sweeper {
            st.sweeper = true;
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

/// Closes idle connections older than `idle_timeout`, so an unused pool holds no sockets. One
/// task per pool, alive only while the pool has idle connections.
async fn sweep(pool: Weak<ServerPool>) {
    loop {
        let next = {
            let Some(p) = pool.upgrade() else { return };
            let timeout = p.settings.idle_timeout;
            let now = Instant::now();
            let mut st = p.state();
            let before = st.idle.len();
            st.idle
                .retain(|c| now.duration_since(c.since) < timeout && c.closed.get().is_none());
            for _ in st.idle.len()..before {
                if st.lost.len() >= LOST_REASONS_KEPT {
                    st.lost.pop_front();
                }
                st.lost.push_back("idle_timeout");
            }
            match st.idle.iter().map(|c| c.since).min() {
                Some(oldest) => oldest + timeout,
                None => {
                    st.sweeper = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
}

impl Lease {
    /// Sends `req` on this connection. The request comes back in the error when it was not
    /// sent at all (a pooled connection that closed just before), so it can go on another.
    pub async fn send(
        &mut self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendError> {
        let sent = match self.conn.as_mut() {
            Some(Leased::H1 { sender, .. }) => sender.try_send_request(req).await,
            Some(Leased::H2 { sender, .. }) => sender.try_send_request(req).await,
            None => return Err(SendError::Released),
        };
        sent.map_err(|mut e| match e.take_message() {
            Some(req) => SendError::NotSent(e.into_error(), Box::new(req)),
            None => SendError::Failed(e.into_error()),
        })
    }

    /// HTTP/1.1, after the response head: the connection returns to the pool once the body is
    /// read to its end, or is counted as lost with `will_close` (`Connection: close`).
    /// `fate` tells the return task why the connection did not come back, when it does not.
    pub fn release_h1(&mut self, will_close: bool, fate: Arc<OnceLock<&'static str>>) {
        let Some(Leased::H1 { mut sender, closed }) = self.conn.take() else {
            return;
        };
        if will_close {
            self.pool.note_lost("connection_close_header");
            return;
        }
        // A small response is usually read to its end by the connection's task before this
        // request's task sees its head, and the connection is then ready already: it goes back
        // now, without a task (and its allocation and scheduling) per request.
        if sender.is_ready() {
            self.pool.put_idle(sender, closed);
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            match sender.ready().await {
                Ok(()) => pool.put_idle(sender, closed),
                Err(_) => pool.note_lost(fate.get().copied().unwrap_or("upstream_closed")),
            }
        });
    }

    /// The connection was handed over (a `101` upgrade): it neither returns nor counts as lost.
    pub fn consume(&mut self) {
        self.conn = None;
    }

    /// Whether this is an HTTP/2 connection's first exchange that failed: the upstream does not
    /// really speak HTTP/2 (an h2c server that is not one).
    pub fn first_h2_exchange(&self) -> bool {
        !self.reused && self.wire.is_h2()
    }
}

/// Why [`Lease::send`] got no response.
pub enum SendError {
    /// The connection closed before the request left: it can go on another connection.
    NotSent(hyper::Error, Box<http::Request<UpBody>>),
    /// The exchange failed after the request (or part of it) was sent.
    Failed(hyper::Error),
    /// The lease had already given its connection back (a bug, answered as a 502).
    Released,
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(Leased::H1 { .. }) => self.pool.note_lost(self.fate),
            Some(Leased::H2 { streams, .. }) => {
                streams.fetch_sub(1, Relaxed);
            }
            None => {}
        }
    }
}

/// One request counted against its server's load until dropped.
pub struct InFlight(Arc<ServerPool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}
