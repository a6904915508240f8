//! Protocol selection on real sockets: HTTP/1.1, h2 over TLS, h2c, ALPN policy and SNI.

use crate::common;

use common::{tls_connect, Pki, TestServer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_listener(name: &str, protocols: &str, extra: &str, cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nprotocols = {protocols}\n{extra}\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

fn static_site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<h1>home</h1>\n").unwrap();
    std::fs::write(dir.path().join("data.txt"), "0123456789abcdefghij").unwrap();
    std::fs::write(dir.path().join("large.bin"), large_file()).unwrap();
    dir
}

/// Larger than the open-file cache keeps and several read chunks long, with no repeating
/// pattern a chunk boundary error could hide in.
fn large_file() -> Vec<u8> {
    (0..300_007u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[tokio::test]
async fn static_file_over_http1_h2_and_h2c() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let site = static_site();
    let toml = format!(
        "{}\n[[listeners]]\nname = \"clear\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n[[routes]]\nstatic = \"{}\"\n",
        tls_listener("tls", "[\"h2\", \"http/1.1\"]", "", &cert, &key),
        site.path().display()
    );
    let srv = TestServer::start(&toml).await;
    let tls_port = srv.addr("tls").port();
    let clear = srv.addr("clear");

    for (client, url, version) in [
        (
            pki.reqwest(false),
            format!("https://localhost:{tls_port}/data.txt"),
            reqwest::Version::HTTP_11,
        ),
        (
            pki.reqwest(true),
            format!("https://localhost:{tls_port}/data.txt"),
            reqwest::Version::HTTP_2,
        ),
        (
            pki.reqwest(false),
            format!("http://{clear}/data.txt"),
            reqwest::Version::HTTP_11,
        ),
        (
            pki.reqwest(true),
            format!("http://{clear}/data.txt"),
            reqwest::Version::HTTP_2,
        ),
    ] {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.version(), version, "{url}");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "20");
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        let etag = resp.headers()["etag"].clone();
        assert_eq!(resp.text().await.unwrap(), "0123456789abcdefghij");
        let ranged = client.get(&url).header("range", "bytes=2-5").send().await.unwrap();
        assert_eq!(ranged.status(), 206);
        assert_eq!(ranged.headers()["content-range"], "bytes 2-5/20");
        assert_eq!(ranged.text().await.unwrap(), "2345");
        let cond = client.get(&url).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(cond.status(), 304);

        // A file streamed in chunks arrives whole, and a range across chunk boundaries exactly.
        let large = large_file();
        let url = url.replace("data.txt", "large.bin");
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "300007");
        assert!(resp.bytes().await.unwrap() == large[..], "{url}: body differs");
        let ranged = client
            .get(&url)
            .header("range", "bytes=65000-200000")
            .send()
            .await
            .unwrap();
        assert_eq!(ranged.status(), 206);
        assert_eq!(ranged.headers()["content-range"], "bytes 65000-200000/300007");
        assert!(
            ranged.bytes().await.unwrap() == large[65000..=200000],
            "{url}: range differs"
        );
    }
    assert_eq!(
        srv.metric(r#"gatehouse_requests_total{listener="tls",protocol="h2",method="GET",status="200"}"#),
        2.0
    );
    assert_eq!(
        srv.metric(r#"gatehouse_requests_total{listener="clear",protocol="h2c",method="GET",status="206"}"#),
        2.0
    );
    srv.stop().await;
}

/// Reads one HTTP/1.1 response with a Content-Length body: its head and its body.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> (String, Vec<u8>) {
    use tokio::io::AsyncBufReadExt;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).await.unwrap() > 0,
            "connection closed in a head: {head}"
        );
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("no content-length: {head}"))
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.unwrap();
    (head, body)
}

/// Cleartext HTTP/1.1 sends files with `sendfile`. Pipelined file responses, a range and a
/// reader with a tiny receive buffer (so the server's sends stop part way and wait) get exactly
/// the files' bytes, and the connection carries on after them.
#[tokio::test]
async fn sendfile_responses_are_the_files_bytes_through_a_slow_reader() {
    let site = static_site();
    // Larger than a socket's send buffer can hold, so the server must wait for the reader.
    let big: Vec<u8> = (0..5_000_021u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    std::fs::write(site.path().join("big.bin"), &big).unwrap();
    let toml = format!(
        "[[listeners]]\nname = \"clear\"\naddress = \"127.0.0.1:0\"\n[[routes]]\nstatic = \"{}\"\n",
        site.path().display()
    );
    let srv = TestServer::start(&toml).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(srv.addr("clear")).await.unwrap();
    conn.write_all(
        b"GET /big.bin HTTP/1.1\r\nhost: a\r\n\r\n\
          GET /large.bin HTTP/1.1\r\nhost: a\r\nrange: bytes=65000-300006\r\n\r\n\
          GET /big.bin HTTP/1.1\r\nhost: a\r\nrange: bytes=262143-262144\r\n\r\n",
    )
    .await
    .unwrap();
    let mut r = tokio::io::BufReader::with_capacity(1024, conn);
    let (head, body) = read_response(&mut r).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body == big, "big.bin differs");
    let (head, body) = read_response(&mut r).await;
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert!(body == large_file()[65000..], "the range of large.bin differs");
    let (head, body) = read_response(&mut r).await;
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert_eq!(body, big[262_143..=262_144]);
    // The big file went out through `sendfile`, not through a copy (the other two responses may
    // have too, when their chunks were cached).
    // (A kernel without cachestat(2), before Linux 6.5, copies instead, and says so.)
    let file = std::fs::File::open(site.path().join("big.bin")).unwrap();
    let kernel_can_tell = !matches!(
        gatehouse::conn::sendfile::cached(&file, 0, 4096),
        gatehouse::conn::sendfile::InCache::Unknown
    );
    let spliced: u64 = srv.handle.registry.snapshot().iter().map(|c| c.bytes_sendfile()).sum();
    if kernel_can_tell {
        assert!(spliced >= big.len() as u64, "{spliced} bytes sent with sendfile");
    }
    // The connection is still in step: a small answer comes next.
    r.get_mut()
        .write_all(b"GET /data.txt HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut r).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"0123456789abcdefghij");
    srv.stop().await;
}

/// Reads what the server sends back after a ClientHello it refuses: a TLS alert record.
async fn alert_after_hello(addr: std::net::SocketAddr, pki: &Pki, alpn: &[&str]) -> (std::io::Error, Option<u8>) {
    let err = match tls_connect(addr, "localhost", pki.client_config(alpn)).await {
        Ok(_) => panic!("handshake must fail"),
        Err(e) => e,
    };
    // rustls surfaces the peer's alert as InvalidData carrying rustls::Error::AlertReceived.
    let desc = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::AlertReceived(a) => Some(u8::from(*a)),
            _ => None,
        });
    (err, desc)
}

const NO_APPLICATION_PROTOCOL: u8 = 120;

#[tokio::test]
async fn alpn_mismatch_fails_with_no_application_protocol_alert() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = tls_listener("h1only", "[\"http/1.1\"]", "", &cert, &key)
        + "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
    let srv = TestServer::start(&toml).await;
    let (err, alert) = alert_after_hello(srv.addr("h1only"), &pki, &["h2"]).await;
    assert_eq!(alert, Some(NO_APPLICATION_PROTOCOL), "{err:?}");
    assert!(
        srv.wait_metric(r#"gatehouse_tls_handshakes_total{listener="h1only",result="no_common_protocol",tls_version="none",alpn="none"}"#, 1.0)
            .await
    );
    // The same listener still serves a client that offers http/1.1.
    let tls = tls_connect(srv.addr("h1only"), "localhost", pki.client_config(&["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    srv.stop().await;
}

#[tokio::test]
async fn h2_only_listener_refuses_http1_only_clients() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml =
        tls_listener("h2only", "[\"h2\"]", "", &cert, &key) + "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
    let srv = TestServer::start(&toml).await;
    let (err, alert) = alert_after_hello(srv.addr("h2only"), &pki, &["http/1.1"]).await;
    assert_eq!(alert, Some(NO_APPLICATION_PROTOCOL), "{err:?}");
    srv.stop().await;
}

async fn http1_over(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn no_alpn_gets_http1_and_is_counted() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = tls_listener("web", "[\"h2\", \"http/1.1\"]", "", &cert, &key)
        + "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
    let srv = TestServer::start(&toml).await;
    let fallback = r#"gatehouse_alpn_fallback_total{listener="web",reason="client_offered_none"}"#;
    assert_eq!(srv.metric(fallback), 0.0);
    let mut tls = tls_connect(srv.addr("web"), "localhost", pki.client_config(&[]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let resp = http1_over(&mut tls).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");
    assert!(srv.wait_metric(fallback, 1.0).await);
    srv.stop().await;
}

#[tokio::test]
async fn no_alpn_is_rejected_when_configured() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = tls_listener(
        "strict",
        "[\"h2\", \"http/1.1\"]",
        "on_no_alpn = \"reject\"",
        &cert,
        &key,
    ) + "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
    let srv = TestServer::start(&toml).await;
    let (err, alert) = alert_after_hello(srv.addr("strict"), &pki, &[]).await;
    assert_eq!(alert, Some(NO_APPLICATION_PROTOCOL), "{err:?}");
    assert!(
        srv.wait_metric(r#"gatehouse_tls_handshakes_total{listener="strict",result="no_alpn_rejected",tls_version="none",alpn="none"}"#, 1.0)
            .await
    );
    // Clients that do offer ALPN are served.
    let tls = tls_connect(srv.addr("strict"), "localhost", pki.client_config(&["h2"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    srv.stop().await;
}

#[tokio::test]
async fn sni_selects_the_matching_certificate() {
    let pki = Pki::new();
    let (a_cert, a_key) = pki.leaf("a", &["a.test"]);
    let (b_cert, b_key) = pki.leaf("b", &["b.test", "*.wild.test"]);
    let toml = format!(
        "{}[[listeners.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n",
        tls_listener("multi", "[\"h2\", \"http/1.1\"]", "", &a_cert, &a_key),
        b_cert.display(),
        b_key.display()
    );
    let srv = TestServer::start(&toml).await;
    // rustls verifies the presented certificate against the SNI name, so success proves selection.
    for name in ["a.test", "b.test", "x.wild.test"] {
        let tls = tls_connect(srv.addr("multi"), name, pki.client_config(&["h2"])).await;
        assert!(tls.is_ok(), "{name}: {:?}", tls.err());
    }
    // An unknown name gets the default (first) certificate, which does not cover it.
    let other = tls_connect(srv.addr("multi"), "c.test", pki.client_config(&["h2"])).await;
    assert!(other.is_err());
    srv.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_is_http1_when_disabled_and_switches_when_enabled() {
    let base = "[[routes]]\nrespond = { status = 200, body = \"upgraded?\" }\n";
    let request = b"GET /u HTTP/1.1\r\nhost: example\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n";

    let off = TestServer::start(&format!(
        "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n{base}"
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(off.addr("c")).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        off.wait_metric(
            r#"gatehouse_alpn_fallback_total{listener="c",reason="h2c_upgrade_disabled"}"#,
            1.0
        )
        .await
    );
    off.stop().await;

    let on = TestServer::start(&format!(
        "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\nh2c_upgrade = true\n{base}"
    ))
    .await;
    let mut tcp = tokio::net::TcpStream::connect(on.addr("c")).await.unwrap();
    tcp.write_all(request).await.unwrap();
    // Read exactly the 101 head, then speak HTTP/2 on the same socket.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: h2c"), "{head}");
    // The h2 client library cannot adopt stream 1, so read its response from raw frames.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut got_headers_on_1 = false;
    let mut body = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let mut fh = [0u8; 9];
        if tokio::time::timeout_at(deadline, tcp.read_exact(&mut fh))
            .await
            .is_err()
        {
            break;
        }
        let len = ((fh[0] as usize) << 16) | ((fh[1] as usize) << 8) | fh[2] as usize;
        let (ty, flags) = (fh[3], fh[4]);
        let stream = u32::from_be_bytes([fh[5] & 0x7f, fh[6], fh[7], fh[8]]);
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        if ty == 0x4 && flags & 0x1 == 0 {
            tcp.write_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00").await.unwrap();
            // SETTINGS ACK
        }
        if ty == 0x1 && stream == 1 {
            got_headers_on_1 = true;
        }
        if ty == 0x0 && stream == 1 {
            body.extend_from_slice(&payload);
            if flags & 0x1 != 0 {
                break;
            }
        }
    }
    assert!(got_headers_on_1, "no HEADERS on stream 1");
    assert_eq!(body, b"upgraded?");
    assert!(
        on.wait_metric(
            r#"gatehouse_requests_total{listener="c",protocol="h2c",method="GET",status="200"}"#,
            1.0
        )
        .await
    );
    on.stop().await;
}

#[tokio::test]
async fn h2_only_listener_rejects_clients_without_alpn() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml =
        tls_listener("h2only", "[\"h2\"]", "", &cert, &key) + "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
    let srv = TestServer::start(&toml).await;
    let (err, alert) = alert_after_hello(srv.addr("h2only"), &pki, &[]).await;
    assert_eq!(alert, Some(NO_APPLICATION_PROTOCOL), "{err:?}");
    srv.stop().await;
}

#[tokio::test]
async fn ed25519_keys_work_and_sessions_resume() {
    let pki = Pki::new();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (cert, key) = pki.leaf_with("ed", &["localhost"], key);
    let toml = tls_listener("web", "[\"h2\", \"http/1.1\"]", "", &cert, &key)
        + "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
    let srv = TestServer::start(&toml).await;
    // One client config keeps its session cache across connections.
    let client = pki.client_config(&["http/1.1"]);
    let mut first = tls_connect(srv.addr("web"), "localhost", client.clone()).await.unwrap();
    assert_eq!(first.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
    // TLS 1.3 tickets arrive after the handshake: read a response so the client has processed them.
    assert!(http1_over(&mut first).await.ends_with("ok"));
    let second = tls_connect(srv.addr("web"), "localhost", client).await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    srv.stop().await;
}
