//! Debug switches replaced at run time through the admin API, narrowed to one client address.

use crate::common;

use common::binary::Gatehouse;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// `method path` with a JSON body on the admin API: (status, body).
fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// An h2c (prior knowledge) client whose connections come from `source`.
fn h2c_client(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .no_proxy()
        .build()
        .unwrap()
}

async fn get(client: &reqwest::Client, addr: SocketAddr) {
    let r = client.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "ok");
}

/// Log lines that are h2_frames events of a client at `ip`.
fn frame_lines(log: &str, ip: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("h2_frames") && l.contains(&format!("peer={ip}:")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_frames_narrowed_to_one_client_address_at_run_time() {
    let g = Gatehouse::start(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [[routes]]\nrespond = { status = 200, body = \"ok\" }\n[log]\naccess_log = \"off\"\n",
    );
    let web = g.addr("web");
    let (watched, other) = (h2c_client("127.0.0.2"), h2c_client("127.0.0.1"));
    // Nothing is on yet: no frame events for anyone.
    get(&watched, web).await;
    assert_eq!(frame_lines(&g.log(), "127.0.0.2"), 0);

    let (status, body) = admin(
        g.admin,
        "PUT",
        "/debug/switches",
        r#"{"switches":["h2_frames"],"peer":"127.0.0.2/32"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["switches"], serde_json::json!(["h2_frames"]));
    assert_eq!(v["peer"], "127.0.0.2/32");
    assert_eq!(admin(g.admin, "GET", "/debug/switches", "").1.trim(), body.trim());

    get(&watched, web).await;
    get(&other, web).await;
    // The watched client's request and response: HEADERS both ways, DATA from the server.
    assert!(
        g.wait_log("h2 recv HEADERS", Duration::from_secs(10)),
        "no frame events:\n{}",
        g.log()
    );
    assert!(g.wait_log("h2 send DATA", Duration::from_secs(10)), "{}", g.log());

    // Turning the switch off is a logged event: once it is in the log, every frame event of
    // the requests before it is too (each is written before its frame reaches the client).
    let (status, body) = admin(g.admin, "PUT", "/debug/switches", r#"{"switches":[]}"#);
    assert_eq!(status, 200, "{body}");
    assert!(g.wait_log("debug switches replaced", Duration::from_secs(10)));
    let log = g.log();
    let watched_lines = frame_lines(&log, "127.0.0.2");
    assert!(watched_lines >= 3, "{log}");
    assert_eq!(
        frame_lines(&log, "127.0.0.1"),
        0,
        "another client's frames were logged:\n{log}"
    );

    // Off: the watched client's next request logs nothing.
    get(&watched, web).await;
    get(&other, web).await;
    let (status, _) = admin(
        g.admin,
        "PUT",
        "/debug/switches",
        r#"{"switches":["accept"],"peer":"127.0.0.9"}"#,
    );
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while g.log().matches("debug switches replaced").count() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", g.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = g.log();
    assert_eq!(frame_lines(&log, "127.0.0.2"), watched_lines, "{log}");
    assert_eq!(frame_lines(&log, "127.0.0.1"), 0, "{log}");
}

#[test]
fn switches_and_connection_filters_refuse_what_does_not_exist() {
    let g = Gatehouse::start(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n[[routes]]\nrespond = { status = 200 }\n",
    );
    let (status, body) = admin(g.admin, "PUT", "/debug/switches", r#"{"switches":["h2_framez"]}"#);
    assert_eq!(status, 400);
    assert!(body.contains("h1_headers") && body.contains("reload"), "{body}");
    for switch in ["h1_headers", "reload", "tls", "conn", "accept", "h2_frames"] {
        let (status, body) = admin(
            g.admin,
            "PUT",
            "/debug/switches",
            &format!(r#"{{"switches":["{switch}"],"listener":"web"}}"#),
        );
        assert_eq!(status, 200, "{switch}: {body}");
    }
    // A connection open and idle, to be found (or not) by the filters.
    let mut c = std::net::TcpStream::connect(g.addr("web")).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 256];
    assert!(c.read(&mut buf).unwrap() > 0);
    let count = |q: &str| {
        let (status, body) = g.admin_get(&format!("/debug/connections{q}"));
        assert_eq!(status, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["connections"].as_array().unwrap().len()
    };
    // The read above can return before the response's end is recorded: wait for `idle`.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count("?state=idle") != 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(count("?listener=web&protocol=http%2F1.1&state=idle"), 1);
    assert_eq!(count("?protocol=h2"), 0);
    assert_eq!(count("?state=busy"), 0);
    for bad in ["?state=sleepy", "?protocol=h3", "?listener=nope", "?colour=red"] {
        let (status, body) = g.admin_get(&format!("/debug/connections{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
    }
}
