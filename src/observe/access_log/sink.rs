//! The access log's writer thread, and the buffer that request threads append lines to without
//! waking it.
//!
//! Waking a thread per line costs a futex wake and a context switch, which on a server pinned to
//! one CPU is most of what a log line costs. So request threads only append to a shared, bounded
//! buffer; the writer is woken once when the buffer stops being empty, then lets lines gather for
//! [`BATCH_INTERVAL`] and hands the whole batch to the sink in one `write`. Under steady load that
//! is one wake-up and one write per interval, whatever the request rate. The writer is hurried
//! only when the buffer is half full, when someone waits for a flush, and when the log closes.

use prometheus_client::metrics::counter::Counter;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How long the writer lets lines gather after the first one: the bound on how late a line is
/// written (unless the sink itself blocks), and at most 100 wake-ups a second under any load.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Bytes of lines waiting for the writer, at most; a line that does not fit is dropped and
/// counted. About 3,500 lines of 300 bytes: over 30 batch intervals at 10,000 requests a second,
/// and time to ride out a sink that stalls for a moment. With the batch being written, at most
/// twice this is held.
pub const MAX_PENDING: usize = 1 << 20;

/// The buffers start this size (and so grow in powers of two, to exactly [`MAX_PENDING`]).
const INITIAL_BUFFER: usize = 64 * 1024;

/// What request threads and the writer share.
pub struct Sink {
    state: Mutex<State>,
    /// The writer waits here: for a first line while parked, or for its pause to end.
    wake: Condvar,
    /// [`Sink::flush`] waits here for the writer to catch up.
    written: Condvar,
    /// Lines lost: no room in the buffer, or the sink failed to take them.
    dropped: Counter,
}

struct State {
    pending: Vec<u8>,
    /// Bytes ever appended, and ever handed to the sink (or given up on): a flush waits until
    /// `written` reaches the `appended` it saw.
    appended: u64,
    written: u64,
    writer: Writer,
    /// Write without pausing next time: the buffer is half full, a flush waits, or closing.
    hurry: bool,
    /// Every handle is gone: write what is left, then end.
    closed: bool,
    flush_waiters: usize,
}

/// What the writer thread is doing, which tells a request thread whether to wake it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writer {
    /// Waiting, without a deadline, for the buffer to stop being empty: the first line wakes it.
    Parked,
    /// Letting lines gather until its deadline; woken early only to hurry.
    Pausing,
    /// Writing a batch, not waiting on anything: it looks at `hurry` when done.
    Writing,
    /// The thread has ended (closed, or it could not start).
    Exited,
}

impl Sink {
    /// Starts the writer thread for `out`.
    pub fn start(out: Box<dyn Write + Send>, dropped: Counter) -> std::io::Result<Arc<Sink>> {
        let sink = Arc::new(Sink {
            state: Mutex::new(State {
                pending: Vec::with_capacity(INITIAL_BUFFER),
                appended: 0,
                written: 0,
                writer: Writer::Parked,
                hurry: false,
                closed: false,
                flush_waiters: 0,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
            dropped,
        });
        let writer = sink.clone();
        std::thread::Builder::new()
            .name("gatehouse-access-log".into())
            .spawn(move || writer.run(out))?;
        Ok(sink)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one line (without its newline); drops and counts it when the buffer is full.
    /// Never blocks on the sink: the lock is held only to copy the line in.
    pub fn push(&self, line: &[u8]) {
        let mut st = self.lock();
        if st.closed || st.writer == Writer::Exited || st.pending.len() + line.len() + 1 > MAX_PENDING {
            drop(st);
            self.dropped.inc();
            return;
        }
        st.pending.extend_from_slice(line);
        st.pending.push(b'\n');
        st.appended += line.len() as u64 + 1;
        let half_full = st.pending.len() >= MAX_PENDING / 2;
        let wake = match st.writer {
            // The state changes here so that the lines after this one do not wake it again.
            Writer::Parked => {
                st.writer = Writer::Pausing;
                true
            }
            Writer::Pausing if half_full && !st.hurry => {
                st.hurry = true;
                true
            }
            Writer::Writing if half_full => {
                st.hurry = true;
                false
            }
            Writer::Pausing | Writer::Writing | Writer::Exited => false,
        };
        drop(st);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Waits (at most `timeout`) until every line appended before the call has been handed to
    /// the sink; returns whether it was.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let mark = st.appended;
        if st.written >= mark {
            return true;
        }
        st.hurry = true;
        if st.writer == Writer::Pausing {
            self.wake.notify_one();
        }
        st.flush_waiters += 1;
        while st.written < mark && st.writer != Writer::Exited {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .written
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.flush_waiters -= 1;
        st.written >= mark
    }

    /// No more lines will come: the writer writes what is left, without pausing, and ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        drop(st);
        self.wake.notify_one();
    }

    fn run(self: Arc<Sink>, mut out: Box<dyn Write + Send>) {
        let mut batch = Vec::with_capacity(INITIAL_BUFFER);
        let mut failing = false;
        let mut st = self.lock();
        loop {
            while st.pending.is_empty() && !st.closed {
                st.writer = Writer::Parked;
                st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.pending.is_empty() {
                break;
            }
            st.writer = Writer::Pausing;
            let deadline = Instant::now() + BATCH_INTERVAL;
            while !st.hurry && !st.closed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = self
                    .wake
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.hurry = false;
            st.writer = Writer::Writing;
            std::mem::swap(&mut st.pending, &mut batch);
            let upto = st.appended;
            drop(st);
            self.write_batch(&mut *out, &batch, &mut failing);
            batch.clear();
            st = self.lock();
            st.written = upto;
            if st.flush_waiters > 0 {
                self.written.notify_all();
            }
        }
        st.writer = Writer::Exited;
        if st.flush_waiters > 0 {
            self.written.notify_all();
        }
    }

    /// Writes whole lines, as few `write` calls as the sink allows. When the sink fails, the
    /// lines not written are counted as dropped, and the failure is logged once per episode.
    fn write_batch(&self, out: &mut dyn Write, batch: &[u8], failing: &mut bool) {
        let mut rest = batch;
        let result = loop {
            if rest.is_empty() {
                break out.flush();
            }
            match out.write(rest) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) if *failing => {
                *failing = false;
                tracing::info!("access log: the sink takes lines again");
            }
            Ok(()) => {}
            Err(e) => {
                // A line cut short counts as lost with those after it.
                let lost = rest.iter().filter(|&&b| b == b'\n').count() as u64;
                self.dropped.inc_by(lost);
                if !*failing {
                    *failing = true;
                    tracing::error!(error = %e, lines_lost = lost, "access log: cannot write; lines are dropped and counted in gatehouse_access_log_dropped_total until the sink takes them again");
                }
            }
        }
    }
}

/// One open access log's sink; closes it when the last handle goes.
pub struct SinkHandle(pub Arc<Sink>);

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Flushes an access log that may have been replaced (by a reload) since: a retired log's writer
/// still writes what it holds, and a shutdown should wait for that too.
#[derive(Clone, Debug)]
pub struct Flusher(pub(super) Weak<Sink>);

impl Flusher {
    /// Like [`Sink::flush`]; true at once when the writer has already ended.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.0.upgrade().is_none_or(|s| s.flush(timeout))
    }

    /// Whether the writer thread still runs (and so may hold lines).
    pub fn is_live(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Sink")
            .field("pending", &st.pending.len())
            .field("writer", &st.writer)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
