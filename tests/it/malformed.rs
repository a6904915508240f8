//! Malformed HTTP/1.1 and HTTP/2 requests and request limits: every one gets its status, the
//! connection's fate follows from whether framing can still be trusted, and nothing panics.

use crate::common;

use common::TestServer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVER: &str = r#"
[[listeners]]
name = "plain"
address = "127.0.0.1:0"
protocols = ["http/1.1", "h2c"]
[limits]
max_header_bytes = "4KiB"
max_uri_bytes = "1KiB"
max_body_bytes = "1KiB"
[[routes]]
respond = { status = 200, body = "ok" }
"#;

const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// The connection answers another request.
    Open,
    /// The server closes it after the answer.
    Closed,
}

/// Who answers: hyper's parser (the pipeline never sees the request) or gatehouse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum By {
    Parser,
    Gatehouse,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    status: u16,
    fate: Fate,
    by: By,
}

fn case(name: &'static str, bytes: impl AsRef<[u8]>, status: u16, fate: Fate, by: By) -> Case {
    Case {
        name,
        bytes: bytes.as_ref().to_vec(),
        status,
        fate,
        by,
    }
}

fn cases() -> Vec<Case> {
    use By::*;
    use Fate::*;
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(1100));
    let long_head = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "h".repeat(5000));
    let big_chunk = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
        "b".repeat(0x800)
    );
    let big_declared = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n\r\n";
    vec![
        // Controls: valid requests keep the connection.
        case("valid GET", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200, Open, Gatehouse),
        // A 2xx would mean "tunnel established"; a fixed-answer route tunnels nothing.
        case(
            "CONNECT to a route that does not tunnel",
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
            501,
            Open,
            Gatehouse,
        ),
        case("bare LF line ends", "GET / HTTP/1.1\nHost: a\n\n", 200, Open, Gatehouse),
        case(
            "POST with Content-Length (built-in handler reads it)",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            200,
            Open,
            Gatehouse,
        ),
        case(
            "POST chunked",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            200,
            Open,
            Gatehouse,
        ),
        case(
            "same Content-Length twice",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
            200,
            Open,
            Gatehouse,
        ),
        case(
            "absolute-form agreeing with Host",
            "GET http://a:80/x HTTP/1.1\r\nHost: A\r\n\r\n",
            200,
            Open,
            Gatehouse,
        ),
        case(
            "HTTP/1.0 without Host",
            "GET / HTTP/1.0\r\n\r\n",
            200,
            Closed,
            Gatehouse,
        ),
        // The parser's refusals: the head cannot be trusted, so the connection closes.
        case(
            "header without colon",
            "GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "whitespace before colon",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "bare CR",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "obs-fold",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "invalid header name",
            "GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "NUL in a header value",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "NUL in the target",
            "GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "invalid method token",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case(
            "differing Content-Length values",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
            400,
            Closed,
            Parser,
        ),
        case(
            "Content-Length list",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 3\r\n\r\nhi",
            400,
            Closed,
            Parser,
        ),
        case(
            "signed Content-Length",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nhi",
            400,
            Closed,
            Parser,
        ),
        case(
            "Transfer-Encoding not ending in chunked",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nhi",
            400,
            Closed,
            Parser,
        ),
        case(
            "Transfer-Encoding on HTTP/1.0",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            Closed,
            Parser,
        ),
        case("head over max_header_bytes", long_head, 431, Closed, Parser),
        // gatehouse's refusals of sound framing: the connection stays usable.
        case("missing Host", "GET / HTTP/1.1\r\n\r\n", 400, Open, Gatehouse),
        case(
            "two Host fields",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        case(
            "invalid Host",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        // An `http` URI with an empty host is invalid (RFC 9110 §4.2.1).
        case("empty Host", "GET / HTTP/1.1\r\nHost: \r\n\r\n", 400, Open, Gatehouse),
        case(
            "Host with a bad port",
            "GET / HTTP/1.1\r\nHost: a:8o\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        case(
            "Host with userinfo",
            "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        case(
            "absolute-form with another Host",
            "GET http://b/x HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        case(
            "userinfo in the target",
            "GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        case(
            "authority-form on GET",
            "GET a:80 HTTP/1.1\r\nHost: a:80\r\n\r\n",
            400,
            Open,
            Gatehouse,
        ),
        case("target over max_uri_bytes", long_target, 414, Open, Gatehouse),
        // ... unless a body is left unread.
        case(
            "missing Host with a body",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            400,
            Closed,
            Gatehouse,
        ),
        // Doubtful or broken body framing: answered, then closed.
        case(
            "chunked applied twice",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            400,
            Closed,
            Gatehouse,
        ),
        case(
            "transfer coding before chunked",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            Closed,
            Gatehouse,
        ),
        // hyper drops Content-Length and reads the chunked body (RFC 9112 §6.1 allows this), then
        // closes; the evidence never reaches gatehouse, so there is no 400 to give.
        case(
            "Transfer-Encoding with Content-Length",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            200,
            Closed,
            Gatehouse,
        ),
        case(
            "bad chunk size",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            400,
            Closed,
            Gatehouse,
        ),
        case(
            "chunk size overflow",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n0\r\n\r\n",
            400,
            Closed,
            Gatehouse,
        ),
        case(
            "chunk data without its CRLF",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n",
            400,
            Closed,
            Gatehouse,
        ),
        case("chunked body over max_body_bytes", big_chunk, 413, Closed, Gatehouse),
        case(
            "declared body over max_body_bytes",
            big_declared,
            413,
            Closed,
            Gatehouse,
        ),
    ]
}

/// One response read off the wire: its status and whether it announced `Connection: close`.
struct Response {
    status: u16,
    close: bool,
}

/// Reads one response; `None` when the connection ends (or errs) before a whole one arrives.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Response> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let len: usize = header("content-length:").map_or(Some(0), |v| v.parse().ok())?;
    let close = header("connection:").is_some_and(|v| v.contains("close"));
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..head_end + len);
    Some(Response { status, close })
}

/// Sends `bytes` on a fresh connection, reads the answer, then tries a second request.
/// Returns (status, fate, whether the answer said `Connection: close`).
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> (Option<u16>, Fate, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let Some(first) = read_response(&mut s, &mut buf).await else {
        return (None, Fate::Closed, false);
    };
    // A write to a connection the server has closed may fail; the read below tells the fate.
    let _ = s.write_all(NEXT).await;
    let fate = match read_response(&mut s, &mut buf).await {
        Some(r) if r.status == 200 => Fate::Open,
        _ => Fate::Closed,
    };
    (Some(first.status), fate, first.close)
}

#[tokio::test]
async fn each_malformed_request_gets_its_status_and_the_right_connection_fate() {
    let srv = TestServer::start(SERVER).await;
    let addr = srv.addr("plain");
    let cases = cases();
    let mut table = String::new();
    let mut failed = 0;
    for c in &cases {
        let (status, fate, said_close) = tokio::time::timeout(Duration::from_secs(10), exchange(addr, &c.bytes))
            .await
            .unwrap_or_else(|_| panic!("{}: the server neither answered nor closed", c.name));
        // On HTTP/1.1 a close is always announced, and only a close is.
        let http11 = c.bytes.windows(8).any(|w| w == b"HTTP/1.1");
        let consistent = if http11 {
            said_close == (fate == Fate::Closed)
        } else {
            !(said_close && fate == Fate::Open)
        };
        let ok = status == Some(c.status) && fate == c.fate && consistent;
        if !ok {
            failed += 1;
        }
        table.push_str(&format!(
            "{} {:<52} want {} {:<6} got {:?} {:?} (Connection: close {said_close})\n",
            if ok { "  " } else { "!!" },
            c.name,
            c.status,
            format!("{:?}", c.fate),
            status,
            fate,
        ));
    }
    assert_eq!(failed, 0, "{failed} case(s) failed:\n{table}");

    // The parser's refusals are requests too: counted with their status, and each connection
    // closed with a named reason.
    let by_parser = |status: u16| {
        cases
            .iter()
            .filter(|c| c.by == By::Parser && c.status == status)
            .count() as f64
    };
    for status in [400, 431] {
        let series = format!(
            r#"gatehouse_requests_total{{listener="plain",protocol="http/1.1",method="OTHER",status="{status}"}}"#
        );
        assert!(
            srv.wait_metric(&series, by_parser(status)).await,
            "{series} = {}, want {}",
            srv.metric(&series),
            by_parser(status)
        );
    }
    // A broken chunked body also ends its connection as a protocol error: framing is lost.
    let broken_bodies = cases
        .iter()
        .filter(|c| c.by == By::Gatehouse && c.status == 400 && c.name.contains("chunk "))
        .count() as f64;
    let protocol_error = r#"gatehouse_connections_closed_total{listener="plain",reason="protocol_error"}"#;
    assert!(
        srv.wait_metric(protocol_error, by_parser(400) + broken_bodies).await,
        "{protocol_error} = {}",
        srv.metric(protocol_error)
    );
    let limit = r#"gatehouse_connections_closed_total{listener="plain",reason="limit"}"#;
    assert!(
        srv.wait_metric(limit, by_parser(431)).await,
        "{limit} = {}",
        srv.metric(limit)
    );
    srv.stop().await;
}

/// Panics seen on each watched thread; the test server runs on its test's thread.
fn panic_counter() -> &'static Mutex<Vec<(ThreadId, &'static AtomicUsize)>> {
    static WATCHED: OnceLock<Mutex<Vec<(ThreadId, &'static AtomicUsize)>>> = OnceLock::new();
    WATCHED.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let me = std::thread::current().id();
            if let Ok(w) = panic_counter().lock() {
                for (id, n) in w.iter() {
                    if *id == me {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            previous(info);
        }));
        Mutex::new(Vec::new())
    })
}

/// xorshift64*: a tiny deterministic generator, so a failing input can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const VALID: &[&[u8]] = &[
    b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
];

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One garbage input: mutations of valid requests, random bytes, random header lines, and
/// HTTP/2 frames after a real preface.
fn garbage(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => {
            let mut v = VALID[rng.below(VALID.len())].to_vec();
            for _ in 0..=rng.below(4) {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            v
        }
        1 => {
            let len = rng.below(600);
            rng.bytes(len)
        }
        2 => {
            let mut v = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
            for _ in 0..rng.below(6) {
                let len = rng.below(40);
                v.extend(rng.bytes(len));
                v.extend_from_slice(if rng.below(3) == 0 { b"\n" } else { b"\r\n" });
            }
            v.extend_from_slice(b"\r\n");
            v
        }
        3 => {
            let v = VALID[rng.below(VALID.len())];
            v[..rng.below(v.len())].to_vec()
        }
        4 => {
            // Printable noise that looks like HTTP: the parser's slow paths, not just its first byte.
            let alphabet = b"GETPOSH /:1.\r\n\t ;=,chunkedContent-LengthTransfer-Encoding0123456789abcdef%@[]";
            (0..rng.below(400))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect()
        }
        _ => {
            // h2c prior knowledge: a real preface, then random frames (9-byte header + payload).
            let mut v = PREFACE.to_vec();
            v.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
            for _ in 0..=rng.below(5) {
                let len = rng.below(64);
                let (ty, flags) = (rng.below(11) as u8, rng.next() as u8);
                let stream = (rng.below(8) as u32).to_be_bytes();
                v.extend_from_slice(&[0, (len >> 8) as u8, len as u8, ty, flags]);
                v.extend_from_slice(&stream);
                v.extend(rng.bytes(len));
            }
            v
        }
    }
}

#[tokio::test]
async fn random_bytes_never_crash_the_server() {
    let panics: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
    panic_counter()
        .lock()
        .unwrap()
        .push((std::thread::current().id(), panics));
    let srv = TestServer::start(SERVER).await;
    let addr = srv.addr("plain");
    let mut rng = Rng(0x5eed_6a7e_4005_e000);
    let inputs: Vec<Vec<u8>> = (0..300).map(|_| garbage(&mut rng)).collect();
    for batch in inputs.chunks(25) {
        let tasks: Vec<_> = batch
            .iter()
            .cloned()
            .map(|input| {
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    // The server may close (or reset) before reading everything: that is fine.
                    let _ = s.write_all(&input).await;
                    let _ = s.shutdown().await;
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    // Every input reached the server (a connection that was never accepted proves nothing).
    let accepted = srv.metric(r#"gatehouse_connections_accepted_total{listener="plain"}"#);
    assert!(accepted >= inputs.len() as f64, "only {accepted} connections accepted");
    // Still serving, over HTTP/1.1 and h2c.
    let text = common::raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let (resp, _) = client
        .send_request(http::Request::get("http://a/").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(
        panics.load(Ordering::Relaxed),
        0,
        "a panic happened on the server's thread"
    );
    assert_eq!(srv.metric(r#"gatehouse_panics_total{listener="plain"}"#), 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn http2_authority_differing_from_host_is_refused_on_its_stream_only() {
    let srv = TestServer::start(SERVER).await;
    let tcp = TcpStream::connect(srv.addr("plain")).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let conn_task = tokio::spawn(connection);
    let send = |client: &mut h2::client::SendRequest<bytes::Bytes>, host: &str| {
        let req = http::Request::get("http://a.example/")
            .header("host", host)
            .body(())
            .unwrap();
        client.send_request(req, true).unwrap().0
    };
    let mismatched = send(&mut client, "b.example").await.unwrap();
    assert_eq!(mismatched.status(), 400);
    let mut body = mismatched.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&text).contains(":authority"), "{text:?}");
    // The same connection serves the next stream, whose Host agrees (default port included).
    let agreeing = send(&mut client, "A.example:80").await.unwrap();
    assert_eq!(agreeing.status(), 200);
    assert!(!conn_task.is_finished());
    let refused = r#"gatehouse_requests_total{listener="plain",protocol="h2c",method="GET",status="400"}"#;
    assert!(
        srv.wait_metric(refused, 1.0).await,
        "{refused} = {}",
        srv.metric(refused)
    );
    srv.stop().await;
}

/// Reads until the server closes: the bytes, and whether the close was orderly (not a reset).
async fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let orderly = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the server did not close the connection")
        .is_ok();
    (got, orderly)
}

/// An invalid HTTP/2 connection preface is a connection error of type PROTOCOL_ERROR (RFC 9113
/// §3.4): the server's own preface (SETTINGS) and a GOAWAY saying so, then an orderly close, where
/// closing with the client's bytes unread would reset the connection and could lose the GOAWAY.
/// On a listener that also serves HTTP/1.1, only bytes that begin as the preface and then break it
/// are HTTP/2's to refuse; anything else is an HTTP/1.1 request.
#[tokio::test]
async fn an_invalid_http2_preface_gets_goaway_protocol_error_and_an_orderly_close() {
    let srv = TestServer::start(&format!(
        "{SERVER}[[listeners]]\nname = \"h2c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"h2c\"]\n"
    ))
    .await;
    let settings_then_goaway: &[u8] = &[
        0, 0, 0, 4, 0, 0, 0, 0, 0, // SETTINGS, empty, stream 0
        0, 0, 8, 7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes, stream 0
        0, 0, 0, 0, 0, 0, 0, 1, // last stream 0, PROTOCOL_ERROR
    ];
    let cases: [(&str, &[u8]); 3] = [
        ("h2c", b"INVALID CONNECTION PREFACE\r\n\r\n"),
        ("h2c", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("plain", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\nmore bytes after it"),
    ];
    for (listener, bytes) in cases {
        let mut s = TcpStream::connect(srv.addr(listener)).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let (got, orderly) = read_to_close(&mut s).await;
        assert_eq!(
            got,
            settings_then_goaway,
            "{listener} {:?}",
            String::from_utf8_lossy(bytes)
        );
        assert!(orderly, "{listener}: reset, not closed");
    }
    for (listener, n) in [("h2c", 2.0), ("plain", 1.0)] {
        let series = format!(r#"gatehouse_h2_goaway_sent_total{{listener="{listener}",reason="protocol_error"}}"#);
        assert!(srv.wait_metric(&series, n).await, "{series} = {}", srv.metric(&series));
    }
    // Garbage that is not the preface is still HTTP/1.1's to answer where HTTP/1.1 is served.
    let mut s = TcpStream::connect(srv.addr("plain")).await.unwrap();
    s.write_all(b"INVALID CONNECTION PREFACE\r\n\r\n").await.unwrap();
    let (got, _) = read_to_close(&mut s).await;
    assert!(got.starts_with(b"HTTP/1.1 400 "), "{:?}", String::from_utf8_lossy(&got));
    srv.stop().await;
}
