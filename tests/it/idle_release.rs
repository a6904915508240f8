//! Idle HTTP/1.1 keep-alive connections release hyper's buffers (`limits.idle_release_after`)
//! and serve their next request exactly as before: split and pipelined heads, upgrades, the idle
//! timeout, drain and the byte counters.

use crate::common;

use bytes::Bytes;
use common::binary::Gatehouse;
use common::TestServer;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LISTENER: &str = "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n";
const RESPOND: &str = "[[routes]]\nrespond = { status = 200, body = \"ok\\n\" }\n";
const RELEASED: &str = "released its HTTP/1.1 buffers";
/// The `conn` switch's line for a request starting on an idle connection.
const STARTED: &str = " idle -> busy ";

/// Reads one response with a `content-length` (or none, for a 101): its head and body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("response head in time")
            .expect("response head");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body))
        .await
        .expect("response body in time")
        .expect("response body");
    (head, body)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n")
}

/// How many release events the log holds.
fn releases(g: &Gatehouse) -> usize {
    g.log().matches(RELEASED).count()
}

/// Waits (bounded) until the log holds `n` release events.
fn wait_releases(g: &Gatehouse, n: usize) -> bool {
    wait_count(g, RELEASED, n)
}

/// Waits (bounded) until the log holds `needle` `n` times. Log lines reach the test through a
/// pipe read by another thread, so there is no event to await.
fn wait_count(g: &Gatehouse, needle: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if g.log().matches(needle).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_connection_serves_split_and_pipelined_requests_with_exact_byte_counts() {
    let g = Gatehouse::start(&format!(
        "{LISTENER}[limits]\nidle_release_after = \"0s\"\n[debug]\nswitches = [\"conn\"]\n[log]\naccess_log = \"off\"\n{RESPOND}"
    ));
    let mut s = TcpStream::connect(g.addr("c")).await.unwrap();
    let (mut sent, mut received) = (0usize, 0usize);
    let mut exchange = |sent_now: usize, head: &str, body: &[u8]| {
        sent += sent_now;
        received += head.len() + body.len();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"ok\n");
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
    };

    // A request; the connection releases as soon as its answer is out (the default, "0s").
    let req = get("/1");
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    exchange(req.len(), &head, &body);
    assert!(wait_releases(&g, 1), "no release:\n{}", g.log());
    assert!(g.log().contains("(0 bytes of a next request kept)"), "{}", g.log());

    // The next request after the release, and one whose head was half read when the connection
    // was released: a whole request with the first half of the next one in one write.
    let (whole, first_half, second_half) = (get("/2"), "GET /3 HTTP/1.1\r\nho", "st: a\r\n\r\n");
    s.write_all(format!("{whole}{first_half}").as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    exchange(whole.len() + first_half.len(), &head, &body);
    assert!(wait_releases(&g, 2), "no second release:\n{}", g.log());
    let kept = format!("({} bytes of a next request kept)", first_half.len());
    assert!(g.log().contains(&kept), "the half head was not kept:\n{}", g.log());
    s.write_all(second_half.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    exchange(second_half.len(), &head, &body);

    // Two pipelined requests in one write on a released connection: two answers, in order.
    assert!(wait_releases(&g, 3), "no third release:\n{}", g.log());
    let two = format!("{}{}", get("/4"), get("/5"));
    s.write_all(two.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    exchange(two.len(), &head, &body);
    let (head, body) = read_response(&mut s).await;
    exchange(0, &head, &body);
    assert!(wait_releases(&g, 4), "no fourth release:\n{}", g.log());

    // The admin view still lists the released connection as idle, with every byte counted once.
    let (status, list) = g.admin_get("/debug/connections?listener=c");
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let conns = list["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{list}");
    let c = &conns[0];
    assert_eq!(c["state"], "idle", "{c}");
    assert_eq!(c["protocol"], "http/1.1", "{c}");
    assert_eq!(c["requests"], 5, "{c}");
    assert_eq!(c["bytes_in"], sent as u64, "{c}");
    assert_eq!(c["bytes_out"], received as u64, "{c}");
}

#[tokio::test]
async fn a_released_connection_closes_on_the_idle_timeout() {
    let srv = TestServer::start(&format!(
        "{LISTENER}[limits]\nidle_release_after = \"0s\"\n[timeouts]\nidle = \"500ms\"\n{RESPOND}"
    ))
    .await;
    let mut s = TcpStream::connect(srv.addr("c")).await.unwrap();
    // The idle clock cannot start before the request is sent; timing from the response's arrival
    // instead would count the client's own scheduling delay against the server.
    let started = Instant::now();
    s.write_all(get("/").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the server")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(500), "closed after {waited:?}");
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="idle_timeout"}"#,
            1.0
        )
        .await
    );
    assert_eq!(srv.metric(r#"gatehouse_timeouts_total{listener="c",kind="idle"}"#), 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn drain_closes_a_released_connection_at_once_with_shutdown() {
    let srv = TestServer::start(&format!(
        "{LISTENER}[limits]\nidle_release_after = \"0s\"\n[shutdown]\ndrain_timeout = \"20s\"\n{RESPOND}"
    ))
    .await;
    let mut s = TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(get("/").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    srv.handle.shutdown();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the drain, well before its deadline")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        srv.wait_metric(
            r#"gatehouse_connections_closed_total{listener="c",reason="shutdown"}"#,
            1.0
        )
        .await
    );
    srv.stop().await;
}

/// Answers `Upgrade: echo` with 101 and then echoes the upgraded bytes; anything else with `ok`.
fn echo_service() -> impl gatehouse::HttpService<Full<Bytes>> {
    tower::service_fn(|mut req: http::Request<gatehouse::RequestBody>| async move {
        let Some(on_upgrade) = req
            .headers()
            .contains_key(http::header::UPGRADE)
            .then(|| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
            .flatten()
        else {
            return Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok\n"))));
        };
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let resp = http::Response::builder()
            .status(http::StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "echo")
            .body(Full::new(Bytes::new()))
            .unwrap();
        Ok(resp)
    })
}

/// Upgrades `s` to the echo protocol and checks that bytes come back.
async fn upgrade_and_echo(s: &mut TcpStream) {
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&back, b"ping");
}

#[tokio::test]
async fn upgrades_work_on_new_and_on_released_connections() {
    // "0s": each connection releases as soon as its response is out, so the second connection's
    // upgrade arrives on a rebuilt hyper connection.
    let srv = TestServer::start_service(
        &format!("{LISTENER}[limits]\nidle_release_after = \"0s\"\n[log]\naccess_log = \"off\"\n"),
        echo_service(),
    )
    .await;
    let mut first = TcpStream::connect(srv.addr("c")).await.unwrap();
    upgrade_and_echo(&mut first).await;

    let mut second = TcpStream::connect(srv.addr("c")).await.unwrap();
    second.write_all(get("/").as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut second).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok\n");
    upgrade_and_echo(&mut second).await;
    srv.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_works_on_a_released_connection() {
    let srv = TestServer::start(&format!(
        "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\nh2c_upgrade = true\n\
         [limits]\nidle_release_after = \"0s\"\n{RESPOND}"
    ))
    .await;
    let mut s = TcpStream::connect(srv.addr("c")).await.unwrap();
    s.write_all(get("/").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET /u HTTP/1.1\r\nhost: a\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.to_ascii_lowercase().starts_with("http/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: h2c"), "{head}");
    // After the preface, the server's first frame is its SETTINGS (type 4) on stream 0.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut frame))
        .await
        .expect("a frame in time")
        .unwrap();
    assert_eq!(frame[3], 4, "first frame {frame:?}");
    assert!(
        srv.wait_metric(
            r#"gatehouse_requests_total{listener="c",protocol="h2c",method="GET",status="200"}"#,
            1.0
        )
        .await,
        "{}",
        srv.handle.metrics.encode()
    );
    srv.stop().await;
}

/// hyper answers at most 16 requests of a pipelined batch per poll and then yields with the rest
/// still in its buffer and nothing in flight: that pause is not idleness, and the whole batch is
/// answered on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipelined_batch_is_answered_whole_and_the_connection_stays_open() {
    let g = Gatehouse::start(&format!(
        "{LISTENER}[limits]\nidle_release_after = \"0s\"\n[log]\naccess_log = \"off\"\n{RESPOND}"
    ));
    let mut s = TcpStream::connect(g.addr("c")).await.unwrap();
    let batch: String = (0..100).map(|i| get(&format!("/p{i}"))).collect();
    s.write_all(batch.as_bytes()).await.unwrap();
    for i in 0..100 {
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "response {i}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "response {i}: {head}"
        );
        assert_eq!(body, b"ok\n", "response {i}");
    }
    // Still open and serving after the batch (and after its release).
    s.write_all(get("/after").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// A connection whose requests follow each other closely keeps its state between them (a rebuild
/// per request costs more than the few microseconds of freed memory are worth), and releases
/// once it has been idle for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_keeps_its_state_until_it_has_idled_for_a_second() {
    let g = Gatehouse::start(&format!(
        "{LISTENER}[limits]\nidle_release_after = \"0s\"\n[debug]\nswitches = [\"conn\"]\n[log]\naccess_log = \"off\"\n{RESPOND}"
    ));
    let mut s = TcpStream::connect(g.addr("c")).await.unwrap();
    // Back to back: a release followed at once (within 10 ms) by the next request marks the
    // connection busy, and from then on it keeps its state between requests. A loaded machine can
    // make the client miss that window a few times (each miss is one more release), so requests
    // go until the releases stop: 20 idle spells in a row without one, within 200. A connection
    // that never became busy releases in every spell. The quiet time counts from the last
    // request's sending, not its answer's arrival: the server's clock may start before the client
    // sees the response.
    let mut quiet_since = Instant::now();
    let (mut seen, mut steady) = (0, 0);
    for i in 0..200 {
        quiet_since = Instant::now();
        s.write_all(get(&format!("/{i}")).as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"ok\n");
        // The log reaches the test late, and a count read too early would take releases still in
        // the pipe for none. Request i's start is logged after the release of the idle spell
        // before it (if any), so once the log holds i + 1 starts, the count covers every spell
        // before request i.
        assert!(wait_count(&g, STARTED, i + 1), "request {i} not logged:\n{}", g.log());
        let now = releases(&g);
        if now == seen {
            steady += 1;
            if steady == 20 {
                break;
            }
        } else {
            (seen, steady) = (now, 0);
        }
    }
    let during = releases(&g);
    assert!(
        steady == 20 && during >= 1,
        "{during} releases, still releasing after 200 back-to-back requests:\n{}",
        g.log()
    );
    // Idle now: it releases after a second, and still answers after that.
    assert!(wait_releases(&g, during + 1), "no release once idle:\n{}", g.log());
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(900),
        "released {:?} after the last request, before the busy hold",
        quiet_since.elapsed()
    );
    s.write_all(get("/after").as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok\n");
}
