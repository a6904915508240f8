//! The admin dashboard (`GET /`) in headless Chromium: the figures it shows equal `/metrics`.

use crate::common;

use common::binary::Gatehouse;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "dashboard-test-token-5f2c";

/// Runs headless Chromium on `url` with `args` added; returns its stdout.
fn chromium(url: &str, profile: &Path, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            // CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1100",
            // Virtual time runs the page's timers (three polls) without waiting for them, and
            // pauses while its fetches are in flight.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium is installed (.ci/run installs the Debian package `chromium`)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET path` on the admin API with the bearer token: (status, headers, body).
fn admin_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The sum of a metric's samples whose labels include every `labels` pair.
fn sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `data-value` of the element with `id` in the dumped DOM.
fn shown(dom: &str, id: &str) -> f64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the dashboard:\n{dom}"));
    let rest = &dom[at..];
    let tag = &rest[..rest.find('>').unwrap()];
    let v = tag
        .split("data-value=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap_or_else(|| panic!("#{id} has no data-value: {tag}"));
    v.parse().unwrap()
}

/// One request on its own connection; returns the raw answer.
fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn dashboard_in_chromium_shows_the_figures_of_metrics() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let g = Gatehouse::start_with_admin(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [timeouts]\nheader_read = \"300ms\"\n\
         [[routes]]\npath = \"/missing\"\nrespond = { status = 404, body = \"no\" }\n\
         [[routes]]\nrespond = { status = 200, body = \"ok\" }\n",
        &format!("token_file = \"{}\"\n", token_file.display()),
    );
    let web = g.addr("web");
    for _ in 0..5 {
        assert!(exchange(web, "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
    for _ in 0..2 {
        assert!(
            exchange(web, "GET /missing HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").starts_with("HTTP/1.1 404")
        );
    }
    // Upgrade: h2c on a listener that does not honour it: a counted fallback, served HTTP/1.1.
    let up = exchange(
        web,
        "GET / HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\nconnection: close\r\n\r\n",
    );
    assert!(up.starts_with("HTTP/1.1 200"), "{up}");
    // A head that never ends: a header_read timeout.
    exchange(web, "GET / HTTP/1.1\r\nhost: x\r\n");
    // One idle keep-alive connection, open while the page looks.
    let mut idle = std::net::TcpStream::connect(web).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).unwrap() > 0);

    // Every figure settled before the page looks.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, _, m) = admin_get(g.admin, "/metrics");
        assert_eq!(status, 200);
        if sum(&m, "gatehouse_requests_total", &[]) == 9.0
            && sum(&m, "gatehouse_connections_open", &[("state", "idle")]) == 1.0
            && sum(&m, "gatehouse_timeouts_total", &[("kind", "header_read")]) == 1.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "traffic not recorded:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    };

    let (status, head, page) = admin_get(g.admin, "/");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'sha256-"),
        "{head}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", g.admin);
    // Without the token the page asks for it and shows nothing.
    let dom = chromium(&url, profile.path(), &["--dump-dom"]);
    assert!(dom.contains("data-state=\"unauthorized\""), "{dom}");
    // With it (in the fragment, which never reaches the server), it shows the figures.
    let dom = chromium(&format!("{url}#token={TOKEN}"), profile.path(), &["--dump-dom"]);
    assert!(dom.contains("data-state=\"ready\""), "{dom}");
    let checks: Vec<(&str, f64)> = vec![
        ("requests-total", sum(&metrics, "gatehouse_requests_total", &[])),
        ("status-2xx", 7.0),
        ("status-4xx", 2.0),
        ("status-5xx", 0.0),
        ("open-total", sum(&metrics, "gatehouse_connections_open", &[])),
        ("open-http/1.1-idle", 1.0),
        ("timeout-header_read", 1.0),
        ("timeout-idle", 0.0),
        (
            "fallback-h2c_upgrade_disabled",
            sum(
                &metrics,
                "gatehouse_alpn_fallback_total",
                &[("reason", "h2c_upgrade_disabled")],
            ),
        ),
        ("fallback-client_offered_none", 0.0),
        (
            "reloads-ok",
            sum(&metrics, "gatehouse_reloads_total", &[("result", "ok")]),
        ),
        (
            "listener-web-accepted",
            sum(&metrics, "gatehouse_connections_accepted_total", &[]),
        ),
        ("listener-web-requests", 9.0),
        ("conn-count", 1.0),
    ];
    assert_eq!(sum(&metrics, "gatehouse_requests_total", &[("status", "200")]), 7.0);
    assert_eq!(sum(&metrics, "gatehouse_alpn_fallback_total", &[]), 1.0);
    assert_eq!(sum(&metrics, "gatehouse_connections_accepted_total", &[]), 10.0);
    for (id, want) in checks {
        assert_eq!(shown(&dom, id), want, "#{id}");
    }
    // The metrics did not move while the page looked (its requests are not counted traffic).
    let (_, _, after) = admin_get(g.admin, "/metrics");
    assert_eq!(sum(&after, "gatehouse_requests_total", &[]), 9.0);

    // A screenshot renders (docs/dashboard.png is made the same way).
    let shot = profile.path().join("dashboard.png");
    chromium(
        &format!("{url}#token={TOKEN}"),
        profile.path(),
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    drop(idle);
}
