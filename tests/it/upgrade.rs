//! Zero-downtime binary upgrade of the real binary: `gatehouse upgrade` and SIGUSR2 hand the
//! listening sockets to a new process while clients keep sending; a new process that fails leaves
//! the old one serving.

use crate::common::binary::{command, Gatehouse};
use crate::common::Pki;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cleartext listener for HTTP/1.1 and h2c, a TLS one for h2, and short handover bounds so the
/// old process leaves within a few seconds.
fn config(pki: &Pki) -> String {
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocols = ["http/1.1", "h2c"]
[[listeners]]
name = "tls"
address = "127.0.0.1:0"
protocols = ["h2", "http/1.1"]
[listeners.tls]
cert = "{}"
key = "{}"
[shutdown]
handover_grace = "1s"
drain_timeout = "5s"
[log]
access_log = "off"
[[routes]]
respond = {{ status = 200, body = "hello\n" }}
"#,
        cert.display(),
        key.display()
    )
}

/// A process that is not the test's child (a binary upgrade's new process is the old one's):
/// stopped on drop.
struct Adopted(u32);

impl Adopted {
    fn is_alive(&self) -> bool {
        // A zombie (exited, not yet reaped by whoever inherited it) is not alive.
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

/// Runs `gatehouse upgrade --admin ADDR`: (exit code, stdout, stderr).
fn upgrade_cli(admin: SocketAddr) -> (Option<i32>, String, String) {
    let out = command("info")
        .arg("upgrade")
        .arg("--admin")
        .arg(admin.to_string())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The new pid in "upgrade ok: pid N is serving; ...".
fn new_pid(stdout: &str) -> u32 {
    stdout
        .strip_prefix("upgrade ok: pid ")
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout:?}"))
}

/// One metric series from an admin API exposition, 0 when absent.
fn metric(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Client kinds of the load, each a loop of GET / on its own connection pattern.
const KINDS: [&str; 4] = ["h1-new-connection", "h1-keep-alive", "h2c", "h2-tls"];

/// Requests answered `200 hello`, per kind and per phase (0: before the upgrade, 1: during,
/// 2: after the old process exited); and every failure, described.
#[derive(Default)]
struct Tally {
    ok: [[AtomicU64; 3]; 4],
    failures: Mutex<Vec<String>>,
    phase: AtomicUsize,
    stop: AtomicBool,
}

impl Tally {
    fn min_in_phase(&self, phase: usize) -> u64 {
        self.ok
            .iter()
            .map(|k| k[phase].load(Ordering::SeqCst))
            .min()
            .unwrap_or(0)
    }
    fn table(&self) -> HashMap<&'static str, [u64; 3]> {
        KINDS
            .iter()
            .zip(&self.ok)
            .map(|(k, c)| (*k, [0, 1, 2].map(|p| c[p].load(Ordering::SeqCst))))
            .collect()
    }
}

async fn load(kind: usize, client: reqwest::Client, url: String, tally: Arc<Tally>) {
    while !tally.stop.load(Ordering::SeqCst) {
        let phase = tally.phase.load(Ordering::SeqCst);
        let outcome = match client.get(&url).send().await {
            Ok(r) if r.status() == 200 => match r.bytes().await {
                Ok(b) if &b[..] == b"hello\n" => Ok(()),
                Ok(b) => Err(format!("body {b:?}")),
                Err(e) => Err(format!("body: {e:?}")),
            },
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(format!("{e:?}")),
        };
        match outcome {
            Ok(()) => {
                tally.ok[kind][phase].fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => tally
                .failures
                .lock()
                .unwrap()
                .push(format!("{} (phase {phase}): {e}", KINDS[kind])),
        }
    }
}

fn clients(pki: &Pki, web: SocketAddr, tls: SocketAddr) -> Vec<(reqwest::Client, String)> {
    let base = || reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10));
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    vec![
        (
            base().http1_only().pool_max_idle_per_host(0).build().unwrap(),
            format!("http://{web}/"),
        ),
        (base().http1_only().build().unwrap(), format!("http://{web}/")),
        (
            base().http2_prior_knowledge().build().unwrap(),
            format!("http://{web}/"),
        ),
        (
            base()
                .use_rustls_tls()
                .add_root_certificate(ca)
                .resolve("localhost", tls)
                .http2_prior_knowledge()
                .build()
                .unwrap(),
            format!("https://localhost:{}/", tls.port()),
        ),
    ]
}

/// Waits (bounded) until `cond` holds; the load's counters have no event to await.
fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn load_across_an_upgrade_sees_no_error_and_the_new_process_takes_over() {
    const N: u64 = 20;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut g = Gatehouse::start_with(&config(&pki), "info", |c| {
        c.env("NOTIFY_SOCKET", &notify_path);
    });
    let old_pid = g.child.id();
    let (web, tls) = (g.addr("web"), g.addr("tls"));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tally = Arc::new(Tally::default());
    let tasks: Vec<_> = clients(&pki, web, tls)
        .into_iter()
        .enumerate()
        .map(|(kind, (client, url))| rt.spawn(load(kind, client, url, tally.clone())))
        .collect();
    wait_until("load before the upgrade", Duration::from_secs(30), || {
        tally.min_in_phase(0) >= N || !tally.failures.lock().unwrap().is_empty()
    });

    tally.phase.store(1, Ordering::SeqCst);
    let (code, stdout, stderr) = upgrade_cli(g.admin);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}\nlog:\n{}", g.log());
    let new = Adopted(new_pid(&stdout));
    assert_ne!(new.0, old_pid);
    assert!(stdout.contains(&format!("pid {old_pid} is draining")), "{stdout}");
    // The old process winds down while the load goes on, and exits 0.
    let status = g.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", g.log());
    assert!(new.is_alive(), "the new process must outlive the old one:\n{}", g.log());

    // Only the new process holds the sockets now: everything served from here on is its work.
    tally.phase.store(2, Ordering::SeqCst);
    wait_until("load after the upgrade", Duration::from_secs(30), || {
        tally.min_in_phase(2) >= N || !tally.failures.lock().unwrap().is_empty()
    });
    tally.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    let failures = tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed request(s) across the upgrade: {failures:#?}\ncounts: {:?}\nlog:\n{}",
        failures.len(),
        tally.table(),
        g.log()
    );
    assert!(
        tally.min_in_phase(0) >= N && tally.min_in_phase(2) >= N,
        "{:?}",
        tally.table()
    );

    let log = g.log();
    for listener in ["web", "tls"] {
        assert!(
            log.contains(&format!(
                "adopted the socket of listener `{listener}` from pid {old_pid}"
            )),
            "{log}"
        );
    }
    assert!(
        log.contains(&format!("adopted the socket of the admin API from pid {old_pid}")),
        "{log}"
    );
    // The admin API moved too: its address answers from the new process, which counts what it
    // accepted on the listeners it adopted.
    let (status, metrics) = g.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metric(&metrics, "gatehouse_connections_accepted_total{listener=\"web\"}") > 0.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "gatehouse_upgrades_total{result=\"ok\"}"), 0.0);

    // systemd heard the new main pid from the old process, and never that the service stops.
    notify.set_nonblocking(true).unwrap();
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        messages
            .iter()
            .any(|m| m.lines().any(|l| l == format!("MAINPID={}", new.0))),
        "{messages:#?}"
    );
    assert!(!messages.iter().any(|m| m.contains("STOPPING=1")), "{messages:#?}");
}

#[test]
fn a_new_process_that_fails_leaves_the_old_one_serving_and_says_why() {
    let pki = Pki::new();
    let mut g = Gatehouse::start(&config(&pki));
    let old_pid = g.child.id();
    // The new process reads the configuration file again: break it.
    let path = g.dir.path().join("gatehouse.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}bogus_key = 1\n")).unwrap();

    let (code, stdout, stderr) = upgrade_cli(g.admin);
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains(&format!("upgrade failed; pid {old_pid} keeps serving: pid ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("exited with status 78 (invalid configuration, certificate or key)"),
        "{stderr}"
    );
    assert!(stderr.contains("bogus_key"), "the new process's reason: {stderr}");

    assert!(g.is_running());
    let (status, _) = g.admin_get("/healthz");
    assert_eq!(status, 200);
    let resp = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(crate::common::raw_exchange(
            g.addr("web"),
            b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        ));
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(resp.ends_with("hello\n"), "{resp}");
    let (_, metrics) = g.admin_get("/metrics");
    assert_eq!(
        metric(&metrics, "gatehouse_upgrades_total{result=\"failed\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "gatehouse_upgrades_total{result=\"ok\"}"),
        0.0,
        "{metrics}"
    );
    // The log line is written after the counter, and reaches the test through a pipe.
    assert!(
        g.wait_log("binary upgrade failed; still serving", Duration::from_secs(5)),
        "{}",
        g.log()
    );
}

#[test]
fn sigusr2_upgrades_and_the_old_process_exits_zero() {
    let pki = Pki::new();
    let mut g = Gatehouse::start(&config(&pki));
    let old_pid = g.child.id();
    // Signal handlers are installed before readiness is reported; until then SIGUSR2 kills.
    wait_until("readiness", Duration::from_secs(10), || g.admin_get("/readyz").0 == 200);
    g.signal("USR2");
    assert!(
        g.wait_log("binary upgrade: pid ", Duration::from_secs(30)),
        "{}",
        g.log()
    );
    let log = g.log();
    let pid: u32 = log
        .split("binary upgrade: pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    // Adopted before anything else can fail, so that a failure does not leave it running.
    let new = Adopted(pid);
    assert_eq!(g.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", g.log());
    let log = g.log();
    assert_ne!(new.0, old_pid);
    assert!(new.is_alive(), "{log}");
    // The old process is gone: the port answers from the new one.
    let resp = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(crate::common::raw_exchange(
            g.addr("web"),
            b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        ));
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
}

/// Whether a connection attempt to `addr` is refused: nothing listens there any more.
fn refused(addr: SocketAddr) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Cleartext listeners `(name, address)`, short handover bounds, and a route answering `hello`.
fn listeners_config(listeners: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, address) in listeners {
        out.push_str(&format!("[[listeners]]\nname = \"{name}\"\naddress = \"{address}\"\n"));
    }
    out.push_str(
        "[shutdown]\nhandover_grace = \"1s\"\ndrain_timeout = \"5s\"\n[log]\naccess_log = \"off\"\n\
         [[routes]]\nrespond = { status = 200, body = \"hello\\n\" }\n",
    );
    out
}

/// Rewrites the running server's configuration file with `text` (keeping its admin API's address)
/// and reloads it through the admin API: the JSON answer, which must be 200.
fn reload_with(g: &Gatehouse, text: &str) -> serde_json::Value {
    let file = g.dir.path().join("gatehouse.toml");
    std::fs::write(&file, format!("{text}[admin]\naddress = \"{}\"\n", g.admin)).unwrap();
    let (status, answer) = crate::reload_listeners::post_reload(g.admin);
    assert_eq!(status, 200, "{answer}\n{}", g.log());
    answer
}

#[test]
fn an_upgrade_hands_over_the_listeners_a_reload_added_and_not_those_it_removed() {
    use crate::reload_listeners::get_blocking;
    let mut g = Gatehouse::start(&listeners_config(&[("web", "127.0.0.1:0"), ("old", "127.0.0.1:0")]));
    let old_pid = g.child.id();
    let (web, old) = (g.addr("web"), g.addr("old"));

    // A reload removes `old` and adds `extra` on a port of the kernel's choosing: the new process
    // can serve that port only if it is handed the socket, since binding port 0 again picks another.
    let answer = reload_with(
        &g,
        &listeners_config(&[("web", "127.0.0.1:0"), ("extra", "127.0.0.1:0")]),
    );
    assert_eq!(answer["listeners"]["removed"][0]["name"], "old", "{answer}");
    assert_eq!(answer["listeners"]["added"][0]["name"], "extra", "{answer}");
    let extra: SocketAddr = answer["listeners"]["added"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get_blocking(extra), "hello\n");
    assert!(refused(old), "a removed listener's port must refuse connections");

    let (code, stdout, stderr) = upgrade_cli(g.admin);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}\nlog:\n{}", g.log());
    let new = Adopted(new_pid(&stdout));
    assert_eq!(g.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", g.log());
    assert!(new.is_alive(), "{}", g.log());

    // The old process is gone: whatever answers now is the new one, on the reload's port.
    assert_eq!(get_blocking(extra), "hello\n", "{}", g.log());
    assert_eq!(get_blocking(web), "hello\n", "{}", g.log());
    assert!(refused(old), "the removed listener must not come back with the upgrade");
    let log = g.log();
    for listener in ["web", "extra"] {
        assert!(
            log.contains(&format!(
                "adopted the socket of listener `{listener}` from pid {old_pid}"
            )),
            "{log}"
        );
    }
    // Not handed over at all (not merely unused by the new configuration).
    assert!(!log.contains("socket of listener `old`"), "{log}");
    let (status, metrics) = g.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metric(&metrics, "gatehouse_connections_accepted_total{listener=\"extra\"}") >= 1.0,
        "{metrics}"
    );
}

#[test]
fn a_socket_activated_listener_stays_so_across_an_upgrade_and_a_bound_one_can_move() {
    use crate::reload_listeners::{free_addr, get_blocking};
    let config = listeners_config(&[("web", "127.0.0.1:0"), ("api", "127.0.0.1:0")]);
    let ports = tempfile::tempdir().unwrap();
    let port_file = ports.path().join("port");
    let pf = port_file.clone();
    let mut g = Gatehouse::start_with(&config, "info", move |c| {
        *c = crate::systemd::activate(c, &pf, "web");
    });
    let old_pid = g.child.id();
    let (web, api) = (g.addr("web"), g.addr("api"));
    let passed: u16 = std::fs::read_to_string(&port_file).unwrap().parse().unwrap();
    assert_eq!(web.port(), passed, "{}", g.log());

    let (code, stdout, stderr) = upgrade_cli(g.admin);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}\nlog:\n{}", g.log());
    let new = Adopted(new_pid(&stdout));
    assert_eq!(g.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", g.log());
    assert!(new.is_alive(), "{}", g.log());
    assert_eq!(get_blocking(web), "hello\n");

    // The new process knows `web`'s socket is systemd's: moving it is refused, saying why.
    let moved_web = free_addr().to_string();
    let file = g.dir.path().join("gatehouse.toml");
    std::fs::write(
        &file,
        format!(
            "{}[admin]\naddress = \"{}\"\n",
            listeners_config(&[("web", &moved_web), ("api", "127.0.0.1:0")]),
            g.admin
        ),
    )
    .unwrap();
    let (status, answer) = crate::reload_listeners::post_reload(g.admin);
    assert_eq!(status, 422, "{answer}\n{}", g.log());
    assert!(
        answer["findings"].as_array().unwrap().iter().any(|f| f["key"]
            == "listeners[0].address"
            && f["message"].as_str().unwrap().contains("socket activation")),
        "{answer}"
    );
    assert_eq!(get_blocking(web), "hello\n");

    // `api`'s socket was bound by the old process: the new one moves it like any other.
    let moved_api = free_addr();
    let answer = reload_with(
        &g,
        &listeners_config(&[("web", "127.0.0.1:0"), ("api", &moved_api.to_string())]),
    );
    assert_eq!(answer["listeners"]["moved"][0]["name"], "api", "{answer}");
    assert_eq!(answer["listeners"]["moved"][0]["from"], api.to_string(), "{answer}");
    assert_eq!(get_blocking(moved_api), "hello\n");
    assert!(refused(api), "the moved listener's old port must refuse connections");
    assert_eq!(get_blocking(web), "hello\n");
    assert!(
        g.log()
            .contains(&format!("adopted the socket of listener `api` from pid {old_pid}")),
        "{}",
        g.log()
    );
}
