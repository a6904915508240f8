//! The Prometheus exposition: exact counter movements for a known mix of traffic, and
//! `promtool check metrics` accepting the output.

use crate::common;

use common::{tls_connect, Pki, TestServer};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every sample of a text exposition: series (name and labels, as written) to value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

const N_H1: usize = 3;
const M_H2: usize = 2;

#[tokio::test]
async fn counters_move_by_exactly_the_traffic_sent() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = format!(
        "[[listeners]]\nname = \"clear\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [[listeners]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"h2\", \"http/1.1\"]\n\
         [listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [timeouts]\nheader_read = \"300ms\"\n\
         [[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n",
        cert.display(),
        key.display()
    );
    let srv = TestServer::start(&toml).await;
    let before = samples(&srv.handle.metrics.encode_text());

    // N HTTP/1.1 requests on one keep-alive connection, which stays open.
    let mut h1 = tokio::net::TcpStream::connect(srv.addr("clear")).await.unwrap();
    for _ in 0..N_H1 {
        assert_eq!(h1_exchange(&mut h1).await, "ok");
    }
    // M HTTP/2 requests over TLS (ALPN h2), one connection.
    let h2 = pki.reqwest(true);
    let tls_port = srv.addr("tls").port();
    for _ in 0..M_H2 {
        let r = h2.get(format!("https://localhost:{tls_port}/")).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    // A TLS client that offers no ALPN: served HTTP/1.1, counted as a fallback.
    let mut tls = tls_connect(srv.addr("tls"), "localhost", pki.client_config(&[]))
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("the server closes after Connection: close")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    // A request head that never ends: header_read fires and closes the connection.
    let mut slow = tokio::net::TcpStream::connect(srv.addr("clear")).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
        .await
        .expect("header_read closes the connection")
        .unwrap();

    let closed = r#"gatehouse_connections_closed_total{listener="clear",reason="header_timeout"}"#;
    let want: &[(&str, f64)] = &[
        (
            r#"gatehouse_requests_total{listener="clear",protocol="http/1.1",method="GET",status="200"}"#,
            N_H1 as f64,
        ),
        (
            r#"gatehouse_requests_total{listener="tls",protocol="h2",method="GET",status="200"}"#,
            M_H2 as f64,
        ),
        (
            r#"gatehouse_requests_total{listener="tls",protocol="http/1.1",method="GET",status="200"}"#,
            1.0,
        ),
        (
            r#"gatehouse_request_duration_seconds_count{listener="clear",protocol="http/1.1"}"#,
            N_H1 as f64,
        ),
        (
            r#"gatehouse_request_duration_seconds_count{listener="tls",protocol="h2"}"#,
            M_H2 as f64,
        ),
        // The keep-alive connection and the slow one.
        (r#"gatehouse_connections_accepted_total{listener="clear"}"#, 2.0),
        // The h2 connection and the no-ALPN one.
        (r#"gatehouse_connections_accepted_total{listener="tls"}"#, 2.0),
        (
            r#"gatehouse_tls_handshakes_total{listener="tls",result="ok",tls_version="1.3",alpn="h2"}"#,
            1.0,
        ),
        (
            r#"gatehouse_tls_handshakes_total{listener="tls",result="ok",tls_version="1.3",alpn="none"}"#,
            1.0,
        ),
        (
            r#"gatehouse_alpn_fallback_total{listener="tls",reason="client_offered_none"}"#,
            1.0,
        ),
        (r#"gatehouse_timeouts_total{listener="clear",kind="header_read"}"#, 1.0),
        (closed, 1.0),
    ];
    // Each figure is recorded as its event completes, which may trail what the client saw.
    for (series, n) in want {
        let target = before.get(*series).copied().unwrap_or(0.0) + n;
        assert!(
            srv.wait_metric(series, target).await,
            "{series} should be {target}:\n{}",
            srv.handle.metrics.encode_text()
        );
    }
    let after = samples(&srv.handle.metrics.encode_text());
    // Nothing else moved: no other timeout, fallback, rejection or panic.
    for (series, value) in &after {
        let counted = want.iter().any(|(s, _)| s == series);
        let watched = [
            "gatehouse_timeouts_total",
            "gatehouse_alpn_fallback_total",
            "gatehouse_connections_rejected_total",
            "gatehouse_panics_total",
            "gatehouse_requests_total",
        ]
        .iter()
        .any(|m| series.starts_with(m));
        if watched && !counted {
            assert_eq!(
                *value - before.get(series).copied().unwrap_or(0.0),
                0.0,
                "unexpected movement of {series}"
            );
        }
    }
    drop(h1);
    // `after` was taken while both clients' connections were open and idle: the gauge saw them.
    assert_eq!(
        after
            .get(r#"gatehouse_connections_open{listener="clear",protocol="http/1.1",state="idle"}"#)
            .copied(),
        Some(1.0)
    );
    assert_eq!(
        after
            .get(r#"gatehouse_connections_open{listener="tls",protocol="h2",state="idle"}"#)
            .copied(),
        Some(1.0)
    );
    srv.stop().await;
}

/// A connection remembers the request series it counted last; requests that change method,
/// status or protocol on the same connection, or finish at once on concurrent HTTP/2 streams,
/// must each still land in their own series.
#[tokio::test]
async fn one_connection_counts_each_request_under_its_own_labels() {
    let toml = "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [[routes]]\npath = \"/a\"\nrespond = { status = 200, body = \"a\" }\n\
         [[routes]]\npath = \"/b\"\nrespond = { status = 410, body = \"b\" }\n";
    let srv = TestServer::start(toml).await;
    let before = samples(&srv.handle.metrics.encode_text());

    // HTTP/1.1, one connection, written as one pipelined batch: each request's status or method
    // differs from the one before it.
    let batch = [
        "GET /a",
        "GET /b",
        "HEAD /a",
        "GET /a",
        "GET /nowhere",
        "GET /a",
        "GET /b",
    ]
    .iter()
    .map(|r| format!("{r} HTTP/1.1\r\nhost: x\r\n\r\n"))
    .collect::<String>()
        + "GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(batch.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server closes after the last request")
        .unwrap();
    let statuses: Vec<&str> = String::from_utf8_lossy(&out)
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .map(|b| std::str::from_utf8(b).unwrap())
        .collect();
    assert_eq!(statuses, ["200", "410", "200", "200", "404", "200", "410", "200"]);

    // h2c, one connection, 12 streams at once over three routes.
    let tcp = tokio::net::TcpStream::connect(srv.addr("c")).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut waiting = Vec::new();
    for i in 0..12 {
        let path = ["/a", "/b", "/nowhere"][i % 3];
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://x{path}")).body(()).unwrap();
        waiting.push(client.send_request(req, true).unwrap().0);
    }
    for (i, resp) in waiting.into_iter().enumerate() {
        let resp = resp.await.unwrap();
        assert_eq!(resp.status().as_u16(), [200, 410, 404][i % 3]);
        let mut body = resp.into_body();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
    }
    drop(client);
    let _ = conn.await;

    let series = |protocol: &str, method: &str, status: u16| {
        format!(r#"gatehouse_requests_total{{listener="c",protocol="{protocol}",method="{method}",status="{status}"}}"#)
    };
    let want = [
        (series("http/1.1", "GET", 200), 4.0),
        (series("http/1.1", "HEAD", 200), 1.0),
        (series("http/1.1", "GET", 410), 2.0),
        (series("http/1.1", "GET", 404), 1.0),
        (series("h2c", "GET", 200), 4.0),
        (series("h2c", "GET", 410), 4.0),
        (series("h2c", "GET", 404), 4.0),
        (
            r#"gatehouse_request_duration_seconds_count{listener="c",protocol="http/1.1"}"#.to_string(),
            8.0,
        ),
        (
            r#"gatehouse_request_duration_seconds_count{listener="c",protocol="h2c"}"#.to_string(),
            12.0,
        ),
    ];
    // Counted as each response body ends: wait for the last before reading them all.
    assert!(
        srv.wait_metric(&want[8].0, 12.0).await,
        "{}",
        srv.handle.metrics.encode_text()
    );
    let after = samples(&srv.handle.metrics.encode_text());
    for (series, n) in &want {
        let moved = after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0);
        assert_eq!(moved, *n, "{series}");
    }
    srv.stop().await;
}

/// One GET on a keep-alive HTTP/1.1 connection; returns the body (read by its Content-Length).
async fn h1_exchange(s: &mut tokio::net::TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return body[..len].to_string();
            }
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response within 10s")
            .unwrap();
        assert!(n > 0, "connection closed mid-response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs `promtool check metrics` over `text`; returns (success, what it printed).
fn promtool(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (.ci/run installs the Debian package `prometheus`)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[tokio::test]
async fn promtool_accepts_the_exposition_without_warnings() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = format!(
        "[[listeners]]\nname = \"clear\"\naddress = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n",
        cert.display(),
        key.display()
    );
    let srv = TestServer::start(&toml).await;
    // Traffic, so that every family has samples with labels (histograms, counters, gauges).
    let r = pki
        .reqwest(true)
        .get(format!("https://localhost:{}/", srv.addr("tls").port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = pki
        .reqwest(false)
        .get(format!("http://{}/missing", srv.addr("clear")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = srv.handle.metrics.encode_text();
    for family in [
        "gatehouse_requests_total",
        "gatehouse_request_duration_seconds_bucket",
        "gatehouse_connections_open",
        "gatehouse_ready",
        "gatehouse_reloads_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.contains(&format!("\n{family}")), "{family} missing:\n{text}");
    }
    let (ok, printed) = promtool(&text);
    assert!(ok, "promtool refused the exposition:\n{printed}\n{text}");
    assert!(printed.trim().is_empty(), "promtool warnings:\n{printed}");
    // The process figures are the real ones: this very process, read from /proc.
    let s = samples(&text);
    assert!(s["process_resident_memory_bytes"] > 1e6);
    assert!(s["process_open_fds"] >= 3.0 && s["process_open_fds"] <= s["process_max_fds"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = s["process_start_time_seconds"];
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "start {started}, now {now}"
    );
    srv.stop().await;
}
