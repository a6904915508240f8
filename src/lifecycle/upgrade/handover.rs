//! The handover as the new process sees it: the environment the old process sets, the sockets it
//! passes, and the channel on which the new process reports that it serves, or why it cannot.
//!
//! The old process starts the new one with:
//!
//! | variable | value |
//! |---|---|
//! | `GATEHOUSE_UPGRADE_FDS` | `public=3,internal=4,@admin=5`: each listening socket by listener name (percent-encoded), the admin API's as `@admin` |
//! | `GATEHOUSE_UPGRADE_FROM` | the old process's pid |
//! | `GATEHOUSE_UPGRADE_READY_FD` | a Unix stream socket: the new process writes `READY\n`, or `FAILED\n` and why, then closes it |
//! | `GATEHOUSE_UPGRADE_ACTIVATED` | `public`: the listeners (percent-encoded, comma-separated) whose sockets came from socket activation, which a reload must not move; absent or empty when none did |
//!
//! The variables are trusted only when `GATEHOUSE_UPGRADE_FROM` is this process's parent: the
//! same variables left in a shell's environment by accident must never make a process take over
//! descriptor numbers it does not own. They are removed at once, so nothing this process starts
//! sees them.

use crate::config::{Findings, ListenerConfig};
use crate::listen::Origin;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use socket2::Socket;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

pub const FDS_VAR: &str = "GATEHOUSE_UPGRADE_FDS";
pub const FROM_VAR: &str = "GATEHOUSE_UPGRADE_FROM";
pub const READY_FD_VAR: &str = "GATEHOUSE_UPGRADE_READY_FD";
pub const ACTIVATED_VAR: &str = "GATEHOUSE_UPGRADE_ACTIVATED";

/// More sockets than this is a garbled variable, not a configuration (as for `LISTEN_FDS`).
const MAX_PASSED: usize = 4096;

/// Characters a listener name cannot carry raw in `GATEHOUSE_UPGRADE_FDS`: the separators, the
/// escape itself, and `@`, so that no listener name can read as `@admin`.
const NAME_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b',').add(b'=').add(b'%').add(b'@');

/// What a handed-over socket serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The `[[listeners]]` entry of this name.
    Listener(String),
    /// The admin API.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Listener(name) => write!(f, "listener `{name}`"),
            Role::Admin => f.write_str("the admin API"),
        }
    }
}

/// `GATEHOUSE_UPGRADE_FDS` for these sockets.
pub fn encode(entries: &[(Role, RawFd)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(role, fd)| match role {
            Role::Listener(name) => format!("{}={fd}", utf8_percent_encode(name, NAME_ESCAPES)),
            Role::Admin => format!("@admin={fd}"),
        })
        .collect();
    items.join(",")
}

/// `GATEHOUSE_UPGRADE_ACTIVATED` for these roles (listeners only: the admin API is never
/// socket-activated).
pub fn encode_activated(roles: &[&Role]) -> String {
    let names: Vec<String> = roles
        .iter()
        .filter_map(|role| match role {
            Role::Listener(name) => Some(utf8_percent_encode(name, NAME_ESCAPES).to_string()),
            Role::Admin => None,
        })
        .collect();
    names.join(",")
}

/// Parses `GATEHOUSE_UPGRADE_ACTIVATED` against the roles `GATEHOUSE_UPGRADE_FDS` passed: each
/// name must be one of those listeners, once.
pub fn parse_activated(text: &str, passed: &[(Role, RawFd)]) -> Result<Vec<Role>, String> {
    let mut out: Vec<Role> = Vec::new();
    if text.trim().is_empty() {
        return Ok(out);
    }
    for name in text.split(',') {
        let decoded = percent_decode_str(name)
            .decode_utf8()
            .map_err(|_| format!("`{name}` is not a percent-encoded UTF-8 listener name"))?;
        let role = Role::Listener(decoded.into_owned());
        if !passed.iter().any(|(r, _)| *r == role) {
            return Err(format!("{role} is not among the sockets handed over"));
        }
        if out.contains(&role) {
            return Err(format!("{role} is given twice"));
        }
        out.push(role);
    }
    Ok(out)
}

/// Parses `GATEHOUSE_UPGRADE_FDS`. Every descriptor must be above stderr and appear once, and
/// every role once: anything else is not what a gatehouse wrote.
pub fn parse(text: &str) -> Result<Vec<(Role, RawFd)>, String> {
    let mut out: Vec<(Role, RawFd)> = Vec::new();
    if text.trim().is_empty() {
        return Ok(out);
    }
    for item in text.split(',') {
        let (name, fd) = item.split_once('=').ok_or_else(|| format!("`{item}` is not NAME=FD"))?;
        let fd: RawFd = fd
            .trim()
            .parse()
            .map_err(|_| format!("`{fd}` in `{item}` is not a descriptor number"))?;
        if fd < 3 {
            return Err(format!("descriptor {fd} in `{item}` is stdin, stdout or stderr"));
        }
        let role = match name {
            "@admin" => Role::Admin,
            _ if name.starts_with('@') => return Err(format!("`{name}` is not a known role")),
            _ => {
                let decoded = percent_decode_str(name)
                    .decode_utf8()
                    .map_err(|_| format!("`{name}` is not a percent-encoded UTF-8 listener name"))?;
                if decoded.is_empty() {
                    return Err(format!("`{item}` has no listener name"));
                }
                Role::Listener(decoded.into_owned())
            }
        };
        if out.iter().any(|(_, f)| *f == fd) {
            return Err(format!("descriptor {fd} is given twice"));
        }
        if out.iter().any(|(r, _)| *r == role) {
            return Err(format!("{role} is given twice"));
        }
        out.push((role, fd));
        if out.len() > MAX_PASSED {
            return Err(format!("more than {MAX_PASSED} descriptors"));
        }
    }
    Ok(out)
}

/// Whether `GATEHOUSE_UPGRADE_FROM` names `parent`, the process that started this one.
pub fn addressed_to_us(from: &str, parent: u32) -> bool {
    from.trim().parse::<u32>().is_ok_and(|pid| pid == parent && pid > 1)
}

/// Where the new process tells the old one how its start went. Cloneable: the server reports
/// ready once it accepts, and the command reports a failure wherever startup stops.
#[derive(Clone, Debug, Default)]
pub struct ReadyReport {
    channel: Arc<Mutex<Option<UnixStream>>>,
}

impl ReadyReport {
    /// Every listener accepts: the old process may hand over. Closes the channel.
    pub fn ready(&self) {
        self.send(b"READY\n".to_vec());
    }

    /// Startup failed with `why`; this process is about to exit. Closes the channel.
    pub fn failed(&self, why: &str) {
        self.send(format!("FAILED\n{}\n", why.trim_end()).into_bytes());
    }

    fn send(&self, message: Vec<u8>) {
        let taken = self.channel.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut channel) = taken {
            // A parent that gave up (its upgrade_timeout) closed its end: it already logged why.
            if let Err(e) = channel.write_all(&message) {
                tracing::warn!(error = %e, "cannot report to the process that started this upgrade");
            }
        }
    }
}

/// One socket the old process handed over.
struct Passed {
    role: Role,
    fd: RawFd,
    /// Where the socket first came from, which the old process knew and passed on.
    origin: Origin,
    socket: Result<(Socket, SocketAddr), String>,
}

/// What the old process handed to this one in a binary upgrade.
pub struct Handover {
    from: u32,
    passed: Vec<Option<Passed>>,
    report: ReadyReport,
}

impl Handover {
    /// Reads and removes the upgrade variables and takes ownership of the descriptors. `None`
    /// when this process was not started by an upgrade. Problems go to `findings` (exit 78): the
    /// parent then reports that the upgrade failed, and why.
    ///
    /// Call it before any thread is started: it changes the process environment.
    pub fn from_env(findings: &mut Findings) -> Option<Handover> {
        let fds = std::env::var(FDS_VAR).ok();
        let from = std::env::var(FROM_VAR).ok();
        let ready = std::env::var(READY_FD_VAR).ok();
        let activated = std::env::var(ACTIVATED_VAR).ok();
        for var in [FDS_VAR, FROM_VAR, READY_FD_VAR, ACTIVATED_VAR] {
            std::env::remove_var(var);
        }
        let fds = fds?;
        let parent = std::os::unix::process::parent_id();
        let from = from.unwrap_or_default();
        if !addressed_to_us(&from, parent) {
            tracing::warn!(
                upgrade_from = %from,
                parent,
                "{FDS_VAR} is set, but not by this process's parent; ignoring it (binding as usual)"
            );
            return None;
        }
        let from = parent;
        let mut bad = |message: String| {
            findings.error(
                FDS_VAR,
                message,
                "start upgrades with `gatehouse upgrade` or SIGUSR2, not by hand",
            )
        };
        let entries = match parse(&fds) {
            Ok(e) => e,
            Err(why) => {
                bad(format!("`{fds}` from pid {from}: {why}"));
                return None;
            }
        };
        let activated = match parse_activated(activated.as_deref().unwrap_or_default(), &entries) {
            Ok(a) => a,
            Err(why) => {
                bad(format!("{ACTIVATED_VAR} from pid {from}: {why}"));
                return None;
            }
        };
        let ready_fd = match ready.as_deref().map(str::trim).map(str::parse::<RawFd>) {
            None => None,
            Some(Ok(fd)) if fd >= 3 && !entries.iter().any(|(_, f)| *f == fd) => Some(fd),
            Some(_) => {
                bad(format!(
                    "{READY_FD_VAR} `{}` is not a free descriptor number",
                    ready.unwrap_or_default()
                ));
                return None;
            }
        };
        let numbers: Vec<RawFd> = entries.iter().map(|(_, fd)| *fd).collect();
        let (sockets, channel) = crate::listen::inherit::own_handed_over(&numbers, ready_fd)?;
        let channel = match channel.transpose() {
            Ok(c) => c,
            Err(why) => {
                bad(format!(
                    "{READY_FD_VAR} descriptor {} {why}",
                    ready_fd.unwrap_or_default()
                ));
                None
            }
        };
        let passed = entries
            .into_iter()
            .zip(sockets)
            .map(|((role, fd), socket)| {
                let origin = if activated.contains(&role) {
                    Origin::Inherited
                } else {
                    Origin::Bound
                };
                Some(Passed {
                    role,
                    fd,
                    origin,
                    socket,
                })
            })
            .collect();
        tracing::info!(
            from,
            sockets = numbers.len(),
            "binary upgrade: taking over from pid {from}"
        );
        Some(Handover {
            from,
            passed,
            report: ReadyReport {
                channel: Arc::new(Mutex::new(channel)),
            },
        })
    }

    /// The pid of the process that handed over.
    pub fn from_pid(&self) -> u32 {
        self.from
    }

    /// Where to report ready or failed.
    pub fn report(&self) -> ReadyReport {
        self.report.clone()
    }

    /// For each listener, the handed-over socket it adopts and where that socket first came from
    /// (`None`: bind it as usual). A socket goes to the listener of its name if it is on that
    /// listener's address (any port when the configured port is 0); otherwise to a listener on
    /// exactly its address (a renamed listener). A listener that moved is bound anew, and its old
    /// socket closed.
    pub fn adopt_listeners(
        &mut self,
        listeners: &[ListenerConfig],
        findings: &mut Findings,
    ) -> Vec<Option<(std::net::TcpListener, Origin)>> {
        let mut out: Vec<Option<(std::net::TcpListener, Origin)>> = listeners.iter().map(|_| None).collect();
        for (i, l) in listeners.iter().enumerate() {
            let role = Role::Listener(l.name.clone());
            out[i] = self.take(findings, &format!("listeners[{i}].address"), l.address, |p| {
                p.role == role
            });
        }
        for (i, l) in listeners.iter().enumerate() {
            if out[i].is_none() && l.address.port() != 0 {
                out[i] = self.take(findings, &format!("listeners[{i}].address"), l.address, |p| {
                    matches!(p.role, Role::Listener(_)) && matches!(&p.socket, Ok((_, a)) if *a == l.address)
                });
            }
        }
        out
    }

    /// The admin API's socket, if it was handed over and is on `address`.
    pub fn adopt_admin(&mut self, address: SocketAddr, findings: &mut Findings) -> Option<std::net::TcpListener> {
        self.take(findings, "admin.address", address, |p| p.role == Role::Admin)
            .map(|(socket, _)| socket)
    }

    /// Takes the first passed socket `wanted` picks, if it is on `address`.
    fn take(
        &mut self,
        findings: &mut Findings,
        key: &str,
        address: SocketAddr,
        wanted: impl Fn(&Passed) -> bool,
    ) -> Option<(std::net::TcpListener, Origin)> {
        let slot = self.passed.iter_mut().find(|p| p.as_ref().is_some_and(&wanted))?;
        let on_address = |a: &SocketAddr| a.ip() == address.ip() && (address.port() == 0 || a.port() == address.port());
        match slot.as_ref().map(|p| &p.socket) {
            Some(Ok((_, a))) if on_address(a) => {}
            // Moved in the new configuration: leave it for `finish` to close.
            Some(Ok(_)) => return None,
            _ => {}
        }
        let p = slot.take()?;
        match p.socket {
            Ok((socket, addr)) => {
                tracing::info!(fd = p.fd, address = %addr, from = self.from, "adopted the socket of {} from pid {}", p.role, self.from);
                Some((socket.into(), p.origin))
            }
            Err(why) => {
                findings.error(
                    key,
                    format!(
                        "socket fd {} handed over for {} by pid {} {why}",
                        p.fd, p.role, self.from
                    ),
                    "this is a bug in the old process; restart gatehouse instead of upgrading",
                );
                None
            }
        }
    }

    /// Closes the sockets the new configuration does not use, once everything was adopted (the
    /// old process closes its copies as it exits, so their ports stop listening).
    pub fn close_unused(&mut self) {
        for p in self.passed.drain(..).flatten() {
            let addr = p.socket.as_ref().map(|(_, a)| a.to_string()).unwrap_or_default();
            tracing::info!(fd = p.fd, address = %addr, "the new configuration does not use the handed-over socket of {}; closing it", p.role);
        }
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        self.close_unused();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_cannot_pose_as_admin() {
        let entries = vec![
            (Role::Listener("public".into()), 3),
            (Role::Listener("a,b=c %d".into()), 4),
            (Role::Listener("@admin".into()), 5),
            (Role::Listener("名前".into()), 6),
            (Role::Admin, 7),
        ];
        let text = encode(&entries);
        assert_eq!(text.matches(',').count(), 4, "{text}");
        assert!(text.starts_with("public=3,a%2Cb%3Dc%20%25d=4,%40admin=5,"), "{text}");
        assert!(text.ends_with(",@admin=7"), "{text}");
        assert_eq!(parse(&text).unwrap(), entries);
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn refuses_what_a_gatehouse_would_not_write() {
        for (text, why) in [
            ("public", "is not NAME=FD"),
            ("public=x", "is not a descriptor number"),
            ("public=-1", "is stdin, stdout or stderr"),
            ("public=2", "is stdin, stdout or stderr"),
            ("a=3,b=3", "descriptor 3 is given twice"),
            ("a=3,a=4", "listener `a` is given twice"),
            ("@admin=3,@admin=4", "the admin API is given twice"),
            ("@root=3", "is not a known role"),
            ("=3", "has no listener name"),
            ("%FF=3", "is not a percent-encoded UTF-8"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn socket_activated_listeners_are_named_among_the_passed_ones() {
        let passed = vec![
            (Role::Listener("public".into()), 3),
            (Role::Listener("a,b".into()), 4),
            (Role::Admin, 5),
        ];
        let activated = [&passed[1].0, &passed[2].0];
        let text = encode_activated(&activated);
        assert_eq!(text, "a%2Cb", "the admin API is never socket-activated");
        assert_eq!(
            parse_activated(&text, &passed).unwrap(),
            vec![Role::Listener("a,b".into())]
        );
        assert_eq!(parse_activated("", &passed).unwrap(), vec![]);
        for (text, why) in [
            ("other", "is not among the sockets handed over"),
            ("public,public", "is given twice"),
            ("%FF", "is not a percent-encoded UTF-8"),
        ] {
            let e = parse_activated(text, &passed).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn trusts_only_the_parent() {
        assert!(addressed_to_us("4242", 4242));
        assert!(addressed_to_us(" 4242\n", 4242));
        assert!(!addressed_to_us("4242", 4243), "a stale variable from a shell");
        assert!(!addressed_to_us("", 4242));
        assert!(!addressed_to_us("1", 1), "orphaned: reparented to init");
        assert!(!addressed_to_us("-4242", 4242));
    }

    #[test]
    fn reports_once_then_closes() {
        use std::io::Read;
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let report = ReadyReport {
            channel: Arc::new(Mutex::new(Some(theirs))),
        };
        report.failed("configuration refused:\nerror: x\n");
        report.ready();
        let mut got = String::new();
        ours.read_to_string(&mut got).unwrap();
        assert_eq!(got, "FAILED\nconfiguration refused:\nerror: x\n");
    }
}
