//! The access log: one JSON object per request, written off the request path by a sink thread.
//!
//! Requests never wait for the log: a request thread builds its line in a reused per-thread
//! buffer ([`line`]) and copies it into a bounded buffer that a writer thread empties in batches
//! ([`sink`]). When the sink cannot keep up, lines are dropped and counted in
//! `gatehouse_access_log_dropped_total`. A line is written within about [`BATCH_INTERVAL`] of the
//! end of its request (unless the sink blocks), and [`AccessLog::flush`] writes everything before
//! the process exits.

mod line;
mod sink;

pub use line::Line;
pub use sink::{Flusher, BATCH_INTERVAL, MAX_PENDING};

use super::redact::{HashKey, HashKeyError, Redactor};
use crate::config::{LogConfig, RedactMode};
use line::Clock;
use prometheus_client::metrics::counter::Counter;
use sink::{Sink, SinkHandle};
use std::cell::RefCell;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A line buffer that grew past this (a very long path) is not kept for the next line.
const KEEP_LINE_BUFFER: usize = 16 * 1024;

thread_local! {
    /// Each request thread's line buffer and clock, reused from line to line.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    buf: String,
    clock: Clock,
}

/// Where access log lines go.
#[derive(Clone, Debug)]
pub struct AccessLog {
    sink: Option<Arc<SinkHandle>>,
    redact: Redactor,
}

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}: {source}")]
    Sink { path: String, source: std::io::Error },
    #[error(transparent)]
    HashKey(#[from] HashKeyError),
}

impl OpenError {
    /// The configuration key to blame in a finding.
    pub fn key(&self) -> &'static str {
        match self {
            OpenError::Sink { .. } => "log.access_log",
            OpenError::HashKey(_) => "log.hash_key_file",
        }
    }

    /// What the operator can do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            OpenError::Sink { .. } => "make the file's directory writable, or use \"stdout\" or \"off\"",
            OpenError::HashKey(_) => {
                "make the key file (or the state directory) readable and writable by this user, or set log.hash_key_file"
            }
        }
    }
}

impl AccessLog {
    /// An access log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            sink: None,
            redact: Redactor::default(),
        }
    }

    /// Opens the configured sink and starts its writer thread. Also builds the redactor, which
    /// the `h1_headers` switch uses even when the access log is off; in `hash` mode that loads
    /// (or makes, in `state_dir`) the hash key.
    pub fn open(cfg: &LogConfig, state_dir: &Path, dropped: Counter) -> Result<AccessLog, OpenError> {
        let key = match cfg.redact_mode {
            RedactMode::Hash => Some(HashKey::load(cfg, state_dir)?),
            RedactMode::Mask | RedactMode::Drop => None,
        };
        let redact = Redactor::new(cfg, key);
        let sink_error = |source| OpenError::Sink {
            path: cfg.access_log.clone(),
            source,
        };
        let out: Box<dyn Write + Send> = match cfg.access_log.as_str() {
            "off" => return Ok(AccessLog { sink: None, redact }),
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(sink_error)?,
            ),
        };
        let sink = Sink::start(out, dropped).map_err(sink_error)?;
        Ok(AccessLog {
            sink: Some(Arc::new(SinkHandle(sink))),
            redact,
        })
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redact
    }

    /// Records one line: `fill` adds the fields after `ts` (the time of this call). The line is
    /// built in this thread's reused buffer and queued; it is dropped and counted when the queue
    /// is full. Does nothing (and does not call `fill`) when the log is off.
    pub fn record(&self, fill: impl FnOnce(&mut Line<'_>)) {
        let Some(sink) = &self.sink else { return };
        let build = |scratch: &mut Scratch| {
            let mut line = Line::start(&mut scratch.buf, &mut scratch.clock);
            fill(&mut line);
            line.finish();
            sink.0.push(scratch.buf.as_bytes());
            if scratch.buf.capacity() > KEEP_LINE_BUFFER {
                scratch.buf = String::new();
            }
        };
        // The per-thread buffer is always free here (a line is not built from inside another),
        // but a thread being torn down has none: build in a fresh one then.
        let mut build = Some(build);
        let _ = SCRATCH.try_with(|s| {
            if let Ok(mut scratch) = s.try_borrow_mut() {
                if let Some(build) = build.take() {
                    build(&mut scratch);
                }
            }
        });
        if let Some(build) = build {
            build(&mut Scratch::default());
        }
    }

    /// Waits (at most `timeout`) until every line recorded so far has been written; returns
    /// whether it was. True at once when the log is off.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.sink.as_ref().is_none_or(|s| s.0.flush(timeout))
    }

    /// A way to flush this log after it has been replaced; `None` when it is off.
    pub fn flusher(&self) -> Option<Flusher> {
        self.sink.as_ref().map(|s| Flusher(Arc::downgrade(&s.0)))
    }
}
