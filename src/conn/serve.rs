//! One connection from accept to close: TLS, protocol selection, serving, and the close reason.

use super::h1::{self, serve_h1};
use super::h2frames;
use super::h2watch::H2Watch;
use super::io::MeteredIo;
use super::timer::LazySleep;
use super::watchdog::{self, Verdict};
use super::{CloseReason, ConnInfo, ConnShared, ConnState, ListenerShared, Protocol};
use crate::http::body::BoxError;
use crate::http::{HttpService, Pipeline, ServiceBody};
use crate::lifecycle::Phase;
use bytes::{Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The preface's first line: no HTTP/1.1 request starts so (the version is 2.0), and a client
/// that sends it and then something other than the rest of the preface speaks broken HTTP/2.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// How long, and how many bytes, a connection refused for its preface is read after the refusal
/// before it is closed: closing with unread input would reset it, and the client could lose the
/// GOAWAY that says why.
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const REFUSAL_LINGER_BYTES: u64 = 64 * 1024;

/// After a graceful HTTP/2 close starts (GOAWAY + PING), how long an idle connection may take to
/// finish the round trip before it is closed anyway. Busy connections wait for their streams.
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves one accepted TCP connection until it closes, with `svc` answering its requests.
pub async fn serve_connection<S, B>(tcp: TcpStream, peer: SocketAddr, listener: Arc<ListenerShared>, svc: S)
where
    S: HttpService<B>,
    B: ServiceBody,
{
    serve_connection_holding(tcp, peer, listener, svc, ()).await
}

/// [`serve_connection`], dropping `guard` when the connection has closed: the accept loop's
/// admission permit and drain token ride in the connection's own future, with no wrapper.
///
/// The connection is registered when this is called, and what the future keeps is only what an
/// idle connection needs: it is in every connection's task for its whole life
/// (docs/performance.md, idle memory). So it is not an `async fn`, which would copy each
/// argument into a second slot of its future.
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub(crate) fn serve_connection_holding<S, B, G>(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerShared>,
    svc: S,
    guard: G,
) -> impl Future<Output = ()>
where
    S: HttpService<B>,
    B: ServiceBody,
    G: Send + 'static,
{
    let conn = open(&tcp, peer, listener);
    // Each stretch of serving is boxed, and the box freed when the stretch ends: between two, a
    // parked HTTP/1.1 connection holds only this future, its socket and `park`'s timer.
    let first: Active<'static> = Box::pin(run(tcp, conn.clone(), svc.clone()));
    async move {
        let mut active = first;
        let reason = loop {
            let io = match active.await {
                Step::Closed(reason) => break reason,
                Step::Parked(io) => io,
            };
            match h1::park(io, &conn).await {
                Ok(io) => active = Box::pin(serve_h1(io, &conn, svc.clone())),
                Err(reason) => break reason,
            }
        };
        closed(&conn, reason);
        drop(guard);
    }
}

/// Registers a new connection.
fn open(tcp: &TcpStream, peer: SocketAddr, listener: Arc<ListenerShared>) -> Arc<ConnShared> {
    let local = tcp.local_addr().unwrap_or(peer);
    let _ = tcp.set_nodelay(true);
    let id = listener.registry.next_id();
    let initial = if listener.tls.is_some() {
        ConnState::Handshaking
    } else {
        ConnState::Idle
    };
    let info = Arc::new(ConnInfo::new(id, listener.name.0.clone(), peer, local, initial));
    info.watch_transitions(listener.debug.clone());
    listener.registry.insert(info.clone());
    listener
        .debug
        .event(crate::observe::Switch::Conn, &listener.name.0, peer, || {
            format!("conn {id} opened from {peer} on {local}, state {}", initial.as_str())
        });
    Arc::new(ConnShared {
        info,
        listener,
        close_requested: tokio::sync::Notify::new(),
        pending_h2c: Mutex::new(None),
        upgrades: super::UpgradeGate::default(),
        close_cause: std::sync::OnceLock::new(),
        request_metrics: Default::default(),
    })
}

/// Records a connection's close, and why.
fn closed(conn: &ConnShared, reason: CloseReason) {
    let (info, listener) = (&conn.info, &conn.listener);
    let (id, peer) = (info.id, info.peer);
    info.set_state(ConnState::Closed);
    listener.metrics.connection_closed(&listener.name, reason);
    listener.registry.remove(id);
    tracing::debug!(
        conn_id = id,
        listener = %listener.name.0,
        remote = %peer,
        protocol = info.protocol().as_str(),
        reason = reason.as_str(),
        requests = info.requests(),
        bytes_in = info.bytes_in(),
        bytes_out = info.bytes_out(),
        age_ms = info.opened.elapsed().as_millis() as u64,
        "connection closed"
    );
    listener
        .debug
        .event(crate::observe::Switch::Conn, &listener.name.0, peer, || {
            format!("conn {id} closed: {reason} after {} requests", info.requests())
        });
}

/// How a stretch of serving a connection ended.
pub(super) enum Step {
    Closed(CloseReason),
    /// An HTTP/1.1 connection idles with nothing but its socket (see `conn::h1`): it waits in
    /// `h1::park`, and a new stretch starts with its next request.
    Parked(MeteredIo<TcpStream>),
}

/// A stretch of serving, boxed (see `serve_connection_holding`).
type Active<'a> = Pin<Box<dyn Future<Output = Step> + Send + 'a>>;

// Not an `async fn`, for the reason `serve_connection_holding` gives.
#[allow(clippy::manual_async_fn)]
fn run<S, B>(tcp: TcpStream, conn: Arc<ConnShared>, svc: S) -> impl Future<Output = Step> + Send
where
    S: HttpService<B>,
    B: ServiceBody,
{
    async move {
        let conn = &conn;
        let listener = &conn.listener;
        let info = &conn.info;
        let settings = listener.settings.load_full();
        if listener.tls.is_some() {
            // Boxed: the handshake's state is large, and inline it would size every connection's
            // task, cleartext ones included, for their whole life.
            return Box::pin(serve_tls(tcp, conn, svc, settings.timeouts.tls_handshake.get())).await;
        }
        let policy = listener.policy.load_full();
        if policy.h2c {
            // Boxed: it is over once the first bytes have arrived, and inline its state would
            // size every connection's task for its whole life.
            let sniffed = Box::pin(async {
                tokio::select! {
                    s = sniff_preface(tcp, settings.timeouts.first_request.get()) => Some(s),
                    _ = listener.shutdown.draining() => None,
                }
            })
            .await;
            let Some(sniffed) = sniffed else {
                return Step::Closed(CloseReason::Shutdown);
            };
            // Settled before anything is awaited, so that the sniffed result takes no room in
            // this future while the connection is served.
            let (h2, io) = match sniffed {
                Sniffed::Timeout => return Step::Closed(CloseReason::FirstRequestTimeout),
                Sniffed::Closed => return Step::Closed(CloseReason::ClientClosed),
                Sniffed::Error => return Step::Closed(CloseReason::IoError),
                Sniffed::Preface(tcp, prefix) => (true, MeteredIo::new(tcp, prefix, info.clone())),
                // HTTP/1.1, unless the bytes began as HTTP/2's preface and then broke it (or
                // HTTP/1.1 is not served here): an HTTP/2 client, to be told so in HTTP/2.
                Sniffed::Other(tcp, prefix) if policy.http1 && !prefix.starts_with(H2_PREFACE_LINE) => {
                    (false, MeteredIo::new(tcp, prefix, info.clone()))
                }
                Sniffed::Other(tcp, prefix) => {
                    let io = MeteredIo::new(tcp, Bytes::new(), info.clone());
                    return Step::Closed(Box::pin(refuse_preface(io, conn, prefix)).await);
                }
            };
            return if h2 {
                Step::Closed(Box::pin(serve_h2(io, conn, svc, Protocol::H2c)).await)
            } else {
                serve_h1(io, conn, svc).await
            };
        }
        h1::start_parked(MeteredIo::new(tcp, Bytes::new(), info.clone()), conn)
    }
}

/// A TLS connection: the handshake, then HTTP/2 or HTTP/1.1 as ALPN decided.
async fn serve_tls<S, B>(tcp: TcpStream, conn: &Arc<ConnShared>, svc: S, handshake_timeout: std::time::Duration) -> Step
where
    S: HttpService<B>,
    B: ServiceBody,
{
    let listener = &conn.listener;
    let info = &conn.info;
    let Some(tls) = &listener.tls else {
        return Step::Closed(CloseReason::HandshakeFailed);
    };
    let tls = tls.load_full();
    let hs = tokio::select! {
        hs = crate::tls::handshake(tcp, &tls, handshake_timeout) => hs,
        _ = listener.shutdown.forced() => return Step::Closed(CloseReason::DrainForced),
    };
    match hs {
        Err(e) => {
            count_handshake(listener, e.result, "none", "none");
            listener
                .debug
                .event(crate::observe::Switch::Tls, &listener.name.0, info.peer, || {
                    format!(
                        "conn {} handshake {}: {} (offered ALPN {:?}, SNI {:?})",
                        info.id, e.result, e.detail, e.offered_alpn, e.sni
                    )
                });
            tracing::debug!(conn_id = info.id, result = e.result, detail = %e.detail, "TLS handshake failed");
            Step::Closed(if e.result == "timeout" {
                CloseReason::HandshakeTimeout
            } else {
                CloseReason::HandshakeFailed
            })
        }
        Ok((stream, negotiated)) => {
            let s = &negotiated.summary;
            let alpn_label = match s.alpn.as_deref() {
                Some("h2") => "h2",
                Some("http/1.1") => "http/1.1",
                _ => "none",
            };
            count_handshake(listener, "ok", s.version, alpn_label);
            listener
                .debug
                .event(crate::observe::Switch::Tls, &listener.name.0, info.peer, || {
                    format!(
                        "conn {} handshake ok: TLS {} {} ALPN offered {:?} chosen {:?} SNI {:?} resumed {} (cipher suites offered: {})",
                        info.id,
                        s.version,
                        s.cipher,
                        negotiated.offered_alpn,
                        s.alpn,
                        s.sni,
                        negotiated.resumed,
                        negotiated.offered_ciphers.join(" ")
                    )
                });
            let h2 = alpn_label == "h2";
            let offers_h2 = tls.alpn.iter().any(|p| p == b"h2");
            if !h2 && offers_h2 {
                let reason = if negotiated.client_offered_no_alpn {
                    "client_offered_none"
                } else {
                    "client_offered_http1_only"
                };
                listener.metrics.alpn_fallback(&listener.name, reason);
                tracing::info!(
                    conn_id = info.id,
                    listener = %listener.name.0,
                    remote = %info.peer,
                    reason,
                    offered = ?negotiated.offered_alpn,
                    "serving HTTP/1.1 on a listener that offers h2"
                );
            }
            info.set_tls(negotiated.summary);
            info.set_state(ConnState::Idle);
            let io = MeteredIo::new(stream, Bytes::new(), info.clone());
            // Boxed: an HTTP/2 connection's state is several times an HTTP/1.1 one's, and inline
            // it would size every connection's task, idle HTTP/1.1 keep-alives included.
            return if h2 {
                Step::Closed(Box::pin(serve_h2(io, conn, svc, Protocol::H2)).await)
            } else {
                serve_h1(io, conn, svc).await
            };
        }
    }
}

fn count_handshake(listener: &ListenerShared, result: &'static str, tls_version: &'static str, alpn: &'static str) {
    listener
        .metrics
        .tls_handshakes
        .get_or_create(&crate::observe::metrics::HandshakeLabels {
            listener: listener.name.clone(),
            result,
            tls_version,
            alpn,
        })
        .inc();
}

/// A cleartext connection whose first bytes are not HTTP/2's connection preface where HTTP/2 is
/// expected: an HTTP/2 connection error of type PROTOCOL_ERROR (RFC 9113 §3.4). The server's
/// preface (an empty SETTINGS frame, which must come first) and a GOAWAY say so, counted in
/// `gatehouse_h2_goaway_sent_total{reason="protocol_error"}`, before the connection is closed.
async fn refuse_preface<IO>(mut io: IO, conn: &ConnShared, prefix: Bytes) -> CloseReason
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let listener = &conn.listener;
    tracing::debug!(
        conn_id = conn.info.id,
        listener = %listener.name.0,
        remote = %conn.info.peer,
        first_bytes = ?String::from_utf8_lossy(&prefix[..prefix.len().min(H2_PREFACE.len())]),
        "not the HTTP/2 connection preface; answering GOAWAY(PROTOCOL_ERROR)"
    );
    let mut frames = [0u8; 2 * h2frames::HEAD_LEN + 8];
    frames[3] = h2frames::SETTINGS;
    frames[h2frames::HEAD_LEN..].copy_from_slice(&h2frames::goaway(0, h2frames::PROTOCOL_ERROR));
    listener
        .metrics
        .goaway(&listener.name, h2frames::error_label(h2frames::PROTOCOL_ERROR));
    if io.write_all(&frames).await.is_err() || io.shutdown().await.is_err() {
        return CloseReason::ProtocolError;
    }
    let mut rest = (&mut io).take(REFUSAL_LINGER_BYTES);
    let _ = tokio::time::timeout(REFUSAL_LINGER, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
    CloseReason::ProtocolError
}

enum Sniffed {
    Preface(TcpStream, Bytes),
    Other(TcpStream, Bytes),
    Timeout,
    Closed,
    Error,
}

/// Reads until the bytes either are the HTTP/2 connection preface or cannot become it.
async fn sniff_preface(mut tcp: TcpStream, timeout: std::time::Duration) -> Sniffed {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let read = async {
        loop {
            match tcp.read_buf(&mut buf).await {
                Ok(0) => return if buf.is_empty() { Err(true) } else { Ok(()) },
                Ok(_) => {
                    let n = buf.len().min(H2_PREFACE.len());
                    if buf[..n] != H2_PREFACE[..n] || buf.len() >= H2_PREFACE.len() {
                        return Ok(());
                    }
                }
                Err(_) => return Err(false),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Sniffed::Timeout,
        Ok(Err(true)) => Sniffed::Closed,
        Ok(Err(false)) => Sniffed::Error,
        Ok(Ok(())) => {
            let prefix = buf.freeze();
            if prefix.starts_with(H2_PREFACE) {
                Sniffed::Preface(tcp, prefix)
            } else {
                Sniffed::Other(tcp, prefix)
            }
        }
    }
}

pub(super) fn h1_builder(conn: &ConnShared) -> http1::Builder {
    let settings = conn.listener.settings.load();
    // `max_header_size` is the exact limit (431 beyond it, request line included). The buffer
    // must not be the smaller bound, or hyper would refuse a head below the limit; hyper's
    // minimum buffer is 8KiB.
    let max_header = settings.limits.max_header_bytes.as_usize();
    let mut b = http1::Builder::new();
    // gatehouse's watchdog bounds header reads per request; hyper's timer would also act as the
    // idle timeout (it starts when hyper waits for the next request), so it is off here.
    b.header_read_timeout(None)
        .keep_alive(true)
        .half_close(false)
        .max_header_size(max_header)
        .max_buf_size(max_header.saturating_add(1).max(8192));
    b
}

pub(super) async fn serve_h2<IO, S, B>(io: IO, conn: &Arc<ConnShared>, svc: S, protocol: Protocol) -> CloseReason
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<B>,
    B: ServiceBody,
{
    conn.info.set_protocol(protocol);
    let s = conn.listener.settings.load();
    let h = &s.http2;
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(h.max_concurrent_streams)
        .initial_stream_window_size(h.initial_stream_window.as_u32())
        .initial_connection_window_size(h.initial_connection_window.as_u32())
        .max_frame_size(h.max_frame_size.as_u32())
        .keep_alive_interval(Some(h.keepalive_interval.get()))
        .keep_alive_timeout(h.keepalive_timeout.get())
        .max_header_list_size(s.limits.max_header_bytes.as_u32())
        .max_pending_accept_reset_streams(h.max_pending_reset_streams as usize)
        .max_local_error_reset_streams(h.max_local_reset_streams as usize)
        .max_send_buf_size(h.max_send_buffer.as_usize())
        // RFC 8441: WebSocket over HTTP/2, which proxy routes carry to HTTP/1.1 upstreams (a
        // static route answers 405, a fixed `respond` its answer, as to any other method).
        .enable_connect_protocol();
    let (io, flooded) = H2Watch::new(io, conn.clone());
    let pipeline = Pipeline::new(svc, conn.clone());
    let hconn = b.serve_connection(TokioIo::new(io), pipeline);
    let reason = drive(std::pin::pin!(hconn), conn, protocol).await;
    if flooded.get() {
        // The watch sent GOAWAY(ENHANCE_YOUR_CALM) and failed the read; whatever hyper made of
        // that, the connection ended on a limit.
        return CloseReason::Limit;
    }
    reason
}

/// A hyper connection that can be asked to finish gracefully.
pub(super) trait Graceful {
    /// Runs the connection; ready when it has ended.
    fn poll_conn(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>>;
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn poll_conn(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        self.poll(cx)
    }
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs a hyper connection to its end, applying drain, max-requests and the watchdog.
///
/// The connection is pinned by the caller: taken by value, it would be stored twice in this
/// future (as the argument and as the pinned local), and this future is in every connection's
/// task for its whole life (docs/performance.md, idle memory).
pub(super) async fn drive<C: Graceful>(mut hconn: Pin<&mut C>, conn: &ConnShared, protocol: Protocol) -> CloseReason {
    let listener = &conn.listener;
    let info = &conn.info;
    let http1 = protocol == Protocol::Http11;
    let mut initiated: Option<CloseReason> = None;
    // When a graceful close we started should have finished.
    let mut grace_until = tokio::time::Instant::now();
    let first = watchdog::check(
        info,
        http1,
        &listener.settings.load().timeouts,
        std::time::Instant::now(),
    );
    let sleep = tokio::time::sleep_until(match first {
        Verdict::Recheck(at) => at.into(),
        Verdict::Expired(_) => tokio::time::Instant::now(),
    });
    tokio::pin!(sleep);
    // Polled only once it can have fired (see `LazySleep`): the `select!` below runs on every wake.
    let mut sleep = LazySleep::new(sleep);
    // Bytes moved in either direction when the graceful close was last checked (drain only).
    let mut progress = 0u64;
    // HTTP/2's GOAWAY is safe the moment this process stops accepting (a binary upgrade hands
    // its sockets over): the client retries unprocessed streams elsewhere. Closing an idle
    // HTTP/1.1 connection is not, as a request may be on its way: during a handover it gets the
    // grace, and each response meanwhile says `Connection: close` (the pipeline adds it).
    //
    // One shutdown wait at a time, first for that phase, then for the forced close (which comes
    // later).
    let stop_phase = if http1 { Phase::Draining } else { Phase::HandedOver };
    let shutdown = listener.shutdown.reached(stop_phase);
    tokio::pin!(shutdown);
    let mut watching_forced = false;
    loop {
        tokio::select! {
            res = std::future::poll_fn(|cx| hconn.as_mut().poll_conn(cx)) => {
                // During a handover an HTTP/1.1 connection ends after a response that said
                // `Connection: close` because this process is leaving: that is a shutdown close.
                let leaving = http1 && listener.shutdown.phase() != Phase::Running;
                return classify(res, initiated.or(leaving.then_some(CloseReason::Shutdown)), conn);
            }
            _ = &mut shutdown => {
                if watching_forced {
                    return CloseReason::DrainForced;
                }
                shutdown.set(listener.shutdown.reached(Phase::Forced));
                watching_forced = true;
                if initiated.is_some() {
                    // Already closing for another reason (HTTP/2 max requests or idle).
                    continue;
                }
                initiated = Some(CloseReason::Shutdown);
                info.set_state(ConnState::Closing);
                if !http1 {
                    listener.metrics.goaway(&listener.name, "shutdown");
                }
                // HTTP/1.1: hyper closes an idle connection at once and a busy one after its
                // response; this timer only catches one stuck in a request head that stopped.
                progress = info.bytes_in() + info.bytes_out();
                grace_until = tokio::time::Instant::now() + GOAWAY_GRACE;
                let at = grace_until.min(sleep.deadline());
                sleep.reset(at);
                hconn.as_mut().graceful();
            }
            _ = conn.close_requested.notified(), if initiated.is_none() && !http1 => {
                initiated = Some(CloseReason::MaxRequests);
                info.set_state(ConnState::Closing);
                listener.metrics.goaway(&listener.name, "max_requests");
                grace_until = tokio::time::Instant::now() + GOAWAY_GRACE;
                let at = grace_until.min(sleep.deadline());
                sleep.reset(at);
                hconn.as_mut().graceful();
            }
            _ = std::future::poll_fn(|cx| sleep.poll_expired(cx)) => {
                let settings = listener.settings.load();
                let now = tokio::time::Instant::now();
                let verdict = watchdog::check(info, http1, &settings.timeouts, now.into_std());
                if verdict == Verdict::Expired(CloseReason::WriteTimeout) {
                    // The peer takes no bytes, so neither a response nor a GOAWAY could reach it:
                    // close now. Dropping the connection ends its in-flight responses.
                    let _ = conn.close_cause.set(CloseReason::WriteTimeout);
                    tracing::debug!(
                        conn_id = info.id,
                        listener = %listener.name.0,
                        remote = %info.peer,
                        timeout_ms = settings.timeouts.write.get().as_millis() as u64,
                        in_flight = info.in_flight(),
                        "write timeout: the client accepted no response bytes; closing"
                    );
                    return CloseReason::WriteTimeout;
                }
                let recheck = match verdict {
                    Verdict::Recheck(at) => tokio::time::Instant::from_std(at),
                    Verdict::Expired(_) => now,
                };
                if let Some(reason) = initiated {
                    if now >= grace_until {
                        // A response whose body has ended is not delivered yet: its tail can sit
                        // in hyper's or h2's buffers behind a slow reader (write blocked) or still
                        // be moving. Closing then would cut a download that was about to complete.
                        let moved = info.bytes_in() + info.bytes_out();
                        let draining_with_progress = reason == CloseReason::Shutdown && moved != progress;
                        progress = moved;
                        if info.in_flight() == 0 && info.write_blocked_since().is_none() && !draining_with_progress {
                            // The graceful close we started did not finish: the peer is not answering.
                            return reason;
                        }
                        // The drain deadline (or the write timeout) bounds this wait.
                        grace_until = now + GOAWAY_GRACE;
                    }
                    sleep.reset(grace_until.min(recheck.max(now + MIN_RECHECK)));
                    continue;
                }
                match verdict {
                    Verdict::Recheck(_) => sleep.reset(recheck),
                    Verdict::Expired(reason) if !http1 && info.requests() > 0 => {
                        // HTTP/2: say goodbye with GOAWAY rather than a bare close; bound the wait.
                        initiated = Some(reason);
                        info.set_state(ConnState::Closing);
                        listener.metrics.goaway(&listener.name, reason.as_str());
                        hconn.as_mut().graceful();
                        grace_until = now + settings.http2.keepalive_timeout.get();
                        sleep.reset(grace_until.min(now + MIN_RECHECK));
                    }
                    Verdict::Expired(reason) => return reason,
                }
            }
        }
    }
}

/// While a graceful close is under way the watchdog only looks for write stalls; this keeps an
/// already-expired phase deadline from turning the wait into a busy loop.
const MIN_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Names the reason a hyper connection ended.
fn classify(res: hyper::Result<()>, initiated: Option<CloseReason>, conn: &ConnShared) -> CloseReason {
    let info = &conn.info;
    // A cause the pipeline recorded (a body timeout answered 408, a malformed body) explains the
    // close better than hyper's view, unless a drain we started is what ended the connection.
    if initiated != Some(CloseReason::Shutdown) {
        if let Some(cause) = conn.close_cause.get() {
            return *cause;
        }
    }
    match res {
        Ok(()) => {
            if let Some(r) = initiated {
                return r;
            }
            let max = u64::from(conn.listener.settings.load().limits.max_requests_per_connection);
            if info.protocol() == Protocol::Http11 && info.requests() >= max {
                CloseReason::MaxRequests
            } else {
                CloseReason::ClientClosed
            }
        }
        Err(e) => {
            let refused = super::parse_error::report(&e, info, &conn.listener);
            if let Some(r) = initiated {
                if r != CloseReason::Shutdown && r != CloseReason::MaxRequests {
                    return r;
                }
            }
            refused.unwrap_or_else(|| classify_error(&e))
        }
    }
}

fn classify_error(e: &hyper::Error) -> CloseReason {
    if e.is_timeout() {
        // hyper's only timer here is HTTP/2 keep-alive: the peer stopped answering PINGs.
        return CloseReason::IdleTimeout;
    }
    if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() || e.is_user() {
        return CloseReason::ProtocolError;
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return CloseReason::ClientClosed;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionAborted => CloseReason::ClientClosed,
                _ => CloseReason::IoError,
            };
        }
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if h2e.is_go_away() && h2e.is_remote() {
                return CloseReason::ClientClosed;
            }
            if h2e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                // h2's own abuse bounds: rapid reset, MadeYouReset, CONTINUATION and HPACK floods.
                return CloseReason::Limit;
            }
            if h2e.is_io() {
                return CloseReason::IoError;
            }
            return CloseReason::ProtocolError;
        }
        source = s.source();
    }
    CloseReason::IoError
}
