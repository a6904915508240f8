//! Graceful drain of the real binary: SIGTERM under load, the drain deadline, idle and
//! never-used connections, and the second signal.
//!
//! Every client here reads continuously (paced, never stalled) unless the test is about a client
//! that stops reading, and every drain that should finish on its own gets a `drain_timeout` of 30s:
//! on a loaded CI machine a download may take many times longer than on a laptop, and a short
//! deadline would cut it (`drain_forced`) by design. What the tests assert instead is that the
//! process exits as soon as the work is done, far ahead of that deadline.

use crate::common::binary::Gatehouse;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Barrier};

const BIG: usize = 16 * 1024 * 1024;
/// Every download reaches this before the signal, so all of them are mid-body when it arrives.
const BEFORE_SIGNAL: usize = 1024 * 1024;
/// The client's TCP receive buffer: keeps the server from running far ahead of a slow reader,
/// so a download stays in flight as long as its client is reading (16 MiB is far more than this
/// plus the server's send buffer). It also holds the whole HTTP/2 connection window
/// (H2_CONN_WINDOW): everything the server may send is in the client's kernel, never only in the
/// server's, when the server closes after its last frame. (gatehouse does not linger after a
/// close: a WINDOW_UPDATE arriving at a closed socket makes the kernel answer with a reset, which
/// would discard data still queued on the server side. See docs/shutdown-and-reload.md.)
const CLIENT_RCVBUF: u32 = 512 * 1024;
const H2_STREAM_WINDOW: u32 = 128 * 1024;
const H2_CONN_WINDOW: u32 = 256 * 1024;
const GENEROUS: Duration = Duration::from_secs(10);

fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // Not all zeros, so a misplaced chunk would be noticed by the checksum.
    let data: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("big.bin"), data).unwrap();
    std::fs::write(dir.path().join("small.txt"), "hello\n").unwrap();
    dir
}

fn config(site: &std::path::Path, drain_delay: &str, drain_timeout: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocols = ["http/1.1", "h2c"]
[shutdown]
drain_delay = "{drain_delay}"
drain_timeout = "{drain_timeout}"
[log]
access_log = "off"
[[routes]]
static = "{}"
"#,
        site.display()
    )
}

/// Expected checksum of the first `n` bytes of big.bin.
fn checksum(n: usize) -> u64 {
    (0..n).map(|i| (i % 251) as u64).sum()
}

async fn connect_small(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(CLIENT_RCVBUF).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads `stream` up to the end of the response head; returns (head, body bytes already read).
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
    }
}

/// How a paced client downloads: waits at `reached` after BEFORE_SIGNAL bytes, then for `gate`.
#[derive(Clone)]
struct Pace {
    reached: Arc<Barrier>,
    gate: watch::Receiver<bool>,
}

impl Pace {
    async fn hold(&mut self) {
        self.reached.wait().await;
        self.gate.wait_for(|open| *open).await.unwrap();
    }
    /// A short pause per chunk: the download spans the drain but never stalls.
    async fn step() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Downloads big.bin over HTTP/1.1. Returns (body bytes, checksum, whether the server closed the
/// connection after the body).
async fn h1_download(addr: SocketAddr, mut pace: Pace) -> (usize, u64, bool) {
    let mut s = connect_small(addr).await;
    s.write_all(b"GET /big.bin HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let (head, first) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = first.len();
    let mut sum: u64 = first.iter().map(|b| u64::from(*b)).sum();
    let mut held = false;
    let mut buf = vec![0u8; 64 * 1024];
    while got < BIG {
        if !held && got >= BEFORE_SIGNAL {
            held = true;
            pace.hold().await;
        }
        let n = match tokio::time::timeout(GENEROUS, s.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("HTTP/1.1 download failed after {got} of {BIG}: {e}"),
            Err(_) => panic!("HTTP/1.1 download stalled after {got} of {BIG}"),
        };
        if n == 0 {
            break;
        }
        got += n;
        sum += buf[..n].iter().map(|b| u64::from(*b)).sum::<u64>();
        Pace::step().await;
    }
    let closed = matches!(tokio::time::timeout(GENEROUS, s.read(&mut buf)).await, Ok(Ok(0)));
    (got, sum, closed)
}

/// Downloads big.bin on `streams` concurrent HTTP/2 streams of one h2c connection. Returns each
/// stream's (bytes, checksum) and whether the server closed the connection (GOAWAY) while this
/// client still held it open.
async fn h2_downloads(addr: SocketAddr, streams: usize, pace: Pace) -> (Vec<(usize, u64)>, bool) {
    let tcp = connect_small(addr).await;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut client = client.clone();
        let mut pace = pace.clone();
        tasks.push(tokio::spawn(async move {
            client = client.ready().await.unwrap();
            let req = http::Request::get(format!("http://{addr}/big.bin")).body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let (mut got, mut sum, mut held) = (0usize, 0u64, false);
            loop {
                if !held && got >= BEFORE_SIGNAL {
                    held = true;
                    pace.hold().await;
                }
                let chunk = match tokio::time::timeout(GENEROUS, body.data()).await {
                    Ok(Some(Ok(c))) => c,
                    Ok(None) => break,
                    Ok(Some(Err(e))) => panic!("HTTP/2 download failed after {got} of {BIG}: {e}"),
                    Err(_) => panic!("HTTP/2 download stalled after {got} of {BIG}"),
                };
                got += chunk.len();
                sum += chunk.iter().map(|b| u64::from(*b)).sum::<u64>();
                let _ = body.flow_control().release_capacity(chunk.len());
                Pace::step().await;
            }
            (got, sum)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // `client` is still alive: the connection can only end because the server closed it.
    let closed = tokio::time::timeout(GENEROUS, conn).await.is_ok();
    drop(client);
    (results, closed)
}

/// An HTTP/1.1 connection that served one request and is now idle (keep-alive).
async fn idle_h1(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /small.txt HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let (head, mut body) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    while body.len() < b"hello\n".len() {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-body");
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body, b"hello\n");
    s
}

/// An HTTP/2 connection that served one request and is now idle; the task ends when it closes.
async fn idle_h2(addr: SocketAddr) -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{addr}/small.txt")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    (client, conn)
}

/// Resolves when the server closes `s` (EOF or reset); panics after GENEROUS.
async fn closed_by_server(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(GENEROUS, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: unexpected {n} bytes"),
        Err(_) => panic!("{what}: still open {GENEROUS:?} after the drain began"),
    }
}

/// Blocks (off the async workers) until the process exits; returns (status, when).
async fn exited(g: Gatehouse) -> (std::process::ExitStatus, Instant, Gatehouse) {
    tokio::task::spawn_blocking(move || {
        let mut g = g;
        let status = g.wait_exit(Duration::from_secs(40));
        (status, Instant::now(), g)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_downloads_and_exits_zero() {
    let site = site();
    let g = Gatehouse::start(&config(site.path(), "300ms", "30s"));
    let addr = g.addr("web");

    const H1: usize = 3;
    const H2_STREAMS: usize = 2;
    let reached = Arc::new(Barrier::new(H1 + H2_STREAMS + 1));
    let (open_gate, gate) = watch::channel(false);
    let pace = Pace {
        reached: reached.clone(),
        gate,
    };
    let h1: Vec<_> = (0..H1).map(|_| tokio::spawn(h1_download(addr, pace.clone()))).collect();
    let h2 = tokio::spawn(h2_downloads(addr, H2_STREAMS, pace.clone()));
    let mut idle = idle_h1(addr).await;

    // Every download is mid-body: now the signal.
    tokio::time::timeout(GENEROUS, reached.wait())
        .await
        .expect("downloads did not start");
    let signalled = Instant::now();
    g.signal("TERM");

    // Readiness flips at once, while the listener still accepts during drain_delay.
    let mut g = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + GENEROUS;
        while g.admin_get("/readyz").0 != 503 {
            assert!(Instant::now() < deadline, "readyz never answered 503:\n{}", g.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        g
    })
    .await
    .unwrap();
    // The idle keep-alive connection closes as soon as the drain begins, downloads or not.
    closed_by_server(&mut idle, "idle HTTP/1.1 keep-alive connection").await;
    // Then new connections are refused: the listening socket is closed.
    let deadline = Instant::now() + GENEROUS;
    loop {
        assert!(Instant::now() < deadline, "the listener still accepts during the drain");
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // The listener closed with this attempt in its accept queue: try again.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect during drain: {e}"),
            // Still within drain_delay.
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(g.is_running(), "exited with downloads in flight:\n{}", g.log());

    let _ = open_gate.send(true);
    for (i, d) in h1.into_iter().enumerate() {
        let (got, sum, closed) = d.await.unwrap();
        assert_eq!(got, BIG, "HTTP/1.1 download {i} cut short: {got} of {BIG}\n{}", g.log());
        assert_eq!(sum, checksum(BIG), "HTTP/1.1 download {i}: wrong bytes");
        assert!(
            closed,
            "HTTP/1.1 download {i}: the connection stayed open after the drained response"
        );
    }
    let (streams, h2_closed) = h2.await.unwrap();
    for (i, (got, sum)) in streams.into_iter().enumerate() {
        assert_eq!(got, BIG, "HTTP/2 stream {i} cut short: {got} of {BIG}\n{}", g.log());
        assert_eq!(sum, checksum(BIG), "HTTP/2 stream {i}: wrong bytes");
    }
    assert!(
        h2_closed,
        "the HTTP/2 connection was not closed (GOAWAY) after its streams"
    );
    let done = Instant::now();

    let (status, at, g) = exited(g).await;
    assert_eq!(status.code(), Some(0), "{}", g.log());
    // The deadline is 30s; the exit must follow the last download, not the deadline.
    assert!(
        at.duration_since(done) < Duration::from_secs(5),
        "exit came {:?} after the downloads finished (signal {:?} before):\n{}",
        at.duration_since(done),
        done.duration_since(signalled),
        g.log()
    );
    let log = g.log();
    assert!(log.contains("drain complete") && log.contains("forced=0"), "{log}");
}

/// An HTTP/1.1 download whose client stops reading after the response head.
async fn stalled_h1(addr: SocketAddr) -> TcpStream {
    let mut s = connect_small(addr).await;
    s.write_all(b"GET /big.bin HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Reads what is left on `s` until the server closes it; returns how many bytes that was.
async fn drain_client(s: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    while let Ok(Ok(k)) = tokio::time::timeout(GENEROUS, s.read(&mut buf)).await {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_timeout_forces_the_rest_closed_and_counts_them() {
    let site = site();
    let g = Gatehouse::start_with(&config(site.path(), "0s", "1s"), "info,gatehouse::conn=debug", |_| {});
    let addr = g.addr("web");
    let mut h1 = stalled_h1(addr).await;
    // HTTP/2: a stream whose client never reads its body, so its window never reopens.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{addr}/big.bin")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let h2_body = resp.await.unwrap().into_body();

    let signalled = Instant::now();
    g.signal("TERM");
    let (status, at, g) = exited(g).await;
    let log = g.log();
    assert_eq!(status.code(), Some(0), "a forced drain still exits 0 (SPEC):\n{log}");
    let took = at.duration_since(signalled);
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before drain_timeout (1s):\n{log}"
    );
    assert!(
        took < Duration::from_secs(8),
        "exited {took:?} after the signal; drain_timeout is 1s:\n{log}"
    );
    // Both connections were cut by the deadline, each logged with its reason, and counted.
    let forced_lines = log
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains("drain_forced"))
        .count();
    assert_eq!(forced_lines, 2, "{log}");
    assert!(
        log.contains("drain deadline reached") && log.contains("connections=2") && log.contains("forced=2"),
        "{log}"
    );
    // The clients saw their downloads end short.
    let rest = drain_client(&mut h1).await;
    assert!(rest < BIG, "the stalled HTTP/1.1 download was completed, not cut");
    assert!(tokio::time::timeout(GENEROUS, conn).await.is_ok());
    drop(h2_body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keepalive_and_preconnected_sockets_do_not_hold_shutdown() {
    let site = site();
    let g = Gatehouse::start_with(&config(site.path(), "0s", "30s"), "info,gatehouse::conn=debug", |_| {});
    let addr = g.addr("web");
    let mut h1 = idle_h1(addr).await;
    let (_h2_client, h2_conn) = idle_h2(addr).await;
    // Like a browser's speculative preconnect: connected, never a byte.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // All three are open on the server (the silent one is accepted, not waiting in the backlog).
    let g = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + GENEROUS;
        while g.admin_get("/debug/connections").1.matches("\"peer\"").count() < 3 {
            assert!(Instant::now() < deadline, "connections not registered:\n{}", g.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        g
    })
    .await
    .unwrap();

    let signalled = Instant::now();
    g.signal("TERM");
    let (status, at, g) = exited(g).await;
    let log = g.log();
    assert_eq!(status.code(), Some(0), "{log}");
    // No deadline was needed: nothing was in flight (30s drain_timeout, typically ~0.1s here).
    let took = at.duration_since(signalled);
    assert!(
        took < Duration::from_secs(5),
        "idle connections held shutdown for {took:?}:\n{log}"
    );
    assert!(log.contains("forced=0"), "{log}");
    closed_by_server(&mut h1, "idle HTTP/1.1").await;
    closed_by_server(&mut silent, "connection that never sent a byte").await;
    assert!(
        tokio::time::timeout(GENEROUS, h2_conn).await.is_ok(),
        "the idle HTTP/2 connection was not closed"
    );
    let shutdown_closes = log
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains("reason=\"shutdown\""))
        .count();
    assert_eq!(shutdown_closes, 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_signal_closes_at_once() {
    let site = site();
    let g = Gatehouse::start(&config(site.path(), "0s", "30s"));
    let addr = g.addr("web");
    let mut stalled = stalled_h1(addr).await;

    g.signal("TERM");
    assert!(g.wait_log("draining", GENEROUS), "{}", g.log());
    // The drain now waits for the stalled download (up to 30s); the second signal ends it.
    let second = Instant::now();
    g.signal("INT");
    let (status, at, g) = exited(g).await;
    let log = g.log();
    assert_eq!(status.code(), Some(0), "{log}");
    let took = at.duration_since(second);
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after the second signal:\n{log}"
    );
    assert!(log.contains("second signal") && log.contains("forced=1"), "{log}");
    assert!(drain_client(&mut stalled).await < BIG);
}
