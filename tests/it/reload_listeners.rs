//! Listener changes on reload, on real sockets: a new listener binds and answers, a removed one
//! stops accepting and drains its connections alone, a moved one does both, an address in use
//! refuses the whole reload; and certificate files that change on disk are reloaded by themselves.

use crate::common::{self, tls_connect, Pki, TestServer};
use bytes::Bytes;
use gatehouse::lifecycle::reload::ListenerMove;
use gatehouse::lifecycle::ReloadError;
use http_body_util::{BodyExt, Empty};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const GENEROUS: Duration = Duration::from_secs(10);
/// The two halves of the slow download: the first is sent at once, the second when the gate opens.
const HALF: usize = 64 * 1024;

type SlowBody = http_body_util::StreamBody<
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Send>>,
>;

/// Answers `/slow` with HALF bytes, then (once `gate` opens) HALF more; anything else with "ok".
fn service(gate: watch::Receiver<bool>) -> impl gatehouse::HttpService<SlowBody> {
    tower::service_fn(move |req: http::Request<gatehouse::RequestBody>| {
        let gate = gate.clone();
        async move {
            let stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = _> + Send>> = if req.uri().path() == "/slow" {
                Box::pin(futures_util::stream::unfold(
                    (0u8, gate),
                    |(step, mut gate)| async move {
                        match step {
                            0 => Some((Ok(Frame::data(Bytes::from(vec![b'a'; HALF]))), (1, gate))),
                            1 => {
                                let _ = gate.wait_for(|open| *open).await;
                                Some((Ok(Frame::data(Bytes::from(vec![b'b'; HALF]))), (2, gate)))
                            }
                            _ => None,
                        }
                    },
                ))
            } else {
                Box::pin(futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"ok")))]))
            };
            let mut resp = http::Response::new(http_body_util::StreamBody::new(stream));
            if req.uri().path() != "/slow" {
                resp.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from_static("2"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    })
}

fn two_listeners(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [[listeners]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n{extra}"
    )
}

/// The running configuration without listener `name`.
fn without(srv: &TestServer, name: &str) -> gatehouse::Config {
    let mut next = (*srv.handle.config()).clone();
    next.listeners.retain(|l| l.name != name);
    next
}

/// `GET /` on a fresh HTTP/1.1 connection: (status, body).
async fn get(addr: SocketAddr) -> (u16, String) {
    let answer = common::raw_exchange(addr, b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").await;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A free loopback address (bound, then released for the server to take).
pub(crate) fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A kept-alive HTTP/1.1 client connection and the task driving it (it ends when the server closes).
async fn h1_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

/// `GET /` on a kept-alive HTTP/1.1 connection: the body.
async fn get_on(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, host: &str) -> Bytes {
    let resp = sender
        .send_request(http::Request::get("/").header("host", host).body(Empty::new()).unwrap())
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// An h2c (prior knowledge) client connection and the task driving it.
async fn h2_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

/// Starts `GET /slow` and waits for its first half: the download is in flight.
async fn start_slow(
    send: impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
) -> (hyper::body::Incoming, usize) {
    let resp = tokio::time::timeout(GENEROUS, send).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    while got < HALF {
        let frame = tokio::time::timeout(GENEROUS, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got += frame.data_ref().map_or(0, |d| d.len());
    }
    (body, got)
}

/// Reads the rest of a body; returns the total.
async fn finish(mut body: hyper::body::Incoming, mut got: usize) -> usize {
    while let Some(frame) = tokio::time::timeout(GENEROUS, body.frame())
        .await
        .expect("download stalled")
    {
        got += frame.expect("download cut").data_ref().map_or(0, |d| d.len());
    }
    got
}

fn slow_request(authority: SocketAddr) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!("http://{authority}/slow"))
        .header("host", authority.to_string())
        .body(Empty::new())
        .unwrap()
}

/// Polls the metrics (bounded by GENEROUS) until `series` equals `want`.
async fn wait_metric(srv: &TestServer, series: &str, want: f64) -> bool {
    let deadline = Instant::now() + GENEROUS;
    while Instant::now() < deadline {
        if srv.metric(series) == want {
            return true;
        }
        // Metrics have no change notification; poll the observable value.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_reload_adds_a_listener_that_answers_over_http1_and_h2c() {
    let (_open, gate) = watch::channel(true);
    let srv = TestServer::start_service(&two_listeners(""), service(gate)).await;
    let mut next = (*srv.handle.config()).clone();
    let mut extra = next.listeners[0].clone();
    extra.name = "extra".into();
    next.listeners.push(extra);
    let report = srv.handle.reload(next).await.unwrap();

    let addr = srv.handle.local_addr("extra").expect("the new listener is in force");
    assert_ne!(addr.port(), 0);
    assert_eq!(report.listeners.added.len(), 1, "{:?}", report.listeners);
    assert_eq!(report.listeners.added[0].name, "extra");
    assert_eq!(report.listeners.added[0].address, addr);
    assert!(report.listeners.removed.is_empty() && report.listeners.moved.is_empty());
    assert_eq!(report.changed, ["listeners.extra"]);

    assert_eq!(get(addr).await, (200, "ok".to_string()));
    let (mut h2, _conn) = h2_client(addr).await;
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{addr}/"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    // Metrics carry the new listener's name.
    assert_eq!(
        srv.metric(r#"gatehouse_connections_accepted_total{listener="extra"}"#),
        2.0
    );
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="ok"}"#), 1.0);
    // The listeners that were there keep serving.
    assert_eq!(get(srv.addr("a")).await.0, 200);
    assert_eq!(get(srv.addr("b")).await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn a_removed_listener_refuses_new_connections_and_its_downloads_finish() {
    let (open, gate) = watch::channel(false);
    let srv = TestServer::start_service(&two_listeners(""), service(gate)).await;
    let (a, b) = (srv.addr("a"), srv.addr("b"));
    // On `a`, a keep-alive connection that must not notice anything.
    let (mut keep, _keep_conn) = h1_client(a).await;
    assert_eq!(get_on(&mut keep, "a").await, "ok");
    // On `b`, one download per protocol, each half done.
    let (mut h1, h1_conn) = h1_client(b).await;
    let (h1_body, h1_got) = start_slow(h1.send_request(slow_request(b))).await;
    let (mut h2, h2_conn) = h2_client(b).await;
    let (h2_body, h2_got) = start_slow(h2.send_request(slow_request(b))).await;
    // And an idle HTTP/1.1 keep-alive, parked with nothing but its socket.
    let (mut idle, idle_conn) = h1_client(b).await;
    assert_eq!(get_on(&mut idle, "b").await, "ok");

    let report = srv.handle.reload(without(&srv, "b")).await.unwrap();
    assert_eq!(report.listeners.removed.len(), 1, "{:?}", report.listeners);
    assert_eq!(
        (
            report.listeners.removed[0].name.as_str(),
            report.listeners.removed[0].address
        ),
        ("b", b)
    );
    assert_eq!(report.changed, ["listeners.b"]);
    // Once the reload has answered, the port is closed.
    let refused = TcpStream::connect(b).await;
    assert!(refused.is_err(), "the removed listener still accepts");
    assert_eq!(srv.handle.local_addr("b"), None);
    // The HTTP/2 client was told with GOAWAY; both downloads are still in flight.
    assert!(
        wait_metric(
            &srv,
            r#"gatehouse_h2_goaway_sent_total{listener="b",reason="shutdown"}"#,
            1.0
        )
        .await
    );
    // The idle one is closed at once, while the downloads are still held.
    tokio::time::timeout(GENEROUS, idle_conn)
        .await
        .expect("idle HTTP/1.1 connection left open")
        .unwrap();
    open.send(true).unwrap();
    assert_eq!(finish(h1_body, h1_got).await, 2 * HALF, "HTTP/1.1 download incomplete");
    assert_eq!(finish(h2_body, h2_got).await, 2 * HALF, "HTTP/2 download incomplete");
    // Then the server closes both connections, as a drain does.
    tokio::time::timeout(GENEROUS, h1_conn)
        .await
        .expect("HTTP/1.1 connection left open")
        .unwrap();
    drop(h2);
    tokio::time::timeout(GENEROUS, h2_conn)
        .await
        .expect("HTTP/2 connection left open")
        .unwrap();
    assert!(
        wait_metric(
            &srv,
            r#"gatehouse_connections_closed_total{listener="b",reason="shutdown"}"#,
            3.0
        )
        .await
    );
    assert_eq!(
        srv.metric(r#"gatehouse_connections_closed_total{listener="b",reason="drain_forced"}"#),
        0.0
    );
    // `a` served on throughout, on its old connection and on new ones; the server is not draining.
    assert_eq!(get_on(&mut keep, "a").await, "ok");
    assert_eq!(get(a).await, (200, "ok".to_string()));
    assert!(srv.handle.is_ready());
    srv.stop().await;
}

#[tokio::test]
async fn a_removed_listener_closes_what_is_left_at_drain_timeout() {
    let (_never, gate) = watch::channel(false);
    let srv = TestServer::start_service(&two_listeners("[shutdown]\ndrain_timeout = \"300ms\"\n"), service(gate)).await;
    let b = srv.addr("b");
    let (mut h1, h1_conn) = h1_client(b).await;
    let (body, got) = start_slow(h1.send_request(slow_request(b))).await;
    srv.handle.reload(without(&srv, "b")).await.unwrap();
    // The second half never comes: the listener's drain deadline closes the connection.
    tokio::time::timeout(GENEROUS, h1_conn)
        .await
        .expect("not closed at the deadline")
        .unwrap();
    let mut body = body;
    let cut = loop {
        match tokio::time::timeout(GENEROUS, body.frame())
            .await
            .expect("body neither ended nor failed")
        {
            Some(Ok(_)) => continue,
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(
        cut,
        "the body of a forced-closed download must not look complete ({got} bytes)"
    );
    assert!(
        wait_metric(
            &srv,
            r#"gatehouse_connections_closed_total{listener="b",reason="drain_forced"}"#,
            1.0
        )
        .await
    );
    // Only `b` drained: `a` serves, and the server is still ready.
    assert_eq!(get(srv.addr("a")).await, (200, "ok".to_string()));
    assert!(srv.handle.is_ready());
    srv.stop().await;
}

#[tokio::test]
async fn moving_a_listener_binds_the_new_address_and_drains_the_old() {
    let srv = TestServer::start(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n\
         [[routes]]\nrespond = { status = 200, body = \"here\" }\n",
    )
    .await;
    let old = srv.addr("web");
    // An idle keep-alive connection on the old address.
    let mut idle = TcpStream::connect(old).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(GENEROUS, idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let new = free_addr();
    let mut next = (*srv.handle.config()).clone();
    next.listeners[0].address = new;
    let report = srv.handle.reload(next).await.unwrap();
    assert_eq!(
        report.listeners.moved,
        [ListenerMove {
            name: "web".into(),
            from: old,
            to: new
        }]
    );
    assert_eq!(srv.handle.local_addr("web"), Some(new));
    assert_eq!(get(new).await, (200, "here".to_string()));
    assert!(TcpStream::connect(old).await.is_err(), "the old address still accepts");
    // The idle connection on the old address is closed by the drain.
    let closed = tokio::time::timeout(GENEROUS, idle.read(&mut buf))
        .await
        .expect("idle connection left open");
    assert!(matches!(closed, Ok(0) | Err(_)));
    assert!(
        wait_metric(
            &srv,
            r#"gatehouse_connections_closed_total{listener="web",reason="shutdown"}"#,
            1.0
        )
        .await
    );
    assert_eq!(
        srv.metric(r#"gatehouse_connections_accepted_total{listener="web"}"#),
        2.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn an_address_in_use_refuses_the_whole_reload() {
    let srv = TestServer::start(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n\
         [[routes]]\nrespond = { status = 200, body = \"old\" }\n",
    )
    .await;
    let web = srv.addr("web");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let text = format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n\
         [[listeners]]\nname = \"extra\"\naddress = \"{busy}\"\n\
         [[routes]]\nrespond = {{ status = 200, body = \"new\" }}\n"
    );
    let mut next = gatehouse::Config::from_toml(&text).unwrap();
    next.server.state_dir = srv.handle.config().server.state_dir.clone();
    next.log = srv.handle.config().log.clone();
    next.admin.address = String::new();
    let err = srv.handle.reload(next).await.unwrap_err();
    let ReloadError::Invalid(findings) = &err else {
        panic!("expected findings, got {err}")
    };
    let f = findings
        .iter()
        .find(|f| f.key == "listeners[1].address")
        .unwrap_or_else(|| panic!("{findings}"));
    assert!(
        f.problem.contains(&busy.to_string()) && f.problem.contains("address already in use"),
        "{f}"
    );
    // Nothing changed: the old route, the old listener set, the old configuration.
    assert_eq!(get(web).await, (200, "old".to_string()));
    assert_eq!(srv.handle.local_addr("extra"), None);
    assert_eq!(srv.handle.config().listeners.len(), 1);
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="refused"}"#), 1.0);
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="ok"}"#), 0.0);
    drop(taken);
    srv.stop().await;
}

/// The leaf certificate (DER) of a PEM chain file.
fn leaf_der(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).unwrap();
    CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().to_vec()
}

/// The leaf certificate a new handshake gets.
async fn presented(addr: SocketAddr, pki: &Pki) -> Vec<u8> {
    let tls = tls_connect(addr, "localhost", pki.client_config(&["http/1.1"]))
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Polls new handshakes until they present `want` (bounded by GENEROUS).
async fn wait_presented(addr: SocketAddr, pki: &Pki, want: &[u8]) -> bool {
    let deadline = Instant::now() + GENEROUS;
    while Instant::now() < deadline {
        if presented(addr, pki).await == want {
            return true;
        }
        // The watcher acts on its own schedule; what a client observes is the handshake.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Copies a freshly issued pair into `dir` as tls.crt and tls.key; returns the leaf (DER).
fn issue_into(pki: &Pki, stem: &str, dir: &std::path::Path) -> Vec<u8> {
    let (cert, key) = pki.leaf(stem, &["localhost"]);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(&cert, dir.join("tls.crt")).unwrap();
    common::write_key(&dir.join("tls.key"), &std::fs::read_to_string(&key).unwrap());
    leaf_der(&cert)
}

#[tokio::test]
async fn watched_certificates_reload_when_replaced_and_a_broken_replacement_is_refused() {
    let pki = Pki::new();
    // The layout of a Kubernetes Secret volume: the configured paths go through a `live` symlink
    // that an update swaps, atomically, to a new directory.
    let root = tempfile::tempdir().unwrap();
    let first = issue_into(&pki, "one", &root.path().join("v1"));
    std::os::unix::fs::symlink("v1", root.path().join("live")).unwrap();
    let (cert, key) = (root.path().join("live/tls.crt"), root.path().join("live/tls.key"));
    let srv = TestServer::start(&format!(
        "[server]\nwatch_certificates = \"200ms\"\n\
         [[listeners]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n",
        cert.display(),
        key.display()
    ))
    .await;
    let addr = srv.addr("secure");
    assert_eq!(presented(addr, &pki).await, first);

    // The swap: no reload is asked for; new handshakes get the new certificate.
    let second = issue_into(&pki, "two", &root.path().join("v2"));
    std::os::unix::fs::symlink("v2", root.path().join("live.new")).unwrap();
    std::fs::rename(root.path().join("live.new"), root.path().join("live")).unwrap();
    assert!(
        wait_presented(addr, &pki, &second).await,
        "the new certificate was never presented; reloads: ok {} refused {}",
        srv.metric(r#"gatehouse_reloads_total{result="ok"}"#),
        srv.metric(r#"gatehouse_reloads_total{result="refused"}"#)
    );
    assert!(wait_metric(&srv, r#"gatehouse_reloads_total{result="ok"}"#, 1.0).await);

    // A broken replacement, written in place: refused, and the certificate in force keeps serving.
    std::fs::write(root.path().join("v2/tls.crt"), "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    assert!(wait_metric(&srv, r#"gatehouse_reloads_total{result="refused"}"#, 1.0).await);
    assert_eq!(presented(addr, &pki).await, second);
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="ok"}"#), 1.0);
    assert_eq!(get_tls_ok(addr, &pki).await, "ok");

    // Fixed in place (certificate, then key): tried again, and applied once both are written.
    let third = issue_into(&pki, "three", &root.path().join("v2"));
    assert!(
        wait_presented(addr, &pki, &third).await,
        "the fixed certificate was never presented"
    );
    assert!(wait_metric(&srv, r#"gatehouse_reloads_total{result="ok"}"#, 2.0).await);
    srv.stop().await;
}

/// `GET /` over TLS and HTTP/1.1: the body.
async fn get_tls_ok(addr: SocketAddr, pki: &Pki) -> String {
    let mut tls = tls_connect(addr, "localhost", pki.client_config(&["http/1.1"]))
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(GENEROUS, tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text)
}

/// `GET /` over HTTP/1.1, blocking: the body.
pub(crate) fn get_blocking(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(out)
}

/// `POST /reload` on the admin API: (status, JSON answer).
pub(crate) fn post_reload(admin: SocketAddr) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    s.write_all(b"POST /reload HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[test]
fn a_socket_activated_listener_cannot_move_and_the_admin_api_reports_listener_changes() {
    use crate::common::binary::Gatehouse;
    let config = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n[log]\naccess_log = \"off\"\n\
                  [[routes]]\nrespond = { status = 200, body = \"hello\" }\n";
    let ports = tempfile::tempdir().unwrap();
    let port_file = ports.path().join("port");
    let pf = port_file.clone();
    let g = Gatehouse::start_with(config, "info", move |c| {
        *c = crate::systemd::activate(c, &pf, "web");
    });
    let web = g.addr("web");
    let file = g.dir.path().join("gatehouse.toml");
    let admin = format!("\n[admin]\naddress = \"{}\"\n", g.admin);

    // Moving the passed socket's listener is refused: only the service manager can bind there.
    let moved = config.replace("127.0.0.1:0", &free_addr().to_string());
    std::fs::write(&file, format!("{moved}{admin}")).unwrap();
    let (status, answer) = post_reload(g.admin);
    assert_eq!(status, 422, "{answer}");
    let findings = answer["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["key"] == "listeners[0].address"
            && f["message"].as_str().unwrap().contains("socket activation")),
        "{answer}"
    );
    assert_eq!(get_blocking(web), "hello");

    // Adding a listener next to it works, and the answer says so.
    let added = format!("{config}[[listeners]]\nname = \"extra\"\naddress = \"127.0.0.1:0\"\n{admin}");
    std::fs::write(&file, added).unwrap();
    let (status, answer) = post_reload(g.admin);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["listeners"]["added"][0]["name"], "extra", "{answer}");
    let extra: SocketAddr = answer["listeners"]["added"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get_blocking(extra), "hello");
    assert_eq!(get_blocking(web), "hello");
    assert!(g.wait_log("configuration reloaded", GENEROUS), "{}", g.log());
    assert!(g.log().contains("added extra"), "{}", g.log());
}
