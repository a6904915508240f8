//! The reverse proxy against real upstream servers on loopback (hyper servers written here):
//! every protocol pairing, pooled reuse, forwarded headers, streaming, WebSocket, failures.

use crate::common;

use bytes::Bytes;
use common::upstream::*;
use common::{Pki, TestServer};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every header the upstream received, one `name: value` a line, plus the request line.
fn echo_head(req: &Request<Incoming>) -> String {
    let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
    for (k, v) in req.headers() {
        out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    out
}

/// Sends one request with `body` over a fresh HTTP/1.1 or h2c connection, with hyper's client.
async fn send(
    addr: SocketAddr,
    http2: bool,
    path: &str,
    body: BoxBody<Bytes, BoxError>,
) -> hyper::Result<Response<Incoming>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    if http2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post(format!("http://a{path}")).body(body).unwrap();
        s.send_request(req).await
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post(path).header("host", "a").body(body).unwrap();
        s.send_request(req).await
    }
}

#[tokio::test]
async fn every_protocol_pairing_proxies_a_request() {
    let pki = Pki::new();
    let hello = handler(|req| async move { text(format!("hello over {:?}", req.version())) });
    let h1 = Backend::start(Kind::H1, hello.clone()).await;
    let h2c = Backend::start(Kind::H2c, hello.clone()).await;
    let h2tls = Backend::start(Kind::Tls(tls_server(&pki, &["h2"])), hello.clone()).await;
    let (cert, key) = pki.leaf("proxy", &["localhost"]);
    let ca = pki.ca_path();
    let srv = TestServer::start(&format!(
        "{LISTENER}
[[listeners]]
name = \"tls\"
address = \"127.0.0.1:0\"
[listeners.tls]
cert = \"{}\"
key = \"{}\"
[[upstreams]]
name = \"one\"
servers = [\"{}\"]
[[upstreams]]
name = \"two\"
servers = [\"{}\"]
protocol = \"h2c\"
[[upstreams]]
name = \"tls\"
servers = [\"{}\"]
protocol = \"h2\"
tls = {{ server_name = \"localhost\", ca = \"{}\" }}
[[routes]]
path = \"/one\"
proxy = \"one\"
[[routes]]
path = \"/two\"
proxy = \"two\"
[[routes]]
path = \"/tls\"
proxy = \"tls\"
",
        cert.display(),
        key.display(),
        h1.addr,
        h2c.addr,
        h2tls.addr,
        ca.display()
    ))
    .await;
    let clear = srv.addr("c");
    let tls_port = srv.addr("tls").port();
    let cases = [
        (client(false), format!("http://{clear}/one"), "HTTP/1.1", "h1->h1"),
        (client(true), format!("http://{clear}/one"), "HTTP/1.1", "h2->h1"),
        (client(false), format!("http://{clear}/two"), "HTTP/2.0", "h1->h2c"),
        (
            pki.reqwest(true),
            format!("https://localhost:{tls_port}/tls"),
            "HTTP/2.0",
            "h2->h2 (TLS both sides)",
        ),
    ];
    for (c, url, upstream_version, what) in cases {
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{what}");
        assert_eq!(
            resp.text().await.unwrap(),
            format!("hello over {upstream_version}"),
            "{what}"
        );
    }
    for (up, server, protocol) in [
        ("one", h1.addr, "http/1.1"),
        ("two", h2c.addr, "h2c"),
        ("tls", h2tls.addr, "h2"),
    ] {
        assert_eq!(
            srv.metric(&series(
                "upstream_connections_opened_total",
                &format!("upstream=\"{up}\",server=\"{server}\",protocol=\"{protocol}\"")
            )),
            1.0,
            "{up}"
        );
    }
    assert_eq!(
        srv.metric(&series(
            "upstream_requests_total",
            &format!("upstream=\"one\",server=\"{}\",status=\"200\"", h1.addr)
        )),
        2.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn auto_falls_back_to_http1_and_counts_it() {
    let pki = Pki::new();
    let be = Backend::start(
        Kind::Tls(tls_server(&pki, &["http/1.1"])),
        handler(|req| async move { text(format!("{:?}", req.version())) }),
    )
    .await;
    let srv = proxy(
        &[be.addr],
        &format!(
            "protocol = \"auto\"\ntls = {{ server_name = \"localhost\", ca = \"{}\" }}",
            pki.ca_path().display()
        ),
    )
    .await;
    let c = client(true);
    for _ in 0..2 {
        let resp = c.get(format!("http://{}/", srv.addr("c"))).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "HTTP/1.1");
    }
    let server = format!("upstream=\"api\",server=\"{}\"", be.addr);
    assert_eq!(srv.metric(&series("upstream_alpn_fallback_total", &server)), 1.0);
    assert_eq!(
        srv.metric(&series(
            "upstream_connections_opened_total",
            &format!("{server},protocol=\"http/1.1\"")
        )),
        1.0
    );
    srv.stop().await;
}

/// Sends `n` sequential requests and checks that the upstream saw a handful of connections.
async fn sequential_reuse(kind: Kind, protocol: &str, http2_client: bool) {
    let be = Backend::start(kind, handler(|_| async { text("ok") })).await;
    let srv = proxy(&[be.addr], &format!("protocol = \"{protocol}\"")).await;
    let c = client(http2_client);
    let url = format!("http://{}/", srv.addr("c"));
    for _ in 0..1000 {
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap(), "ok");
    }
    let opened = srv.metric(&series(
        "upstream_connections_opened_total",
        &format!("upstream=\"api\",server=\"{}\",protocol=\"{protocol}\"", be.addr),
    ));
    let ratio = srv.metric(&series("upstream_connection_reuse_ratio", "upstream=\"api\""));
    assert!((1.0..=5.0).contains(&opened), "{protocol}: opened {opened} connections");
    assert!(ratio > 0.99, "{protocol}: reuse ratio {ratio}");
    assert_eq!(be.accepted.load(SeqCst) as f64, opened, "the upstream agrees");
    assert_eq!(
        srv.metric(&series(
            "upstream_requests_total",
            &format!("upstream=\"api\",server=\"{}\",status=\"200\"", be.addr)
        )),
        1000.0
    );
    srv.stop().await;
}

/// The series a response is counted in follow its status when the status changes from one
/// response to the next on the same upstream server and connection.
#[tokio::test]
async fn each_upstream_status_is_counted_under_its_own_label() {
    let be = Backend::start(
        Kind::H1,
        handler(|req| async move {
            let code: u16 = req.uri().path().trim_start_matches('/').parse().unwrap();
            let mut r = text("ok");
            *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
            r
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    let c = client(false);
    let statuses = [200, 404, 404, 200, 201, 200, 404];
    for status in statuses {
        let resp = c
            .get(format!("http://{}/{status}", srv.addr("c")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        resp.bytes().await.unwrap();
    }
    for (status, want) in [(200, 3.0), (404, 3.0), (201, 1.0)] {
        assert_eq!(
            srv.metric(&series(
                "upstream_requests_total",
                &format!("upstream=\"api\",server=\"{}\",status=\"{status}\"", be.addr)
            )),
            want,
            "status {status}"
        );
    }
    // One connection: every request after the first reused it.
    assert_eq!(be.accepted.load(SeqCst), 1);
    let ratio = srv.metric(&series("upstream_connection_reuse_ratio", "upstream=\"api\""));
    assert!((ratio - 6.0 / 7.0).abs() < 1e-9, "reuse ratio {ratio}");
    srv.stop().await;
}

#[tokio::test]
async fn thousand_sequential_requests_reuse_http1_connections() {
    sequential_reuse(Kind::H1, "http/1.1", false).await;
}

#[tokio::test]
async fn thousand_sequential_requests_reuse_one_h2_connection() {
    sequential_reuse(Kind::H2c, "h2c", true).await;
}

#[tokio::test]
async fn connection_close_from_upstream_is_the_counted_reason() {
    let be = Backend::start(
        Kind::H1,
        handler(|_| async {
            let mut r = text("bye");
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("close"));
            r
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    let c = client(false);
    for _ in 0..3 {
        let resp = c.get(format!("http://{}/", srv.addr("c"))).send().await.unwrap();
        // Connection is hop-by-hop: the client's connection to gatehouse stays open.
        assert!(resp.headers().get("connection").is_none());
        assert_eq!(resp.text().await.unwrap(), "bye");
    }
    let reason = |r: &str| {
        srv.metric(&series(
            "upstream_new_connection_reasons_total",
            &format!("upstream=\"api\",reason=\"{r}\""),
        ))
    };
    assert_eq!(reason("pool_empty"), 1.0);
    assert_eq!(reason("connection_close_header"), 2.0);
    assert_eq!(be.accepted.load(SeqCst), 3);
    assert_eq!(
        srv.metric(&series("upstream_connection_reuse_ratio", "upstream=\"api\"")),
        0.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn hop_by_hop_removed_and_forwarding_headers_set() {
    let be = Backend::start(
        Kind::H1,
        handler(|req| async move {
            let mut r = text(echo_head(&req));
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("x-up-hop"));
            r.headers_mut().insert("x-up-hop", http::HeaderValue::from_static("1"));
            r.headers_mut()
                .insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
            r
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    let addr = srv.addr("c");
    let resp = client(false)
        .get(format!("http://{addr}/a/b?q=1"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip, trailers")
        .header("x-forwarded-for", "203.0.113.9")
        // What a CGI-style backend would read as X-Forwarded-For.
        .header("x_forwarded_for", "6.6.6.6")
        .header("forwarded", "for=203.0.113.9")
        .header("via", "1.1 edge")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-up-hop").is_none(), "{:?}", resp.headers());
    assert!(resp.headers().get("keep-alive").is_none());
    assert_eq!(resp.headers()["via"], "1.1 gatehouse");
    let seen = resp.text().await.unwrap();
    let has = |line: &str| seen.lines().any(|l| l == line);
    assert!(seen.starts_with("GET /a/b?q=1 HTTP/1.1\n"), "{seen}");
    for line in [
        format!("host: {addr}"),
        "x-forwarded-for: 203.0.113.9, 127.0.0.1".to_string(),
        "x-forwarded-proto: http".to_string(),
        format!("forwarded: for=203.0.113.9, for=127.0.0.1;proto=http;host=\"{addr}\""),
        "via: 1.1 edge, 1.1 gatehouse".to_string(),
        "te: trailers".to_string(),
        "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
        "x-end-to-end: kept".to_string(),
    ] {
        assert!(has(&line), "upstream did not see `{line}`:\n{seen}");
    }
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "connection",
        "x_forwarded_for",
    ] {
        assert!(
            !seen.lines().any(|l| l.starts_with(&format!("{gone}:"))),
            "`{gone}` reached the upstream:\n{seen}"
        );
    }

    // HTTP/2 client: Via names the protocol received; :authority becomes Host.
    let seen = client(true)
        .get(format!("http://{addr}/h2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(seen.lines().any(|l| l == "via: 2 gatehouse"), "{seen}");
    assert!(seen.lines().any(|l| l == format!("host: {addr}")), "{seen}");

    // HTTP/1.0 may come without a Host: the HTTP/1.1 request made from it names the server it goes to.
    let answer = common::raw_exchange(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.contains("\nvia: 1.0 gatehouse\n"), "{answer}");
    assert!(answer.contains(&format!("\nhost: {}\n", be.addr)), "{answer}");
    srv.stop().await;
}

#[tokio::test]
async fn host_rewrite_and_ipv6_forwarded_quoting() {
    let be = Backend::start(Kind::H2c, handler(|req| async move { text(echo_head(&req)) })).await;
    let list = format!("\"{}\"", be.addr);
    let srv = TestServer::start(&format!(
        "[[listeners]]\nname = \"v6\"\naddress = \"[::1]:0\"\n[[upstreams]]\nname = \"api\"\nservers = [{list}]\nprotocol = \"h2c\"\nhost = \"api.internal\"\n[[routes]]\nproxy = \"api\"\n"
    ))
    .await;
    let resp = client(false)
        .get(format!("http://{}/x", srv.addr("v6")))
        .send()
        .await
        .unwrap();
    let seen = resp.text().await.unwrap();
    // HTTP/2 upstream: the rewritten host travels as :authority, which hyper shows in the URI.
    assert!(seen.starts_with("GET http://api.internal/x HTTP/2.0\n"), "{seen}");
    assert!(seen.lines().any(|l| l == "x-forwarded-for: ::1"), "{seen}");
    assert!(
        seen.lines()
            .any(|l| l.starts_with("forwarded: for=\"[::1]\";proto=http;host=")),
        "{seen}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn bodies_stream_both_ways_without_buffering() {
    // The upstream reports its first request chunk, then answers with a body whose second
    // chunk waits for the test: neither side could finish if the proxy buffered whole bodies.
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let (release_tx, release_rx) = tokio::sync::mpsc::channel::<()>(1);
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let be = Backend::start(
        Kind::H1,
        handler(move |req| {
            let first_tx = first_tx.clone();
            let release_rx = release_rx.clone();
            async move {
                let mut body = req.into_body();
                let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
                first_tx.send(first).await.unwrap();
                let mut total = 0;
                while let Some(f) = body.frame().await {
                    total += f.unwrap().into_data().map_or(0, |d| d.len());
                }
                let (tx, resp_body) = channel_body();
                tokio::spawn(async move {
                    tx.send(Ok(Frame::data(Bytes::from(format!("rest {total};")))))
                        .await
                        .unwrap();
                    release_rx.lock().await.recv().await;
                    tx.send(Ok(Frame::data(Bytes::from_static(b"done")))).await.unwrap();
                });
                Response::new(resp_body)
            }
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    for http2 in [false, true] {
        let (tx, req_body) = channel_body();
        let pending = tokio::spawn(send(srv.addr("c"), http2, "/up", req_body));
        tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), first_rx.recv())
            .await
            .expect("the upstream must get the first chunk while the client is still sending")
            .unwrap();
        assert_eq!(first, "first");
        tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 100_000]))))
            .await
            .unwrap();
        drop(tx);
        let resp = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let mut body = resp.into_body();
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the client must get the first response chunk before the upstream finished")
            .unwrap()
            .unwrap();
        assert_eq!(chunk.into_data().unwrap(), "rest 100000;");
        release_tx.send(()).await.unwrap();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "done");
    }
    srv.stop().await;
}

#[tokio::test]
async fn trailers_are_passed_on() {
    let be = Backend::start(
        Kind::H2c,
        handler(|_| async {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(b"payload")))).await.unwrap();
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                tx.send(Ok(Frame::trailers(t))).await.unwrap();
            });
            Response::new(body)
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "protocol = \"h2c\"").await;
    let tcp = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let (resp, _) = h2
        .send_request(Request::get("http://a/t").body(()).unwrap(), true)
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut data = Vec::new();
    while let Some(d) = body.data().await {
        data.extend_from_slice(&d.unwrap());
    }
    assert_eq!(data, b"payload");
    let trailers = body.trailers().await.unwrap().expect("trailers must reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    srv.stop().await;
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    // RFC 6455 §1.3's example key and its accept value: the accept the client gets proves the
    // upstream received the key unchanged.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
    let be = Backend::start(Kind::H1, websocket_echo()).await;
    let srv = proxy(&[be.addr], "").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: {KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains(&format!("sec-websocket-accept: {}", ACCEPT.to_ascii_lowercase())),
        "{head}"
    );
    assert_eq!(&echo_hello(&mut s).await, b"\x81\x05hello");
    srv.stop().await;
}

/// A WebSocket upstream (HTTP/1.1): answers the RFC 6455 handshake for whatever key it gets,
/// echoes the first subprotocol offered, then echoes one short client frame. A request without
/// `Upgrade` gets a plain 200.
fn websocket_echo() -> Handler {
    handler(|mut req| async move {
        if !req.headers().contains_key("upgrade") {
            return text("plain");
        }
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers()["connection"], "upgrade");
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(req.headers()["sec-websocket-version"], "13");
        let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
        let subprotocol = req.headers().get("sec-websocket-protocol").cloned();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on_upgrade.await.unwrap());
            // One masked client frame with a short payload, echoed unmasked.
            let mut head = [0u8; 2];
            io.read_exact(&mut head).await.unwrap();
            let len = (head[1] & 0x7f) as usize;
            let mut mask = [0u8; 4];
            io.read_exact(&mut mask).await.unwrap();
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            let mut frame = vec![0x81, len as u8];
            frame.extend_from_slice(&payload);
            io.write_all(&frame).await.unwrap();
        });
        let mut r = Response::new(BoxBody::default());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert("connection", http::HeaderValue::from_static("upgrade"));
        h.insert("upgrade", http::HeaderValue::from_static("websocket"));
        let accept = gatehouse::proxy::websocket::accept_for(&key);
        h.insert("sec-websocket-accept", accept.parse().unwrap());
        if let Some(p) = subprotocol {
            h.insert("sec-websocket-protocol", p);
        }
        r
    })
}

/// Sends "hello" as one masked text frame on `io` and returns the echoed frame.
async fn echo_hello<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut IO) -> [u8; 7] {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 5];
    frame.extend_from_slice(&mask);
    frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    io.write_all(&frame).await.unwrap();
    let mut echo = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    echo
}

#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_an_http1_upstream() {
    let be = Backend::start(Kind::H1, websocket_echo()).await;
    let srv = proxy(&[be.addr], "").await;
    let tcp = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    // A first exchange makes sure the server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrived:
    // the client may only send an extended CONNECT after it (RFC 8441 §3).
    let plain = s
        .send_request(
            Request::get("http://a/")
                .body(BoxBody::<Bytes, BoxError>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::OK);

    let connect = |protocol: &'static str| {
        Request::connect("http://a/chat")
            .extension(hyper::ext::Protocol::from_static(protocol))
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat")
            .body(BoxBody::<Bytes, BoxError>::default())
            .unwrap()
    };
    let mut resp = s.send_request(connect("websocket")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "RFC 8441 §5: a 2xx opens the tunnel");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    for hop in ["sec-websocket-accept", "upgrade", "connection"] {
        assert!(
            !resp.headers().contains_key(hop),
            "{hop} must not reach the HTTP/2 client"
        );
    }
    let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
    assert_eq!(&echo_hello(&mut io).await, b"\x81\x05hello");

    // Another extended CONNECT protocol is named and refused, on the same connection.
    let other = s.send_request(connect("connect-udp")).await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_IMPLEMENTED);
    access_log(&srv, "connect_protocol_not_proxied protocol=connect-udp").await;
    srv.stop().await;
}

#[tokio::test]
async fn websocket_upstream_with_a_wrong_accept_is_a_502() {
    let be = Backend::start(
        Kind::H1,
        handler(|_req| async move {
            let mut r = Response::new(BoxBody::default());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("upgrade"));
            r.headers_mut()
                .insert("upgrade", http::HeaderValue::from_static("websocket"));
            r.headers_mut().insert(
                "sec-websocket-accept",
                http::HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            );
            r
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    let tcp = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let _ = s
        .send_request(
            Request::get("http://a/")
                .body(BoxBody::<Bytes, BoxError>::default())
                .unwrap(),
        )
        .await;
    let resp = s
        .send_request(
            Request::connect("http://a/chat")
                .extension(hyper::ext::Protocol::from_static("websocket"))
                .header("sec-websocket-version", "13")
                .body(BoxBody::<Bytes, BoxError>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    access_log(&srv, "Sec-WebSocket-Accept does not answer").await;
    srv.stop().await;
}

#[tokio::test]
async fn upstream_killed_mid_response_aborts_the_client_and_then_502() {
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(4);
    let senders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = senders.clone();
    let be = Backend::start(
        Kind::H1,
        handler(move |_| {
            let started_tx = started_tx.clone();
            let keep = keep.clone();
            async move {
                let (tx, body) = channel_body();
                tx.send(Ok(Frame::data(Bytes::from_static(b"partial")))).await.unwrap();
                // Held open (never finished) until the backend is killed.
                keep.lock().unwrap().push(tx);
                started_tx.send(()).await.unwrap();
                Response::new(body)
            }
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    let addr = srv.addr("c");

    // HTTP/1.1 client: chunked response without its last chunk, then the connection closes.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    started_rx.recv().await.unwrap();
    // HTTP/2 client on the same upstream, also mid-response.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let (resp, _) = h2
        .send_request(Request::get("http://a/big").body(()).unwrap(), true)
        .unwrap();
    started_rx.recv().await.unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut h2_body = resp.into_body();
    assert_eq!(h2_body.data().await.unwrap().unwrap(), "partial");

    be.kill();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("gatehouse must close the client connection")
        .ok();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(text.contains("partial"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the response must not look complete:\n{text}"
    );
    let err = tokio::time::timeout(Duration::from_secs(5), h2_body.data())
        .await
        .unwrap()
        .expect("a frame or an error")
        .expect_err("the stream must be reset, not ended");
    assert_eq!(err.reason(), Some(h2::Reason::INTERNAL_ERROR), "{err}");

    let server = format!("upstream=\"api\",server=\"{}\"", be.addr);
    assert_eq!(
        srv.metric(&series(
            "upstream_errors_total",
            &format!("{server},cause=\"reset_mid_response\"")
        )),
        2.0
    );
    // The server is down now: the next request is a clean 502 that says why.
    let resp = client(false).get(format!("http://{addr}/next")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("connect_failed"));
    let log = access_log(&srv, "upstream:connect_failed").await;
    assert!(
        log.contains(&format!("upstream:connect_failed upstream=api server={}", be.addr)),
        "{log}"
    );
    assert!(log.contains("upstream:reset_mid_response upstream=api"), "{log}");
    drop(senders);
    srv.stop().await;
}

#[tokio::test]
async fn response_header_timeout_answers_504() {
    let be = Backend::start(
        Kind::H1,
        handler(|_| async {
            std::future::pending::<()>().await;
            text("never")
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "response_header_timeout = \"300ms\"").await;
    for http2 in [false, true] {
        let started = std::time::Instant::now();
        let resp = client(http2)
            .get(format!("http://{}/slow", srv.addr("c")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 504);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(resp.text().await.unwrap().contains("response_header_timeout"));
    }
    assert_eq!(
        srv.metric(&series(
            "upstream_errors_total",
            &format!(
                "upstream=\"api\",server=\"{}\",cause=\"response_header_timeout\"",
                be.addr
            )
        )),
        2.0
    );
    access_log(&srv, "upstream:response_header_timeout upstream=api").await;
    srv.stop().await;
}

#[tokio::test]
async fn client_going_away_cancels_the_upstream_request() {
    let (outcome_tx, mut outcome_rx) = tokio::sync::mpsc::channel::<&'static str>(2);
    let (got_tx, mut got_rx) = tokio::sync::mpsc::channel::<()>(2);
    let be = Backend::start(
        Kind::H1,
        handler(move |req| {
            let (outcome_tx, got_tx) = (outcome_tx.clone(), got_tx.clone());
            async move {
                let mut body = req.into_body();
                let mut told = false;
                let outcome = loop {
                    match body.frame().await {
                        Some(Ok(_)) if !told => {
                            told = true;
                            got_tx.send(()).await.unwrap();
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) => break "body_error",
                        None => break "complete",
                    }
                };
                outcome_tx.send(outcome).await.unwrap();
                text("late")
            }
        }),
    )
    .await;
    let srv = proxy(&[be.addr], "").await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 1000000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), got_rx.recv())
        .await
        .expect("the upstream must receive the start of the body")
        .unwrap();
    drop(s);
    let outcome = tokio::time::timeout(Duration::from_secs(5), outcome_rx.recv())
        .await
        .expect("the upstream must see its request end when the client goes away")
        .unwrap();
    assert_eq!(outcome, "body_error");
    let cancelled = series(
        "upstream_requests_total",
        &format!("upstream=\"api\",server=\"{}\",status=\"cancelled\"", be.addr),
    );
    assert!(
        srv.wait_metric(&cancelled, 1.0).await,
        "{}",
        srv.handle.metrics.encode()
    );
    // Not an upstream failure.
    let errors = srv.handle.metrics.encode();
    assert!(!errors.contains("gatehouse_upstream_errors_total{"), "{errors}");
    srv.stop().await;
}

#[tokio::test]
async fn reload_moves_traffic_to_the_new_servers_and_closes_idle_old_connections() {
    let a = Backend::start(Kind::H1, handler(|_| async { text("a") })).await;
    let b = Backend::start(Kind::H1, handler(|_| async { text("b") })).await;
    let srv = proxy(&[a.addr], "").await;
    let url = format!("http://{}/", srv.addr("c"));
    let c = client(false);
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "a");
    assert_eq!(a.open.load(SeqCst), 1, "the connection to a is pooled");

    let mut next = (*srv.handle.config()).clone();
    next.upstreams[0].servers = vec![b.addr.to_string()];
    let report = srv.handle.reload(next).await.unwrap();
    assert!(
        report.changed.contains(&"upstreams".to_string()),
        "{:?}",
        report.changed
    );
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "b");
    for _ in 0..500 {
        if a.open.load(SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.open.load(SeqCst),
        0,
        "the idle connection to the removed server must close"
    );
    srv.stop().await;
}

#[tokio::test]
async fn idle_upstream_connections_close_after_idle_timeout() {
    let be = Backend::start(Kind::H1, handler(|_| async { text("ok") })).await;
    let srv = proxy(&[be.addr], "idle_timeout = \"200ms\"").await;
    let url = format!("http://{}/", srv.addr("c"));
    let c = client(false);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    for _ in 0..500 {
        if be.open.load(SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(be.open.load(SeqCst), 0, "gatehouse must close the idle connection");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        srv.metric(&series(
            "upstream_new_connection_reasons_total",
            "upstream=\"api\",reason=\"idle_timeout\""
        )),
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn balancing_spreads_requests_over_servers() {
    let a = Backend::start(Kind::H1, handler(|_| async { text("a") })).await;
    let b = Backend::start(Kind::H1, handler(|_| async { text("b") })).await;
    for balance in ["round_robin", "least_requests", "p2c_ewma"] {
        let srv = proxy(&[a.addr, b.addr], &format!("balance = \"{balance}\"")).await;
        let c = client(false);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..40 {
            let t = c
                .get(format!("http://{}/", srv.addr("c")))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            *seen.entry(t).or_insert(0) += 1;
        }
        if balance == "round_robin" {
            assert_eq!(seen.get("a"), Some(&20), "{balance}: {seen:?}");
        } else {
            // Sequential requests leave both idle, so either may be chosen; both must be used
            // only for least_requests (ties rotate); p2c picks by latency, so just count them.
            assert_eq!(seen.values().sum::<i32>(), 40, "{balance}: {seen:?}");
            if balance == "least_requests" {
                assert!(seen.len() == 2, "{balance}: {seen:?}");
            }
        }
        srv.stop().await;
    }
}

/// nginx as the upstream, the third-party server gatehouse is most often put in front of:
/// its `keepalive_requests` limit ends an HTTP/1.1 connection with `Connection: close` and an
/// HTTP/2 one with GOAWAY. 300 sequential requests over each reuse a handful of connections,
/// none fails, and every new connection is counted with the reason nginx gave.
#[tokio::test]
async fn nginx_upstream_keepalive_limits_are_followed_and_counted() {
    use crate::common::nginx::{free_port, version, Nginx};
    let (h1, h2) = (free_port(), free_port());
    let h2_listen = if version() >= vec![1, 25, 1] {
        format!("listen 127.0.0.1:{h2};\n http2 on;")
    } else {
        format!("listen 127.0.0.1:{h2} http2;")
    };
    let _nginx = Nginx::start(
        &format!(
            "keepalive_requests 100;\n\
             server {{ listen 127.0.0.1:{h1}; location / {{ return 200 \"nginx h1\\n\"; }} }}\n\
             server {{ {h2_listen} location / {{ return 200 \"nginx h2\\n\"; }} }}"
        ),
        &[h1, h2],
    )
    .await;
    let srv = TestServer::start(&format!(
        "{LISTENER}\
         [[upstreams]]\nname = \"one\"\nservers = [\"127.0.0.1:{h1}\"]\nprotocol = \"http/1.1\"\n\
         [[upstreams]]\nname = \"two\"\nservers = [\"127.0.0.1:{h2}\"]\nprotocol = \"h2c\"\n\
         [[routes]]\npath = \"/one\"\nproxy = \"one\"\n\
         [[routes]]\npath = \"/two\"\nproxy = \"two\"\n"
    ))
    .await;
    let c = client(false);
    for (path, body) in [("one", "nginx h1\n"), ("two", "nginx h2\n")] {
        for i in 0..300 {
            let resp = c
                .get(format!("http://{}/{path}/{i}", srv.addr("c")))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "request {i} to {path}");
            assert_eq!(resp.text().await.unwrap(), body);
        }
    }
    let reason = |upstream: &str, r: &str| {
        srv.metric(&series(
            "upstream_new_connection_reasons_total",
            &format!("upstream=\"{upstream}\",reason=\"{r}\""),
        ))
    };
    assert_eq!(reason("one", "pool_empty"), 1.0);
    assert_eq!(
        reason("one", "connection_close_header"),
        2.0,
        "nginx closes after 100 requests"
    );
    assert_eq!(reason("two", "pool_empty"), 1.0);
    assert_eq!(reason("two", "goaway"), 2.0, "nginx sends GOAWAY after 100 streams");
    srv.stop().await;
}
