//! Every `[timeouts]` phase on real sockets: what the client sees, the close reason and the counter.
//!
//! `first_request`, `idle` and the first request's `header_read` are covered in connections.rs.

use crate::common;

use bytes::Bytes;
use common::{tls_connect, Pki, TestServer};
use http_body_util::BodyExt;
use std::convert::Infallible;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLEAR: &str = "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n";

/// Size of `/big`: more than any loopback socket buffers can hold, so a client that does not read
/// blocks the server's writes.
const BIG: usize = 32 << 20;
/// Size of `/medium`: what a slow reader takes a few seconds to read.
const MEDIUM: usize = 192 << 10;
const CHUNK: usize = 16 << 10;

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// `/echo` reads the whole body and answers its length (or 500 if reading failed: the pipeline
/// must replace that answer); `/slow` takes 5s; `/big` and `/medium` stream that many bytes.
async fn handle(req: http::Request<gatehouse::RequestBody>) -> Result<http::Response<TestBody>, Infallible> {
    let full = |status: u16, text: String| {
        let mut r = http::Response::new(http_body_util::Full::new(Bytes::from(text)).boxed_unsync());
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        Ok(r)
    };
    match req.uri().path() {
        "/echo" => match req.into_body().collect().await {
            Ok(b) => full(200, format!("{}", b.to_bytes().len())),
            Err(e) => full(500, format!("body failed: {e}")),
        },
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            full(200, "late".into())
        }
        "/big" | "/medium" => {
            let total = if req.uri().path() == "/big" { BIG } else { MEDIUM };
            let chunk = Bytes::from(vec![b'x'; CHUNK]);
            let frames = (0..total / CHUNK).map(move |_| Ok(http_body::Frame::data(chunk.clone())));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let mut r = http::Response::new(body.boxed_unsync());
            r.headers_mut().insert("content-length", total.into());
            Ok(r)
        }
        _ => full(200, "ok".into()),
    }
}

async fn start(extra: &str) -> TestServer {
    TestServer::start_service(&format!("{CLEAR}{extra}"), tower::service_fn(handle)).await
}

/// Waits up to `within` for a metric series to reach `want`.
async fn wait_for(srv: &TestServer, series: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = srv.metric(series);
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {v}, want {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) for an access log line containing `needle`.
async fn access_log_line(srv: &TestServer, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&srv.access_log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line with {needle}:\n{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads until the server closes; fails if it has not within `within`.
async fn read_until_closed(s: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut out))
        .await
        .expect("the server must close the connection")
        .unwrap_or_default();
    out
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns it as text.
async fn read_h1_response(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed mid-response: {text}");
        buf.extend_from_slice(&b[..n]);
    }
}

async fn h2c_client(
    srv: &TestServer,
    builder: &h2::client::Builder,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    let (client, connection) = builder.handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

#[tokio::test]
async fn body_read_timeout_answers_408_and_closes_http1() {
    let srv = start("[timeouts]\nbody_read = \"400ms\"\n").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let out = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 408"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(elapsed >= Duration::from_millis(350), "answered after {elapsed:?}");
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="c",reason="body_timeout"}"#,
        1.0,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="body_read"}"#),
        1.0
    );
    let line = access_log_line(&srv, "\"/echo\"").await;
    assert!(line.contains(r#""status":408"#), "{line}");
    assert!(line.contains(r#""error":"timeout:body_read""#), "{line}");
    assert!(line.contains(r#""bytes_in":10"#), "{line}");
    srv.stop().await;
}

#[tokio::test]
async fn a_steady_request_body_is_not_cut_by_the_body_read_timeout() {
    let srv = start("[timeouts]\nbody_read = \"400ms\"\n").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n")
        .await
        .unwrap();
    // Ten bytes over about a second: every gap is well under the timeout, the total is not.
    for b in b"0123456789" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let resp = read_h1_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n10"), "{resp}");
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="body_read"}"#),
        0.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn body_read_timeout_answers_408_on_an_http2_stream_and_the_connection_serves_on() {
    let srv = start("[timeouts]\nbody_read = \"400ms\"\n").await;
    let (mut client, conn_task) = h2c_client(&srv, &h2::client::Builder::new()).await;
    let req = http::Request::post("http://a/echo").body(()).unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"0123456789"), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(resp.status(), 408);
    // The same connection serves the next request.
    let (next, _) = client
        .send_request(http::Request::get("http://a/").body(()).unwrap(), true)
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(next.status(), 200);
    assert!(!conn_task.is_finished());
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="body_read"}"#),
        1.0
    );
    assert_eq!(
        srv.metric(r#"gatehouse_connections_closed_total{listener="c",reason="body_timeout"}"#),
        0.0
    );
    let line = access_log_line(&srv, r#""status":408"#).await;
    assert!(line.contains(r#""error":"timeout:body_read""#), "{line}");
    assert!(line.contains(r#""protocol":"h2c""#), "{line}");
    srv.stop().await;
}

#[tokio::test]
async fn write_timeout_closes_a_client_that_stops_reading() {
    let srv = start("[timeouts]\nwrite = \"500ms\"\n").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    // Reads nothing: the socket buffers fill and the server's writes block.
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="c",reason="write_timeout"}"#,
        1.0,
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="write"}"#),
        1.0
    );
    // What the server did send ends short of the body: the close was abrupt, as it must be.
    let out = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(out.starts_with(b"HTTP/1.1 200"));
    assert!(out.len() < BIG, "received {} bytes", out.len());
    let line = access_log_line(&srv, "\"/big\"").await;
    assert!(line.contains(r#""error":"timeout:write""#), "{line}");
    srv.stop().await;
}

#[tokio::test]
async fn write_timeout_closes_a_tls_client_that_stops_reading() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = format!(
        "[[listeners]]\nname = \"t\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n[timeouts]\nwrite = \"500ms\"\n",
        cert.display(),
        key.display()
    );
    let srv = TestServer::start_service(&toml, tower::service_fn(handle)).await;
    let mut tls = tls_connect(srv.addr("t"), "localhost", pki.client_config(&["http/1.1"]))
        .await
        .unwrap();
    tls.write_all(b"GET /big HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="t",reason="write_timeout"}"#,
        1.0,
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="t",kind="write"}"#),
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn zero_window_stall_is_closed_after_write_timeout() {
    let srv = start("[timeouts]\nwrite = \"500ms\"\n").await;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(0);
    let (mut client, conn_task) = h2c_client(&srv, &b).await;
    // The stall cannot start before the request is sent; timing from the headers' arrival
    // instead would count the client's own scheduling delay against the server.
    let started = Instant::now();
    let (resp, _) = client
        .send_request(http::Request::get("http://a/big").body(()).unwrap(), true)
        .unwrap();
    // Headers are not flow-controlled, so they arrive; no DATA can until we open the window,
    // which this client never does. Its socket keeps reading, so the server's never blocks.
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("headers arrive")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = tokio::time::timeout(Duration::from_secs(8), conn_task)
        .await
        .expect("the server must close the stalled connection");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(500), "closed after {elapsed:?}");
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="c",reason="write_timeout"}"#,
        1.0,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="write"}"#),
        1.0
    );
    drop(resp);
    srv.stop().await;
}

#[tokio::test]
async fn a_slow_but_steady_reader_is_not_cut_by_the_write_timeout() {
    let srv = start("[timeouts]\nwrite = \"500ms\"\n").await;
    // HTTP/2: an 8 KiB stream window, opened again 8 KiB at a time every 100ms, so the
    // response keeps waiting on the peer (about 2.4s in all) yet never for long.
    let mut b = h2::client::Builder::new();
    b.initial_window_size(8 << 10).initial_connection_window_size(1 << 20);
    let (mut client, conn_task) = h2c_client(&srv, &b).await;
    let (resp, _) = client
        .send_request(http::Request::get("http://a/medium").body(()).unwrap(), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the stream is not cut");
        got += chunk.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    assert_eq!(got, MEDIUM);
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(!conn_task.is_finished());
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="write"}"#),
        0.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn header_read_timeout_applies_to_every_request_on_a_keepalive_connection() {
    let srv = start("[timeouts]\nheader_read = \"300ms\"\nidle = \"10s\"\n").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let first = read_h1_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The second request's head never ends. `idle` is far away: only `header_read` can close this.
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n").await.unwrap();
    let started = Instant::now();
    let rest = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}"
    );
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="c",reason="header_timeout"}"#,
        1.0,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="header_read"}"#),
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn tls_handshake_timeout_closes_a_silent_tls_client() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = format!(
        "[[listeners]]\nname = \"t\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"h2\", \"http/1.1\"]\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n[timeouts]\ntls_handshake = \"300ms\"\n",
        cert.display(),
        key.display()
    );
    let srv = TestServer::start_service(&toml, tower::service_fn(handle)).await;
    // Connects and never sends a ClientHello.
    let mut s = tokio::net::TcpStream::connect(srv.addr("t")).await.unwrap();
    let started = Instant::now();
    let out = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(out.is_empty());
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}"
    );
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="t",reason="handshake_timeout"}"#,
        1.0,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="t",kind="tls_handshake"}"#),
        1.0
    );
    assert_eq!(
        srv.metric(r#"gatehouse_tls_handshakes_total{listener="t",result="timeout",tls_version="none",alpn="none"}"#),
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn request_timeout_answers_504() {
    let srv = start("[timeouts]\nrequest = \"300ms\"\n").await;
    // HTTP/1.1: 504, and the connection stays usable.
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let resp = read_h1_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    assert!(read_h1_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // HTTP/2: 504 on that stream.
    let (mut client, _conn) = h2c_client(&srv, &h2::client::Builder::new()).await;
    let (resp, _) = client
        .send_request(http::Request::get("http://a/slow").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 504);
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="request"}"#),
        2.0
    );
    assert_eq!(
        srv.metric(r#"gatehouse_requests_total{listener="c",protocol="http/1.1",method="GET",status="504"}"#),
        1.0
    );
    let line = access_log_line(&srv, r#""status":504"#).await;
    assert!(line.contains(r#""error":"timeout:request""#), "{line}");
    srv.stop().await;
}

/// One HTTP/2 frame header: (length, type, flags, stream id).
fn frame_header(buf: &[u8]) -> (usize, u8, u8, u32) {
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
    (len, buf[3], buf[4], id)
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

#[tokio::test]
async fn http2_peer_that_never_answers_ping_is_closed() {
    let srv = start("[timeouts]\nidle = \"10s\"\nfirst_request = \"10s\"\n[http2]\nkeepalive_interval = \"300ms\"\nkeepalive_timeout = \"300ms\"\n").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = Instant::now();
    // Frame by frame: ACK the server's SETTINGS, note its PING, never answer it.
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let mut pinged = false;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("the server must close the connection")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&b[..n]);
        while buf.len() >= 9 {
            let (len, kind, flags, _) = frame_header(&buf);
            if buf.len() < 9 + len {
                break;
            }
            if kind == SETTINGS && flags & ACK == 0 {
                s.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.unwrap();
            }
            if kind == PING && flags & ACK == 0 {
                pinged = true;
            }
            buf.drain(..9 + len);
        }
    }
    let elapsed = started.elapsed();
    assert!(pinged, "the server must have sent a PING");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}"
    );
    wait_for(
        &srv,
        r#"gatehouse_connections_closed_total{listener="c",reason="idle_timeout"}"#,
        1.0,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="idle"}"#), 1.0);
    srv.stop().await;
}
