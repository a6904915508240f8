//! systemd service notifications (`sd_notify`): ready, status, reloading and stopping.
//!
//! The protocol (sd_notify(3)) is one datagram of newline-separated `KEY=VALUE` lines sent to the
//! `AF_UNIX` socket named by `$NOTIFY_SOCKET`: a path, or `@name` for the Linux abstract namespace.
//! It is implemented here on std's `UnixDatagram` rather than with libsystemd, so there is nothing
//! to link and nothing to configure: without `$NOTIFY_SOCKET` every call is a no-op and the server
//! behaves the same inside and outside systemd.
//!
//! What gatehouse sends, and when:
//!
//! | when | message |
//! |---|---|
//! | every listener is bound and accepting | `READY=1`, `STATUS=serving N listener(s); M connection(s)` |
//! | every [`STATUS_INTERVAL`] while serving | `STATUS=serving N listener(s); M connection(s)` |
//! | SIGTERM/SIGINT: the drain begins | `STOPPING=1`, `STATUS=draining M connection(s)` |
//! | a reload starts | `RELOADING=1`, `MONOTONIC_USEC=...` ([`Notifier::reloading`]) |
//! | a reload is done (applied or refused) | `READY=1`, `STATUS=...` ([`Notifier::reloaded`]) |
//! | a binary upgrade's new process serves | `MAINPID=<new pid>`, `STATUS=...` ([`Notifier::main_pid`]); then nothing more from the old process |
//!
//! `NOTIFY_SOCKET` is deliberately left in the environment: a binary upgrade starts the new
//! process as a child, and that process must be able to tell systemd it is the one now serving.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

/// How often the status line is refreshed while serving: `systemctl status` shows it, and a
/// connection count a few seconds old is as useful as a live one at a fraction of the messages.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// A datagram that the manager has not taken within this long is dropped rather than stalling a
/// runtime thread: the manager's queue is full, which only happens when it is itself in trouble.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends notifications to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// As given in `$NOTIFY_SOCKET`, for log messages.
    name: String,
}

/// The process's notifier, read from `$NOTIFY_SOCKET` on first use.
///
/// # Examples
///
/// A reload, as systemd's `Type=notify-reload` expects it:
///
/// ```no_run
/// let notify = gatehouse::lifecycle::systemd::notifier();
/// notify.reloading();
/// // ... validate and apply the new configuration ...
/// notify.reloaded("serving 2 listener(s); configuration reloaded");
/// ```
pub fn notifier() -> &'static Notifier {
    static NOTIFIER: OnceLock<Notifier> = OnceLock::new();
    NOTIFIER.get_or_init(Notifier::from_env)
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`; disabled when it is unset or unusable (logged).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Notifier { target: None },
            Some(v) => match Notifier::connect(&v.to_string_lossy()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(notify_socket = %v.to_string_lossy(), error = %e, "cannot use NOTIFY_SOCKET; systemd will not be told when gatehouse is ready");
                    Notifier { target: None }
                }
            },
        }
    }

    /// A notifier for the given socket: a filesystem path, or `@name` for an abstract socket.
    pub fn connect(notify_socket: &str) -> io::Result<Notifier> {
        let addr = if let Some(abstract_name) = notify_socket.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        } else if notify_socket.starts_with('/') {
            SocketAddr::from_pathname(notify_socket)?
        } else {
            // sd_notify(3) accepts only these two forms (and vsock, which gatehouse does not need).
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path nor an @abstract name",
            ));
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Notifier {
            target: Some(Target {
                socket,
                addr,
                name: notify_socket.to_string(),
            }),
        })
    }

    /// Whether a service manager is listening.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: startup is complete and every listener accepts connections.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STATUS=`: a one-line description shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1`: the drain has begun; systemd's stop timeout now runs.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` timestamp systemd uses to match the reload it
    /// asked for (`Type=notify-reload`). Call it before validating the new configuration, and
    /// [`Notifier::reloaded`] once the reload was applied or refused: until then systemd reports
    /// the unit as `reloading`.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading configuration",
            monotonic_usec()
        ));
    }

    /// `MAINPID=`: `pid` (a binary upgrade's new process) is now the service's main process. Sent
    /// by the current main process, so systemd accepts it under `NotifyAccess=main` as well.
    pub fn main_pid(&self, pid: u32, status: &str) {
        self.send(&format!("MAINPID={pid}\nSTATUS={}", one_line(status)));
    }

    /// `READY=1` after a reload (successful or refused: either way the server is serving).
    pub fn reloaded(&self, status: &str) {
        self.ready(status);
    }

    fn send(&self, message: &str) {
        let Some(t) = &self.target else { return };
        match t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            Ok(_) => {
                tracing::debug!(notify_socket = %t.name, message = %message.replace('\n', " "), "notified the service manager")
            }
            Err(e) => {
                tracing::warn!(notify_socket = %t.name, error = %e, message = %message.replace('\n', " "), "cannot notify the service manager")
            }
        }
    }
}

/// A status line must stay one assignment: a newline would start a new (bogus) key.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
/// (`std::time::Instant` reads the same clock but does not expose its value.)
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket_and_keeps_status_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.ready("serving 1 listener(s)\nREADY=0");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "READY=1\nSTATUS=serving 1 listener(s) READY=0"
        );
        n.reloading();
        let len = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        let usec: u64 = msg
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(msg.starts_with("RELOADING=1\n") && usec > 0, "{msg}");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gatehouse-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::connect(&format!("@{name}"))
            .unwrap()
            .stopping("draining 0 connection(s)");
        let mut buf = [0u8; 128];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=draining 0 connection(s)");
    }

    #[test]
    fn refuses_relative_paths() {
        assert!(Notifier::connect("notify.sock").is_err());
    }
}
