//! Socket activation: adopting listening sockets passed at exec (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, as systemd and `systemd-socket-activate` pass them; sd_listen_fds(3)).
//!
//! A passed socket goes to the listener whose `name` equals its `FileDescriptorName=`; sockets
//! without such a name (systemd then names them after the unit, or `unknown`) go to the listener
//! whose address they are bound to. An adopted socket must be a listening TCP socket on the
//! listener's address: anything else is a mismatch between the unit files and the configuration
//! and refuses to start (exit 78) rather than serving on an address nobody asked for. Passed sockets
//! that no listener wants are closed with a warning.
//!
//! A binary upgrade passes descriptors the same way (by number, across exec); their environment
//! protocol lives in `lifecycle::upgrade`, and [`own_handed_over`] takes ownership of them here.
//!
//! This is the only module with `unsafe` code: taking ownership of an inherited descriptor number
//! is inherently unchecked by the compiler.

use crate::config::{Findings, ListenerConfig};
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first passed descriptor (`SD_LISTEN_FDS_START`): 0-2 are stdin, stdout and stderr.
const LISTEN_FDS_START: RawFd = 3;

/// More descriptors than this is a launcher bug, not a configuration: refusing it keeps a garbled
/// `LISTEN_FDS` from making the process take over descriptors it does not own.
const MAX_PASSED: usize = 4096;

/// The descriptors can be owned once per process; a second server in the same process (tests,
/// library users) binds its own.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Like `CLAIMED`, for the descriptors a previous gatehouse handed over in a binary upgrade.
static HANDED_OVER_CLAIMED: AtomicBool = AtomicBool::new(false);

/// What a binary upgrade handed to this process, now owned: each listening socket (or why it
/// cannot be one), and the channel on which to report ready.
pub(crate) type HandedOver = (
    Vec<Result<(Socket, SocketAddr), String>>,
    Option<Result<std::os::unix::net::UnixStream, String>>,
);

/// Takes ownership of the descriptors the previous process handed over in a binary upgrade:
/// `listening` must be listening TCP sockets (checked as socket activation checks them), `ready`
/// a Unix stream socket. The caller has checked that they were addressed to this process (the
/// handing process is our parent), that each number is above stderr and that none repeats.
/// `None` when they were already taken in this process.
pub(crate) fn own_handed_over(listening: &[RawFd], ready: Option<RawFd>) -> Option<HandedOver> {
    if HANDED_OVER_CLAIMED.swap(true, Ordering::SeqCst) {
        return None;
    }
    let sockets = listening.iter().map(|&fd| own(fd)).collect();
    let ready = ready.map(|fd| {
        let socket = own_socket(fd)?;
        let domain = socket.domain().map_err(|e| format!("cannot be inspected: {e}"))?;
        if domain != Domain::UNIX || socket.r#type().ok() != Some(Type::STREAM) {
            return Err("is not a Unix stream socket".to_string());
        }
        socket
            .set_cloexec(true)
            .map_err(|e| format!("cannot be set close-on-exec: {e}"))?;
        Ok(std::os::unix::net::UnixStream::from(OwnedFd::from(socket)))
    });
    Some((sockets, ready))
}

/// One descriptor passed to this process.
struct Passed {
    fd: RawFd,
    name: Option<String>,
    /// The socket and its address, or why it cannot serve as a listener.
    socket: Result<(Socket, SocketAddr), String>,
}

/// Returns, for each listener, the passed socket it adopts (`None`: bind it as usual). Problems
/// are added to `findings` under the listener's `address` key.
pub fn adopt(listeners: &[ListenerConfig], findings: &mut Findings) -> Vec<Option<std::net::TcpListener>> {
    let mut out: Vec<Option<std::net::TcpListener>> = listeners.iter().map(|_| None).collect();
    let Some(passed) = take_from_env(findings) else {
        return out;
    };
    let mut passed: Vec<Option<Passed>> = passed.into_iter().map(Some).collect();
    let mut claimed = vec![false; listeners.len()];
    // By name first: it is what the unit says explicitly.
    for (i, l) in listeners.iter().enumerate() {
        let found = passed
            .iter_mut()
            .find(|p| p.as_ref().is_some_and(|p| p.name.as_deref() == Some(l.name.as_str())));
        if let Some(p) = found.and_then(Option::take) {
            claimed[i] = true;
            out[i] = check(p, i, l, findings);
        }
    }
    // Then unnamed (or otherwise named) sockets, by the exact address they are bound to.
    for (i, l) in listeners.iter().enumerate() {
        if claimed[i] || l.address.port() == 0 {
            continue;
        }
        let found = passed.iter_mut().find(|p| {
            p.as_ref()
                .is_some_and(|p| matches!(&p.socket, Ok((_, a)) if *a == l.address))
        });
        if let Some(p) = found.and_then(Option::take) {
            out[i] = check(p, i, l, findings);
        }
    }
    for p in passed.into_iter().flatten() {
        let addr = p.socket.as_ref().map(|(_, a)| a.to_string()).unwrap_or_default();
        tracing::warn!(
            fd = p.fd,
            name = p.name.as_deref().unwrap_or(""),
            address = %addr,
            "inherited socket matches no listener (by name or address); closing it"
        );
    }
    out
}

/// Checks that `p` can serve listener `l` (index `i`).
fn check(p: Passed, i: usize, l: &ListenerConfig, findings: &mut Findings) -> Option<std::net::TcpListener> {
    let key = format!("listeners[{i}].address");
    let (socket, addr) = match p.socket {
        Ok(s) => s,
        Err(why) => {
            findings.error(
                key,
                format!("socket fd {} passed for listener `{}` {why}", p.fd, l.name),
                "pass a TCP socket: ListenStream= an address, with Accept=no, in the .socket unit",
            );
            return None;
        }
    };
    let same_port = l.address.port() == 0 || l.address.port() == addr.port();
    if addr.ip() != l.address.ip() || !same_port {
        findings.error(
            key,
            format!(
                "socket fd {} passed for listener `{}` listens on {addr}, but the listener's address is {}",
                p.fd, l.name, l.address
            ),
            "make ListenStream= in the .socket unit and the listener's address the same",
        );
        return None;
    }
    tracing::info!(
        fd = p.fd,
        listener = %l.name,
        address = %addr,
        "adopted socket fd {} for listener {}",
        p.fd,
        l.name
    );
    Some(socket.into())
}

/// Takes ownership of passed descriptor `fd` if it is an open socket.
fn own_socket(fd: RawFd) -> Result<Socket, String> {
    // Look before taking ownership: an `OwnedFd` for a descriptor that is not open, or that is
    // something else this process relies on, would be closed under its real owner.
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) if target.to_string_lossy().starts_with("socket:") => {}
        Ok(target) => return Err(format!("is not a socket ({})", target.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("is not open".to_string()),
        // No /proc (an unusual container): rely on the launcher's word, checked by the caller.
        Err(_) => {}
    }
    // SAFETY: the launcher opened `fd` for this process and handed it over (socket activation:
    // LISTEN_PID is our pid; binary upgrade: the handing process is our parent and named us):
    // nothing else in the process knows this descriptor number, and `CLAIMED` or
    // `HANDED_OVER_CLAIMED` ensures ownership is taken once. /proc shows it is open and a socket
    // (when /proc is available).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Socket::from(owned))
}

/// Reads and clears the `LISTEN_*` variables and takes ownership of the passed descriptors.
/// `None` when nothing was passed to this process.
fn take_from_env(findings: &mut Findings) -> Option<Vec<Passed>> {
    let fds = std::env::var("LISTEN_FDS").ok()?;
    let pid = std::env::var("LISTEN_PID").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // Addressed to another process (a parent that did not clear them): not ours to take.
    if pid.as_deref().map(str::trim) != Some(std::process::id().to_string().as_str()) {
        tracing::debug!(listen_pid = ?pid, "LISTEN_FDS is set for another process; ignoring it");
        return None;
    }
    // Children (a binary upgrade, anything a handler spawns) must not take the sockets again.
    // This runs at startup, before the server's own threads exist.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let count = match fds.trim().parse::<usize>() {
        Ok(n) if n <= MAX_PASSED => n,
        _ => {
            findings.error(
                "LISTEN_FDS",
                format!("`{fds}` is not a descriptor count"),
                "start gatehouse from systemd socket activation, or unset LISTEN_FDS",
            );
            return None;
        }
    };
    let names: Vec<Option<String>> = match names {
        None => vec![None; count],
        Some(n) => {
            let split: Vec<Option<String>> = n.split(':').map(|s| Some(s.to_string())).collect();
            if split.len() != count {
                findings.error(
                    "LISTEN_FDNAMES",
                    format!("{} name(s) for {count} descriptor(s)", split.len()),
                    "give each passed socket one FileDescriptorName=",
                );
                return None;
            }
            split
        }
    };
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return None;
    }
    let mut passed = Vec::with_capacity(count);
    for (k, name) in names.into_iter().enumerate() {
        // `count` is bounded by MAX_PASSED, so this cannot overflow.
        let fd = LISTEN_FDS_START + k as RawFd;
        passed.push(Passed {
            fd,
            name,
            socket: own(fd),
        });
    }
    Some(passed)
}

/// Takes ownership of passed descriptor `fd` if it is a socket, and checks it is a listening TCP
/// socket. Errors say what it is instead, completing "socket fd N passed for listener X ...".
fn own(fd: RawFd) -> Result<(Socket, SocketAddr), String> {
    let socket = own_socket(fd)?;
    let describe = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let ty = socket.r#type().map_err(|e| describe("is not a socket", e))?;
    if ty != Type::STREAM {
        return Err("is not a stream socket (use ListenStream=, not ListenDatagram=)".to_string());
    }
    let domain = socket.domain().map_err(|e| describe("cannot be inspected", e))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err("is not a TCP socket (a Unix socket? use ListenStream=ADDRESS:PORT)".to_string());
    }
    if !socket.is_listener().map_err(|e| describe("cannot be inspected", e))? {
        return Err("is not listening (a connection? the .socket unit needs Accept=no)".to_string());
    }
    let addr = socket
        .local_addr()
        .map_err(|e| describe("has no local address", e))?
        .as_socket()
        .ok_or_else(|| "has no IP address".to_string())?;
    // Children must not inherit it (systemd passes it without CLOEXEC); tokio needs non-blocking.
    socket
        .set_cloexec(true)
        .map_err(|e| describe("cannot be set close-on-exec", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| describe("cannot be made non-blocking", e))?;
    Ok((socket, addr))
}
