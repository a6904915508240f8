//! The access log: one JSON object per request, written off the request path by a sink thread.
//!
//! Requests never wait for the log: lines go through a bounded queue, and when the sink cannot
//! keep up, lines are dropped and counted in `gatehouse_access_log_dropped_total`.

use crate::config::{LogConfig, RedactMode};
use prometheus_client::metrics::counter::Counter;
use std::hash::BuildHasher;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

/// Lines buffered between request tasks and the sink; at ~300 bytes a line, about 2.4 MiB.
const QUEUE_LINES: usize = 8192;

/// Where access log lines go.
#[derive(Clone, Debug)]
pub struct AccessLog {
    sink: Option<SyncSender<String>>,
    dropped: Counter,
    redact: QueryRedactor,
}

impl AccessLog {
    /// An access log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            sink: None,
            dropped: Counter::default(),
            redact: QueryRedactor::default(),
        }
    }

    /// Opens the configured sink and starts its writer thread.
    pub fn open(cfg: &LogConfig, dropped: Counter) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match cfg.access_log.as_str() {
            "off" => {
                return Ok(AccessLog {
                    sink: None,
                    dropped,
                    redact: QueryRedactor::new(cfg),
                })
            }
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, rx) = sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("gatehouse-access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(AccessLog {
            sink: Some(tx),
            dropped,
            redact: QueryRedactor::new(cfg),
        })
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    pub fn redactor(&self) -> &QueryRedactor {
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

/// Redacts configured query parameters before a path is logged.
#[derive(Clone, Debug, Default)]
pub struct QueryRedactor {
    names: Vec<String>,
    mode: RedactMode,
    key: std::hash::RandomState,
}

impl QueryRedactor {
    pub fn new(cfg: &LogConfig) -> Self {
        QueryRedactor {
            names: cfg.redact_query.iter().map(|n| n.to_ascii_lowercase()).collect(),
            mode: cfg.redact_mode,
            key: std::hash::RandomState::new(),
        }
    }

    /// `path_and_query` with the values of listed parameters masked, hashed or dropped.
    pub fn redact<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        let Some((path, query)) = path_and_query.split_once('?') else {
            return path_and_query.into();
        };
        let sensitive = |k: &str| {
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            self.names.iter().any(|n| n.eq_ignore_ascii_case(&k))
        };
        if !query.split('&').any(|kv| sensitive(kv.split('=').next().unwrap_or(""))) {
            return path_and_query.into();
        }
        let mut out = String::with_capacity(path_and_query.len());
        out.push_str(path);
        let mut first = true;
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let value = if sensitive(k) {
                match self.mode {
                    RedactMode::Drop => continue,
                    RedactMode::Mask => "***".to_string(),
                    RedactMode::Hash => format!("h:{:016x}", self.key.hash_one(v)),
                }
            } else {
                v.to_string()
            };
            out.push(if first { '?' } else { '&' });
            first = false;
            out.push_str(k);
            out.push('=');
            out.push_str(&value);
        }
        out.into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_redacted_by_mode() {
        let mut cfg = LogConfig::default();
        let r = QueryRedactor::new(&cfg);
        assert_eq!(r.redact("/a?token=s3cret&x=1"), "/a?token=***&x=1");
        assert_eq!(r.redact("/a?x=1"), "/a?x=1");
        cfg.redact_mode = RedactMode::Drop;
        assert_eq!(QueryRedactor::new(&cfg).redact("/a?x=1&password=p"), "/a?x=1");
        cfg.redact_mode = RedactMode::Hash;
        let r = QueryRedactor::new(&cfg);
        let a = r.redact("/a?token=s3cret").into_owned();
        assert!(!a.contains("s3cret"));
        assert_eq!(a, r.redact("/b?token=s3cret").replace("/b", "/a"));
    }
}
