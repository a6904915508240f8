//! The `gatehouse` binary as an operator runs it: embedded default, curl, exit codes, signals.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn gatehouse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
}

fn curl(args: &[&str], cwd: &std::path::Path) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn embedded_default_serves_h1_h2_and_h2c_to_curl_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = gatehouse()
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("GATEHOUSE_STATE_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the startup report (the last line printed once everything is bound).
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut startup = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "server exited during startup:\n{startup}"
        );
        startup.push_str(&line);
        if line.starts_with("admin API") {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    assert!(
        startup.contains("127.0.0.1:8080") && startup.contains("127.0.0.1:8443"),
        "{startup}"
    );
    let cert = ".gatehouse/self-signed/https.crt";
    assert!(
        startup.contains(cert),
        "startup must print the certificate path:\n{startup}"
    );

    let v = |extra: &[&str], url: &str| {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code} %{http_version}"];
        args.extend_from_slice(extra);
        args.push(url);
        curl(&args, dir.path())
    };
    assert_eq!(v(&["--http2", "--cacert", cert], "https://localhost:8443/"), "200 2");
    assert_eq!(
        v(&["--http1.1", "--cacert", cert], "https://localhost:8443/"),
        "200 1.1"
    );
    assert_eq!(v(&["--http2-prior-knowledge"], "http://127.0.0.1:8080/"), "200 2");
    assert_eq!(v(&["--http1.1"], "http://127.0.0.1:8080/"), "200 1.1");
    let page = curl(
        &[
            "--http2",
            "--cacert",
            cert,
            "-H",
            "accept: application/json",
            "https://localhost:8443/",
        ],
        dir.path(),
    );
    assert!(
        page.contains(r#""protocol":"h2""#) && page.contains(r#""tls_version":"1.3""#),
        "{page}"
    );
    assert_eq!(curl(&["http://127.0.0.1:9901/healthz"], dir.path()), "ok\n");
    assert_eq!(curl(&["http://127.0.0.1:9901/readyz"], dir.path()), "ready\n");
    let metrics = curl(&["http://127.0.0.1:9901/metrics"], dir.path());
    assert!(
        metrics.contains(r#"gatehouse_requests_total{listener="https",protocol="h2",method="GET",status="200"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gatehouse_alpn_fallback_total{listener="https",reason="client_offered_http1_only"} 1"#),
        "{metrics}"
    );

    // The certificate is reused on the next start, not regenerated.
    let before = std::fs::read(dir.path().join(cert)).unwrap();

    let pid = child.id().to_string();
    // SIGHUP's default action would kill the process; the server must keep serving.
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert_eq!(curl(&["http://127.0.0.1:9901/healthz"], dir.path()), "ok\n");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP must not stop the server");

    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = common::wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));

    let out = gatehouse().arg("check").current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dir.path().join(cert)).unwrap(), before);
}

#[test]
fn check_reports_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocols = ["h2"]
[[listeners]]
name = "tls"
address = "127.0.0.1:0"
[listeners.tls]
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
[timeouts]
idle = "0s"
"#,
    )
    .unwrap();
    let out = gatehouse().args(["check", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "listeners[0].protocols",
        "listeners[1].tls.cert",
        "listeners[1].tls.key",
        "timeouts.idle",
        "does not exist",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");

    std::fs::write(&cfg, "[timeouts]\nidel = \"5s\"\n").unwrap();
    let out = gatehouse().args(["check", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("idel"));
}

#[test]
fn an_address_in_use_exits_69_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[admin]\naddress = \"\"\n[[listeners]]\nname = \"web\"\naddress = \"{addr}\"\n[[routes]]\nrespond = {{ status = 200 }}\n"),
    )
    .unwrap();
    let out = gatehouse()
        .args(["serve", "-c"])
        .arg(&cfg)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr.to_string()) && err.contains("address already in use"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = gatehouse().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
