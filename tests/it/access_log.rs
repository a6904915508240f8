//! The access log's writer: every line of a burst of concurrent requests written whole and in
//! order per connection (HTTP/1.1 and HTTP/2), a lone line written without waiting for others,
//! every line written before the process exits on SIGTERM, and lines dropped and counted (never
//! torn, never waited for) while the sink is stalled.

use crate::common::{self, TestServer};
use bytes::Bytes;
use common::binary::Gatehouse;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const GENEROUS: Duration = Duration::from_secs(10);
const ROUTE: &str = "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";
const DROPPED: &str = "gatehouse_access_log_dropped_total";

fn listener() -> String {
    "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n".to_string()
}

/// Waits (bounded) until `path` holds at least `n` lines; returns them. The log is written by its
/// own thread into a file, so there is no event to await: the file is polled.
async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + GENEROUS;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n || Instant::now() >= deadline {
            return text.lines().map(String::from).collect();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `count` GETs of `/<tag>/<i>` one after the other on one kept-alive connection.
async fn h1_requests(addr: std::net::SocketAddr, tag: &str, count: usize) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let driver = tokio::spawn(conn);
    for i in 0..count {
        let req = http::Request::get(format!("/{tag}/{i}"))
            .header("host", "a")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
    drop(sender);
    let _ = driver.await;
}

/// Like [`h1_requests`] over cleartext HTTP/2 (prior knowledge), one stream after the other.
async fn h2_requests(addr: std::net::SocketAddr, tag: &str, count: usize) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    for i in 0..count {
        let req = http::Request::get(format!("http://a/{tag}/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
    drop(sender);
    let _ = driver.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_from_20_connections_gives_one_whole_line_per_request_in_order_per_connection() {
    const CONNS: usize = 20;
    const EACH: usize = 100;
    let srv = TestServer::start(&format!("{}{ROUTE}", listener())).await;
    let addr = srv.addr("c");
    let clients: Vec<_> = (0..CONNS)
        .map(|k| {
            let tag = format!("k{k}");
            // Half over HTTP/1.1, half over HTTP/2.
            tokio::spawn(async move {
                if k % 2 == 0 {
                    h1_requests(addr, &tag, EACH).await
                } else {
                    h2_requests(addr, &tag, EACH).await
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    // Written while the server runs: no shutdown flush involved.
    let lines = wait_lines(&srv.access_log, CONNS * EACH).await;
    assert_eq!(lines.len(), CONNS * EACH, "one line per request");
    // Per client tag: the request numbers in file order, and the connection's sequence numbers.
    let mut seen: HashMap<String, Vec<(usize, u64)>> = HashMap::new();
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["bytes_out"], 2, "{line}");
        let path = v["path"].as_str().unwrap();
        let (tag, i) = path[1..].split_once('/').unwrap();
        let req_id = v["req_id"].as_str().unwrap();
        let (conn, seq) = req_id.split_once('-').unwrap();
        assert_eq!(conn, v["conn_id"].to_string(), "{line}");
        let protocol = v["protocol"].as_str().unwrap();
        let k: usize = tag[1..].parse().unwrap();
        assert_eq!(protocol, if k % 2 == 0 { "http/1.1" } else { "h2c" }, "{line}");
        seen.entry(tag.to_string())
            .or_default()
            .push((i.parse().unwrap(), seq.parse().unwrap()));
    }
    assert_eq!(seen.len(), CONNS);
    for (tag, requests) in &seen {
        let order: Vec<usize> = requests.iter().map(|r| r.0).collect();
        assert_eq!(order, (0..EACH).collect::<Vec<_>>(), "{tag}: lines out of order");
        let seqs: Vec<u64> = requests.iter().map(|r| r.1).collect();
        assert_eq!(seqs, (1..=EACH as u64).collect::<Vec<_>>(), "{tag}: req_id sequence");
    }
    assert_eq!(srv.metric(DROPPED), 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn a_single_line_is_written_without_waiting_for_more() {
    let srv = TestServer::start(&format!("{}{ROUTE}", listener())).await;
    let started = Instant::now();
    h1_requests(srv.addr("c"), "one", 1).await;
    let lines = wait_lines(&srv.access_log, 1).await;
    // The documented bound is about 10 ms; a loaded CI machine gets a generous margin, but a
    // writer that waited for a batch to fill (or for shutdown) would never write this line.
    assert_eq!(lines.len(), 1, "the line was not written within {GENEROUS:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["path"], "/one/0");
    srv.stop().await;
}

#[test]
fn every_line_is_written_before_the_process_exits_on_sigterm() {
    const CONNS: usize = 4;
    const EACH: usize = 250;
    let mut g = Gatehouse::start(&format!(
        "{}{ROUTE}[log]\naccess_log = \"{{dir}}/access.log\"\n",
        listener()
    ));
    let addr = g.addr("c");
    let clients: Vec<_> = (0..CONNS)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(GENEROUS)).unwrap();
                // Pipelined, the last one closing: the answers come back to back.
                let mut batch = String::new();
                for i in 0..EACH {
                    let close = if i + 1 == EACH { "connection: close\r\n" } else { "" };
                    batch.push_str(&format!("GET /k{k}/{i} HTTP/1.1\r\nhost: a\r\n{close}\r\n"));
                }
                s.write_all(batch.as_bytes()).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                assert_eq!(out.matches("HTTP/1.1 200").count(), EACH);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // Straight away: the last lines are still in the writer's batch window.
    g.signal("TERM");
    assert!(g.wait_exit(GENEROUS).success(), "{}", g.log());
    let text = std::fs::read_to_string(g.dir.path().join("access.log")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), CONNS * EACH, "lines lost at exit:\n{}", g.log());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["status"], 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_drops_and_counts_lines_and_requests_do_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    // The reader opens the FIFO (which lets the server's open complete) and reads nothing until
    // told: the pipe fills and the writer blocks in `write`, as behind a stalled consumer. Then
    // it passes on what it reads, so that a missing line fails the test instead of hanging it.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (chunk_tx, chunks) = std::sync::mpsc::channel::<Vec<u8>>();
    {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(&fifo).unwrap();
            let _ = wait.recv();
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = f.read(&mut buf) {
                if chunk_tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    let srv = TestServer::start(&format!(
        "{}{ROUTE}[log]\naccess_log = \"{}\"\n",
        listener(),
        fifo.display()
    ))
    .await;
    // Long paths fill the pipe (64 KiB) and the writer's buffer (1 MiB) in a few hundred lines.
    let long = "x".repeat(4000);
    let tcp = TcpStream::connect(srv.addr("c")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut sent = 0u64;
    while srv.metric(DROPPED) < 10.0 {
        assert!(sent < 5_000, "no line dropped after {sent} requests");
        let req = http::Request::get(format!("/{long}/{sent}"))
            .header("host", "a")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = tokio::time::timeout(GENEROUS, sender.send_request(req))
            .await
            .expect("a request waited for the access log")
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        sent += 1;
    }
    drop(sender);
    let _ = driver.await;
    // Every request has been answered, and its line written or counted.
    let dropped = srv.metric(DROPPED) as u64;
    // The consumer comes back, and the writer catches up (the shutdown flush waits for it).
    go.send(()).unwrap();
    srv.stop().await;
    let expected = (sent - dropped) as usize;
    let mut text = Vec::new();
    let deadline = Instant::now() + GENEROUS;
    while text.iter().filter(|&&b| b == b'\n').count() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        match chunks.recv_timeout(left) {
            Ok(chunk) => text.extend(chunk),
            Err(e) => panic!("{e}: want {expected} lines ({sent} requests, {dropped} dropped)"),
        }
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.ends_with('\n'), "a line was cut short");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        expected,
        "each request's line is written or counted as dropped"
    );
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("torn line ({e}): {line:.200}"));
    }
}
