//! Resource exhaustion: out of descriptors the server waits instead of spinning and recovers by
//! itself; hundreds of slow clients do not delay a normal request.

use crate::common::TestServer;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Makes sure this test process may open `need` descriptors (both tests hold hundreds of sockets,
/// and the suite runs tests in parallel): raises the soft limit up to the hard one if needed.
fn ensure_fd_limit(need: u64) {
    let soft = || -> (u64, String) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_string();
        let soft = line.split_whitespace().nth(3).unwrap();
        (soft.parse().unwrap_or(u64::MAX), line)
    };
    if soft().0 >= need {
        return;
    }
    let pid = std::process::id().to_string();
    let _ = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={need}:")])
        .status();
    let (now, line) = soft();
    assert!(
        now >= need,
        "this test needs {need} open files; raise `ulimit -n` (prlimit could not): {line}"
    );
}

/// One request on `stream` (kept alive); returns the status and body.
fn get(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "closed after:\n{head}");
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// User plus system CPU time the process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces: utime and
    // stime are fields 14 and 15, the 12th and 13th after it.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// The binary with its stderr log collected, killed when dropped.
struct Gatehouse {
    child: Child,
    web: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Gatehouse {
    /// Runs `gatehouse serve` under `ulimit -n {nofile}` with a cleartext listener `web` and the
    /// admin API, both on ephemeral ports read back from the startup report (on two loopback
    /// addresses: validation refuses the same address, port 0 included, for both).
    fn start(nofile: u32, dir: &std::path::Path) -> Gatehouse {
        let cfg = dir.join("gatehouse.toml");
        std::fs::write(
            &cfg,
            r#"
[server]
workers = 2
[admin]
address = "127.0.0.2:0"
[timeouts]
first_request = "60s"
header_read = "60s"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
protocols = ["http/1.1"]
[[routes]]
respond = { status = 200, body = "ok" }
"#,
        )
        .unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                r#"ulimit -n {nofile} && exec "$0" --log-format json serve -c "$1""#
            ))
            .arg(env!("CARGO_BIN_EXE_gatehouse"))
            .arg(&cfg)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let (mut web, mut admin, mut startup) = (None, None, String::new());
        while admin.is_none() {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "server exited during startup:\n{startup}"
            );
            startup.push_str(&line);
            let mut words = line.split_whitespace();
            match words.next() {
                Some("web") => web = words.next().and_then(|a| a.parse().ok()),
                Some("admin") => {
                    admin = line
                        .split("http://")
                        .nth(1)
                        .and_then(|rest| rest.split('/').next())
                        .and_then(|a| a.parse().ok())
                }
                _ => {}
            }
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Gatehouse {
            child,
            web: web.unwrap_or_else(|| panic!("no `web` listener in:\n{startup}")),
            admin: admin.unwrap(),
            log,
        }
    }

    /// Log events at `level` with the given `listener` field.
    fn events(&self, level: &str, listener: &str) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == level && e["listener"] == listener)
            .cloned()
            .collect()
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn running_out_of_descriptors_backs_off_without_spinning_and_recovers() {
    ensure_fd_limit(4096);
    let dir = tempfile::tempdir().unwrap();
    let server = Gatehouse::start(128, dir.path());
    let pid = server.child.id();
    let emfile = r#"gatehouse_accept_errors_total{listener="web",reason="emfile"}"#;

    // A monitoring connection opened before the descriptors run out keeps working throughout.
    let mut monitor = TcpStream::connect(server.admin).unwrap();
    monitor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(get(&mut monitor, "/healthz").0, 200);

    // 300 clients that start a request and hold: about 100 are accepted before the process runs
    // out of its 128 descriptors; the rest wait in the kernel's accept queue.
    let mut clients = Vec::new();
    for _ in 0..300 {
        // A full accept queue (a small net.core.somaxconn) may make later connects time out;
        // enough of them to exhaust the server is all this needs.
        if let Ok(mut c) = TcpStream::connect_timeout(&server.web, Duration::from_secs(2)) {
            c.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n").unwrap();
            clients.push(c);
        }
    }
    assert!(clients.len() > 200, "only {} clients connected", clients.len());

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors_before = 0.0;
    while errors_before == 0.0 {
        assert!(Instant::now() < deadline, "no EMFILE was counted");
        std::thread::sleep(Duration::from_millis(50));
        errors_before = series(&get(&mut monitor, "/metrics").1, emfile);
    }
    // A new admin connection now cannot be accepted either: the admin loop must wait too.
    let mut late_admin = TcpStream::connect(server.admin).unwrap();
    late_admin.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // Saturated: the accept loops are retrying, but sleeping in between.
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_millis(1500));
    let (cpu1, t1) = (cpu_time(pid), Instant::now());
    let metrics = get(&mut monitor, "/metrics").1;
    let errors_after = series(&metrics, emfile);
    // Still trying (not given up), but at the backoff's pace: a loop that retries at once fails
    // thousands of times a second even when a loaded machine gives it a sliver of a core.
    assert!(
        errors_after > errors_before && errors_after < errors_before + 100.0,
        "EMFILE count went from {errors_before} to {errors_after}"
    );
    // Waiting costs a few wake-ups a second; a spinning loop takes whatever CPU it is given.
    let share = (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64();
    assert!(
        share < 0.2,
        "the server used {:.0}% of a core while saturated",
        share * 100.0
    );
    assert!(
        series(
            &metrics,
            r#"gatehouse_accept_errors_total{listener="admin",reason="emfile"}"#
        ) > 0.0,
        "{metrics}"
    );
    let warnings = server.events("WARN", "web");
    assert_eq!(warnings.len(), 1, "one warning per episode: {warnings:#?}");
    let w = &warnings[0];
    assert_eq!(w["reason"], "emfile");
    assert!(
        w["message"]
            .as_str()
            .unwrap()
            .contains("no file descriptor left (EMFILE)"),
        "{w}"
    );
    let fix = w["fix"].as_str().unwrap();
    assert!(fix.contains("ulimit -n") && fix.contains("LimitNOFILE="), "{w}");

    // The clients go away: descriptors come back and the server serves normally, by itself.
    drop(clients);
    let started = Instant::now();
    let mut fresh = TcpStream::connect(server.web).unwrap();
    fresh.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(get(&mut fresh, "/"), (200, "ok".to_string()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The connection that arrived at the admin API while it was out of descriptors is served.
    assert_eq!(get(&mut late_admin, "/healthz").0, 200);

    let deadline = Instant::now() + Duration::from_secs(10);
    let recovered = loop {
        let infos = server.events("INFO", "web");
        if let Some(e) = infos.iter().find(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("accepting connections again")
        }) {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no recovery line: {infos:#?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let counted = series(&get(&mut monitor, "/metrics").1, emfile);
    assert_eq!(recovered["reason"], "emfile");
    assert!(
        recovered["errors"].as_f64().unwrap() >= errors_after && recovered["errors"].as_f64() <= Some(counted),
        "{recovered} vs {counted} counted"
    );
    assert!(recovered["lasted_ms"].as_u64().unwrap() >= 1000, "{recovered}");
    // Recovered for good: another request costs no new error, and the episode produced one warning.
    assert_eq!(get(&mut fresh, "/"), (200, "ok".to_string()));
    assert_eq!(series(&get(&mut monitor, "/metrics").1, emfile), counted);
    assert_eq!(server.events("WARN", "web").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slowloris_connections_do_not_delay_a_normal_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ensure_fd_limit(4096);
    let srv = TestServer::start(
        "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [[routes]]\nrespond = { status = 200, body = \"ok\" }\n",
    )
    .await;
    let addr = srv.addr("c");
    // With the default limits (max_connections_per_ip = 256), two client addresses of 250 each:
    // every slow connection is admitted and held, none is refused.
    let mut slow = Vec::new();
    for i in 0..500 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        let from: SocketAddr = if i % 2 == 0 { "127.0.0.2:0" } else { "127.0.0.3:0" }.parse().unwrap();
        socket.bind(from).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        slow.push(tokio::spawn(async move {
            s.write_all(b"GET / HTTP/1.1\r\nx-slow: ").await?;
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.write_all(b"a").await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        }));
    }
    let accepted = r#"gatehouse_connections_accepted_total{listener="c"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.metric(accepted) < 500.0 {
        assert!(Instant::now() < deadline, "accepted {}", srv.metric(accepted));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the normal request must be answered")
        .unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("ok"), "{text}");
    assert!(took < Duration::from_secs(2), "a normal request took {took:?}");

    // The slow clients were all still being served (none closed, none refused).
    for t in &slow {
        assert!(!t.is_finished(), "a slow client's connection was closed");
    }
    assert_eq!(srv.metric(accepted), 501.0);
    assert_eq!(
        srv.metric(r#"gatehouse_connections_rejected_total{listener="c",reason="per_ip"}"#),
        0.0
    );
    for t in slow {
        t.abort();
    }
    srv.stop().await;
}
