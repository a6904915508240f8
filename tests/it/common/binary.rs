//! The real `gatehouse` binary as a child process: start it from TOML, learn its ephemeral ports
//! from the startup report, signal it, read its log, wait for its exit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `gatehouse serve`, killed on drop if it is still running.
pub struct Gatehouse {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    addrs: HashMap<String, SocketAddr>,
    log: Arc<Mutex<String>>,
    /// Set once the process's stderr reached its end: every line is in `log`.
    log_ended: Arc<std::sync::atomic::AtomicBool>,
}

/// `gatehouse` with the arguments every test wants: text logs at `log_level`.
pub fn command(log_level: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    c.args(["--log-format", "text", "--log-level", log_level]);
    c
}

impl Gatehouse {
    /// Writes `toml` (`{dir}` replaced by a fresh temp dir) with an admin API on an ephemeral
    /// port, runs `gatehouse serve` on it and waits for the startup report.
    pub fn start(toml: &str) -> Gatehouse {
        Gatehouse::start_with(toml, "info", |_| {})
    }

    /// Like `start`, with a log level and a chance to adjust the command (environment, wrapper).
    pub fn start_with(toml: &str, log_level: &str, adjust: impl FnOnce(&mut Command)) -> Gatehouse {
        Gatehouse::launch(toml, "", log_level, adjust)
    }

    /// Like `start`, with more `[admin]` keys (`{dir}` replaced too), such as a `token_file`.
    pub fn start_with_admin(toml: &str, admin_keys: &str) -> Gatehouse {
        Gatehouse::launch(toml, admin_keys, "info", |_| {})
    }

    fn launch(toml: &str, admin_keys: &str, log_level: &str, adjust: impl FnOnce(&mut Command)) -> Gatehouse {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gatehouse.toml");
        let text = format!("{toml}\n[admin]\naddress = \"127.0.0.1:0\"\n{admin_keys}\n")
            .replace("{dir}", dir.path().to_str().unwrap());
        std::fs::write(&config, text).unwrap();
        let mut cmd = command(log_level);
        cmd.arg("serve").arg("-c").arg(&config);
        adjust(&mut cmd);
        let mut child = cmd
            .current_dir(dir.path())
            .env("GATEHOUSE_STATE_DIR", dir.path().join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut startup = String::new();
        let admin = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("gatehouse exited during startup ({status}):\n{startup}");
            }
            startup.push_str(&line);
            if let Some(rest) = line.strip_prefix("admin API: http://") {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        // The protocol table: "<name> <address> <tls> ...", one row per listener.
        let addrs = startup
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, addr) = (f.next()?, f.next()?.parse().ok()?);
                Some((name.to_string(), addr))
            })
            .collect();
        let log = Arc::new(Mutex::new(startup));
        let sink = log.clone();
        let log_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended = log_ended.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while matches!(stderr.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Gatehouse {
            child,
            dir,
            admin,
            addrs,
            log,
            log_ended,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .addrs
            .get(listener)
            .unwrap_or_else(|| panic!("no listener `{listener}` in the startup report:\n{}", self.log()))
    }

    /// Sends `signal` ("TERM", "INT", "HUP"...) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) for the process to exit, then for its last log lines: the thread reading
    /// them may lag behind the exit. They are all in once stderr ends, or once the process's last
    /// line is read (a binary upgrade's new process keeps stderr open after the old one exits).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            // A child's exit has no awaitable event short of blocking in wait(), which cannot time out.
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}:\n{}\n{}",
                self.log(),
                thread_stacks(self.child.id())
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log_ended.load(std::sync::atomic::Ordering::SeqCst)
            && !self.log().contains("gatehouse stopped\n")
            && Instant::now() < deadline
        {
            // Lines arrive through a pipe read by another thread; there is no event to await.
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    }

    /// Waits (bounded) until the log contains `needle`; returns whether it did.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            // Log lines arrive through a pipe read by another thread; there is no event to await.
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// `GET path` on the admin API: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every thread's stack in process `pid`, for a test that finds it stuck: gdb's backtraces where
/// gdb is installed, else each thread's name and what it waits in (from /proc).
fn thread_stacks(pid: u32) -> String {
    if let Ok(out) = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output()
    {
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    let mut text = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
            text.push_str(&format!(
                "thread {}: {} waiting in {}\n",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan")
            ));
        }
    }
    text
}
