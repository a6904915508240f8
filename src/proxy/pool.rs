//! The connections to one upstream server: idle HTTP/1.1 keep-alive connections, shared HTTP/2
//! connections, and the reason each new connection had to be opened.
//!
//! A request *checks out* a connection. HTTP/1.1: the most recently used idle one (LIFO keeps
//! few connections warm instead of many lukewarm) that nothing arrived on while it idled, which
//! goes back to the idle list when its response body was read to its end (see [`super::h1`]).
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
use super::h1::{self, H1Body, H1Conn};
use super::metrics::{OpenedLabels, ReasonLabels, SentSeries, ServerLabels, UpstreamMetrics};
use crate::observe::Name;
use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::client::conn::http2;
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
    conn: H1Conn,
    since: Instant,
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
    /// Why the connection is lost if this lease still holds an HTTP/1.1 connection when dropped.
    pub fate: &'static str,
}

enum Leased {
    H1(H1Conn),
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
        while let Some(mut idle) = st.idle.pop() {
            if let Some(why) = idle.conn.unquiet() {
                reason = Some(why);
                continue;
            }
            if now.duration_since(idle.since) >= idle_timeout {
                reason = Some("idle_timeout");
                continue;
            }
            return Ok(Lease {
                pool: self.clone(),
                conn: Some(Leased::H1(idle.conn)),
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
            Sender::H1(conn) => Leased::H1(conn),
            Sender::H2(h2) => {
                let streams = Arc::new(AtomicUsize::new(1));
                if !self.retired.load(Relaxed) {
                    self.state().h2.push(H2Conn {
                        sender: h2.sender.clone(),
                        streams: streams.clone(),
                        max_streams: h2.max_streams,
                        closed: h2.closed,
                    });
                }
                Leased::H2 {
                    sender: h2.sender,
                    streams,
                }
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

    /// Puts an HTTP/1.1 connection back after a whole exchange (its response body read to its
    /// end), unless the pool is full or retired.
    pub(super) fn put_idle(self: &Arc<Self>, conn: H1Conn) {
        if self.retired.load(Relaxed) {
            return;
        }
        let mut st = self.state();
        if st.idle.len() >= self.settings.max_idle {
            return; // dropped: hyper closes a connection whose last sender is gone
        }
        st.idle.push(IdleH1 {
            conn,
            since: Instant::now(),
        });
        if !st.sweeper {
            st.sweeper = true;
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

/// How often the sweep looks at idle HTTP/1.1 connections for one their server closed. Closed
/// there, such a connection would wait in `CLOSE_WAIT` until a request or `idle_timeout` came
/// for it; looking costs a load of each socket's readiness (and a `recv` for one with something
/// to read) once a second, and only while the pool has idle connections.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Closes idle connections older than `idle_timeout`, and those their server closed (or that
/// received bytes nobody asked for), so an unused pool holds no sockets and no dead ones. One
/// task per pool, alive only while the pool has idle connections.
async fn sweep(pool: Weak<ServerPool>) {
    let mut gone: Vec<&'static str> = Vec::new();
    loop {
        let next = {
            let Some(p) = pool.upgrade() else { return };
            let timeout = p.settings.idle_timeout;
            let now = Instant::now();
            let mut st = p.state();
            st.idle.retain_mut(|c| {
                let why = if now.duration_since(c.since) >= timeout {
                    Some("idle_timeout")
                } else {
                    c.conn.unquiet()
                };
                gone.extend(why);
                why.is_none()
            });
            for why in gone.drain(..) {
                if st.lost.len() >= LOST_REASONS_KEPT {
                    st.lost.pop_front();
                }
                st.lost.push_back(why);
            }
            match st.idle.iter().map(|c| c.since).min() {
                Some(oldest) => (oldest + timeout).min(now + IDLE_CHECK),
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
    /// Sends `req` on this connection and reads the response head. The request comes back in
    /// the error when it can go on another connection (see [`SendError::NotSent`]).
    pub async fn send(&mut self, req: Outgoing) -> Result<http::Response<UpIncoming>, SendError> {
        match (self.conn.as_mut(), req) {
            (Some(Leased::H1(conn)), Outgoing::H1(req)) => match h1::send(conn, req, self.reused).await {
                Ok(sent) => {
                    let Some(Leased::H1(conn)) = self.conn.take() else {
                        return Err(SendError::Released);
                    };
                    Ok(sent.into_response(conn, Some(self.pool.clone())).map(UpIncoming::H1))
                }
                Err(h1::Failure::Resend(e, req)) => Err(SendError::NotSent(UpError::H1(e), Outgoing::H1(req))),
                Err(h1::Failure::Failed(e)) => Err(SendError::Failed(UpError::H1(e))),
            },
            (Some(Leased::H2 { sender, .. }), Outgoing::H2(req)) => match sender.try_send_request(*req).await {
                Ok(resp) => Ok(resp.map(UpIncoming::H2)),
                Err(mut e) => Err(match e.take_message() {
                    Some(req) => SendError::NotSent(UpError::Hyper(e.into_error()), Outgoing::H2(Box::new(req))),
                    None => SendError::Failed(UpError::Hyper(e.into_error())),
                }),
            },
            _ => Err(SendError::Released),
        }
    }

    /// Gives the connection up now, for `reason` (HTTP/1.1), or frees its stream (HTTP/2).
    pub fn lose(&mut self, reason: &'static str) {
        match self.conn.take() {
            Some(Leased::H1(_)) => self.pool.note_lost(reason),
            Some(Leased::H2 { streams, .. }) => {
                streams.fetch_sub(1, Relaxed);
            }
            None => {}
        }
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

/// A request as the connection it goes on needs it.
pub enum Outgoing {
    /// Encoded for HTTP/1.1.
    H1(h1::Request),
    /// For hyper's HTTP/2 client.
    H2(Box<http::Request<UpBody>>),
}

/// A response body from either protocol.
pub enum UpIncoming {
    H1(H1Body),
    H2(hyper::body::Incoming),
}

impl http_body::Body for UpIncoming {
    type Data = bytes::Bytes;
    type Error = crate::http::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpIncoming::H1(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpIncoming::H2(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            UpIncoming::H1(b) => b.is_end_stream(),
            UpIncoming::H2(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpIncoming::H1(b) => b.size_hint(),
            UpIncoming::H2(b) => b.size_hint(),
        }
    }
}

/// An exchange's error from either protocol.
#[derive(Debug)]
pub enum UpError {
    H1(h1::Error),
    Hyper(hyper::Error),
}

impl std::fmt::Display for UpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpError::H1(e) => e.fmt(f),
            UpError::Hyper(e) => e.fmt(f),
        }
    }
}

/// Why [`Lease::send`] got no response.
pub enum SendError {
    /// The connection ended before the request left (HTTP/2), or before any answer to a request
    /// that may be sent again (HTTP/1.1, see [`h1::Failure::Resend`]): it can go on another
    /// connection.
    NotSent(UpError, Outgoing),
    /// The exchange failed after the request (or part of it) was sent.
    Failed(UpError),
    /// The lease had already given its connection back (a bug, answered as a 502).
    Released,
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(Leased::H1(_)) => self.pool.note_lost(self.fate),
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
