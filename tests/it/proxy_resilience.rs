//! Upstream resilience through the real proxy, against real upstream servers on loopback:
//! passive ejection after an upstream dies mid-stream, the circuit breaker's whole cycle, active
//! health checks over HTTP/1.1, h2c and h2 (TLS), the retry budget, and the stale and
//! configured fallbacks.

use crate::common;

use bytes::Bytes;
use common::upstream::*;
use common::Pki;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn reply(status: u16, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()).map_err(|e: Infallible| match e {}).boxed());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r
}

fn server_labels(addr: SocketAddr) -> String {
    format!("upstream=\"api\",server=\"{addr}\"")
}

/// Polls `cond` every 20ms for up to 10s (generous for a loaded CI machine).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened within 10s: {what}");
}

/// An upstream dies while streaming a response: the client's response is visibly broken, and
/// passive ejection takes the dead server out, so that (with a retry) every later request is
/// answered by the other server.
async fn killed_mid_stream(kind: Kind, protocol: &str, http2_client: bool) {
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let senders = Arc::new(std::sync::Mutex::new(Vec::<FrameTx>::new()));
    let keep = senders.clone();
    let dying = Backend::start(
        kind.clone(),
        handler(move |_| {
            let (started_tx, keep) = (started_tx.clone(), keep.clone());
            async move {
                let (tx, body) = channel_body();
                tx.send(Ok(Frame::data(Bytes::from_static(b"partial")))).await.unwrap();
                keep.lock().unwrap().push(tx);
                let _ = started_tx.send(()).await;
                Response::new(body)
            }
        }),
    )
    .await;
    let good = Backend::start(kind, handler(|_| async { reply(200, "good") })).await;
    let srv = proxy(
        &[dying.addr, good.addr],
        &format!("protocol = \"{protocol}\"\n[upstreams.retry]\nattempts = 2\n"),
    )
    .await;
    let addr = srv.addr("c");

    // Round robin starts with the first server: the dying one.
    if http2_client {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let (resp, _) = h2
            .send_request(Request::get("http://a/stream").body(()).unwrap(), true)
            .unwrap();
        started_rx.recv().await.unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        assert_eq!(body.data().await.unwrap().unwrap(), "partial");
        dying.kill();
        let err = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("the stream must end promptly")
            .expect("a frame or an error")
            .expect_err("the stream must be reset, not ended");
        assert_eq!(err.reason(), Some(h2::Reason::INTERNAL_ERROR), "{err}");
    } else {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        started_rx.recv().await.unwrap();
        // The head and the first chunk are on their way before the kill.
        let mut first = vec![0u8; 1];
        s.read_exact(&mut first).await.unwrap();
        dying.kill();
        let mut out = first;
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("gatehouse must close the client connection")
            .ok();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("partial"), "{text}");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "the response must not look complete:\n{text}"
        );
    }
    let dead = server_labels(dying.addr);
    eventually("the mid-stream reset is counted", || {
        srv.metric(&series(
            "upstream_errors_total",
            &format!("{dead},cause=\"reset_mid_response\""),
        )) == 1.0
    })
    .await;

    // Every later request is answered by the good server: the dead one fails its connects
    // (each retried on the good one) until the third failure in a row ejects it.
    let c = client(http2_client);
    for i in 0..12 {
        let resp = c.get(format!("http://{addr}/after/{i}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "good");
    }
    assert_eq!(srv.metric(&series("upstream_ejections_total", &dead)), 1.0);
    let connect_failures = srv.metric(&series(
        "upstream_errors_total",
        &format!("{dead},cause=\"connect_failed\""),
    ));
    assert_eq!(
        connect_failures, 2.0,
        "ejected after reset + 2 connect failures, then skipped"
    );
    assert_eq!(good.requests(), 12);
    assert_eq!(
        srv.metric(&series("retries_total", "upstream=\"api\",result=\"attempted\"")),
        2.0
    );
    drop(senders);
    srv.stop().await;
}

#[tokio::test]
async fn killed_http1_upstream_mid_stream_breaks_the_response_and_is_ejected() {
    killed_mid_stream(Kind::H1, "http/1.1", false).await;
}

#[tokio::test]
async fn killed_h2c_upstream_mid_stream_resets_the_stream_and_is_ejected() {
    killed_mid_stream(Kind::H2c, "h2c", true).await;
}

/// A server that answers 500 to every other request (while `sick`): the breaker opens exactly
/// when the window reaches `min_requests` at the ratio, fallbacks answer while it is open, and
/// after `open_for` its probes find the server recovered and close it: the gauge goes 0, 1, 2, 0.
async fn breaker_cycle(kind: Kind, protocol: &str) {
    let sick = Arc::new(AtomicBool::new(true));
    let n = Arc::new(AtomicUsize::new(0));
    let (s, count) = (sick.clone(), n.clone());
    let be = Backend::start(
        kind,
        handler(move |_| {
            let fail = s.load(SeqCst) && count.fetch_add(1, SeqCst) % 2 == 0;
            async move {
                if fail {
                    reply(500, "oops")
                } else {
                    reply(200, "fine")
                }
            }
        }),
    )
    .await;
    let srv = proxy(
        &[be.addr],
        &format!(
            "protocol = \"{protocol}\"
[upstreams.breaker]
failure_ratio = 0.5
min_requests = 10
window = \"30s\"
open_for = \"300ms\"
half_open_probes = 2
[upstreams.fallback]
respond = {{ status = 503, body = \"try later\", retry_after = \"1s\" }}
"
        ),
    )
    .await;
    let addr = srv.addr("c");
    let state = series("upstream_breaker_state", &server_labels(be.addr));
    assert_eq!(srv.metric(&state), 0.0);
    let c = client(false);
    // 500, 200, 500, ...: after 10 requests the ratio is exactly 0.5 but the breaker only
    // decides after a failure; the 11th (a failure: 6 of 11) opens it.
    for i in 1..=11 {
        let resp = c.get(format!("http://{addr}/r{i}")).send().await.unwrap();
        let want = if i % 2 == 1 { 500 } else { 200 };
        assert_eq!(resp.status(), want, "request {i}");
        assert!(resp.headers().get("x-gatehouse-fallback").is_none());
        let expected = if i < 11 { 0.0 } else { 1.0 };
        assert_eq!(srv.metric(&state), expected, "breaker state after request {i}");
    }
    // Open: the fallback answers, the server sees nothing.
    for _ in 0..3 {
        let resp = c.get(format!("http://{addr}/open")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-gatehouse-fallback"], "respond");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.text().await.unwrap(), "try later");
    }
    assert_eq!(be.requests(), 11);
    assert_eq!(
        srv.metric(&series("fallback_total", "upstream=\"api\",kind=\"respond\"")),
        3.0
    );
    let log = access_log(&srv, "fallback=respond").await;
    assert!(
        log.contains("upstream:no_server_available upstream=api") && log.contains("breaker_open"),
        "{log}"
    );

    // The server recovers; after open_for the first request is a probe (half-open)...
    sick.store(false, SeqCst);
    let mut probed = false;
    for _ in 0..250 {
        let resp = c.get(format!("http://{addr}/probe")).send().await.unwrap();
        if resp.headers().get("x-gatehouse-fallback").is_none() {
            assert_eq!(resp.status(), 200);
            probed = true;
            break;
        }
        // Time must pass (open_for); there is no event to await.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(probed, "no probe admitted within 5s of open_for = 300ms");
    assert_eq!(srv.metric(&state), 2.0, "half-open after the first probe");
    // ...and the second successful probe closes it.
    let resp = c.get(format!("http://{addr}/probe2")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(srv.metric(&state), 0.0, "closed after half_open_probes successes");
    for i in 0..5 {
        let resp = c.get(format!("http://{addr}/closed{i}")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    srv.stop().await;
}

#[tokio::test]
async fn breaker_opens_at_the_ratio_serves_fallbacks_probes_and_closes_http1() {
    breaker_cycle(Kind::H1, "http/1.1").await;
}

#[tokio::test]
async fn breaker_opens_at_the_ratio_serves_fallbacks_probes_and_closes_h2c() {
    breaker_cycle(Kind::H2c, "h2c").await;
}

/// Active checks take a server out after `unhealthy_after` failed probes and bring it back after
/// `healthy_after` good ones; with every server down and no fallback, the answer is a 503 that
/// says so.
async fn active_health(kind: Kind, upstream_keys: &str) {
    let a_ok = Arc::new(AtomicBool::new(true));
    let b_ok = Arc::new(AtomicBool::new(true));
    let checks = |ok: Arc<AtomicBool>, name: &'static str| {
        handler(move |req| {
            let healthy = ok.load(SeqCst);
            async move {
                if req.uri().path() == "/healthz" {
                    assert_eq!(
                        req.headers()
                            .get("user-agent")
                            .map(|v| v.to_str().unwrap().starts_with("gatehouse-health-check/")),
                        Some(true)
                    );
                    reply(if healthy { 200 } else { 503 }, "")
                } else {
                    reply(200, name)
                }
            }
        })
    };
    let a = Backend::start(kind.clone(), checks(a_ok.clone(), "a")).await;
    let b = Backend::start(kind, checks(b_ok.clone(), "b")).await;
    let srv = proxy(
        &[a.addr, b.addr],
        &format!(
            "{upstream_keys}
[upstreams.health]
path = \"/healthz\"
interval = \"100ms\"
unhealthy_after = 2
healthy_after = 2
"
        ),
    )
    .await;
    let addr = srv.addr("c");
    let healthy = |s: SocketAddr| srv.metric(&series("upstream_server_healthy", &server_labels(s)));
    assert_eq!((healthy(a.addr), healthy(b.addr)), (1.0, 1.0), "servers start healthy");
    let c = client(false);

    a_ok.store(false, SeqCst);
    eventually("a is marked unhealthy", || healthy(a.addr) == 0.0).await;
    let before = a.requests();
    for _ in 0..6 {
        let resp = c.get(format!("http://{addr}/x")).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "b");
    }
    assert_eq!(a.requests(), before, "no request goes to an unhealthy server");

    b_ok.store(false, SeqCst);
    eventually("b is marked unhealthy", || healthy(b.addr) == 0.0).await;
    let resp = c.get(format!("http://{addr}/none")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("x-gatehouse-fallback").is_none());
    let text = resp.text().await.unwrap();
    assert!(text.contains("no server available (unhealthy)"), "{text}");
    let log = access_log(&srv, "upstream:no_server_available").await;
    assert!(
        log.contains(&format!("{} unhealthy, {} unhealthy", a.addr, b.addr)),
        "{log}"
    );
    assert_eq!(
        srv.metric(&series(
            "upstream_unavailable_total",
            "upstream=\"api\",reason=\"unhealthy\""
        )),
        1.0
    );

    a_ok.store(true, SeqCst);
    b_ok.store(true, SeqCst);
    eventually("both are healthy again", || {
        healthy(a.addr) == 1.0 && healthy(b.addr) == 1.0
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(
            c.get(format!("http://{addr}/y"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    assert_eq!(seen.len(), 2, "traffic spreads over both again: {seen:?}");
    srv.stop().await;
}

#[tokio::test]
async fn active_health_checks_take_servers_out_and_back_http1() {
    active_health(Kind::H1, "").await;
}

#[tokio::test]
async fn active_health_checks_take_servers_out_and_back_h2c() {
    active_health(Kind::H2c, "protocol = \"h2c\"").await;
}

#[tokio::test]
async fn active_health_checks_take_servers_out_and_back_h2_over_tls() {
    let pki = Pki::new();
    let keys = format!(
        "protocol = \"h2\"\ntls = {{ server_name = \"localhost\", ca = \"{}\" }}",
        pki.ca_path().display()
    );
    active_health(Kind::Tls(tls_server(&pki, &["h2"])), &keys).await;
}

/// Both servers always answer 503: with `budget = 0.2` and up to two retries a request, 200
/// requests get exactly the budget's retries (20% plus the floor of 10/s over the 10s window),
/// never more; a POST is never retried, nor a PUT whose body went upstream.
#[tokio::test]
async fn retries_never_exceed_the_budget_and_unreplayable_requests_are_not_retried() {
    let down = || handler(|_| async { reply(503, "busy") });
    let a = Backend::start(Kind::H1, down()).await;
    let b = Backend::start(Kind::H1, down()).await;
    let srv = proxy(&[a.addr, b.addr], "[upstreams.retry]\nattempts = 3\nbudget = 0.2\n").await;
    let addr = srv.addr("c");
    let c = client(false);
    for i in 0..200 {
        let resp = c.get(format!("http://{addr}/g{i}")).send().await.unwrap();
        assert_eq!(resp.status(), 503, "the upstream's own answer is passed on");
        assert_eq!(resp.text().await.unwrap(), "busy");
    }
    let retries = |result: &str| {
        srv.metric(&series(
            "retries_total",
            &format!("upstream=\"api\",result=\"{result}\""),
        ))
    };
    let attempted = retries("attempted");
    // 0.2 × 200 requests + 10 retries/s × 10s window.
    assert!(attempted <= 140.0, "{attempted} retries exceed the budget");
    assert!(attempted >= 100.0, "the floor lets retries happen: {attempted}");
    assert!(retries("budget_exhausted") >= 60.0, "{}", retries("budget_exhausted"));
    assert_eq!((a.requests() + b.requests()) as f64, 200.0 + attempted);

    let sent = a.requests() + b.requests();
    for i in 0..5 {
        let resp = c
            .post(format!("http://{addr}/p{i}"))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
    }
    assert_eq!(retries("not_idempotent"), 5.0);
    let resp = c
        .put(format!("http://{addr}/put"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(retries("body_consumed"), 1.0);
    assert_eq!(a.requests() + b.requests(), sent + 6, "one attempt each");
    assert_eq!(retries("attempted"), attempted);
    srv.stop().await;
}

/// While the only server is down, a GET it answered before is served from the stale cache
/// (marked, with Age and Warning), anything else gets the configured answer; a response larger
/// than the cache's cap streams through untouched and is not cached.
#[tokio::test]
async fn stale_fallback_serves_the_last_good_get_then_respond() {
    let (go_tx, go_rx) = tokio::sync::mpsc::channel::<()>(1);
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let be = Backend::start(
        Kind::H1,
        handler(move |req| {
            let go_rx = go_rx.clone();
            async move {
                match req.uri().path() {
                    "/big" => {
                        // 600 KiB now, 600 KiB once the client has seen the first part: more
                        // than the 1 MiB the cache takes, and proof that nothing waits for it.
                        let (tx, body) = channel_body();
                        tokio::spawn(async move {
                            tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 600 * 1024]))))
                                .await
                                .unwrap();
                            go_rx.lock().await.recv().await;
                            tx.send(Ok(Frame::data(Bytes::from(vec![b'y'; 600 * 1024]))))
                                .await
                                .unwrap();
                        });
                        Response::new(body)
                    }
                    "/page" => {
                        let mut r = reply(200, "version 1");
                        r.headers_mut().insert("content-type", "text/plain".parse().unwrap());
                        r
                    }
                    _ => reply(200, "other"),
                }
            }
        }),
    )
    .await;
    let srv = proxy(
        &[be.addr],
        "[upstreams.fallback]\nstale_for = \"5m\"\nrespond = { status = 503, body = \"down for now\", retry_after = \"2s\" }\n",
    )
    .await;
    let addr = srv.addr("c");
    let c = client(false);
    assert_eq!(
        c.get(format!("http://{addr}/page"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "version 1"
    );
    let mut big = c.get(format!("http://{addr}/big")).send().await.unwrap();
    let mut got = 0;
    while got < 600 * 1024 {
        got += tokio::time::timeout(Duration::from_secs(5), big.chunk())
            .await
            .expect("the first part streams before the upstream sends the rest")
            .unwrap()
            .unwrap()
            .len();
    }
    go_tx.send(()).await.unwrap();
    while let Some(chunk) = big.chunk().await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, 1200 * 1024);

    be.kill();
    for http2 in [false, true] {
        let resp = client(http2).get(format!("http://{addr}/page")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-gatehouse-fallback"], "stale");
        assert_eq!(resp.headers()["warning"], "110 - \"Response is Stale\"");
        assert!(resp.headers()["age"].to_str().unwrap().parse::<u64>().is_ok());
        assert_eq!(resp.headers()["content-type"], "text/plain");
        assert_eq!(resp.text().await.unwrap(), "version 1");
    }
    for (method, path) in [("GET", "/never-seen"), ("GET", "/big"), ("POST", "/page")] {
        let resp = c
            .request(method.parse().unwrap(), format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503, "{method} {path}");
        assert_eq!(resp.headers()["x-gatehouse-fallback"], "respond");
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.text().await.unwrap(), "down for now");
    }
    assert_eq!(
        srv.metric(&series("fallback_total", "upstream=\"api\",kind=\"stale\"")),
        2.0
    );
    assert_eq!(
        srv.metric(&series("fallback_total", "upstream=\"api\",kind=\"respond\"")),
        3.0
    );
    let log = access_log(&srv, "fallback=stale").await;
    assert!(
        log.contains(&format!("upstream:connect_failed upstream=api server={}", be.addr)),
        "{log}"
    );
    srv.stop().await;
}

/// A reload replaces the checkers (a removed `[upstreams.health]` stops probing, and its gauge
/// series goes), and shutdown stops them: no checker task outlives its configuration.
#[tokio::test]
async fn reload_replaces_health_checkers_and_shutdown_stops_them() {
    let probes = Arc::new(AtomicUsize::new(0));
    let p = probes.clone();
    let be = Backend::start(
        Kind::H1,
        handler(move |req| {
            if req.uri().path() == "/healthz" {
                p.fetch_add(1, SeqCst);
            }
            async { reply(503, "") }
        }),
    )
    .await;
    let srv = proxy(
        &[be.addr],
        "[upstreams.health]\ninterval = \"100ms\"\nunhealthy_after = 1\nhealthy_after = 1\n",
    )
    .await;
    let gauge = series("upstream_server_healthy", &server_labels(be.addr));
    eventually("the failing server is marked unhealthy", || srv.metric(&gauge) == 0.0).await;

    // Without [upstreams.health]: the checker stops and its series is removed.
    let mut next = (*srv.handle.config()).clone();
    next.upstreams[0].health = None;
    srv.handle.reload(next).await.unwrap();
    assert!(!srv
        .handle
        .metrics
        .encode()
        .contains("gatehouse_upstream_server_healthy{"));
    let after_reload = probes.load(SeqCst);
    // Absence cannot be awaited: give a stray checker five intervals to show itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        probes.load(SeqCst) <= after_reload + 1,
        "probes continued after the reload removed the checks"
    );

    // Back again: a new checker (the server starts healthy, its settings having changed).
    let mut next = (*srv.handle.config()).clone();
    next.upstreams[0].health = Some(Default::default());
    next.upstreams[0].health.as_mut().unwrap().interval = gatehouse::config::Span(Duration::from_millis(100));
    next.upstreams[0].health.as_mut().unwrap().unhealthy_after = 1;
    srv.handle.reload(next).await.unwrap();
    let before = probes.load(SeqCst);
    eventually("the new checker probes", || probes.load(SeqCst) > before + 1).await;
    eventually("and marks the server unhealthy", || srv.metric(&gauge) == 0.0).await;

    srv.stop().await;
    let stopped = probes.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(probes.load(SeqCst) <= stopped + 1, "probes continued after shutdown");
}
