//! The proxy's resilience blocks behind a real server and real clients: what a client sees from
//! a rate limit, load shedding and the fallbacks over HTTP/1.1 and HTTP/2, and the health
//! checker probing real servers over TCP.

use crate::common;

use bytes::Bytes;
use common::upstream::client;
use common::TestServer;
use gatehouse::proxy::resilience::classes::{ClassSpec, TrafficClasses};
use gatehouse::proxy::resilience::health::{
    spawn_checker, CheckedServer, Health, HealthEvent, HealthObserver, HealthSettings, Probe, ProbeResult, ServerHealth,
};
use gatehouse::proxy::resilience::ratelimit::{KeyedRateLimit, RateDecision, RateLimitSpec};
use gatehouse::proxy::resilience::stale::{Fallback, RespondFallback, StaleCache, StaleSettings};
use gatehouse::RequestContext;
use http::header::{HeaderName, HeaderValue};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLEAR: &str = "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n";

type Full = http_body_util::Full<Bytes>;

fn full(r: http::Response<Bytes>) -> http::Response<Full> {
    r.map(Full::new)
}

fn ok(text: &'static str) -> http::Response<Full> {
    http::Response::new(Full::new(Bytes::from_static(text.as_bytes())))
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_ratelimit_fields() {
    for http2 in [false, true] {
        let limit = Arc::new(KeyedRateLimit::new(
            RateLimitSpec::from_keys("per-client", "header:x-api-key", "1/h", 2).unwrap(),
        ));
        let l = Arc::clone(&limit);
        let svc = tower::service_fn(move |req: http::Request<gatehouse::RequestBody>| {
            let l = Arc::clone(&l);
            async move {
                let peer = req
                    .extensions()
                    .get::<RequestContext>()
                    .expect("the pipeline sets a RequestContext")
                    .conn
                    .peer
                    .ip();
                let decision = l.check(peer, req.headers());
                Ok::<_, Infallible>(match decision {
                    RateDecision::Limited { retry_after } => full(l.limited_response(retry_after)),
                    allowed => {
                        let mut r = ok("ok");
                        l.add_headers(&allowed, r.headers_mut());
                        r
                    }
                })
            }
        });
        let srv = TestServer::start_service(CLEAR, svc).await;
        let url = format!("http://{}/", srv.addr("c"));
        let c = client(http2);
        let get = |key: &'static str| c.get(&url).header("x-api-key", key).send();

        let first = get("alice").await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["ratelimit"], "\"per-client\";r=1;t=3600");
        assert_eq!(get("alice").await.unwrap().status(), 200);
        let refused = get("alice").await.unwrap();
        assert_eq!(refused.status(), 429, "http2={http2}");
        let h = refused.headers();
        assert_eq!(h["retry-after"], "3600");
        assert_eq!(h["ratelimit-policy"], "\"per-client\";q=1;w=3600");
        assert_eq!(h["ratelimit"], "\"per-client\";r=0;t=3600");
        assert_eq!(refused.text().await.unwrap(), "rate limited, retry later\n");
        assert_eq!(
            get("bob").await.unwrap().status(),
            200,
            "another key has its own bucket"
        );
        // Without the header the client address is the key: two pass, the third is refused.
        for want in [200, 200, 429] {
            assert_eq!(c.get(&url).send().await.unwrap().status(), want);
        }
        srv.stop().await;
    }
}

#[tokio::test]
async fn shedding_refuses_the_lowest_shed_order_first() {
    for http2 in [false, true] {
        // Global limit 2: the reserve is 1 slot, so standard stops at 1 in flight and premium
        // may use both.
        let classes = TrafficClasses::new(
            &[ClassSpec {
                name: "premium".into(),
                header: HeaderName::from_static("x-traffic-class"),
                value: HeaderValue::from_static("premium"),
                max_in_flight: 0,
                shed_order: 2,
            }],
            2,
        );
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (tc, g) = (classes.clone(), Arc::clone(&gate));
        let svc = tower::service_fn(move |req: http::Request<gatehouse::RequestBody>| {
            let (tc, g) = (tc.clone(), Arc::clone(&g));
            async move {
                let class = tc.classify(req.headers());
                Ok::<_, Infallible>(match tc.admit(class, false) {
                    Err(shed) => full(shed.response()),
                    Ok(in_flight) => {
                        // Held in flight until the test opens the gate.
                        let _permit = g.acquire().await;
                        drop(in_flight);
                        ok("served")
                    }
                })
            }
        });
        let srv = TestServer::start_service(CLEAR, svc).await;
        let url = format!("http://{}/", srv.addr("c"));
        let c = client(http2);
        let send = |premium: bool| {
            let req = c.get(&url);
            let req = if premium {
                req.header("x-traffic-class", "premium")
            } else {
                req
            };
            tokio::spawn(req.send())
        };
        let wait_in_flight = |n: usize| {
            let tc = classes.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while tc.in_flight() != n {
                    assert!(Instant::now() < deadline, "in flight {} != {n}", tc.in_flight());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };

        let standard_held = send(false);
        wait_in_flight(1).await;
        let shed = send(false).await.unwrap().unwrap();
        assert_eq!(shed.status(), 503, "standard is shed at its threshold (http2={http2})");
        assert_eq!(shed.headers()["retry-after"], "1");
        let premium_held = send(true);
        wait_in_flight(2).await;
        let premium_shed = send(true).await.unwrap().unwrap();
        assert_eq!(premium_shed.status(), 503, "premium is shed only at the global limit");

        gate.add_permits(2);
        for held in [standard_held, premium_held] {
            let r = held.await.unwrap().unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.unwrap(), "served");
        }
        wait_in_flight(0).await;
        srv.stop().await;
    }
}

#[tokio::test]
async fn fallbacks_serve_stale_then_respond_marked_as_fallbacks() {
    for http2 in [false, true] {
        let fallback = Arc::new(Fallback {
            stale: Some(StaleCache::new(StaleSettings::from_keys(Duration::from_secs(300)))),
            respond: Some(RespondFallback::from_keys(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "temporarily unavailable",
                Some(Duration::from_secs(5)),
            )),
        });
        let up = Arc::new(AtomicBool::new(true));
        let (fb, u) = (Arc::clone(&fallback), Arc::clone(&up));
        // Stands in for the proxy: while "the upstream" is up it answers and the answer is
        // remembered; once it is down the fallback answers.
        let svc = tower::service_fn(move |req: http::Request<gatehouse::RequestBody>| {
            let (fb, u) = (Arc::clone(&fb), Arc::clone(&u));
            async move {
                let host = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let host = req.uri().host().map(str::to_owned).unwrap_or(host);
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
                let now = Instant::now();
                if u.load(Ordering::SeqCst) {
                    let body = Bytes::from(format!("fresh {pq}"));
                    let mut headers = http::HeaderMap::new();
                    headers.insert("content-type", HeaderValue::from_static("text/plain"));
                    if let Some(cache) = &fb.stale {
                        cache.store(
                            req.method(),
                            &host,
                            &pq,
                            req.headers(),
                            http::StatusCode::OK,
                            &headers,
                            &body,
                            now,
                        );
                    }
                    let mut r = http::Response::new(Full::new(body));
                    *r.headers_mut() = headers;
                    return Ok::<_, Infallible>(r);
                }
                let answer = fb.answer(req.method(), &host, &pq, req.headers(), now);
                Ok(match answer {
                    Some((_, r)) => full(r),
                    None => {
                        let mut r = ok("no fallback");
                        *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                        r
                    }
                })
            }
        });
        let srv = TestServer::start_service(CLEAR, svc).await;
        let base = format!("http://{}", srv.addr("c"));
        let c = client(http2);
        let fresh = c.get(format!("{base}/page?v=1")).send().await.unwrap();
        assert_eq!(fresh.text().await.unwrap(), "fresh /page?v=1");

        up.store(false, Ordering::SeqCst);
        let stale = c.get(format!("{base}/page?v=1")).send().await.unwrap();
        assert_eq!(stale.status(), 200, "http2={http2}");
        let h = stale.headers();
        assert_eq!(h["x-gatehouse-fallback"], "stale");
        assert_eq!(h["warning"], "110 - \"Response is Stale\"");
        assert_eq!(h["age"], "0");
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(stale.text().await.unwrap(), "fresh /page?v=1");

        let respond = c.get(format!("{base}/never-seen")).send().await.unwrap();
        assert_eq!(respond.status(), 503);
        assert_eq!(respond.headers()["x-gatehouse-fallback"], "respond");
        assert_eq!(respond.headers()["retry-after"], "5");
        assert_eq!(respond.text().await.unwrap(), "temporarily unavailable");
        srv.stop().await;
    }
}

/// `GET path` with reqwest: the shape of the probe the proxy provides over its pool.
struct HttpProbe {
    servers: Vec<SocketAddr>,
    client: reqwest::Client,
}

impl Probe for HttpProbe {
    fn probe(&self, server: usize, path: &str) -> Pin<Box<dyn Future<Output = ProbeResult> + Send>> {
        let req = self.client.get(format!("http://{}{path}", self.servers[server]));
        Box::pin(async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("status {}", r.status().as_u16())),
                Err(e) if e.is_connect() => Err("connect failed".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

#[tokio::test]
async fn health_checker_takes_failing_real_servers_out_and_keeps_the_good_one() {
    let route = |status: u16| format!("{CLEAR}[[routes]]\nrespond = {{ status = {status}, body = \"x\" }}\n");
    let good = TestServer::start(&route(200)).await;
    let sick = TestServer::start(&route(503)).await;
    // A port nobody listens on any more: connections are refused.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let settings = HealthSettings::from_keys("/healthz".into(), Duration::from_millis(100), 2, 2);
    let servers: Vec<CheckedServer> = ["good", "sick", "gone"]
        .iter()
        .map(|n| CheckedServer {
            name: (*n).into(),
            health: Arc::new(ServerHealth::new(settings.clone())),
        })
        .collect();
    let probe = Arc::new(HttpProbe {
        servers: vec![good.addr("c"), sick.addr("c"), gone],
        client: reqwest::Client::builder().no_proxy().http1_only().build().unwrap(),
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let observer: HealthObserver = Arc::new(move |server, event, error| {
        let _ = tx.send((server.name.to_string(), *event, error.map(str::to_owned)));
    });
    let checker = spawn_checker(settings, servers.clone(), probe, observer);

    let mut events = Vec::new();
    while events.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("both failing servers reported within 10s")
            .expect("observer alive");
        events.push(e);
    }
    events.sort_by(|a, b| a.0.cmp(&b.0));
    let unhealthy = HealthEvent::Changed {
        to: Health::Unhealthy,
        consecutive: 2,
    };
    assert_eq!(events[0], ("gone".into(), unhealthy, Some("connect failed".into())));
    assert_eq!(events[1], ("sick".into(), unhealthy, Some("status 503".into())));
    let now = Instant::now();
    assert!(servers[0].health.is_available(now), "the good server stays in rotation");
    assert!(!servers[1].health.is_available(now));
    assert!(!servers[2].health.is_available(now));

    tokio::time::timeout(Duration::from_secs(5), checker.stop())
        .await
        .expect("the checker stops");
    good.stop().await;
    sick.stop().await;
}
