//! Traffic classes, load shedding and rate limits in front of a real upstream on loopback: what a
//! client sees (status, Retry-After, RateLimit fields), what is counted, and what is logged.
//!
//! In-flight load is made by an upstream that holds `/slow` requests until the test releases
//! them; the test waits until the upstream has them all before it measures anything.

use crate::common::upstream::LISTENER;
use crate::common::TestServer;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// An HTTP/1.1 upstream: `/slow` answers once released, anything else at once.
struct Upstream {
    addr: SocketAddr,
    /// `/slow` requests that have arrived.
    arrived: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let counter = arrived.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (counter, released) = (counter.clone(), released.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (counter, mut released) = (counter.clone(), released.clone());
                    async move {
                        if req.uri().path() == "/slow" {
                            counter.fetch_add(1, SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                conns.spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
            }
        });
        Upstream {
            addr,
            arrived,
            release,
            task,
        }
    }

    /// Waits (bounded) until `n` `/slow` requests are held.
    async fn holding(&self, n: usize) {
        for _ in 0..500 {
            if self.arrived.load(SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the upstream holds {} /slow requests, not {n}",
            self.arrived.load(SeqCst)
        );
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const PREMIUM: &str =
    "[[traffic_classes]]\nname = \"premium\"\nheader = \"x-traffic-class\"\nvalue = \"premium\"\nshed_order = 2\n";

/// gatehouse proxying every path to `upstream`, with `extra` configuration (top-level tables).
async fn proxy(upstream: &Upstream, upstream_keys: &str, extra: &str) -> TestServer {
    TestServer::start(&format!(
        "{LISTENER}[[upstreams]]\nname = \"api\"\nservers = [\"{}\"]\n{upstream_keys}\n[[routes]]\nproxy = \"api\"\n{extra}",
        upstream.addr
    ))
    .await
}

fn client(http2: bool) -> reqwest::Client {
    let b = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(20));
    if http2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    }
    .build()
    .unwrap()
}

/// Starts `n` `/slow` requests of `class` (None: standard) that stay in flight until released.
fn hold(
    client: &reqwest::Client,
    addr: SocketAddr,
    class: Option<&str>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            let mut req = client.get(format!("http://{addr}/slow"));
            if let Some(c) = class {
                req = req.header("x-traffic-class", c);
            }
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect()
}

async fn get(client: &reqwest::Client, addr: SocketAddr, class: Option<&str>) -> reqwest::Response {
    let mut req = client.get(format!("http://{addr}/fast"));
    if let Some(c) = class {
        req = req.header("x-traffic-class", c);
    }
    req.send().await.unwrap()
}

async fn access_log(srv: &TestServer, want: &str) -> String {
    for _ in 0..300 {
        let log = std::fs::read_to_string(&srv.access_log).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(want)) {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "access log never contained {want}:\n{}",
        std::fs::read_to_string(&srv.access_log).unwrap_or_default()
    );
}

async fn all_ok(held: Vec<tokio::task::JoinHandle<u16>>) {
    for h in held {
        let status = tokio::time::timeout(Duration::from_secs(20), h).await.unwrap().unwrap();
        assert_eq!(status, 200, "a held request must complete once released");
    }
}

/// Global limit 10 with two shed levels: standard stops at 9 in flight (10% is kept for premium).
async fn premium_is_served_while_standard_is_shed(http2: bool) {
    let up = Upstream::start().await;
    let srv = proxy(&up, "", &format!("[limits]\nmax_proxy_in_flight = 10\n{PREMIUM}")).await;
    let addr = srv.addr("c");
    let c = client(http2);
    let held = hold(&c, addr, None, 9);
    up.holding(9).await;

    let shed = get(&c, addr, None).await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(shed.text().await.unwrap(), "overloaded, retry later\n");
    assert!(srv.wait_metric("gatehouse_shed_total{class=\"standard\"}", 1.0).await);
    let line = access_log(&srv, "\"status\":503").await;
    assert!(
        line.contains("shed class=standard reason=global_limit upstream=api"),
        "{line}"
    );

    // Premium keeps being served, one request after another, while standard stays shed.
    for _ in 0..5 {
        let r = get(&c, addr, Some("premium")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.text().await.unwrap(), "ok");
        assert_eq!(get(&c, addr, None).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(srv.metric("gatehouse_shed_total{class=\"standard\"}"), 6.0);
    assert_eq!(srv.metric("gatehouse_shed_total{class=\"premium\"}"), 0.0);

    // Once the load is gone, standard is admitted again (the held slots were given back).
    up.release();
    all_ok(held).await;
    assert_eq!(get(&c, addr, None).await.status(), StatusCode::OK);
    srv.stop().await;
}

#[tokio::test]
async fn premium_is_served_while_standard_is_shed_http1() {
    premium_is_served_while_standard_is_shed(false).await;
}

#[tokio::test]
async fn premium_is_served_while_standard_is_shed_h2() {
    premium_is_served_while_standard_is_shed(true).await;
}

#[tokio::test]
async fn a_class_at_its_max_in_flight_is_shed_alone() {
    let up = Upstream::start().await;
    let batch = "[[traffic_classes]]\nname = \"batch\"\nheader = \"x-traffic-class\"\nvalue = \"batch\"\nmax_in_flight = 2\nshed_order = 0\n";
    let srv = proxy(&up, "", batch).await;
    let addr = srv.addr("c");
    let c = client(true);
    let held = hold(&c, addr, Some("batch"), 2);
    up.holding(2).await;

    let r = get(&c, addr, Some("batch")).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(srv.wait_metric("gatehouse_shed_total{class=\"batch\"}", 1.0).await);
    let line = access_log(&srv, "reason=class_limit").await;
    assert!(line.contains("shed class=batch reason=class_limit"), "{line}");
    // Other classes are not limited by batch's limit.
    for _ in 0..3 {
        assert_eq!(get(&c, addr, None).await.status(), StatusCode::OK);
    }
    assert_eq!(srv.metric("gatehouse_shed_total{class=\"standard\"}"), 0.0);

    up.release();
    all_ok(held).await;
    assert_eq!(get(&c, addr, Some("batch")).await.status(), StatusCode::OK);
    srv.stop().await;
}

#[tokio::test]
async fn a_saturated_upstream_serves_only_the_highest_class() {
    let up = Upstream::start().await;
    let srv = proxy(&up, "saturation_in_flight = 2", PREMIUM).await;
    let addr = srv.addr("c");
    let c = client(false);
    let held = hold(&c, addr, None, 2);
    up.holding(2).await;

    let r = get(&c, addr, None).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(srv.wait_metric("gatehouse_shed_total{class=\"standard\"}", 1.0).await);
    access_log(&srv, "shed class=standard reason=upstream_saturated upstream=api").await;
    assert_eq!(get(&c, addr, Some("premium")).await.status(), StatusCode::OK);

    up.release();
    all_ok(held).await;
    assert_eq!(get(&c, addr, None).await.status(), StatusCode::OK);
    srv.stop().await;
}

/// One HTTP/1.1 GET from the source address `from` (127.0.0.x), with extra headers.
async fn get_from(from: &str, to: SocketAddr, headers: &[(&str, &str)]) -> Response<Bytes> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(to).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::get("/fast").header("host", "a");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = s.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

fn header<'a>(r: &'a Response<Bytes>, name: &str) -> &'a str {
    r.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

/// A `respond` route (rate limits apply to any route kind) limited per API key.
#[tokio::test]
async fn rate_limit_bursts_then_429_per_key_and_recovers() {
    // 1/s, so that the burst cannot refill while the test sends it, even on a loaded machine.
    let srv = TestServer::start(&format!(
        "{LISTENER}[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\nrate_limit = \"per-key\"\n\
         [[rate_limits]]\nname = \"per-key\"\nkey = \"header:x-api-key\"\nrate = \"1/s\"\nburst = 3\n"
    ))
    .await;
    let addr = srv.addr("c");
    let key_a = [("x-api-key", "a")];
    for remaining in [2, 1, 0] {
        let r = get_from("127.0.0.1", addr, &key_a).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "ratelimit-policy"), "\"per-key\";q=1;w=1");
        assert!(
            header(&r, "ratelimit").starts_with(&format!("\"per-key\";r={remaining};t=")),
            "{:?}",
            r.headers()
        );
    }
    let limited = get_from("127.0.0.1", addr, &key_a).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&limited, "retry-after"), "1");
    assert_eq!(header(&limited, "ratelimit-policy"), "\"per-key\";q=1;w=1");
    assert_eq!(header(&limited, "ratelimit"), "\"per-key\";r=0;t=1");
    assert_eq!(limited.body().as_ref(), b"rate limited, retry later\n");
    assert!(
        srv.wait_metric("gatehouse_rate_limited_total{limit=\"per-key\"}", 1.0)
            .await
    );
    let line = access_log(&srv, "\"status\":429").await;
    assert!(line.contains("rate_limited limit=per-key"), "{line}");

    // Another key, from the same address, has its own bucket.
    let other = get_from("127.0.0.1", addr, &[("x-api-key", "b")]).await;
    assert_eq!(other.status(), StatusCode::OK);

    // Waiting what Retry-After says is enough.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get_from("127.0.0.1", addr, &key_a).await.status(), StatusCode::OK);
    assert_eq!(srv.metric("gatehouse_rate_limited_total{limit=\"per-key\"}"), 1.0);
    srv.stop().await;
}

/// A proxy route limited per client address; a reload that keeps the limit keeps its buckets.
#[tokio::test]
async fn rate_limit_per_client_ip_isolates_addresses_and_survives_reload() {
    let up = Upstream::start().await;
    let limit = "[[rate_limits]]\nname = \"per-client\"\nkey = \"client_ip\"\nrate = \"1/m\"\nburst = 2\n";
    let toml = format!(
        "{LISTENER}[[upstreams]]\nname = \"api\"\nservers = [\"{}\"]\n[[routes]]\nproxy = \"api\"\nrate_limit = \"per-client\"\n{limit}",
        up.addr
    );
    let srv = TestServer::start(&toml).await;
    let addr = srv.addr("c");
    for _ in 0..2 {
        let r = get_from("127.0.0.1", addr, &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.body().as_ref(), b"ok", "proxied");
    }
    let limited = get_from("127.0.0.1", addr, &[]).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = header(&limited, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // 127.0.0.2 is another client.
    assert_eq!(get_from("127.0.0.2", addr, &[]).await.status(), StatusCode::OK);

    // A reload with the same limit (and another route) keeps everyone's budget...
    let same = format!("{toml}[[routes]]\npath = \"/other\"\nrespond = {{ status = 204 }}\n");
    let same = gatehouse::config::load_str(&same).unwrap();
    srv.handle.reload(adapt(&srv, same)).await.unwrap();
    assert_eq!(
        get_from("127.0.0.1", addr, &[]).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // ...a changed definition starts afresh.
    let changed = gatehouse::config::load_str(&toml.replace("1/m", "2/m")).unwrap();
    srv.handle.reload(adapt(&srv, changed)).await.unwrap();
    assert_eq!(get_from("127.0.0.1", addr, &[]).await.status(), StatusCode::OK);
    assert_eq!(srv.metric("gatehouse_rate_limited_total{limit=\"per-client\"}"), 2.0);
    srv.stop().await;
}

/// The test harness's adjustments (state dir, access log, admin off) applied to a reloaded config.
fn adapt(srv: &TestServer, mut c: gatehouse::Config) -> gatehouse::Config {
    c.server.state_dir = srv.dir.path().join("state");
    c.log.access_log = srv.access_log.to_string_lossy().into_owned();
    c.admin.address = String::new();
    c
}

fn check(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}

#[test]
fn check_names_each_mistake_and_exits_78() {
    let (code, text) = check(
        "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"api\"\nservers = [\"127.0.0.1:9\"]\n\
         [[routes]]\nproxy = \"api\"\nrate_limit = \"per-clinet\"\n\
         [[rate_limits]]\nname = \"per-client\"\nkey = \"header:bad name\"\nrate = \"100/d\"\n\
         [[rate_limits]]\nname = \"per-client\"\nkey = \"client_ip\"\nrate = \"5/s\"\nburst = 0\n\
         [[traffic_classes]]\nname = \"premium\"\nheader = \"x-traffic-class\"\nshed_order = 2\n",
    );
    assert_eq!(code, Some(78), "{text}");
    for want in [
        "routes[0].rate_limit: no rate limit is named `per-clinet` (known: `per-client`, `per-client`)",
        "rate_limits[0].key",
        "rate_limits[0].rate",
        "rate_limits[1].name: `per-client` is used by an earlier rate limit",
        "rate_limits[1].burst: is 0",
        "traffic_classes[0].value: is missing",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // The example is accepted as it stands.
    let (code, text) = check(
        "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"api\"\nservers = [\"127.0.0.1:9\"]\n\
         [[traffic_classes]]\nname = \"premium\"\nheader = \"x-traffic-class\"\nvalue = \"premium\"\nmax_in_flight = 0\nshed_order = 2\n\
         [[routes]]\npath = \"/api\"\nproxy = \"api\"\nrate_limit = \"per-client\"\n\
         [[rate_limits]]\nname = \"per-client\"\nkey = \"client_ip\"\nrate = \"100/s\"\nburst = 200\n",
    );
    assert_eq!(code, Some(0), "{text}");
}
