//! Connection lifecycle on real sockets: max requests per connection, panics, timeouts, paths.

use crate::common;

use common::{raw_exchange, TestServer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLEAR: &str = "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n";

#[tokio::test]
async fn max_requests_closes_http1_with_connection_close() {
    let srv = TestServer::start(&format!(
        "{CLEAR}[limits]\nmax_requests_per_connection = 2\n[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    // Pipelined: both requests in one write; the second answer must carry Connection: close.
    s.write_all(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("server must close")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let responses: Vec<&str> = text.split("http/1.1 200").skip(1).collect();
    assert_eq!(responses.len(), 2, "{text}");
    assert!(!responses[0].contains("connection: close"), "{text}");
    assert!(responses[1].contains("connection: close"), "{text}");
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="max_requests"}"#,
            1.0
        )
        .await
    );
    srv.stop().await;
}

#[tokio::test]
async fn max_requests_sends_goaway_on_http2() {
    let srv = TestServer::start(&format!(
        "{CLEAR}[limits]\nmax_requests_per_connection = 2\n[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let conn_task = tokio::spawn(connection);
    for i in 0..2 {
        let req = http::Request::get(format!("http://a/{i}")).body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        while let Some(chunk) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.unwrap().len());
        }
    }
    // After the GOAWAY, the client's connection finishes cleanly on its own.
    let done = tokio::time::timeout(Duration::from_secs(5), conn_task)
        .await
        .expect("GOAWAY must end the connection");
    assert!(done.unwrap().is_ok());
    assert!(
        srv.wait_metric(
            r#"gatehouse_h2_goaway_sent_total{listener="c",reason="max_requests"}"#,
            1.0
        )
        .await
    );
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="max_requests"}"#,
            1.0
        )
        .await
    );
    srv.stop().await;
}

#[tokio::test]
async fn static_refuses_traversal_and_symlink_escapes() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    std::fs::write(root.path().join("ok.txt"), "fine").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), root.path().join("escape.txt")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("escape-dir")).unwrap();
    let srv = TestServer::start(&format!("{CLEAR}[[routes]]\nstatic = \"{}\"\n", root.path().display())).await;
    let addr = srv.addr("c");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
    assert!(raw_exchange(addr, get("/ok.txt").as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/escape.txt",
        "/escape-dir/secret.txt",
        "/a/%2E%2E/%2e%2e/secret.txt",
    ] {
        let resp = raw_exchange(addr, get(path).as_bytes()).await;
        assert!(!resp.contains("secret"), "{path} leaked: {resp}");
        assert!(
            resp.starts_with("HTTP/1.1 404") || resp.starts_with("HTTP/1.1 400"),
            "{path}: {resp}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn first_request_and_idle_timeouts_close_with_named_reasons() {
    let srv = TestServer::start(&format!(
        "{CLEAR}[timeouts]\nfirst_request = \"300ms\"\nidle = \"300ms\"\nheader_read = \"300ms\"\n[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
    ))
    .await;
    let addr = srv.addr("c");
    // Each close must come near the configured 300ms, not early: an instant close with the right
    // reason would mean the deadline is computed wrongly.
    let near = |t: std::time::Instant| {
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(250) && e < Duration::from_millis(2000),
            "closed after {e:?}"
        );
    };
    // Never sends a byte.
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut b))
        .await
        .expect("closed by server")
        .unwrap_or(0);
    assert_eq!(n, 0);
    near(started);
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="first_request_timeout"}"#,
            1.0
        )
        .await
    );
    // One request, then silence: idle timeout.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .expect("closed by server")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    near(started);
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="idle_timeout"}"#,
            1.0
        )
        .await
    );
    // Half a request head, then silence: header timeout (slowloris).
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .expect("closed by server")
        .unwrap();
    near(started);
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="header_timeout"}"#,
            1.0
        )
        .await
    );
    assert_eq!(
        srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="header_read"}"#),
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_the_connection_keeps_serving() {
    use gatehouse::{Config, Server};
    let config = Config::from_toml(&format!(
        "{CLEAR}[log]\naccess_log = \"off\"\n[admin]\naddress = \"\"\n"
    ))
    .unwrap();
    let server = Server::bind(config).unwrap().without_signal_handling();
    let addr = server.local_addr("c").unwrap();
    let handle = server.handle();
    let svc = tower::service_fn(|req: http::Request<gatehouse::RequestBody>| async move {
        if req.uri().path() == "/panic" {
            panic!("handler bug");
        }
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
            "fine",
        ))))
    });
    let task = tokio::spawn(server.serve(svc));

    // HTTP/1.1: the 500 keeps the connection usable.
    answers_500_then_serves(addr, "/panic").await;

    // HTTP/2: the other stream on the same connection is served.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let (bad, _) = client
        .send_request(http::Request::get("http://a/panic").body(()).unwrap(), true)
        .unwrap();
    let (good, _) = client
        .send_request(http::Request::get("http://a/ok").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(bad.await.unwrap().status(), 500);
    assert_eq!(good.await.unwrap().status(), 200);
    assert_eq!(
        handle
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("gatehouse_panics_total{"))
            .unwrap(),
        r#"gatehouse_panics_total{listener="c"} 2"#
    );
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `GET {path}` answers 500 and the next request on the same HTTP/1.1 connection is served
/// ("fine", from the test's handler).
async fn answers_500_then_serves(addr: std::net::SocketAddr, path: &str) {
    let both =
        format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\nGET /ok HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
    let resp = raw_exchange(addr, both.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 500"), "{resp}");
    assert!(resp.contains("HTTP/1.1 200") && resp.ends_with("fine"), "{resp}");
}

/// A handler service whose readiness the test controls, and whose `call` itself (not its future)
/// panics on `/panic-in-call`.
#[derive(Clone, Default)]
struct Gated {
    state: std::sync::Arc<GatedState>,
}

#[derive(Default)]
struct GatedState {
    open: std::sync::atomic::AtomicBool,
    refuse: std::sync::atomic::AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
    /// Signalled each time a request finds the service not ready.
    asked: tokio::sync::Notify,
}

impl tower::Service<http::Request<gatehouse::RequestBody>> for Gated {
    type Response = http::Response<http_body_util::Full<bytes::Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.state.refuse.load(SeqCst) {
            return std::task::Poll::Ready(Err(std::io::Error::other("not taking requests")));
        }
        if self.state.open.load(SeqCst) {
            return std::task::Poll::Ready(Ok(()));
        }
        *self.state.waker.lock().unwrap() = Some(cx.waker().clone());
        self.state.asked.notify_one();
        std::task::Poll::Pending
    }

    fn call(&mut self, req: http::Request<gatehouse::RequestBody>) -> Self::Future {
        // tower's contract: `call` only after `poll_ready` said ready.
        assert!(
            self.state.open.load(std::sync::atomic::Ordering::SeqCst),
            "called before ready"
        );
        if req.uri().path() == "/panic-in-call" {
            panic!("bug in call");
        }
        std::future::ready(Ok(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
            "fine",
        )))))
    }
}

/// The pipeline calls a ready handler at once; one that is not ready is polled again with the
/// connection's waker until it is, one that refuses answers 500, and a panic in `call` itself is
/// a 500 like a panic in its future.
#[tokio::test]
async fn a_handler_that_is_not_ready_is_waited_for_and_one_that_refuses_answers_500() {
    use std::sync::atomic::Ordering::SeqCst;
    let gated = Gated::default();
    let state = gated.state.clone();
    let srv = TestServer::start_service(&format!("{CLEAR}[log]\naccess_log = \"off\"\n"), gated).await;
    let addr = srv.addr("c");

    // Not ready: the request waits, and is answered once the service wakes the connection.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let asked = state.asked.notified();
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .expect("the pipeline asks the service whether it is ready");
    state.open.store(true, SeqCst);
    let waker = state.waker.lock().unwrap().take().expect("a waker was left");
    waker.wake();
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !String::from_utf8_lossy(&head).ends_with("fine") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("answered once the service is ready")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&b[..n]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));

    // A panic in `call`, then a normal request on the same connection.
    answers_500_then_serves(addr, "/panic-in-call").await;
    assert_eq!(srv.metric(r#"gatehouse_panics_total{listener="c"}"#), 1.0);

    // Refusing: 500, counted as a handler error.
    state.refuse.store(true, SeqCst);
    let resp = raw_exchange(addr, b"GET /ok HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 500"), "{resp}");
    assert!(
        srv.wait_metric(
            r#"gatehouse_requests_total{listener="c",protocol="http/1.1",method="GET",status="500"}"#,
            2.0
        )
        .await
    );
    srv.stop().await;
}
