//! The transport under hyper's HTTP/2 server: counts the resets and GOAWAYs it sends, bounds
//! control-frame floods, and logs frame heads for the `h2_frames` debug switch.
//!
//! hyper and h2 neither report which RST_STREAM or GOAWAY codes they send nor bound PING and
//! SETTINGS floods (h2 answers every PING and ACKs every SETTINGS, one at a time, forever). So
//! [`H2Watch`] follows frame boundaries in both directions (see [`super::h2frames`]) without
//! copying payloads. Inbound control frames are charged to a token bucket of
//! `http2.max_control_frames_per_second` (burst twice that); when it is empty, the watch stops
//! reading, writes GOAWAY(ENHANCE_YOUR_CALM) itself at the next outbound frame boundary (never
//! inside a frame hyper is writing), and then fails the read so the connection closes with
//! reason `limit`.

use super::h2frames::{self, Frame, FrameCursor, Next, TokenBucket};
use super::ConnShared;
use crate::observe::Switch;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether a connection was closed for a control-frame flood; read after the connection ends.
#[derive(Clone, Debug, Default)]
pub struct Flooded(Arc<AtomicBool>);

impl Flooded {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where the flood defence is.
enum Calm {
    Watching,
    /// Over budget: reads have stopped and this GOAWAY goes out at the next frame boundary.
    Sending {
        frame: [u8; h2frames::HEAD_LEN + 8],
        written: usize,
    },
    /// The GOAWAY is written and flushed; every read now fails so the codec gives up.
    Sent,
}

/// Wraps an HTTP/2 server connection's transport; see the module docs.
pub struct H2Watch<T> {
    inner: T,
    conn: Arc<ConnShared>,
    inbound: FrameCursor,
    outbound: FrameCursor,
    bucket: TokenBucket,
    /// The highest client-initiated stream a HEADERS frame was seen on: our GOAWAY's last stream.
    last_client_stream: u32,
    calm: Calm,
    flooded: Flooded,
    /// The reader waiting for hyper to finish the frame it is writing before our GOAWAY.
    read_waker: Option<Waker>,
}

impl<T> H2Watch<T> {
    pub fn new(inner: T, conn: Arc<ConnShared>) -> (Self, Flooded) {
        let rate = conn.listener.settings.load().http2.max_control_frames_per_second.max(1);
        let flooded = Flooded::default();
        let watch = H2Watch {
            inner,
            conn,
            inbound: FrameCursor::inbound(),
            outbound: FrameCursor::outbound(),
            bucket: TokenBucket::new(rate, rate.saturating_mul(2), Instant::now()),
            last_client_stream: 0,
            calm: Calm::Watching,
            flooded: flooded.clone(),
            read_waker: None,
        };
        (watch, flooded)
    }

    fn frames_logged(&self) -> bool {
        let l = &self.conn.listener;
        l.debug.enabled(Switch::H2Frames, &l.name.0, self.conn.info.peer)
    }

    /// Follows bytes the client sent; returns where to cut them when a frame overflowed the budget.
    fn inspect_inbound(&mut self, bytes: &[u8]) -> Option<usize> {
        let log = self.frames_logged();
        let now = Instant::now();
        let mut overflow = None;
        let conn = &self.conn;
        let cut = self.inbound.advance(bytes, |f| {
            if log {
                log_frame(conn, "recv", &f);
            }
            if f.head.kind == h2frames::HEADERS && f.head.stream % 2 == 1 {
                self.last_client_stream = self.last_client_stream.max(f.head.stream);
            }
            match h2frames::charged(&f.head) {
                Some(label) if !self.bucket.take(now) => {
                    overflow = Some(label);
                    Next::Stop
                }
                _ => Next::Continue,
            }
        });
        if let Some(frame) = overflow {
            self.start_calm(frame);
        }
        cut
    }

    fn start_calm(&mut self, frame: &'static str) {
        let l = &self.conn.listener;
        l.metrics.h2_flood(&l.name, frame);
        self.flooded.0.store(true, Ordering::Relaxed);
        let rate = l.settings.load().http2.max_control_frames_per_second;
        tracing::info!(
            conn_id = self.conn.info.id,
            listener = %l.name.0,
            remote = %self.conn.info.peer,
            frame,
            max_control_frames_per_second = rate,
            "HTTP/2 control frame flood: sending GOAWAY(ENHANCE_YOUR_CALM) and closing"
        );
        self.calm = Calm::Sending {
            frame: h2frames::goaway(self.last_client_stream, h2frames::ENHANCE_YOUR_CALM),
            written: 0,
        };
    }

    /// Follows bytes written to the client: counts resets and error GOAWAYs, logs frames.
    fn observe_outbound(&mut self, bytes: &[u8]) {
        let log = self.frames_logged();
        let conn = &self.conn;
        self.outbound.advance(bytes, |f| {
            if log {
                log_frame(conn, "send", &f);
            }
            let l = &conn.listener;
            match (f.head.kind, f.code) {
                (h2frames::RST_STREAM, Some(code)) => l.metrics.h2_reset_sent(&l.name, h2frames::error_label(code)),
                // NO_ERROR GOAWAYs are graceful closes, counted where they start (shutdown, max_requests).
                (h2frames::GOAWAY, Some(code)) if code != 0 => l.metrics.goaway(&l.name, h2frames::error_label(code)),
                _ => {}
            }
            Next::Continue
        });
    }

    /// Whether our GOAWAY may be written now: at a frame boundary, or already partly written.
    fn goaway_due(&self) -> bool {
        match self.calm {
            Calm::Sending { written, .. } => written > 0 || self.outbound.at_boundary(),
            _ => false,
        }
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }
}

impl<T: AsyncWrite + Unpin> H2Watch<T> {
    /// Writes and flushes the pending GOAWAY; call only when [`Self::goaway_due`].
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Calm::Sending { frame, written } = self.calm else {
                return Poll::Ready(Ok(()));
            };
            if written == frame.len() {
                ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
                self.calm = Calm::Sent;
                self.wake_reader();
                return Poll::Ready(Ok(()));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &frame[written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.observe_outbound(&frame[written..written + n]);
            self.calm = Calm::Sending {
                frame,
                written: written + n,
            };
        }
    }

    /// Before hyper writes: our GOAWAY goes first if it is due.
    fn poll_before_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.goaway_due() {
            ready!(self.poll_goaway(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// After hyper wrote: a reader waiting for a frame boundary may go on.
    fn after_write(&mut self) {
        if self.goaway_due() {
            self.wake_reader();
        }
    }
}

fn log_frame(conn: &ConnShared, direction: &str, f: &Frame) {
    let l = &conn.listener;
    l.debug.event(Switch::H2Frames, &l.name.0, conn.info.peer, || {
        let h = &f.head;
        let mut m = format!(
            "conn {} h2 {direction} {} flags=0x{:02x} stream={} length={}",
            conn.info.id,
            h2frames::kind_name(h.kind),
            h.flags,
            h.stream,
            h.len
        );
        if let Some(code) = f.code {
            m.push_str(" error=");
            m.push_str(h2frames::error_label(code));
        }
        m
    });
}

fn flood_error() -> io::Error {
    io::Error::other("HTTP/2 control frames over http2.max_control_frames_per_second")
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Watch<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.calm {
                Calm::Watching => {}
                Calm::Sending { .. } => {
                    if !this.goaway_due() {
                        // hyper is inside a frame; its next write ends it and wakes us.
                        this.read_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    ready!(this.poll_goaway(cx))?;
                    continue;
                }
                Calm::Sent => return Poll::Ready(Err(flood_error())),
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let Some(cut) = this.inspect_inbound(&buf.filled()[before..]) else {
                return Poll::Ready(Ok(()));
            };
            // Hand hyper only the frames before the one that overflowed; drop the rest unread.
            buf.set_filled(before + cut);
            if cut > 0 {
                return Poll::Ready(Ok(()));
            }
            // Nothing to hand over (an empty read would mean EOF): go straight to the GOAWAY.
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for H2Watch<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_before_write(cx))?;
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.observe_outbound(&buf[..n]);
        this.after_write();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_before_write(cx))?;
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            this.observe_outbound(&b[..k]);
            left -= k;
        }
        this.after_write();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_before_write(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_before_write(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
