//! The OTLP/HTTP exporter: batches encoded spans off the request path and POSTs them to
//! `{otlp_endpoint}/v1/traces` as `application/x-protobuf`.
//!
//! One background task owns the collector connection (HTTP/1.1, kept alive and reopened when
//! it breaks). Each export is bounded by `export_timeout`; a collector answering 429, 502, 503
//! or 504, a refused connection or a timeout is retried with doubling backoff (honouring
//! `Retry-After`) a bounded number of times, as the OTLP specification asks. What cannot be
//! sent is dropped and counted by reason; the first failure of a run is a warning, repeats are
//! debug lines until an export succeeds again.

use super::proto;
use super::TraceMetrics;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Attempts per batch, the first included: three covers a collector restart or a short
/// overload without holding a batch (and the queue behind it) for long.
const MAX_ATTEMPTS: u32 = 3;
/// First retry delay, doubled for each further one.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Upper bound on any wait between attempts, `Retry-After` included: past it the queue behind
/// the batch would be dropping spans anyway.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A collector's answer body is a small `ExportTraceServiceResponse`; anything larger is read
/// no further.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where spans go: `http://host:port[/base]` plus the OTLP/HTTP signal path `/v1/traces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address without brackets, for connecting.
    host: String,
    port: u16,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// The request target: the endpoint's path with `/v1/traces` appended.
    path: String,
}

impl Endpoint {
    /// Parses `otlp_endpoint`. Only `http://` is accepted: exporting over TLS would need a
    /// trust store and client certificates this build does not configure, and sending spans
    /// over cleartext to an `https://` URL would be a silent downgrade.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let uri: http::Uri = text.parse().map_err(|e| format!("`{text}` is not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "`{text}`: OTLP export over https is not supported in this version"
                ))
            }
            _ => return Err(format!("`{text}` must start with http://")),
        }
        let authority = uri.authority().ok_or_else(|| format!("`{text}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{text}`: user information in the URL is not supported"));
        }
        if uri.query().is_some() {
            return Err(format!("`{text}`: a query string is not supported"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{text}` has no host"));
        }
        let base = uri.path().trim_end_matches('/');
        Ok(Endpoint {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            path: format!("{base}/v1/traces"),
        })
    }

    /// The URL spans are posted to, for logs.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// What the exporter needs besides its queue.
pub struct ExportSettings {
    pub endpoint: Endpoint,
    pub timeout: Duration,
    pub batch_delay: Duration,
    pub batch_size: usize,
    /// `Resource` attributes (`service.name`, `service.version`).
    pub resource: Vec<(&'static str, String)>,
}

/// The exporter before it runs: created with the tracer, started by the server on its runtime.
pub struct Exporter {
    settings: ExportSettings,
    queue: mpsc::Receiver<Vec<u8>>,
    metrics: TraceMetrics,
}

/// A running exporter; [`ExportTask::flush_and_stop`] sends what is queued and ends it.
pub struct ExportTask {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    flush_bound: Duration,
}

impl ExportTask {
    /// Stops taking new batches, exports what is queued within one `export_timeout`, and
    /// returns; spans still queued then are dropped and counted (`reason="shutdown"`).
    pub async fn flush_and_stop(self) {
        let _ = self.stop.send(true);
        // The task bounds itself; this is the backstop should a connect hang past its timeout.
        let bound = self.flush_bound + Duration::from_secs(1);
        if tokio::time::timeout(bound, self.done).await.is_err() {
            tracing::warn!(
                bound_ms = bound.as_millis() as u64,
                "OTLP exporter did not finish flushing in time; remaining spans are lost"
            );
        }
    }
}

/// Why one export attempt failed; also the `reason` label of `gatehouse_trace_export_failures_total`.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Timeout,
    Transport(String),
    /// 429: the collector asks us to slow down.
    Throttled(Option<Duration>),
    /// 502, 503, 504: the collector or a gateway in front of it is temporarily unavailable.
    Unavailable(StatusCode, Option<Duration>),
    /// Any other non-2xx answer: retrying the same batch would get the same answer.
    Rejected(StatusCode, String),
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::Timeout => "timeout",
            Failure::Transport(_) => "transport",
            Failure::Throttled(_) => "throttled",
            Failure::Unavailable(..) => "unavailable",
            Failure::Rejected(..) => "rejected",
        }
    }

    fn retryable(&self) -> bool {
        !matches!(self, Failure::Rejected(..))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Throttled(d) | Failure::Unavailable(_, d) => *d,
            _ => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Timeout => write!(f, "no answer within tracing.export_timeout"),
            Failure::Transport(e) => write!(f, "the exchange broke off: {e}"),
            Failure::Throttled(_) => write!(f, "the collector answered 429 (throttled)"),
            Failure::Unavailable(s, _) => write!(f, "the collector answered {s}"),
            Failure::Rejected(s, body) => write!(f, "the collector refused the batch with {s}: {body}"),
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Exporter {
    pub(super) fn new(settings: ExportSettings, queue: mpsc::Receiver<Vec<u8>>, metrics: TraceMetrics) -> Exporter {
        Exporter {
            settings,
            queue,
            metrics,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.settings.endpoint
    }

    /// Starts the export task on the current runtime.
    pub fn spawn(self) -> ExportTask {
        let (stop, stopped) = watch::channel(false);
        let flush_bound = self.settings.timeout;
        let done = tokio::spawn(
            Batcher {
                settings: self.settings,
                metrics: self.metrics,
                conn: None,
                failing: false,
                stopped,
            }
            .run(self.queue),
        );
        ExportTask {
            stop,
            done,
            flush_bound,
        }
    }
}

struct Batcher {
    settings: ExportSettings,
    metrics: TraceMetrics,
    conn: Option<Sender>,
    /// Whether the last export failed, so a broken collector is a warning once, not every batch.
    failing: bool,
    stopped: watch::Receiver<bool>,
}

impl Batcher {
    async fn run(mut self, mut queue: mpsc::Receiver<Vec<u8>>) {
        let size = self.settings.batch_size;
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(size);
        let mut stopping = false;
        while !stopping {
            // Wait for a first span; then give the batch `batch_delay` (or until full) to grow.
            let mut stop = self.stopped.clone();
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                span = queue.recv() => match span {
                    Some(s) => batch.push(s),
                    None => break,
                },
            }
            let deadline = Instant::now() + self.settings.batch_delay;
            while batch.len() < size {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => { stopping = true; break }
                    span = queue.recv() => match span {
                        Some(s) => batch.push(s),
                        None => { stopping = true; break }
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(size));
            self.export(full, None).await;
        }
        // Flush: everything queued by now, within one export_timeout.
        let deadline = Instant::now() + self.settings.timeout;
        queue.close();
        let mut flushed = false;
        while !flushed {
            while batch.len() < size {
                match queue.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => {
                        flushed = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(size));
            if Instant::now() >= deadline {
                self.metrics.dropped("shutdown", full.len());
                continue;
            }
            self.export(full, Some(deadline)).await;
        }
    }

    /// Exports one batch, retrying what may succeed later; counts the outcome.
    async fn export(&mut self, batch: Vec<Vec<u8>>, mut deadline: Option<Instant>) {
        let n = batch.len();
        let resource: Vec<(&str, &str)> = self.settings.resource.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = Bytes::from(proto::export_request(
            &resource,
            (super::SCOPE_NAME, super::SCOPE_VERSION),
            batch.iter().map(Vec::as_slice),
        ));
        drop(batch);
        let mut backoff = INITIAL_BACKOFF;
        let mut attempt = 0;
        let failure = loop {
            attempt += 1;
            let limit = match deadline {
                Some(d) => self.settings.timeout.min(d.saturating_duration_since(Instant::now())),
                None => self.settings.timeout,
            };
            let failure = match self.attempt(body.clone(), limit).await {
                Ok(partial) => {
                    self.succeeded(n, partial);
                    return;
                }
                Err(f) => f,
            };
            self.metrics.export_failed(failure.reason());
            if !failure.retryable() || attempt >= MAX_ATTEMPTS {
                break failure;
            }
            let wait = failure.retry_after().unwrap_or(backoff).min(MAX_BACKOFF);
            backoff *= 2;
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                break failure;
            }
            tracing::debug!(attempt, wait_ms = wait.as_millis() as u64, error = %failure, "OTLP export failed; retrying");
            // A shutdown during the wait does not abandon the batch: it gets its next attempt
            // at once, bounded by the flush deadline.
            let mut stop = self.stopped.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s), if deadline.is_none() => {
                    deadline = Some(Instant::now() + self.settings.timeout);
                }
            }
        };
        self.metrics.dropped("export_failed", n);
        if self.failing {
            tracing::debug!(spans = n, attempts = attempt, error = %failure, "OTLP export failed; spans dropped");
        } else {
            self.failing = true;
            tracing::warn!(
                endpoint = %self.settings.endpoint.url(),
                spans = n,
                attempts = attempt,
                error = %failure,
                "OTLP export failed; spans dropped (counted in gatehouse_trace_spans_dropped_total; \
                 repeats are logged at debug level until an export succeeds)"
            );
        }
    }

    fn succeeded(&mut self, n: usize, partial: Option<(i64, String)>) {
        let rejected = partial
            .as_ref()
            .map_or(0, |(r, _)| usize::try_from(*r).unwrap_or(0).min(n));
        self.metrics.exported.inc_by((n - rejected) as u64);
        if let Some((_, message)) = partial {
            self.metrics.dropped("rejected", rejected);
            tracing::warn!(
                endpoint = %self.settings.endpoint.url(),
                rejected,
                message = %message,
                "OTLP collector accepted the export but rejected some spans"
            );
        }
        if std::mem::take(&mut self.failing) {
            tracing::info!(endpoint = %self.settings.endpoint.url(), "OTLP export succeeded again");
        }
    }

    async fn attempt(&mut self, body: Bytes, limit: Duration) -> Result<Option<(i64, String)>, Failure> {
        match tokio::time::timeout(limit, self.exchange(body)).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may still carry a late answer; it cannot be reused.
                self.conn = None;
                Err(Failure::Timeout)
            }
        }
    }

    async fn exchange(&mut self, body: Bytes) -> Result<Option<(i64, String)>, Failure> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender.ready().await.map_err(|e| Failure::Transport(e.to_string()))?;
        let ep = &self.settings.endpoint;
        let req = Request::post(ep.path.as_str())
            .header(header::HOST, ep.authority.as_str())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::USER_AGENT, concat!("gatehouse/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| Failure::Transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Transport(e.to_string()))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let answer = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| Failure::Transport(format!("reading the answer: {e}")))?
            .to_bytes();
        // Read in full, so the connection is ready for the next export.
        self.conn = Some(sender);
        match status.as_u16() {
            200..=299 => Ok(proto::partial_success(&answer)),
            429 => Err(Failure::Throttled(retry_after)),
            502..=504 => Err(Failure::Unavailable(status, retry_after)),
            _ => {
                let excerpt: String = String::from_utf8_lossy(&answer).chars().take(200).collect();
                Err(Failure::Rejected(status, excerpt))
            }
        }
    }

    async fn connect(&self) -> Result<Sender, Failure> {
        let ep = &self.settings.endpoint;
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "OTLP collector connection closed");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn endpoints_get_the_signal_path() {
        let e = Endpoint::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 4318, "/v1/traces")
        );
        assert_eq!(e.url(), "http://127.0.0.1:4318/v1/traces");
        let e = Endpoint::parse("http://collector/otlp/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("collector", 80, "/otlp/v1/traces")
        );
        let e = Endpoint::parse("http://[::1]:4318").unwrap();
        assert_eq!((e.host.as_str(), e.authority.as_str()), ("::1", "[::1]:4318"));
    }

    #[test]
    fn refuses_what_it_cannot_send_to() {
        for bad in [
            "https://collector:4318",
            "127.0.0.1:4318",
            "grpc://collector:4317",
            "http://user:pw@collector:4318",
            "http://collector:4318/?x=1",
            "not a url",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
