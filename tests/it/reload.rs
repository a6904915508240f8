//! Hot reload on real sockets: certificates, routes, timeouts and limits change without a restart;
//! a bad configuration is refused and the old one keeps serving.

use crate::common;

use bytes::Bytes;
use common::{tls_connect, Pki, TestServer};
use gatehouse::config::{Size, Span};
use gatehouse::lifecycle::ReloadError;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The leaf certificate (DER) at the head of the chain in a PEM file.
fn leaf_der(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).unwrap();
    CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().to_vec()
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn presented(tls: &TlsStream) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn h1_get(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> (u16, Bytes) {
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn h2_get(sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>) -> (u16, Bytes) {
    let req = http::Request::get("https://localhost/").body(Empty::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn reload_presents_a_new_certificate_to_new_handshakes_and_keeps_existing_connections() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let first = leaf_der(&cert);
    let toml = format!(
        "[[listeners]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n",
        cert.display(),
        key.display()
    );
    let srv = TestServer::start(&toml).await;
    let addr = srv.addr("secure");

    // Two keep-alive connections opened before the reload, one per protocol.
    let h1_tls = tls_connect(addr, "localhost", pki.client_config(&["http/1.1"]))
        .await
        .unwrap();
    assert_eq!(presented(&h1_tls), first);
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(h1_tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(h1_get(&mut h1).await, (200, Bytes::from("ok")));
    let h2_tls = tls_connect(addr, "localhost", pki.client_config(&["h2"]))
        .await
        .unwrap();
    assert_eq!(presented(&h2_tls), first);
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(h2_get(&mut h2).await, (200, Bytes::from("ok")));

    // Rotate the files in place (as certbot or cert-manager do), then reload the same configuration.
    let (new_cert, new_key) = pki.leaf("rotated", &["localhost"]);
    let second = leaf_der(&new_cert);
    assert_ne!(first, second);
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    let report = srv.handle.reload((*srv.handle.config()).clone()).await.unwrap();
    assert_eq!(report.changed, ["listeners.secure.tls"]);

    let fresh = tls_connect(addr, "localhost", pki.client_config(&["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(
        presented(&fresh),
        second,
        "a new handshake must see the new certificate"
    );
    drop(fresh);
    // The connections opened before still work, on the certificate they negotiated.
    assert_eq!(h1_get(&mut h1).await, (200, Bytes::from("ok")));
    assert_eq!(h2_get(&mut h2).await, (200, Bytes::from("ok")));
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="ok"}"#), 1.0);

    // A broken certificate is refused, naming the key, and the rotated one keeps serving.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let err = srv.handle.reload((*srv.handle.config()).clone()).await.unwrap_err();
    let ReloadError::Invalid(findings) = &err else {
        panic!("expected findings, got {err}")
    };
    assert!(findings.iter().any(|f| f.key == "listeners[0].tls.cert"), "{findings}");
    let after = tls_connect(addr, "localhost", pki.client_config(&["h2"]))
        .await
        .unwrap();
    assert_eq!(presented(&after), second);
    assert_eq!(h1_get(&mut h1).await, (200, Bytes::from("ok")));
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="refused"}"#), 1.0);
    assert_eq!(srv.metric(r#"gatehouse_reloads_total{result="ok"}"#), 1.0);
    srv.stop().await;
}

/// Reads until the server closes the connection, or `limit`; true when it closed.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = Vec::new();
    matches!(tokio::time::timeout(limit, s.read_to_end(&mut buf)).await, Ok(Ok(_)))
}

async fn post(addr: SocketAddr, body_len: usize) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; body_len]).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn reloaded_timeouts_and_limits_apply_to_new_connections() {
    let srv = TestServer::start(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n\
         [[routes]]\nrespond = { status = 200, body = \"ok\" }\n",
    )
    .await;
    let addr = srv.addr("web");
    assert!(post(addr, 4096).await.starts_with("HTTP/1.1 200"));

    let mut next = (*srv.handle.config()).clone();
    next.timeouts.first_request = Span::millis(300);
    next.limits.max_body_bytes = Size::kib(1);
    next.limits.max_connections_per_ip = 1;
    let report = srv.handle.reload(next).await.unwrap();
    assert_eq!(report.changed, ["timeouts", "limits"]);

    // The body limit: the same request is now refused before the handler runs.
    let answer = post(addr, 4096).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // The first-request timeout: a silent connection is closed well before the old 10s default.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let opened = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(opened.elapsed() >= Duration::from_millis(250), "{:?}", opened.elapsed());
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="web",reason="first_request_timeout"}"#,
            1.0
        )
        .await
    );
    // The per-address limit: with one connection open, a second from the same address is refused.
    // Closed connections release their place just after the close is seen, so retry until one
    // connection is admitted and answers on keep-alive.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut held = loop {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        if matches!(n, Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200")) {
            break s;
        }
        assert!(Instant::now() < deadline, "no connection was admitted");
    };
    let series = r#"gatehouse_connections_rejected_total{listener="web",reason="per_ip"}"#;
    let refused_before = srv.metric(series);
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut second, Duration::from_secs(5)).await);
    assert!(srv.wait_metric(series, refused_before + 1.0).await);
    // The admitted connection is unaffected.
    held.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), held.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&rest));
    srv.stop().await;
}

/// One blocking HTTP/1.1 exchange; (status, body). The admin API and `respond` routes answer with
/// a Content-Length, so reading to the close after `connection: close` yields the whole body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// Polls `GET /` until it answers `want` (bounded); returns the last body seen.
fn wait_body(addr: SocketAddr, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(addr, "GET", "/");
        if body == want || Instant::now() > deadline {
            return body;
        }
        // A signal's effect has no event the client can await; poll the observable answer.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http(admin, "GET", "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn config(body: &str) -> String {
    format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n[log]\naccess_log = \"off\"\n\
         [[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n\
         [[routes]]\nrespond = {{ status = 200, body = \"{body}\" }}\n"
    )
}

#[test]
fn sighup_admin_and_cli_reload_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gatehouse.toml");
    std::fs::write(&file, config("one")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["serve", "--log-format", "text", "-c"])
        .arg(&file)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The startup report names the bound addresses; the admin line comes last.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (mut web, mut admin) = (None, None);
    let mut startup = String::new();
    while admin.is_none() {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server exited:\n{startup}");
        startup.push_str(&line);
        let mut words = line.split_whitespace();
        match words.next() {
            Some("web") => web = words.next().and_then(|a| a.parse::<SocketAddr>().ok()),
            Some("admin") => {
                admin = line
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            }
            _ => {}
        }
    }
    let logs = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let (web, admin) = (web.expect(&startup), admin.unwrap());
    // Readiness is reported only once the signal handlers are installed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http(web, "GET", "/").1, "one");
    assert_eq!(metric(admin, r#"gatehouse_reloads_total{result="refused"}"#), 0.0);

    // SIGHUP re-reads the file.
    std::fs::write(&file, config("two")).unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert_eq!(wait_body(web, "two"), "two");
    assert_eq!(metric(admin, r#"gatehouse_reloads_total{result="ok"}"#), 1.0);

    // POST /reload answers what changed.
    std::fs::write(&file, config("three")).unwrap();
    let (status, answer) = http(admin, "POST", "/reload");
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["result"], "ok");
    assert_eq!(v["changed"], serde_json::json!(["routes"]));
    assert_eq!(http(web, "GET", "/").1, "three");

    // `gatehouse reload` does the same through the admin API.
    std::fs::write(&file, config("four")).unwrap();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("reload")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let admin_arg = admin.to_string();
    let out = cli(&["--admin", &admin_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("reload ok: changed routes"), "{stdout}");
    assert_eq!(http(web, "GET", "/").1, "four");

    // An invalid file: refused by both, with the key; the previous configuration keeps serving.
    std::fs::write(&file, config("five") + "[timeouts]\nidle = \"0s\"\n").unwrap();
    let (status, answer) = http(admin, "POST", "/reload");
    assert_eq!(status, 422, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["result"], "refused");
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["key"] == "timeouts.idle"),
        "{answer}"
    );
    let out = cli(&["--admin", &admin_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("timeouts.idle") && stderr.contains("refused"),
        "{stderr}"
    );
    assert_eq!(http(web, "GET", "/").1, "four");
    assert_eq!(metric(admin, r#"gatehouse_reloads_total{result="refused"}"#), 2.0);
    assert_eq!(metric(admin, r#"gatehouse_reloads_total{result="ok"}"#), 3.0);

    // Nothing listening: the admin API is unavailable, exit 69.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = cli(&["--admin", &closed.to_string()]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));

    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert_eq!(common::wait_exit(&mut child, Duration::from_secs(15)).code(), Some(0));
    let logs = logs.join().unwrap();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(logs.contains("reload refused"), "{logs}");
}

#[tokio::test]
async fn a_library_service_is_kept_across_reloads() {
    let toml = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n[admin]\naddress = \"\"\n[log]\naccess_log = \"off\"\n";
    let server = gatehouse::Server::bind(gatehouse::Config::from_toml(toml).unwrap())
        .unwrap()
        .without_signal_handling();
    let addr = server.local_addr("web").unwrap();
    let handle = server.handle();
    let app = tower::service_fn(|_req: http::Request<gatehouse::RequestBody>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("mine")))
    });
    let task = tokio::spawn(server.serve(app));

    let next =
        format!("{toml}[timeouts]\nidle = \"5s\"\n[[routes]]\nrespond = {{ status = 200, body = \"theirs\" }}\n");
    let report = handle
        .reload(gatehouse::Config::from_toml(&next).unwrap())
        .await
        .unwrap();
    // The routes are not what this server serves, so they are not reported as applied.
    assert_eq!(report.changed, ["timeouts"]);
    assert_eq!(handle.config().timeouts.idle, Span::secs(5));
    let answer = common::raw_exchange(addr, b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await;
    assert!(answer.ends_with("mine"), "{answer}");

    // Given in code, there is no file to re-read: refused, and counted.
    let err = handle.reload_from_source().await.unwrap_err();
    assert!(matches!(err, ReloadError::Unavailable(_)), "{err}");
    let metrics = handle.metrics.encode();
    assert!(
        metrics.contains("gatehouse_reloads_total{result=\"refused\"} 1"),
        "{metrics}"
    );
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The startup report is printed only once the signal handlers are in: a SIGHUP sent the moment
/// the report names the admin API reloads the server, where SIGHUP's default action would have
/// ended it. Several starts, since the window this closes was a few milliseconds wide.
#[test]
fn a_signal_sent_as_soon_as_the_startup_report_appears_is_handled() {
    for _ in 0..5 {
        let mut g = common::binary::Gatehouse::start(
            "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
             [[routes]]\nrespond = { status = 200, body = \"hi\\n\" }\n",
        );
        // Straight from this process: a `kill` command would take longer to start than the
        // window did.
        let pid = rustix::process::Pid::from_raw(g.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
        assert!(g.wait_log("reload requested", Duration::from_secs(10)), "{}", g.log());
        assert!(g.is_running(), "{}", g.log());
    }
}
