//! Per-connection counters in the admin API (`/debug/connections`, which the dashboard shows):
//! requests served and bytes in/out, exact for HTTP/1.1, and moving for HTTP/2.

use crate::common;

use common::binary::Gatehouse;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const CONFIG: &str = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
                      [[routes]]\nrespond = { status = 200, body = \"ok\" }\n[log]\naccess_log = \"off\"\n";

/// The one idle connection of `protocol` once `done` holds for it. A write is counted when the
/// kernel has taken the bytes, which can be just after the client has read them: hence the wait.
fn connection(g: &Gatehouse, protocol: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = g.admin_get(&format!("/debug/connections?protocol={protocol}&state=idle"));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(c) = v["connections"].as_array().and_then(|a| a.first()) {
            if done(c) {
                return c.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no idle {protocol} connection with the expected counters: {body}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads one response with a 2-byte body; returns how many bytes it took.
fn read_response(c: &mut std::net::TcpStream) -> usize {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            if body == "ok" {
                return got.len();
            }
        }
    }
}

#[test]
fn http1_counters_are_exact() {
    let g = Gatehouse::start(CONFIG);
    let mut c = std::net::TcpStream::connect(g.addr("web")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Longer than the 24 bytes read to tell HTTP/1.1 from the HTTP/2 preface, which used to go
    // uncounted (the dashboard showed "bytes in 3 B").
    let request = b"GET /page HTTP/1.1\r\nhost: example.test\r\nuser-agent: counters\r\n\r\n";
    let mut out = 0;
    for n in 1..=2u64 {
        c.write_all(request).unwrap();
        out += read_response(&mut c);
        let conn = connection(&g, "http%2F1.1", |c| c["requests"] == n && c["bytes_out"] == out as u64);
        assert_eq!(conn["bytes_in"], n * request.len() as u64, "{conn}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_counters_count_requests_and_bytes() {
    let g = Gatehouse::start(CONFIG);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("http://{}/", g.addr("web"));
    let mut last = (0, 0);
    for n in 1..=3u64 {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.text().await.unwrap(), "ok");
        // The preface alone is 24 bytes; each request adds a HEADERS frame, each answer two frames.
        let conn = tokio::task::block_in_place(|| {
            connection(&g, "h2c", |c| {
                let (bytes_in, bytes_out) = (c["bytes_in"].as_u64().unwrap(), c["bytes_out"].as_u64().unwrap());
                c["requests"] == n && bytes_in > last.0 && bytes_in >= 24 + n * 9 && bytes_out > last.1
            })
        });
        let (bytes_in, bytes_out) = (conn["bytes_in"].as_u64().unwrap(), conn["bytes_out"].as_u64().unwrap());
        last = (bytes_in, bytes_out);
    }
}
