//! The access log: one JSON object per request, written off the request path by a sink thread.
//!
//! Requests never wait for the log: lines go through a bounded queue, and when the sink cannot
//! keep up, lines are dropped and counted in `gatehouse_access_log_dropped_total`.

use super::redact::{HashKey, HashKeyError, Redactor};
use crate::config::{LogConfig, RedactMode};
use prometheus_client::metrics::counter::Counter;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

/// Lines buffered between request tasks and the sink; at ~300 bytes a line, about 2.4 MiB.
const QUEUE_LINES: usize = 8192;

/// Where access log lines go.
#[derive(Clone, Debug)]
pub struct AccessLog {
    sink: Option<SyncSender<String>>,
    dropped: Counter,
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
            dropped: Counter::default(),
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
            "off" => {
                return Ok(AccessLog {
                    sink: None,
                    dropped,
                    redact,
                })
            }
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
        let (tx, rx) = sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("gatehouse-access-log".into())
            .spawn(move || write_lines(rx, out))
            .map_err(sink_error)?;
        Ok(AccessLog {
            sink: Some(tx),
            dropped,
            redact,
        })
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redact
    }

    /// Queues one line (without the newline); drops and counts it when the queue is full.
    pub fn write(&self, line: String) {
        if let Some(tx) = &self.sink {
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc();
                }
            }
        }
    }
}

fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        let _ = out.write_all(b"\n");
        // Batch while lines keep coming; flush as soon as the queue is empty.
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
        }
        let _ = out.flush();
    }
}

/// Appends `"key":` and a JSON string value.
pub fn json_str(out: &mut String, key: &str, value: &str) {
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
    // serde_json escapes exactly per RFC 8259; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into()));
    out.push(',');
}

/// Appends `"key":` and a number.
pub fn json_num(out: &mut String, key: &str, value: impl std::fmt::Display) {
    use std::fmt::Write as _;
    let _ = write!(out, "\"{key}\":{value},");
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
