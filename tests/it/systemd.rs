//! systemd integration of the real binary: sd_notify messages and socket activation.

use crate::common::binary::{command, Gatehouse};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

const CONFIG: &str = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[log]
access_log = "off"
[[routes]]
respond = { status = 200, body = "hello\n" }
"#;

/// One notification datagram, as text.
fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `GET /` over plain HTTP/1.1: the status line.
fn get(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn sd_notify_reports_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = Gatehouse::start_with(CONFIG, "info", |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    let ready = recv(&sock);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=serving 1 listener(s)")),
        "{ready}"
    );
    // READY=1 means serving: the port answers the moment it arrives.
    assert_eq!(get(g.addr("web")), "HTTP/1.1 200 OK");

    g.signal("TERM");
    let stopping = recv(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    assert_eq!(g.wait_exit(Duration::from_secs(15)).code(), Some(0), "{}", g.log());
}

/// Python's exec keeps the pid, so it can pass a listening socket as fd 3 exactly as systemd
/// does (LISTEN_PID = the exec'd process), without a port chosen in advance.
const ACTIVATE: &str = r#"
import os, socket, sys
port_file, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(64)
with open(port_file, "w") as f:
    f.write(str(s.getsockname()[1]))
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES=name)
os.execve(argv[0], argv, env)
"#;

pub(crate) fn activate(
    cmd: &mut std::process::Command,
    port_file: &std::path::Path,
    name: &str,
) -> std::process::Command {
    let program = cmd.get_program().to_owned();
    let mut wrapped = std::process::Command::new("python3");
    wrapped
        .arg("-c")
        .arg(ACTIVATE)
        .arg(port_file)
        .arg(name)
        .arg(program)
        .args(cmd.get_args());
    wrapped
}

#[test]
fn socket_activation_adopts_the_passed_socket_by_name() {
    let ports = tempfile::tempdir().unwrap();
    let port_file = ports.path().join("port");
    let pf = port_file.clone();
    let mut g = Gatehouse::start_with(CONFIG, "info", move |c| {
        *c = activate(c, &pf, "web");
    });
    let passed: u16 = std::fs::read_to_string(&port_file).unwrap().parse().unwrap();
    // The listener serves on the passed socket's port (its configured port is 0).
    assert_eq!(g.addr("web").port(), passed, "{}", g.log());
    assert_eq!(get(g.addr("web")), "HTTP/1.1 200 OK");
    assert!(g.log().contains("adopted socket fd 3 for listener web"), "{}", g.log());
    g.signal("TERM");
    assert_eq!(g.wait_exit(Duration::from_secs(15)).code(), Some(0), "{}", g.log());

    // A socket passed for the listener on another address is a configuration mismatch: 78.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let config = CONFIG.replace("127.0.0.1:0", "127.0.0.1:1");
    std::fs::write(&cfg, format!("{config}\n[admin]\naddress = \"\"\n")).unwrap();
    let mut c = command("info");
    c.args(["serve", "-c"]).arg(&cfg);
    let out = activate(&mut c, &dir.path().join("port"), "web")
        .current_dir(dir.path())
        .env("GATEHOUSE_STATE_DIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("listeners[0].address") && err.contains("socket fd 3 passed for listener `web`"),
        "{err}"
    );
}
