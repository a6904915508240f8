//! OpenTelemetry tracing: spans reach an OTLP/HTTP receiver written here, which decodes them with
//! the official generated protobuf types; W3C trace context is honoured and handed to handlers.

use crate::common::TestServer;
use bytes::Bytes;
use gatehouse::observe::TraceContext;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
/// `SPAN_KIND_SERVER`, `STATUS_CODE_ERROR`, and the `SpanFlags` bits for a remote parent.
const KIND_SERVER: i32 = 2;
const STATUS_ERROR: i32 = 2;
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

/// How the receiver answers one export.
#[derive(Clone, Debug)]
enum Answer {
    Status(u16),
    /// 200 with an `ExportTraceServiceResponse` whose `partial_success` rejects this many spans.
    Reject(i64),
    /// Never answers (the exporter's timeout must fire).
    Hang,
}

/// An OTLP/HTTP trace receiver on loopback. Answers follow a script, then 200.
struct Collector {
    addr: SocketAddr,
    exports: mpsc::UnboundedReceiver<Result<ExportTraceServiceRequest, String>>,
    spans: VecDeque<(Vec<KeyValue>, Span)>,
}

impl Collector {
    async fn start(script: Vec<Answer>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, exports) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (tx, script) = (tx.clone(), script.clone());
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (tx, script) = (tx.clone(), script.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let answer = script.lock().unwrap().pop_front().unwrap_or(Answer::Status(200));
                        let decoded = if parts.method != http::Method::POST || parts.uri.path() != "/v1/traces" {
                            Err(format!("unexpected {} {}", parts.method, parts.uri))
                        } else if parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes())
                            != Some(b"application/x-protobuf")
                        {
                            Err(format!(
                                "unexpected content-type {:?}",
                                parts.headers.get("content-type")
                            ))
                        } else {
                            ExportTraceServiceRequest::decode(body).map_err(|e| format!("undecodable export: {e}"))
                        };
                        let _ = tx.send(decoded);
                        let (status, body) = match answer {
                            Answer::Hang => {
                                std::future::pending::<()>().await;
                                unreachable!()
                            }
                            Answer::Status(s) => (s, Vec::new()),
                            Answer::Reject(n) => (
                                200,
                                ExportTraceServiceResponse {
                                    partial_success: Some(ExportTracePartialSuccess {
                                        rejected_spans: n,
                                        error_message: "span too old".into(),
                                    }),
                                }
                                .encode_to_vec(),
                            ),
                        };
                        let resp = http::Response::builder()
                            .status(status)
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
            }
        });
        Collector {
            addr,
            exports,
            spans: VecDeque::new(),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next export request as it arrived (bounded wait).
    async fn next_export(&mut self) -> ExportTraceServiceRequest {
        let got = tokio::time::timeout(Duration::from_secs(10), self.exports.recv())
            .await
            .expect("no OTLP export arrived within 10s")
            .expect("receiver stopped");
        got.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The next span received, with its resource's attributes (bounded wait).
    async fn next_span(&mut self) -> (Vec<KeyValue>, Span) {
        while self.spans.is_empty() {
            let export = self.next_export().await;
            for rs in export.resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    let scope = ss.scope.expect("every batch names its instrumentation scope");
                    assert_eq!(scope.name, "gatehouse");
                    for span in ss.spans {
                        self.spans.push_back((resource.clone(), span));
                    }
                }
            }
        }
        self.spans.pop_front().unwrap()
    }

    /// Exports received so far, without waiting.
    fn drain_spans(&mut self) -> usize {
        let mut n = self.spans.len();
        while let Ok(Ok(export)) = self.exports.try_recv() {
            n += export
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum::<usize>();
        }
        n
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn str_attr(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key}: expected a string, got {other:?}"),
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(Value::IntValue(i)) => i,
        other => panic!("{key}: expected an int, got {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cleartext listener `edge` exporting to `endpoint`; batches leave after 50ms unless `extra`
/// sets `batch_delay`.
fn config(endpoint: &str, extra: &str) -> String {
    let delay = if extra.contains("batch_delay") {
        ""
    } else {
        "batch_delay = \"50ms\"\n"
    };
    format!(
        "[[listeners]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"edge-test\"\n{delay}{extra}"
    )
}

/// Answers 200 with the trace context it was handed in `x-traceparent`; `/panic` panics and
/// `/status/N` answers N.
async fn app(req: http::Request<gatehouse::RequestBody>) -> Result<http::Response<String>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/panic" {
        panic!("handler bug");
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut resp = http::Response::new("ok\n".to_string());
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    if let Some(ctx) = req.extensions().get::<TraceContext>() {
        resp.headers_mut().insert("x-traceparent", ctx.traceparent());
        if let Some(state) = &ctx.tracestate {
            resp.headers_mut().insert("x-tracestate", state.parse().unwrap());
        }
    }
    Ok(resp)
}

async fn start(collector: &Collector, extra: &str) -> TestServer {
    TestServer::start_service(&config(&collector.endpoint(), extra), tower::service_fn(app)).await
}

fn client(http2: bool) -> reqwest::Client {
    let b = reqwest::Client::builder().no_proxy().user_agent("trace-test/1.0");
    let b = if http2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

/// Polls a metric until it reaches at least `want` (bounded); returns the last value.
async fn wait_at_least(srv: &TestServer, series: &str, want: f64) -> f64 {
    for _ in 0..1000 {
        let v = srv.metric(series);
        if v >= want {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.metric(series)
}

#[tokio::test]
async fn incoming_traceparent_becomes_the_parent_of_a_server_span() {
    let mut collector = Collector::start(vec![]).await;
    let srv = start(&collector, "").await;
    let port = srv.addr("edge").port();
    for (http2, version) in [(false, "1.1"), (true, "2")] {
        let resp = client(http2)
            .get(format!("http://127.0.0.1:{port}/items?token=s3cret&page=2"))
            .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
            .header("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let forwarded = resp.headers()["x-traceparent"].to_str().unwrap().to_string();
        assert_eq!(
            resp.headers()["x-tracestate"],
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        );

        let (resource, span) = collector.next_span().await;
        assert_eq!(str_attr(&resource, "service.name"), "edge-test");
        assert_eq!(str_attr(&resource, "service.version"), env!("CARGO_PKG_VERSION"));
        assert_eq!(hex(&span.trace_id), TRACE_ID);
        assert_eq!(hex(&span.parent_span_id), PARENT_ID);
        assert_eq!(span.span_id.len(), 8);
        // The handler was given this span as the parent of anything it calls.
        assert_eq!(forwarded, format!("00-{TRACE_ID}-{}-01", hex(&span.span_id)));
        assert_eq!(span.trace_state, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        assert_eq!(span.kind, KIND_SERVER);
        assert_eq!(span.name, "GET");
        assert_eq!(span.flags, 0x01 | FLAGS_HAS_IS_REMOTE | FLAGS_IS_REMOTE);
        assert!(span.start_time_unix_nano > 1_600_000_000_000_000_000);
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert_eq!(
            span.status.map(|s| s.code).unwrap_or(0),
            0,
            "a 200 leaves the status unset"
        );

        let a = &span.attributes;
        assert_eq!(str_attr(a, "http.request.method"), "GET");
        assert_eq!(str_attr(a, "url.path"), "/items");
        assert_eq!(
            str_attr(a, "url.query"),
            "token=***&page=2",
            "redacted as the access log is"
        );
        assert_eq!(str_attr(a, "url.scheme"), "http");
        assert_eq!(int_attr(a, "http.response.status_code"), 200);
        assert_eq!(str_attr(a, "network.protocol.name"), "http");
        assert_eq!(str_attr(a, "network.protocol.version"), version);
        assert_eq!(str_attr(a, "server.address"), "127.0.0.1");
        assert_eq!(int_attr(a, "server.port"), i64::from(port));
        assert_eq!(str_attr(a, "client.address"), "127.0.0.1");
        assert_eq!(str_attr(a, "user_agent.original"), "trace-test/1.0");
        assert_eq!(str_attr(a, "gatehouse.listener"), "edge");
        assert_eq!(int_attr(a, "http.response.body.size"), 3);
        assert!(
            str_attr(a, "gatehouse.request.id").starts_with(&format!("{}-", int_attr(a, "gatehouse.connection.id")))
        );
        assert!(attr(a, "error.type").is_none());
    }
    assert!(srv.wait_metric("gatehouse_trace_spans_exported_total", 2.0).await);
    srv.stop().await;
}

#[tokio::test]
async fn a_request_without_a_valid_traceparent_starts_a_new_trace() {
    let mut collector = Collector::start(vec![]).await;
    let srv = start(&collector, "").await;
    let url = format!("http://{}/", srv.addr("edge"));
    let malformed = [
        None,
        Some(format!("00-{}-{PARENT_ID}-01", "0".repeat(32))),
        Some(format!("00-{}-{PARENT_ID}-01", TRACE_ID.to_uppercase())),
        Some(format!("ff-{TRACE_ID}-{PARENT_ID}-01")),
        Some(format!("00-{TRACE_ID}-{PARENT_ID}")),
    ];
    let mut seen = Vec::new();
    for header in &malformed {
        let mut req = client(false).get(&url);
        if let Some(h) = header {
            req = req.header("traceparent", h).header("tracestate", "rojo=1");
        }
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "a malformed traceparent is never the client's error"
        );
        let (_, span) = collector.next_span().await;
        let id = hex(&span.trace_id);
        assert_ne!(id, TRACE_ID);
        assert_ne!(id, "0".repeat(32));
        assert!(span.parent_span_id.is_empty(), "a new trace has no parent");
        assert!(
            span.trace_state.is_empty(),
            "tracestate is dropped with an invalid traceparent"
        );
        assert_eq!(span.flags, 0x01 | FLAGS_HAS_IS_REMOTE, "root span: parent not remote");
        assert_eq!(
            resp.headers()["x-traceparent"].to_str().unwrap(),
            format!("00-{id}-{}-01", hex(&span.span_id))
        );
        seen.push(id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), malformed.len(), "every new trace has its own id");
    srv.stop().await;
}

#[tokio::test]
async fn server_errors_set_error_status_and_type() {
    let mut collector = Collector::start(vec![]).await;
    let srv = start(&collector, "").await;
    let base = format!("http://{}", srv.addr("edge"));
    for (path, status, error_type, span_error) in [
        ("/status/503", 503, Some("503"), true),
        ("/panic", 500, Some("panic"), true),
        ("/status/404", 404, None, false),
    ] {
        let resp = client(true).get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), status);
        let (_, span) = collector.next_span().await;
        let a = &span.attributes;
        assert_eq!(int_attr(a, "http.response.status_code"), i64::from(status), "{path}");
        assert_eq!(
            attr(a, "error.type").map(|_| str_attr(a, "error.type")).as_deref(),
            error_type,
            "{path}"
        );
        let code = span.status.map(|s| s.code).unwrap_or(0);
        assert_eq!(
            code == STATUS_ERROR,
            span_error,
            "{path}: a server's 4xx leaves the status unset"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn sampling_follows_the_parent_else_the_ratio() {
    let mut collector = Collector::start(vec![]).await;
    let srv = start(&collector, "sample_ratio = 0.0\n").await;
    let url = format!("http://{}/", srv.addr("edge"));
    // No parent at ratio 0, and a caller that did not sample: nothing is recorded, yet the
    // handler still gets a context to forward (unsampled).
    let resp = client(false).get(&url).send().await.unwrap();
    assert!(resp.headers()["x-traceparent"].to_str().unwrap().ends_with("-00"));
    let resp = client(false)
        .get(&url)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-00"))
        .send()
        .await
        .unwrap();
    let forwarded = resp.headers()["x-traceparent"].to_str().unwrap().to_string();
    assert!(forwarded.starts_with(&format!("00-{TRACE_ID}-")) && forwarded.ends_with("-00"));
    // A sampled caller is followed whatever the ratio.
    let sampled_trace = "0af7651916cd43dd8448eb211c80319c";
    client(false)
        .get(&url)
        .header("traceparent", format!("00-{sampled_trace}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    let (_, span) = collector.next_span().await;
    assert_eq!(hex(&span.trace_id), sampled_trace);
    // Spans are queued in order: had either unsampled request been recorded, it would be here.
    assert!(srv.wait_metric("gatehouse_trace_spans_exported_total", 1.0).await);
    assert_eq!(collector.drain_spans(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn a_503_is_retried_and_then_delivered() {
    let mut collector = Collector::start(vec![Answer::Status(503)]).await;
    let srv = start(&collector, "").await;
    let resp = client(false)
        .get(format!("http://{}/", srv.addr("edge")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, first) = collector.next_span().await;
    let (_, retried) = collector.next_span().await;
    assert_eq!(first.span_id, retried.span_id, "the same batch is sent again");
    assert!(srv.wait_metric("gatehouse_trace_spans_exported_total", 1.0).await);
    assert_eq!(
        srv.metric(r#"gatehouse_trace_export_failures_total{reason="unavailable"}"#),
        1.0
    );
    assert_eq!(
        srv.metric(r#"gatehouse_trace_spans_dropped_total{reason="export_failed"}"#),
        0.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_collector_that_keeps_failing_costs_spans_not_requests() {
    let unavailable = Collector::start(vec![Answer::Status(503); 3]).await;
    let gone = {
        // A port that was just free: nothing listens there.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let srv_503 = start(&unavailable, "").await;
    let srv_down = TestServer::start_service(&config(&gone, ""), tower::service_fn(app)).await;
    for srv in [&srv_503, &srv_down] {
        let resp = client(false)
            .get(format!("http://{}/", srv.addr("edge")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "export trouble never reaches a request");
    }
    // Three attempts each (with backoff), then the batch is dropped and counted.
    let dropped = r#"gatehouse_trace_spans_dropped_total{reason="export_failed"}"#;
    assert_eq!(wait_at_least(&srv_503, dropped, 1.0).await, 1.0);
    assert_eq!(
        srv_503.metric(r#"gatehouse_trace_export_failures_total{reason="unavailable"}"#),
        3.0
    );
    assert_eq!(wait_at_least(&srv_down, dropped, 1.0).await, 1.0);
    assert_eq!(
        srv_down.metric(r#"gatehouse_trace_export_failures_total{reason="connect"}"#),
        3.0
    );
    assert_eq!(srv_503.metric("gatehouse_trace_spans_exported_total"), 0.0);
    srv_503.stop().await;
    srv_down.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_spans() {
    let mut collector = Collector::start(vec![Answer::Hang]).await;
    let srv = start(&collector, "queue_size = 1\nbatch_size = 1\nexport_timeout = \"2s\"\n").await;
    let url = format!("http://{}/", srv.addr("edge"));
    client(false).get(&url).send().await.unwrap();
    // The exporter now waits on a collector that does not answer.
    collector.next_export().await;
    for _ in 0..4 {
        let resp = client(false).get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // One span fits in the queue; the other three are dropped.
    let full = r#"gatehouse_trace_spans_dropped_total{reason="queue_full"}"#;
    assert_eq!(wait_at_least(&srv, full, 3.0).await, 3.0);
    srv.stop().await;
}

#[tokio::test]
async fn spans_rejected_by_the_collector_are_counted() {
    let mut collector = Collector::start(vec![Answer::Reject(1)]).await;
    let srv = start(&collector, "").await;
    client(false)
        .get(format!("http://{}/", srv.addr("edge")))
        .send()
        .await
        .unwrap();
    collector.next_span().await;
    let rejected = r#"gatehouse_trace_spans_dropped_total{reason="rejected"}"#;
    assert_eq!(wait_at_least(&srv, rejected, 1.0).await, 1.0);
    assert_eq!(srv.metric("gatehouse_trace_spans_exported_total"), 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_flushes_queued_spans() {
    let mut collector = Collector::start(vec![]).await;
    // Left alone, the span would wait a minute for its batch to fill.
    let srv = start(&collector, "batch_delay = \"60s\"\n").await;
    let resp = client(false)
        .get(format!("http://{}/", srv.addr("edge")))
        .send()
        .await
        .unwrap();
    let forwarded = resp.headers()["x-traceparent"].to_str().unwrap().to_string();
    srv.stop().await;
    let (_, span) = collector.next_span().await;
    assert!(forwarded.contains(&hex(&span.trace_id)));
}

#[tokio::test]
async fn tracing_changes_wait_for_a_restart() {
    let collector = Collector::start(vec![]).await;
    let srv = start(&collector, "").await;
    let mut next = (*srv.handle.config()).clone();
    next.tracing.sample_ratio = 0.5;
    let report = srv.handle.reload(next).await.expect("reload is not refused");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.key == "tracing" && w.fix.contains("restart")),
        "{:?}",
        report.warnings
    );
    srv.stop().await;
}
