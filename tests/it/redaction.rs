//! Secrets never reach a log: the access log and the `h1_headers` switch in mask, hash and drop
//! modes; hash digests correlate; the access log file is reopened on SIGHUP (log rotation); the
//! `reload` switch reports every reload.

use crate::common;

use common::binary::Gatehouse;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Values that must appear nowhere in any log.
const SECRETS: [&str; 4] = ["SECRET-QUERY-1", "SECRET-AUTH-1", "SECRET-COOKIE-1", "SECRET-PROXY-1"];

/// A request carrying every secret; answered and closed.
fn send_secrets(addr: SocketAddr) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /login?token=SECRET-QUERY-1&lang=en HTTP/1.1\r\nhost: localhost\r\n\
          authorization: Bearer SECRET-AUTH-1\r\ncookie: session=SECRET-COOKIE-1; theme=SECRET-COOKIE-1\r\n\
          proxy-authorization: Basic SECRET-PROXY-1\r\naccept: text/plain\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Waits (bounded) until `path` holds `n` lines; returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(String::from).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} line(s), want {n}",
            path.display(),
            lines.len()
        );
        // The access log is written by its own thread into a file: there is no event to await.
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn server(mode: &str, extra_log: &str) -> Gatehouse {
    Gatehouse::start(&format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n\
         [[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n\
         [log]\naccess_log = \"{{dir}}/access.log\"\nredact_mode = \"{mode}\"\n{extra_log}\n\
         [debug]\nswitches = [\"h1_headers\"]\n"
    ))
}

/// Runs two requests with the same secrets; returns (access log lines, diagnostic log).
fn exercise(g: &Gatehouse) -> (Vec<String>, String) {
    send_secrets(g.addr("web"));
    send_secrets(g.addr("web"));
    let lines = wait_lines(&g.dir.path().join("access.log"), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.log().matches("response head").count() < 2 {
        assert!(Instant::now() < deadline, "no h1_headers events:\n{}", g.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = g.log();
    for secret in SECRETS {
        for line in &lines {
            assert!(!line.contains(secret), "{secret} in the access log: {line}");
        }
        assert!(!log.contains(secret), "{secret} in the diagnostic log:\n{log}");
    }
    (lines, log)
}

fn path_of(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["path"].as_str().unwrap().to_string()
}

/// The request head events, one per request.
fn request_heads(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("request head (")).collect()
}

/// `name: value` of a field in an h1_headers event (up to the next ` | ` or the line's fields).
fn field<'a>(event: &'a str, name: &str) -> Option<&'a str> {
    let start = event.find(&format!("| {name}: "))? + name.len() + 4;
    let rest = &event[start..];
    let end = rest.find(" | ").or_else(|| rest.find(" switch=")).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

#[test]
fn mask_mode_masks_query_headers_and_cookies() {
    let g = server("mask", "");
    let (lines, log) = exercise(&g);
    assert_eq!(path_of(&lines[0]), "/login?token=***&lang=en");
    let heads = request_heads(&log);
    assert_eq!(heads.len(), 2, "{log}");
    let head = heads[0];
    assert!(head.contains("GET /login?token=***&lang=en HTTP/1.1"), "{head}");
    assert_eq!(field(head, "authorization"), Some("***"), "{head}");
    assert_eq!(field(head, "proxy-authorization"), Some("***"), "{head}");
    assert_eq!(field(head, "cookie"), Some("session=***; theme=***"), "{head}");
    // Not listed: logged as sent. The size is the block's on the wire, before redaction.
    assert_eq!(field(head, "accept"), Some("text/plain"), "{head}");
    assert!(head.contains("request head (244 bytes, 6 fields)"), "{head}");
    assert!(log.contains("response head ("), "{log}");
}

#[test]
fn drop_mode_leaves_no_trace_of_listed_values() {
    let g = server("drop", "");
    let (lines, log) = exercise(&g);
    assert_eq!(path_of(&lines[0]), "/login?lang=en");
    let head = request_heads(&log)[0];
    for name in ["authorization", "proxy-authorization", "cookie"] {
        assert_eq!(field(head, name), None, "{name} logged in drop mode: {head}");
    }
    assert_eq!(field(head, "accept"), Some("text/plain"), "{head}");
    assert!(head.contains("GET /login?lang=en HTTP/1.1"), "{head}");
}

#[test]
fn hash_mode_gives_equal_digests_for_equal_values_across_restarts() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("log-hash.key");
    std::fs::write(&key_file, "a shared secret for these tests\n").unwrap();
    let extra = format!("hash_key_file = \"{}\"", key_file.display());
    let digests = |g: &Gatehouse| {
        let (lines, log) = exercise(g);
        let (a, b) = (path_of(&lines[0]), path_of(&lines[1]));
        assert_eq!(a, b, "equal tokens must give equal digests");
        let token = a
            .strip_prefix("/login?token=")
            .and_then(|r| r.strip_suffix("&lang=en"))
            .unwrap()
            .to_string();
        assert!(token.starts_with("h:") && token.len() == 18, "{token}");
        let heads = request_heads(&log);
        let auth: Vec<&str> = heads.iter().map(|h| field(h, "authorization").unwrap()).collect();
        assert_eq!(auth[0], auth[1], "{log}");
        assert!(auth[0].starts_with("h:"), "{log}");
        assert_ne!(auth[0], token, "different values, different digests");
        // Both cookies hold the same value: the same digest, names kept.
        let cookie = field(heads[0], "cookie").unwrap();
        let (session, theme) = cookie.split_once("; ").unwrap();
        assert_eq!(
            session.strip_prefix("session="),
            theme.strip_prefix("theme="),
            "{cookie}"
        );
        (token, auth[0].to_string())
    };
    let first = digests(&server("hash", &extra));
    // A restart (a new process, a new state directory) with the same key file correlates.
    let second = digests(&server("hash", &extra));
    assert_eq!(first, second);
    // Another key, other digests: they are keyed, not a plain hash anyone could recompute.
    let third = digests(&server("hash", ""));
    assert_ne!(first.0, third.0);
}

/// `POST /reload` on the admin API: the status.
fn post_reload(admin: SocketAddr) -> u16 {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"POST /reload HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn wait_count(g: &Gatehouse, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.log().matches(needle).count() < n {
        assert!(Instant::now() < deadline, "want {n} × `{needle}`:\n{}", g.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn access_log_is_reopened_on_sighup_and_reloads_are_reported() {
    let g = Gatehouse::start(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         [[routes]]\nrespond = { status = 200, body = \"ok\" }\n\
         [log]\naccess_log = \"{dir}/access.log\"\n[debug]\nswitches = [\"reload\"]\n",
    );
    let log = g.dir.path().join("access.log");
    let rotated = g.dir.path().join("access.log.1");
    send_secrets(g.addr("web"));
    wait_lines(&log, 1);
    // What logrotate does: rename, then tell the server.
    std::fs::rename(&log, &rotated).unwrap();
    g.signal("HUP");
    wait_count(&g, "reload ok: trigger sighup", 1);
    send_secrets(g.addr("web"));
    send_secrets(g.addr("web"));
    assert_eq!(wait_lines(&log, 2).len(), 2, "the new lines go to a fresh file");
    assert_eq!(wait_lines(&rotated, 1).len(), 1, "the rotated file is left alone");

    let text = g.log();
    for event in [
        "reload started: trigger sighup",
        "reload staged in ",
        "reload applied in ",
        "reload ok: trigger sighup, changed [",
    ] {
        assert!(text.contains(event), "missing `{event}`:\n{text}");
    }
    assert!(text.contains("switch=\"reload\""), "{text}");
    // The admin API as the trigger; then a refused reload, with its finding.
    assert_eq!(post_reload(g.admin), 200);
    wait_count(&g, "reload ok: trigger admin", 1);
    let config = g.dir.path().join("gatehouse.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[debug]", "[timeouts]\nidle = \"0s\"\n[debug]")).unwrap();
    assert_eq!(post_reload(g.admin), 422);
    wait_count(&g, "reload refused: trigger admin", 1);
    assert!(g.log().contains("timeouts.idle"), "{}", g.log());
    // Every line in both files is one JSON object with the SPEC's fields.
    for line in wait_lines(&log, 2).iter().chain(&wait_lines(&rotated, 1)) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for f in [
            "ts",
            "conn_id",
            "req_id",
            "listener",
            "remote",
            "protocol",
            "tls_version",
            "alpn",
            "method",
            "host",
            "path",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
        ] {
            assert!(v.get(f).is_some(), "no `{f}` in {line}");
        }
    }
}
