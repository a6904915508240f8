//! HTTP/1.1 connections, and the release of hyper's state while a keep-alive connection idles.
//!
//! A hyper HTTP/1.1 connection holds two 8 KiB buffers for its whole life. Like nginx's
//! `ngx_http_set_keepalive`, a cleartext connection that has been idle for
//! `limits.idle_release_after` ends its hyper connection (which, idle, closes without writing a
//! byte) and is *parked*: the stretch of serving ends with [`Step::Parked`], which frees
//! everything but the socket, and the connection's task waits in [`park`] for the socket to
//! become readable, without a read buffer, before [`serve_h1`] builds a new hyper connection for
//! the next request. Bytes hyper had read but not parsed (part of a pipelined head) are replayed
//! into the next one. A fresh cleartext connection starts parked, as nothing has arrived yet.
//!
//! hyper's upgradeable connection cannot give its socket back, so a connection starts with the
//! plain one and switches for the rest of its life when a request could upgrade (see
//! [`UpgradeGate`](super::UpgradeGate)); such a connection is never released again. TLS
//! connections never release: rustls's own buffers dominate their memory, and rustls may hold
//! decrypted bytes that the socket's readiness no longer shows.

use super::io::MeteredIo;
use super::sendfile::SpliceTarget;
use super::serve::{drive, h1_builder, serve_h2, Graceful, Step};
use super::timer::LazySleep;
use super::watchdog::{self, Verdict};
use super::{h2c, CloseReason, Protocol};
use super::{ConnShared, ConnState};
use crate::http::{HttpService, Pipeline, ServiceBody};
use bytes::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A connection's transport, as far as releasing hyper's state goes.
pub(super) trait Transport: AsyncRead + AsyncWrite + SpliceTarget + Unpin + Send + Sized + 'static {
    /// Whether a connection on this transport may release hyper's state while idle.
    const RELEASABLE: bool;
    /// The stretch of serving that released hyper's state on `io` ends with this.
    fn parked(io: MeteredIo<Self>) -> Step;
}

impl Transport for TcpStream {
    const RELEASABLE: bool = true;
    fn parked(io: MeteredIo<Self>) -> Step {
        Step::Parked(io)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    const RELEASABLE: bool = false;
    /// Never called: a TLS connection never releases (see the module docs). Were it to, ending
    /// the connection is the sound answer, as rustls may hold bytes the socket no longer shows.
    fn parked(_io: MeteredIo<Self>) -> Step {
        Step::Closed(CloseReason::IoError)
    }
}

type Io<T> = TokioIo<MeteredIo<T>>;

/// Where an HTTP/1.1 connection's hyper state is.
enum State<T: Transport, S: HttpService<B>, B: ServiceBody> {
    /// Released while idle: only the socket is left, for [`park`].
    Released(MeteredIo<T>),
    Plain(Box<http1::Connection<Io<T>, Pipeline<S>>>),
    Upgradeable(Pin<Box<http1::UpgradeableConnection<Io<T>, Pipeline<S>>>>),
    /// Over: its release failed. (The marker names the response body type, which the hyper
    /// connections' types need.)
    Done(Option<hyper::Result<()>>, PhantomData<fn() -> B>),
}

/// One HTTP/1.1 connection, driven by [`super::serve`]'s `drive` like an HTTP/2 one.
pub(super) struct H1<T: Transport, S: HttpService<B>, B: ServiceBody> {
    state: State<T, S, B>,
    conn: Arc<ConnShared>,
    svc: S,
    /// `None`: this connection never releases (TLS, upgrades, or a release that failed).
    release_after: Option<Duration>,
    /// With a non-zero `release_after`: fires when the connection's current idle spell reaches
    /// it. Made at the first idle spell of a hyper connection and dropped with it at the release,
    /// so a parked connection holds none. Moving it later for each new idle spell of a busy
    /// connection is left to the timer's firing: only then, if the spell is not long enough yet,
    /// is it moved, so a busy connection touches it about once per `release_after`, not per request.
    release_timer: Option<LazySleep<Box<tokio::time::Sleep>>>,
    /// The last release was followed by a request within [`BUSY_GAP`]: this connection carries
    /// back-to-back requests, and holds its state through idle spells shorter than [`BUSY_HOLD`].
    busy: bool,
}

/// A connection whose next request came this soon after a release is busy: releasing after each
/// of its responses would rebuild hyper's state for every request (about 1 µs, 5–10% of a small
/// request's CPU; docs/performance.md) to free memory for a few microseconds.
const BUSY_GAP: Duration = Duration::from_millis(10);
/// How long a busy connection stays idle before it releases after all.
const BUSY_HOLD: Duration = Duration::from_secs(1);

// Nothing in it is pinned in place: the hyper connections are boxed, and the service is cloned for
// each hyper connection. So `drive` may pin it while it is taken apart and rebuilt.
impl<T: Transport, S: HttpService<B>, B: ServiceBody> Unpin for H1<T, S, B> {}

impl<T: Transport, S, B> H1<T, S, B>
where
    S: HttpService<B>,
    B: ServiceBody,
{
    /// A connection whose next request has arrived or is arriving (part of it may already have
    /// been read: `io`'s prefix).
    pub(super) fn new(io: MeteredIo<T>, conn: &Arc<ConnShared>, svc: S) -> Self {
        let info = &conn.info;
        let mut h1 = H1 {
            state: State::Done(None, PhantomData),
            conn: conn.clone(),
            svc,
            release_after: None,
            release_timer: None,
            // Not for the first request: a client sends that as soon as it connects.
            busy: info.requests() > 0 && info.idle_since().elapsed() < BUSY_GAP,
        };
        if T::RELEASABLE {
            // Cleartext TCP: file responses may go out through `sendfile` (see `conn::sendfile`).
            info.splice().enable();
            h1.build(io);
        } else {
            conn.upgrades.open();
            let pipeline = Pipeline::new(h1.svc.clone(), conn.clone());
            let hconn = h1_builder(conn).serve_connection(TokioIo::new(io), pipeline);
            h1.state = State::Upgradeable(Box::pin(hconn.with_upgrades()));
        }
        h1
    }

    fn build(&mut self, io: MeteredIo<T>) {
        let pipeline = Pipeline::new(self.svc.clone(), self.conn.clone());
        let hconn = h1_builder(&self.conn)
            // Queue body chunks instead of copying them into one buffer: a `sendfile`
            // placeholder must reach the transport as it was handed to hyper.
            .writev(true)
            .serve_connection(TokioIo::new(io), pipeline);
        // Read once per build, so that a reload applies from the connection's next request.
        self.release_after = Some(self.conn.listener.settings.load().limits.idle_release_after.get());
        self.state = State::Plain(Box::new(hconn));
    }

    /// No request in flight, its response accepted by the socket, no byte of the next one seen,
    /// and hyper waiting on the socket. The last matters with pipelining: hyper answers at most
    /// 16 requests per poll and then yields with the rest of a pipelined batch still in its
    /// buffer, with nothing in flight; releasing there would end a connection that has work.
    fn idle(&self) -> bool {
        let info = &self.conn.info;
        info.read_waiting()
            && self.conn.upgrades.releasable()
            && self.conn.close_cause.get().is_none()
            && info.in_flight() == 0
            && info.state() == ConnState::Idle
            && info.head_started().is_none()
            && info.write_blocked_since().is_none()
    }

    /// Ends the (idle) hyper connection and keeps its socket, and any bytes it read ahead.
    fn release(&mut self, cx: &mut Context<'_>) {
        let State::Plain(mut hconn) = std::mem::replace(&mut self.state, State::Done(None, PhantomData)) else {
            return;
        };
        self.release_timer = None;
        // Idle, hyper closes at once and writes nothing; without shutdown, the socket stays open.
        Pin::new(&mut *hconn).graceful_shutdown();
        match hconn.poll_without_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                let parts = (*hconn).into_parts();
                let mut io = parts.io.into_inner();
                if !parts.read_buf.is_empty() {
                    // Part of a pipelined head (hyper parses whole ones as soon as it has them):
                    // keep a copy its size, not hyper's buffer, and time it as a head.
                    io.replay(Bytes::copy_from_slice(&parts.read_buf));
                    self.conn.info.note_read();
                }
                self.state = State::Released(io);
                let (info, listener) = (&self.conn.info, &self.conn.listener);
                listener
                    .debug
                    .event(crate::observe::Switch::Conn, &listener.name.0, info.peer, || {
                        format!(
                            "conn {} idle: released its HTTP/1.1 buffers, keeps its socket ({} bytes of a next request kept)",
                            info.id,
                            parts.read_buf.len()
                        )
                    });
            }
            Poll::Ready(Err(e)) => self.state = State::Done(Some(Err(e)), PhantomData),
            Poll::Pending => {
                // hyper was not idle after all (a request body still arriving for a handler that
                // answered without it): it now ends the connection once that exchange is over.
                tracing::debug!(
                    conn_id = self.conn.info.id,
                    "HTTP/1.1 connection was not idle when releasing; it closes after this exchange"
                );
                self.release_after = None;
                self.state = State::Plain(hconn);
            }
        }
    }
}

impl<T: Transport, S, B> Graceful for H1<T, S, B>
where
    S: HttpService<B>,
    B: ServiceBody,
{
    fn poll_conn(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                // The stretch ends here; `serve_h1` takes the socket to park it.
                State::Released(_) => return Poll::Ready(Ok(())),
                State::Plain(hconn) => {
                    if let Poll::Ready(res) = Pin::new(&mut **hconn).poll(cx) {
                        return Poll::Ready(res);
                    }
                    if this.conn.upgrades.take_wanted() {
                        // A request that could upgrade waits for this switch before it answers.
                        let State::Plain(hconn) = std::mem::replace(&mut this.state, State::Done(None, PhantomData))
                        else {
                            unreachable!("matched above");
                        };
                        this.state = State::Upgradeable(Box::pin((*hconn).with_upgrades()));
                        this.release_after = None;
                        this.conn.upgrades.open();
                        continue;
                    }
                    let Some(mut after) = this.release_after else {
                        return Poll::Pending;
                    };
                    if this.busy {
                        after = after.max(BUSY_HOLD);
                    }
                    if !this.idle() {
                        return Poll::Pending;
                    }
                    if !after.is_zero() {
                        let at = tokio::time::Instant::from_std(this.conn.info.idle_since() + after);
                        let timer = this
                            .release_timer
                            .get_or_insert_with(|| LazySleep::new(Box::pin(tokio::time::sleep_until(at))));
                        // `at` only moves later (each idle spell starts after the last; the hold
                        // is fixed for this hyper connection), so the timer is moved only when it
                        // fires before the current spell is long enough.
                        if timer.poll_expired(cx).is_pending() {
                            return Poll::Pending;
                        }
                        if timer.deadline() < at {
                            timer.reset(at);
                            if timer.poll_expired(cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                    }
                    this.release(cx);
                }
                State::Upgradeable(hconn) => return hconn.as_mut().poll(cx),
                State::Done(res, _) => return Poll::Ready(res.take().unwrap_or(Ok(()))),
            }
        }
    }

    fn graceful(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::Plain(hconn) => Pin::new(&mut **hconn).graceful_shutdown(),
            State::Upgradeable(hconn) => hconn.as_mut().graceful_shutdown(),
            State::Released(_) | State::Done(..) => {}
        }
    }
}

/// Serves HTTP/1.1 on `io` until the connection closes, switches to HTTP/2 (`Upgrade: h2c`), or
/// releases hyper's state while idle ([`Step::Parked`]).
///
/// Not an `async fn`: one copies each argument into a second slot of its future.
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub(super) fn serve_h1<'a, T, S, B>(
    io: MeteredIo<T>,
    conn: &'a Arc<ConnShared>,
    svc: S,
) -> impl Future<Output = Step> + 'a
where
    T: Transport,
    S: HttpService<B>,
    B: ServiceBody,
{
    // Built before the future, which then holds the connection rather than its parts.
    conn.info.set_protocol(Protocol::Http11);
    let mut h1 = H1::new(io, conn, svc.clone());
    async move {
        let reason = drive(Pin::new(&mut h1), conn, Protocol::Http11).await;
        let state = std::mem::replace(&mut h1.state, State::Done(None, PhantomData));
        drop(h1);
        if let State::Released(io) = state {
            return T::parked(io);
        }
        // Whatever hyper still held goes before a possible wait for an `Upgrade: h2c`.
        drop(state);
        let pending = conn.pending_h2c.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(pending) = pending else {
            return Step::Closed(reason);
        };
        Step::Closed(match pending.on_upgrade.await {
            Ok(upgraded) => {
                tracing::debug!(conn_id = conn.info.id, "switched to HTTP/2 via Upgrade: h2c");
                let io = h2c::Spliced::new(TokioIo::new(upgraded), pending.stream_one);
                Box::pin(serve_h2(io, conn, svc, Protocol::H2c)).await
            }
            Err(_) => CloseReason::ProtocolError,
        })
    }
}

/// A fresh cleartext HTTP/1.1 connection: it waits for its first request parked, like an idle one.
pub(super) fn start_parked(io: MeteredIo<TcpStream>, conn: &ConnShared) -> Step {
    conn.info.set_protocol(Protocol::Http11);
    conn.info.splice().enable();
    Step::Parked(io)
}

/// Waits, holding only the socket, until a parked connection's next request arrives (or bytes
/// of it were kept from the last hyper connection). Ends the connection instead when its
/// `first_request` or `idle` timeout expires, or its listener drains (an idle HTTP/1.1
/// connection closes at once then, as hyper closes one).
///
/// This future and the task's own are all that a parked connection holds, so both stay small:
/// a timer, a shutdown wait and the socket (docs/performance.md, idle memory).
#[allow(clippy::manual_async_fn)] // Not an `async fn`, for the reason `serve_h1` gives.
pub(super) fn park(
    io: MeteredIo<TcpStream>,
    conn: &ConnShared,
) -> impl Future<Output = Result<MeteredIo<TcpStream>, CloseReason>> + Send + '_ {
    async move {
        // Kept bytes may hold a whole request: they are parsed at once, not after the peer sends more.
        if io.has_prefix() {
            return Ok(io);
        }
        // A parked connection keeps only what it must; its next request looks its series up.
        conn.request_metrics.forget();
        let (info, listener) = (&conn.info, &conn.listener);
        let check = || watchdog::check(info, true, &listener.settings.load().timeouts, Instant::now());
        let at = match check() {
            Verdict::Recheck(at) => at,
            Verdict::Expired(reason) => return Err(reason),
        };
        let timer = tokio::time::sleep_until(at.into());
        let draining = listener.shutdown.draining();
        tokio::pin!(timer, draining);
        std::future::poll_fn(|cx| {
            if draining.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(CloseReason::Shutdown));
            }
            // An error is left for hyper's first read to report, as it would have been.
            if io.get_ref().poll_read_ready(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            while timer.as_mut().poll(cx).is_ready() {
                match check() {
                    Verdict::Recheck(at) => timer.as_mut().reset(at.into()),
                    Verdict::Expired(reason) => return Poll::Ready(Err(reason)),
                }
            }
            Poll::Pending
        })
        .await?;
        Ok(io)
    }
}
