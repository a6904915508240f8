//! A real nginx on loopback, for tests that need a third-party peer (`.ci/run` installs
//! nginx-light). One worker, no master, no daemon, everything under a temporary directory; killed
//! when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

/// The installed nginx's version, e.g. `[1, 22, 1]`.
pub fn version() -> Vec<u32> {
    let out = Command::new("nginx")
        .arg("-v")
        .output()
        .expect("nginx is installed (.ci/run installs nginx-light)");
    let v = String::from_utf8_lossy(&out.stderr).into_owned();
    v.split('/')
        .nth(1)
        .unwrap_or("0")
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// A loopback port that was free a moment ago (nginx must be told its port in its config).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nginx {
    /// Starts nginx with `http` as the body of its `http { }` block (access log off and the
    /// temporary paths are provided; `{dir}` in `http` is replaced by nginx's directory), and
    /// waits until every one of `ports` accepts connections.
    pub async fn start(http: &str, ports: &[u16]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let http = http.replace("{dir}", &d);
        let conf = format!(
            "worker_processes 1;\nmaster_process off;\nevents {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/cb; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n{http}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-e", "stderr", "-g"])
            .arg(format!("daemon off; pid {d}/nginx.pid; error_log stderr;"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx starts (.ci/run installs nginx-light)");
        // nginx prints nothing when it is ready: wait until each port accepts.
        for port in ports {
            let mut ok = false;
            for _ in 0..400 {
                if tokio::net::TcpStream::connect(("127.0.0.1", *port)).await.is_ok() {
                    ok = true;
                    break;
                }
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    use std::io::Read;
                    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                    panic!("nginx exited with {status}:\n{err}");
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(ok, "nginx did not listen on {port}");
        }
        Nginx { child, dir }
    }

    /// nginx's directory (its prefix), where a test can put files to serve.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
