//! `gatehouse doctor` (the real binary) against gatehouse listeners configured in each way that
//! breaks HTTP/2 or connection reuse, through a real CONNECT proxy, and against nginx: exit code,
//! the human verdict and the JSON fields.

use crate::common::{write_key, Pki, TestServer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTE: &str = "[[routes]]\nrespond = { status = 200, body = \"ok\" }\n";

/// Runs `gatehouse doctor ARGS` with `env` set and every proxy variable of the test machine
/// removed; returns (exit code, stdout). Blocking work goes to the blocking pool so that the
/// server under test keeps running on the test's runtime.
async fn doctor(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    cmd.arg("doctor").args(args);
    for v in [
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "GODEBUG",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "doctor panicked:\n{stderr}");
    (out.status.code().unwrap_or(-1), stdout)
}

/// `doctor --json`: exit code and the parsed report.
async fn doctor_json(args: &[&str], env: &[(&str, &str)]) -> (i32, serde_json::Value) {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out) = doctor(&a, env).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    assert_eq!(v["exit_code"], code, "{out}");
    (code, v)
}

fn finding_ids(v: &serde_json::Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

fn tls_listener(name: &str, protocols: &str, extra: &str, cert: &Path, key: &Path) -> String {
    format!(
        "[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nprotocols = {protocols}\n{extra}\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

fn url(srv: &TestServer, listener: &str) -> String {
    format!("https://localhost:{}/", srv.addr(listener).port())
}

#[tokio::test]
async fn h2_listener_negotiates_h2_and_reuses_one_connection() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let srv = TestServer::start(&(tls_listener("tls", "[\"h2\", \"http/1.1\"]", "", &cert, &key) + ROUTE)).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code, v) = doctor_json(&[&url(&srv, "tls"), "--cacert", ca], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    let tls = &v["tls"];
    assert_eq!(tls["alpn_chosen"], "h2");
    assert_eq!(tls["alpn_offered"], serde_json::json!(["h2", "http/1.1"]));
    assert_eq!(tls["sni"], "localhost");
    assert_eq!(tls["version"], "1.3");
    assert_eq!(tls["validates"], true);
    assert_eq!(tls["hostname_match"], true);
    assert_eq!(tls["chain_complete"], true);
    assert_eq!(tls["resumption"], "resumed");
    assert_eq!(tls["no_alpn_client"], "accepted");
    assert_eq!(tls["certificates"][0]["sans"], serde_json::json!(["DNS:localhost"]));
    let h2 = &v["http2"];
    assert_eq!(h2["settings_first"], true);
    assert_eq!(h2["settings"]["max_concurrent_streams"], 128);
    assert!(h2["ping_ms"].is_number(), "{h2}");
    let reuse = &v["reuse"];
    assert_eq!(reuse["protocol"], "h2");
    assert_eq!(reuse["completed"], 5);
    assert_eq!(reuse["connections"], 1);
    assert_eq!(reuse["statuses"], serde_json::json!([200, 200, 200, 200, 200]));
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] != "problem"),
        "{v:#}"
    );

    let (code, text) = doctor(&[&url(&srv, "tls"), "--cacert", ca, "--requests", "3"], &[]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("chosen h2"), "{text}");
    assert!(
        text.contains("3 requests over h2: 3 completed on 1 connection"),
        "{text}"
    );
    assert!(text.contains("OK: the server negotiates what was asked"), "{text}");
    srv.stop().await;
}

#[tokio::test]
async fn http1_only_listener_is_named_with_the_fix() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let srv = TestServer::start(&(tls_listener("h1", "[\"http/1.1\"]", "", &cert, &key) + ROUTE)).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code, v) = doctor_json(&[&url(&srv, "h1"), "--cacert", ca], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["tls"]["alpn_chosen"], "http/1.1");
    assert_eq!(v["tls"]["h2_only_client"], "rejected");
    assert_eq!(v["reuse"]["protocol"], "http/1.1");
    assert_eq!(v["reuse"]["connections"], 1);
    assert!(v["http2"].is_null());
    assert!(finding_ids(&v).contains(&"alpn_http1_only".to_string()), "{v:#}");

    let (code, text) = doctor(&[&url(&srv, "h1"), "--cacert", ca], &[]).await;
    assert_eq!(code, 1);
    assert!(
        text.contains("PROBLEM: server offers ALPN http/1.1 only: HTTP/2 is not enabled on this listener"),
        "{text}"
    );
    assert!(
        text.contains("gatehouse: `protocols = [\"h2\", \"http/1.1\"]`"),
        "{text}"
    );
    assert!(text.contains("nginx: `listen 443 ssl http2;`"), "{text}");
    // Asking for HTTP/1.1 only, the same listener is fine.
    let (code, v) = doctor_json(&[&url(&srv, "h1"), "--cacert", ca, "--http1"], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    srv.stop().await;
}

#[tokio::test]
async fn listener_preferring_http1_is_told_apart_from_one_without_h2() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let srv = TestServer::start(&(tls_listener("pref", "[\"http/1.1\", \"h2\"]", "", &cert, &key) + ROUTE)).await;
    let ca = pki.ca_path();
    let (code, v) = doctor_json(&[&url(&srv, "pref"), "--cacert", ca.to_str().unwrap()], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["tls"]["h2_only_client"], "accepted");
    assert!(finding_ids(&v).contains(&"alpn_prefers_http1".to_string()), "{v:#}");
    srv.stop().await;
}

#[tokio::test]
async fn h2_only_listener_refuses_a_client_offering_http1_and_clients_without_alpn() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let srv = TestServer::start(&(tls_listener("h2", "[\"h2\"]", "", &cert, &key) + ROUTE)).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code, text) = doctor(&[&url(&srv, "h2"), "--cacert", ca, "--http1"], &[]).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("the server sent TLS alert no_application_protocol"),
        "{text}"
    );
    assert!(
        text.contains("PROBLEM: the server refused every protocol offered (http/1.1)"),
        "{text}"
    );
    let (code, v) = doctor_json(&[&url(&srv, "h2"), "--cacert", ca], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["tls"]["alpn_chosen"], "h2");
    assert_eq!(v["tls"]["no_alpn_client"], "rejected");
    assert!(finding_ids(&v).contains(&"no_alpn_rejected".to_string()));
    srv.stop().await;
}

#[tokio::test]
async fn on_no_alpn_http1_accepts_and_reject_refuses_clients_without_alpn() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = tls_listener(
        "open",
        "[\"h2\", \"http/1.1\"]",
        "on_no_alpn = \"http/1.1\"",
        &cert,
        &key,
    ) + &tls_listener(
        "strict",
        "[\"h2\", \"http/1.1\"]",
        "on_no_alpn = \"reject\"",
        &cert,
        &key,
    ) + ROUTE;
    let srv = TestServer::start(&toml).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code, v) = doctor_json(&[&url(&srv, "open"), "--cacert", ca], &[]).await;
    assert_eq!((code, &v["tls"]["no_alpn_client"]), (0, &serde_json::json!("accepted")));
    let (code, text) = doctor(&[&url(&srv, "strict"), "--cacert", ca], &[]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("client without ALPN: rejected"), "{text}");
    assert!(
        text.contains("NOTE: clients that send no ALPN") && text.contains("on_no_alpn = \"http/1.1\""),
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn max_requests_per_connection_1_breaks_reuse_over_http1_and_h2() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml = tls_listener("tls", "[\"h2\", \"http/1.1\"]", "", &cert, &key)
        + "[limits]\nmax_requests_per_connection = 1\n"
        + ROUTE;
    let srv = TestServer::start(&toml).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code, v) = doctor_json(&[&url(&srv, "tls"), "--cacert", ca, "--http1", "--requests", "3"], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    let r = &v["reuse"];
    assert_eq!(
        (r["completed"].as_u64(), r["connections"].as_u64()),
        (Some(3), Some(3)),
        "{r}"
    );
    assert_eq!(r["closes"][0]["reason"], "connection_close");
    assert_eq!(r["closes"][0]["after_request"], 1);
    assert!(finding_ids(&v).contains(&"reuse_connection_close".to_string()));

    let (code, text) = doctor(&[&url(&srv, "tls"), "--cacert", ca, "--requests", "3"], &[]).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("3 requests over h2: 3 completed on 3 connections"),
        "{text}"
    );
    assert!(text.contains("goaway"), "{text}");
    assert!(
        text.contains("PROBLEM: 3 requests needed 3 connections: the server sends GOAWAY")
            && text.contains("max_requests_per_connection = 1000"),
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_short_idle_timeout_is_measured_and_named() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let toml =
        tls_listener("tls", "[\"h2\", \"http/1.1\"]", "", &cert, &key) + "[timeouts]\nidle = \"300ms\"\n" + ROUTE;
    let srv = TestServer::start(&toml).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    for proto in ["--http1", "--http2"] {
        let (code, v) = doctor_json(&[&url(&srv, "tls"), "--cacert", ca, proto], &[]).await;
        assert_eq!(code, 1, "{v:#}");
        let idle = v["reuse"]["idle_close_ms"].as_f64().unwrap_or_else(|| panic!("{v:#}"));
        // Configured 300ms; a loaded machine may add latency, never remove it.
        assert!((250.0..1900.0).contains(&idle), "{idle}");
        assert!(finding_ids(&v).contains(&"idle_timeout_short".to_string()), "{v:#}");
    }
    let (_, text) = doctor(&[&url(&srv, "tls"), "--cacert", ca, "--http1"], &[]).await;
    assert!(
        text.contains("PROBLEM: the server closes idle connections after") && text.contains("idle = \"75s\""),
        "{text}"
    );
    srv.stop().await;
}

/// A leaf for `localhost` issued by an intermediate CA that the root (`pki`) signed; returns the
/// leaf's and the intermediate's PEM, and the key path.
fn leaf_via_intermediate(pki: &Pki) -> (String, String, PathBuf) {
    let ikey = rcgen::KeyPair::generate().unwrap();
    let mut ip = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "gatehouse test intermediate");
    let inter_pem = pki.sign(ip.clone(), &ikey);
    // Signing with a self-signed stand-in carrying the same name and key yields the same issuer
    // name and signature as the root-signed intermediate would.
    let issuer = ip.self_signed(&ikey).unwrap();
    let lkey = rcgen::KeyPair::generate().unwrap();
    let mut lp = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    lp.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let leaf_pem = lp.signed_by(&lkey, &issuer, &ikey).unwrap().pem();
    let key_path = pki.dir.path().join("chain.key");
    write_key(&key_path, &lkey.serialize_pem());
    (leaf_pem, inter_pem, key_path)
}

#[tokio::test]
async fn an_incomplete_chain_and_an_expired_certificate_are_explained() {
    let pki = Pki::new();
    let (leaf, inter, key) = leaf_via_intermediate(&pki);
    let lonely = pki.dir.path().join("lonely.crt");
    std::fs::write(&lonely, &leaf).unwrap();
    let full = pki.dir.path().join("full.crt");
    std::fs::write(&full, format!("{leaf}{inter}")).unwrap();

    // gatehouse refuses to start with an expired certificate, so the listener gets one that
    // expires two seconds from now; the test waits for that moment to pass.
    let now = time::OffsetDateTime::now_utc();
    let expiry = now + time::Duration::seconds(2);
    let ekey = rcgen::KeyPair::generate().unwrap();
    let mut ep = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    ep.not_before = now - time::Duration::days(30);
    ep.not_after = expiry;
    let expired = pki.dir.path().join("expired.crt");
    std::fs::write(&expired, format!("{}{}", pki.sign(ep, &ekey), pki.ca_pem)).unwrap();
    let expired_key = pki.dir.path().join("expired.key");
    write_key(&expired_key, &ekey.serialize_pem());

    let toml = tls_listener("lonely", "[\"h2\", \"http/1.1\"]", "", &lonely, &key)
        + &tls_listener("full", "[\"h2\", \"http/1.1\"]", "", &full, &key)
        + &tls_listener("expired", "[\"h2\", \"http/1.1\"]", "", &expired, &expired_key)
        + ROUTE;
    let srv = TestServer::start(&toml).await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();

    let (code, v) = doctor_json(&[&url(&srv, "lonely"), "--cacert", ca, "--requests", "1"], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["tls"]["validates"], false);
    assert_eq!(v["tls"]["chain_complete"], false);
    assert_eq!(v["tls"]["validation_problem"], "incomplete_chain");
    assert_eq!(v["tls"]["certificates"].as_array().unwrap().len(), 1);
    assert!(finding_ids(&v).contains(&"tls_incomplete_chain".to_string()));
    // The same leaf with its intermediate validates: the finding is about the chain, not the CA.
    let (code, v) = doctor_json(&[&url(&srv, "full"), "--cacert", ca, "--requests", "1"], &[]).await;
    assert_eq!((code, &v["tls"]["validates"]), (0, &serde_json::json!(true)), "{v:#}");

    // Certificate times have one-second resolution: wait until a whole second past the expiry.
    let wait = expiry + time::Duration::milliseconds(1100) - time::OffsetDateTime::now_utc();
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
    let (code, text) = doctor(&[&url(&srv, "expired"), "--cacert", ca, "--requests", "1"], &[]).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("PROBLEM: the certificate does not validate: the certificate expired on")
            && text.contains("renew"),
        "{text}"
    );
    assert!(text.contains("(0 days left)"), "{text}");
    // --insecure reports it without failing.
    let (code, v) = doctor_json(
        &[&url(&srv, "expired"), "--cacert", ca, "--insecure", "--requests", "1"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["tls"]["validation_problem"], "expired");
    srv.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_and_upgrade_on_and_off() {
    let toml = "[[listeners]]\nname = \"on\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\nh2c_upgrade = true\n\
                [[listeners]]\nname = \"off\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\"]\n"
        .to_string()
        + ROUTE;
    let srv = TestServer::start(&toml).await;
    let on = format!("http://{}/", srv.addr("on"));
    let off = format!("http://{}/", srv.addr("off"));

    let (code, v) = doctor_json(&[&on], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["h2c"]["prior_knowledge"], true);
    assert_eq!(v["h2c"]["upgrade"], true);
    assert_eq!(v["h2c"]["upgrade_status"], 101);
    assert_eq!(v["reuse"]["protocol"], "http/1.1");
    let (code, v) = doctor_json(&[&on, "--http2"], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["http2"]["via"], "prior_knowledge");
    assert_eq!(v["reuse"]["protocol"], "h2c");
    assert_eq!(v["reuse"]["connections"], 1);

    let (code, v) = doctor_json(&[&off], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["h2c"]["prior_knowledge"], false);
    assert_eq!(v["h2c"]["upgrade"], false);
    let (code, text) = doctor(&[&off, "--http2"], &[]).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("PROBLEM: cleartext HTTP/2 by prior knowledge does not work here")
            && text.contains("protocols = [\"http/1.1\", \"h2c\"]"),
        "{text}"
    );
    srv.stop().await;
}

/// A CONNECT proxy on loopback: tunnels every CONNECT and counts them.
async fn connect_proxy() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(b) = client.read_u8().await else { return };
                    head.push(b);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
                if !text.starts_with("CONNECT ") {
                    let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n").await;
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target.as_str()).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn through_a_connect_proxy_doctor_reports_the_proxy_and_end_to_end_alpn() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let srv = TestServer::start(&(tls_listener("tls", "[\"h2\", \"http/1.1\"]", "", &cert, &key) + ROUTE)).await;
    let (proxy, count) = connect_proxy().await;
    let proxy_url = format!("http://{proxy}");
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code, v) = doctor_json(&[&url(&srv, "tls"), "--cacert", ca], &[("HTTPS_PROXY", &proxy_url)]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["proxy"]["used"], true);
    assert_eq!(v["proxy"]["source"], "HTTPS_PROXY");
    assert_eq!(v["proxy"]["url"], proxy_url);
    assert_eq!(v["proxy"]["intercepting"], false);
    assert_eq!(v["tls"]["alpn_chosen"], "h2");
    assert_eq!(v["reuse"]["connections"], 1);
    assert!(finding_ids(&v).contains(&"proxy_in_path".to_string()));
    // The main connection, resumption and the no-ALPN probe all went through the tunnel.
    assert!(count.load(Ordering::SeqCst) >= 3, "{}", count.load(Ordering::SeqCst));

    let (code, text) = doctor(&[&url(&srv, "tls"), "--cacert", ca, "--proxy", &proxy_url], &[]).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("Proxy        {proxy_url} from --proxy (HTTP CONNECT")),
        "{text}"
    );
    assert!(text.contains("end-to-end TLS"), "{text}");

    // NO_PROXY excludes the host: no tunnel.
    let before = count.load(Ordering::SeqCst);
    let (code, v) = doctor_json(
        &[&url(&srv, "tls"), "--cacert", ca, "--requests", "1"],
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "example.com,localhost")],
    )
    .await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["proxy"]["used"], false);
    assert_eq!(v["proxy"]["excluded_by"], "localhost");
    assert_eq!(count.load(Ordering::SeqCst), before);
    srv.stop().await;
}

#[tokio::test]
async fn environment_switches_are_listed_and_an_unreachable_server_exits_2() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let (code, text) = doctor(
        &[&format!("https://127.0.0.1:{port}/")],
        &[("GODEBUG", "http2client=0"), ("SSLKEYLOGFILE", "/tmp/keys")],
    )
    .await;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("could not connect: cannot connect to 127.0.0.1"),
        "{text}"
    );
    assert!(
        text.contains("GODEBUG=http2client=0: Go programs' net/http clients never use HTTP/2"),
        "{text}"
    );
    assert!(text.contains("SSLKEYLOGFILE=(set)"), "{text}");
    assert!(text.contains("WARNING: GODEBUG=http2client=0"), "{text}");
}

/// nginx with one `listen ... ssl` server and one with HTTP/2 on, in the syntax of the installed
/// version (`listen ... ssl http2` before 1.25.1, `http2 on;` since).
#[tokio::test]
async fn nginx_without_and_with_http2_is_told_apart_and_the_nginx_fix_named() {
    let http2_on = crate::common::nginx::version() >= vec![1, 25, 1];
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let ports = [crate::common::nginx::free_port(), crate::common::nginx::free_port()];
    let h2 = if http2_on {
        format!("listen 127.0.0.1:{} ssl;\n http2 on;", ports[1])
    } else {
        format!("listen 127.0.0.1:{} ssl http2;", ports[1])
    };
    let nginx = crate::common::nginx::Nginx::start(
        &format!(
            "ssl_certificate {}; ssl_certificate_key {};\n\
             server {{ listen 127.0.0.1:{} ssl; location / {{ return 200 \"ok\\n\"; }} }}\n\
             server {{ {h2} location / {{ return 200 \"ok\\n\"; }} }}",
            cert.display(),
            key.display(),
            ports[0]
        ),
        &ports,
    )
    .await;
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (code1, text) = doctor(&[&format!("https://localhost:{}/", ports[0]), "--cacert", ca], &[]).await;
    let (code2, v) = doctor_json(&[&format!("https://localhost:{}/", ports[1]), "--cacert", ca], &[]).await;
    drop(nginx);
    assert_eq!(code1, 1, "{text}");
    assert!(
        text.contains("chosen http/1.1") && text.contains("server: nginx"),
        "{text}"
    );
    let fix = if http2_on {
        "`http2 on;`"
    } else {
        "`listen 443 ssl http2;`"
    };
    assert!(
        text.contains("PROBLEM: server offers ALPN http/1.1 only") && text.contains(fix),
        "{text}"
    );
    assert_eq!(code2, 0, "{v:#}");
    assert_eq!(v["tls"]["alpn_chosen"], "h2");
    assert_eq!(v["http2"]["settings_first"], true);
    assert_eq!(v["reuse"]["connections"], 1);
}
