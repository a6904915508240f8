//! The proxy's HTTP/1.1 client against upstreams scripted byte by byte: what it accepts from a
//! server (interim responses, every body framing, trailers), what it refuses (ambiguous or broken
//! framing), and when a connection is reused, replaced or a request sent again.

use crate::common;

use common::upstream::*;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream whose connections each run `script(index, socket)`, `index` counting from 0.
struct Raw {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn raw_upstream<F, Fut>(script: F) -> Raw
where
    F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let index = count.fetch_add(1, SeqCst);
            tokio::spawn(script(index, socket));
        }
    });
    Raw { addr, accepted }
}

/// Reads one request (its head, and a body of its `Content-Length`): `None` once the proxy
/// closed the connection.
async fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// Answers every request on the connection with `answer`.
async fn answer_all(mut s: TcpStream, answer: &'static [u8]) {
    while read_request(&mut s).await.is_some() {
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn reason(srv: &common::TestServer, reason: &str) -> f64 {
    srv.metric(&series(
        "upstream_new_connection_reasons_total",
        &format!("upstream=\"api\",reason=\"{reason}\""),
    ))
}

fn errors(srv: &common::TestServer, upstream: SocketAddr, cause: &str) -> f64 {
    srv.metric(&series(
        "upstream_errors_total",
        &format!("upstream=\"api\",server=\"{upstream}\",cause=\"{cause}\""),
    ))
}

#[tokio::test]
async fn interim_responses_are_dropped_and_the_connection_kept() {
    let up = raw_upstream(|_, s| {
        answer_all(
            s,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nfinal",
        )
    })
    .await;
    let srv = proxy(&[up.addr], "").await;
    let c = client(false);
    for _ in 0..3 {
        let resp = c.get(format!("http://{}/", srv.addr("c"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-up"], "1");
        assert_eq!(resp.text().await.unwrap(), "final");
    }
    assert_eq!(up.accepted.load(SeqCst), 1, "one connection for all three");
    srv.stop().await;
}

#[tokio::test]
async fn every_body_framing_arrives_whole_and_only_a_delimited_one_keeps_its_connection() {
    let up = raw_upstream(|index, mut s| async move {
        if index == 0 {
            // Delimited by the end of the connection: it cannot carry another request.
            read_request(&mut s).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
            return;
        }
        answer_all(
            s,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
        )
        .await;
    })
    .await;
    let srv = proxy(&[up.addr], "").await;
    let c = client(false);
    let url = format!("http://{}/", srv.addr("c"));
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "until the end");
    for _ in 0..2 {
        assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "hello world");
    }
    assert_eq!(up.accepted.load(SeqCst), 2);
    assert_eq!(reason(&srv, "pool_empty"), 1.0);
    // The upstream ended that body by closing its connection.
    assert_eq!(reason(&srv, "upstream_closed"), 1.0);
    srv.stop().await;
}

/// Responses whose framing is ambiguous or broken: each is a 502 that names the cause, and its
/// connection is never used again (the next request opens a new one).
#[tokio::test]
async fn ambiguous_or_malformed_responses_are_502_and_their_connection_dropped() {
    const BAD: [&[u8]; 6] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    // One upstream and proxy per case: three failures in a row would eject the server.
    for bad in BAD {
        let up = raw_upstream(move |_, s| answer_all(s, bad)).await;
        let srv = proxy(&[up.addr], "").await;
        let c = client(false);
        let what = String::from_utf8_lossy(bad);
        for _ in 0..2 {
            let resp = c.get(format!("http://{}/", srv.addr("c"))).send().await.unwrap();
            assert_eq!(resp.status(), 502, "{what}");
            assert!(resp.text().await.unwrap().contains("bad_response"), "{what}");
        }
        assert_eq!(errors(&srv, up.addr, "bad_response"), 2.0, "{what}");
        assert_eq!(
            up.accepted.load(SeqCst),
            2,
            "a new connection after a bad response: {what}"
        );
        assert_eq!(reason(&srv, "error"), 1.0, "{what}");
        srv.stop().await;
    }
}

/// A chunk-size line ended by a bare LF (a classic of response smuggling): the head has gone to
/// the client already, so its response is broken off rather than ended as if whole.
#[tokio::test]
async fn a_chunk_line_without_its_cr_breaks_the_response_off() {
    let up = raw_upstream(|_, s| {
        answer_all(
            s,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        )
    })
    .await;
    let srv = proxy(&[up.addr], "").await;
    // hyper writes a head with the body's first bytes, so the client may see the connection
    // end before any head; what it must never get is a response that looks whole.
    match client(false).get(format!("http://{}/", srv.addr("c"))).send().await {
        Err(e) => assert!(e.is_request(), "{e}"),
        Ok(resp) => assert!(resp.bytes().await.is_err(), "the client must see a broken body"),
    }
    assert_eq!(errors(&srv, up.addr, "reset_mid_response"), 1.0);
    srv.stop().await;
}

/// A pooled connection the upstream closed while it idled is not used: the next request opens a
/// new one, counted as `upstream_closed`, and the client never notices.
#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_replaced() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let closed_tx = std::sync::Mutex::new(Some(closed_tx));
    let up = raw_upstream(move |index, mut s| {
        let tx = (index == 0).then(|| closed_tx.lock().unwrap().take()).flatten();
        async move {
            if let Some(tx) = tx {
                read_request(&mut s).await;
                s.write_all(OK).await.unwrap();
                drop(s);
                let _ = tx.send(());
                return;
            }
            answer_all(s, OK).await;
        }
    })
    .await;
    let srv = proxy(&[up.addr], "").await;
    let c = client(false);
    let url = format!("http://{}/", srv.addr("c"));
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "ok");
    closed_rx.await.unwrap();
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "ok");
    assert_eq!(up.accepted.load(SeqCst), 2);
    assert_eq!(reason(&srv, "upstream_closed"), 1.0);
    srv.stop().await;
}

/// The keep-alive race: the upstream takes a second request on a pooled connection and closes
/// without a byte of answer. A GET may be sent again, and is, on a new connection; a POST may have
/// been acted on, so it is a 502 and left to the client.
#[tokio::test]
async fn a_reused_connection_closed_before_any_answer_resends_only_idempotent_requests() {
    let script = |index: usize, mut s: TcpStream| async move {
        if index == 0 {
            read_request(&mut s).await;
            s.write_all(OK).await.unwrap();
            read_request(&mut s).await;
            return; // closed without answering the second request
        }
        answer_all(s, OK).await;
    };
    let up = raw_upstream(script).await;
    let srv = proxy(&[up.addr], "").await;
    let c = client(false);
    let url = format!("http://{}/", srv.addr("c"));
    for _ in 0..2 {
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    assert_eq!(up.accepted.load(SeqCst), 2, "the GET went again on a second connection");
    assert_eq!(reason(&srv, "upstream_closed"), 1.0);
    srv.stop().await;

    let up = raw_upstream(script).await;
    let srv = proxy(&[up.addr], "").await;
    let url = format!("http://{}/", srv.addr("c"));
    let first = c.post(&url).body("one").send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.unwrap(), "ok");
    let second = c.post(&url).body("two").send().await.unwrap();
    assert_eq!(second.status(), 502);
    assert!(second.text().await.unwrap().contains("reset_before_response"));
    assert_eq!(up.accepted.load(SeqCst), 1, "the POST was not sent again");
    srv.stop().await;
}

/// Request bodies go upstream framed as they came: with their `Content-Length`, or chunked when
/// the client announced none (HTTP/2), trailers included when declared.
#[tokio::test]
async fn request_bodies_keep_their_length_or_go_chunked() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let up = raw_upstream(move |_, mut s| {
        let tx = tx.clone();
        async move {
            let mut seen = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
                // Enough to answer: a length-framed body, or the end of a chunked one.
                let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
                let whole =
                    (text.contains("content-length: 5") && text.ends_with("hello")) || text.ends_with("0\r\n\r\n");
                if whole {
                    let _ = tx.send(std::mem::take(&mut seen));
                    s.write_all(OK).await.unwrap();
                }
            }
        }
    })
    .await;
    let srv = proxy(&[up.addr], "").await;
    let url = format!("http://{}/", srv.addr("c"));
    let resp = client(false).post(&url).body("hello").send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    let sent = String::from_utf8(rx.recv().await.unwrap()).unwrap();
    assert!(sent.starts_with("POST / HTTP/1.1\r\n"), "{sent}");
    assert!(
        sent.contains("content-length: 5\r\n") && !sent.contains("transfer-encoding"),
        "{sent}"
    );

    // HTTP/2 without a content-length: the upstream gets chunks.
    let (frames, body) = channel_body();
    let tcp = TcpStream::connect(srv.addr("c")).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://a{}/", srv.addr("c")))
        .body(body)
        .unwrap();
    let answer = tokio::spawn(async move {
        let resp = h2.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    });
    frames.send(Ok(Frame::data("abc".into()))).await.unwrap();
    frames.send(Ok(Frame::data("de".into()))).await.unwrap();
    drop(frames);
    assert_eq!(answer.await.unwrap(), "ok");
    let sent = String::from_utf8(rx.recv().await.unwrap()).unwrap();
    assert!(sent.contains("transfer-encoding: chunked\r\n"), "{sent}");
    assert!(sent.ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "{sent:?}");
    srv.stop().await;
}

/// Over TLS, bytes an upstream sends past its response can sit decrypted inside rustls while the
/// socket shows nothing to read: the connection must still not be reused, or the next request
/// gets them as its answer (here a planted `POISON` response). The first answer is sized so that
/// its head and body fill the client's first read (8 KiB) exactly and the planted response stays
/// in the same TLS record, inside rustls.
#[tokio::test]
async fn over_tls_bytes_past_a_response_held_in_rustls_stop_its_reuse() {
    let pki = common::Pki::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_server(&pki, &["http/1.1"]));
    let head = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
    let body_len = (1..8192).find(|n| head(*n).len() + n == 8192).unwrap();
    let mut first = head(body_len).into_bytes();
    first.extend(std::iter::repeat_n(b'a', body_len));
    first.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON");
    let first: &'static [u8] = first.leak();
    let up = raw_upstream(move |index, tcp| {
        let acceptor = acceptor.clone();
        async move {
            let mut s = acceptor.accept(tcp).await.unwrap();
            let mut buf = vec![0u8; 8192];
            // One request per connection is enough here; a second is answered `clean`.
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            let answer: &[u8] = if index == 0 {
                first
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean"
            };
            s.write_all(answer).await.unwrap();
            s.flush().await.unwrap();
            // Hold the connection open, as a keep-alive server would.
            let _ = s.read(&mut buf).await;
        }
    })
    .await;
    let srv = proxy(
        &[up.addr],
        &format!(
            "tls = {{ server_name = \"localhost\", ca = \"{}\" }}",
            pki.ca_path().display()
        ),
    )
    .await;
    let c = client(false);
    let url = format!("http://{}/", srv.addr("c"));
    let first = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(first.len(), body_len);
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "clean");
    assert_eq!(up.accepted.load(SeqCst), 2);
    assert_eq!(reason(&srv, "error"), 1.0);
    srv.stop().await;
}

/// An idle connection its server closes is closed on this side too within about a second, with
/// no request to find out: it does not wait in CLOSE_WAIT until `idle_timeout` (60 s here). The
/// upstream closes only once the client has its answer, so the connection has idled in the pool
/// (and the pool's first look at it found it open) before.
#[tokio::test]
async fn an_idle_connection_the_upstream_closes_is_closed_here_within_a_second() {
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let chans = std::sync::Mutex::new(Some((close_rx, closed_tx)));
    let up = raw_upstream(move |_, mut s| {
        let chans = chans.lock().unwrap().take();
        async move {
            let Some((close_rx, closed_tx)) = chans else { return };
            read_request(&mut s).await;
            s.write_all(OK).await.unwrap();
            let _ = close_rx.await;
            // Closes its side, and waits for the proxy to close the other.
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            let _ = closed_tx.send(());
        }
    })
    .await;
    let srv = proxy(&[up.addr], "").await;
    let c = client(false);
    let url = format!("http://{}/", srv.addr("c"));
    assert_eq!(c.get(&url).send().await.unwrap().text().await.unwrap(), "ok");
    close_tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), closed_rx)
        .await
        .expect("the proxy kept an idle connection its upstream had closed")
        .unwrap();
    assert_eq!(
        reason(&srv, "upstream_closed"),
        0.0,
        "counted when the next connection opens"
    );
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        502,
        "the upstream answers no more"
    );
    srv.stop().await;
}
