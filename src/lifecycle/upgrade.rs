//! Zero-downtime binary upgrade: start the new binary, hand it the listening sockets, wait until
//! it serves, then drain this process (SIGUSR2, `POST /upgrade`, `gatehouse upgrade`).
//!
//! The sequence, from the old process's side ([`Upgrader::run`]):
//!
//! 1. Duplicate every listening socket in force (the listener set's, as reloads left it, and the
//!    admin API's) without close-on-exec, and a Unix socket pair for the answer; start the
//!    executable this process was started from, with the same arguments, and the [`handover`]
//!    variables naming the descriptors and which came from socket activation. No reload runs
//!    until the upgrade's outcome is known (see `ServerHandle::upgrade`).
//! 2. The new process adopts the sockets by listener name, validates its configuration in full,
//!    binds only listeners the old process did not have, starts accepting (both processes now
//!    accept on the same sockets, so no connection attempt is refused), and writes `READY`.
//!    If anything fails it writes `FAILED` and why, and exits.
//! 3. On `READY`: under systemd, `MAINPID=` the new pid; then [`Phase::HandedOver`]: this process
//!    stops accepting and winds its connections down (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`
//!    on the next response, idle ones after `[shutdown] handover_grace`), and exits 0.
//!    On `FAILED`, an early exit or `[shutdown] upgrade_timeout`: the new process is stopped and
//!    reaped, the reason logged, counted and answered, and this process keeps serving.
//!
//! The answer comes over a dedicated socket rather than through `NOTIFY_SOCKET`: the new process
//! keeps talking to the real service manager, and a `FAILED` line carries the reason, which an
//! exit status alone cannot.

pub mod handover;

use super::{Phase, ShutdownTrigger};
use crate::listen::{ListenerSet, Origin};
use crate::observe::metrics::ResultLabels;
use crate::observe::Metrics;
pub use handover::{Handover, ReadyReport, Role};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The longest answer read from the new process: a `FAILED` message lists configuration
/// findings, a few KiB at most.
const MAX_ANSWER: u64 = 64 * 1024;

/// How long a new process that has closed its answer socket gets to exit before it is killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// How this process was started, so that its successor is started the same way.
#[derive(Clone, Debug)]
pub struct Launch {
    exe: PathBuf,
    arg0: OsString,
    args: Vec<OsString>,
}

impl Launch {
    /// Records the executable and arguments of this process. Call it at startup: once a package
    /// upgrade has replaced the file, `/proc/self/exe` reads `... (deleted)`, while the path
    /// recorded now names the new binary.
    pub fn current() -> std::io::Result<Launch> {
        let exe = std::env::current_exe()?;
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(stripped) => PathBuf::from(stripped),
            None => exe,
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        Ok(Launch {
            exe,
            arg0,
            args: args.collect(),
        })
    }
}

/// The listening sockets a new process takes over, by what each serves.
///
/// The `[[listeners]]` sockets are not copied here: they are read from the [`ListenerSet`] in
/// force when an upgrade starts, so that what a reload added is handed over and what it removed
/// is not (its socket closed as its drain began). Only the admin API's socket, which belongs to no
/// listener set, is kept as a duplicate.
#[derive(Clone, Debug, Default)]
pub struct ListeningSockets {
    listeners: Arc<ListenerSet>,
    admin: Arc<Mutex<Option<std::net::TcpListener>>>,
}

/// One socket as handed to a new process.
struct ForChild {
    role: Role,
    fd: OwnedFd,
    /// Passed by the service manager (socket activation) to whichever process first took it.
    activated: bool,
}

impl ListeningSockets {
    /// The sockets of `listeners` (as it changes), and later the admin API's.
    pub fn new(listeners: Arc<ListenerSet>) -> ListeningSockets {
        ListeningSockets {
            listeners,
            admin: Arc::default(),
        }
    }

    /// Keeps a duplicate of the admin API's socket, replacing any earlier one.
    pub fn keep_admin(&self, socket: &std::net::TcpListener) -> std::io::Result<()> {
        let dup = socket.try_clone()?;
        *self.lock_admin() = Some(dup);
        Ok(())
    }

    /// Forgets (and closes this table's duplicate of) the admin API's socket.
    pub fn forget_admin(&self) {
        self.lock_admin().take();
    }

    /// Closes every socket this process keeps for a successor: the listener set's (which stops
    /// taking listeners from reloads) and the admin API's duplicate. For a process that stops
    /// accepting: a socket kept open here would go on completing handshakes into an accept queue
    /// nobody serves.
    pub fn clear(&self) {
        self.listeners.close_all();
        self.forget_admin();
    }

    fn lock_admin(&self) -> std::sync::MutexGuard<'_, Option<std::net::TcpListener>> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fresh duplicates, inheritable across exec, for one new process.
    fn for_child(&self) -> std::io::Result<Vec<ForChild>> {
        let inheritable = |socket: &std::net::TcpListener| -> std::io::Result<OwnedFd> {
            let dup = OwnedFd::from(socket.try_clone()?);
            socket2::SockRef::from(&dup).set_cloexec(false)?;
            Ok(dup)
        };
        let mut out = Vec::new();
        for (name, socket, origin) in self.listeners.sockets()? {
            out.push(ForChild {
                role: Role::Listener(name),
                fd: inheritable(&socket)?,
                activated: origin == Origin::Inherited,
            });
        }
        if let Some(socket) = self.lock_admin().as_ref() {
            out.push(ForChild {
                role: Role::Admin,
                fd: inheritable(socket)?,
                activated: false,
            });
        }
        Ok(out)
    }
}

/// Why an upgrade did not happen. This process keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Another upgrade is under way (exit 69 for `gatehouse upgrade`).
    #[error("an upgrade is already in progress (new process pid {0}); wait for its outcome")]
    InProgress(u32),
    /// This process cannot start one (exit 69): draining, already handed over, or not the binary.
    #[error("{0}")]
    Unavailable(String),
    /// The new process did not take over; the message says why (exit 1).
    #[error("{0}")]
    Failed(String),
}

/// A completed handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpgradeReport {
    /// The new process, now serving.
    pub pid: u32,
    /// This process, now draining.
    pub previous_pid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Starting { pid: u32 },
    HandedOver { pid: u32 },
}

/// Runs binary upgrades for one server, one at a time.
#[derive(Debug)]
pub struct Upgrader {
    launch: Mutex<Option<Launch>>,
    sockets: ListeningSockets,
    state: Mutex<State>,
}

impl Upgrader {
    /// Upgrades that hand over `sockets`; disabled until [`Upgrader::set_launch`].
    pub fn new(sockets: ListeningSockets) -> Upgrader {
        Upgrader {
            launch: Mutex::new(None),
            sockets,
            state: Mutex::new(State::Idle),
        }
    }

    /// Enables upgrades: successors are started as `launch` describes.
    pub fn set_launch(&self, launch: Launch) {
        *self.launch.lock().unwrap_or_else(|p| p.into_inner()) = Some(launch);
    }

    pub fn sockets(&self) -> &ListeningSockets {
        &self.sockets
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Starts the new process and hands over to it, or says why not. Logs and counts the outcome.
    pub async fn run(
        &self,
        trigger: &ShutdownTrigger,
        metrics: &Metrics,
        timeout: Duration,
    ) -> Result<UpgradeReport, UpgradeError> {
        let launch = self.launch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(launch) = launch else {
            return Err(refused(UpgradeError::Unavailable(
                "binary upgrade needs the gatehouse binary; this server runs inside another program".into(),
            )));
        };
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match *state {
                State::Starting { pid } => return Err(refused(UpgradeError::InProgress(pid))),
                State::HandedOver { pid } => {
                    return Err(refused(UpgradeError::Unavailable(format!(
                        "this process already handed over to pid {pid} and is draining; upgrade that one"
                    ))))
                }
                State::Idle if trigger.phase() != Phase::Running => {
                    return Err(refused(UpgradeError::Unavailable(
                        "the server is shutting down; start it again instead of upgrading".into(),
                    )))
                }
                State::Idle => *state = State::Starting { pid: 0 },
            }
        }
        let previous_pid = std::process::id();
        let outcome = self.start_and_wait(&launch, timeout).await;
        let count = |result| metrics.upgrades.get_or_create(&ResultLabels { result }).inc();
        match outcome {
            // Taken only from `Running`, atomically: a SIGTERM that raced the start wins.
            Ok(pid) if trigger.advance(Phase::HandedOver) => {
                count("ok");
                self.set_state(State::HandedOver { pid });
                tracing::info!(pid, previous_pid, exe = %launch.exe.display(), "binary upgrade: pid {pid} is serving; handing over and draining this process");
                crate::lifecycle::systemd::notifier()
                    .main_pid(pid, &format!("upgraded: pid {pid} took over from {previous_pid}"));
                // The new process accepts on every socket already; this table's copies only keep
                // them open here.
                self.sockets.clear();
                Ok(UpgradeReport { pid, previous_pid })
            }
            Ok(pid) => {
                // A SIGTERM arrived while the new process started: both would now serve, and
                // nobody asked for the new one to stay. Stop it; this process drains as asked.
                count("failed");
                self.set_state(State::Idle);
                let why = format!("the server began shutting down while pid {pid} started; stopped it");
                stop(pid);
                tracing::error!(pid, "binary upgrade failed: {why}");
                Err(UpgradeError::Failed(why))
            }
            Err(why) => {
                count("failed");
                self.set_state(State::Idle);
                tracing::error!(exe = %launch.exe.display(), "binary upgrade failed; still serving: {why}");
                Err(UpgradeError::Failed(why))
            }
        }
    }

    /// Starts the new process and waits for its answer. `Ok(pid)` once it serves.
    async fn start_and_wait(&self, launch: &Launch, timeout: Duration) -> Result<u32, String> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("cannot create the answer socket: {e}"))?;
        let fds = self
            .sockets
            .for_child()
            .map_err(|e| format!("cannot duplicate the listening sockets: {e}"))?;
        socket2::SockRef::from(&theirs)
            .set_cloexec(false)
            .map_err(|e| format!("cannot pass the answer socket: {e}"))?;
        let entries: Vec<(Role, i32)> = fds.iter().map(|f| (f.role.clone(), f.fd.as_raw_fd())).collect();
        let activated: Vec<&Role> = fds.iter().filter(|f| f.activated).map(|f| &f.role).collect();
        let mut cmd = Command::new(&launch.exe);
        cmd.arg0(&launch.arg0)
            .args(&launch.args)
            .env(handover::FDS_VAR, handover::encode(&entries))
            .env(handover::ACTIVATED_VAR, handover::encode_activated(&activated))
            .env(handover::FROM_VAR, std::process::id().to_string())
            .env(handover::READY_FD_VAR, theirs.as_raw_fd().to_string());
        // The inheritable duplicates exist only from here to the end of `spawn`; gatehouse starts
        // no other process that could inherit them meanwhile.
        let spawned = cmd.spawn();
        drop(fds);
        drop(theirs);
        let mut child = spawned.map_err(|e| format!("cannot start {}: {e}", launch.exe.display()))?;
        let pid = child.id();
        self.set_state(State::Starting { pid });
        tracing::info!(pid, exe = %launch.exe.display(), "binary upgrade: started pid {pid}; waiting for it to report ready");
        let answer = async {
            ours.set_nonblocking(true)?;
            let mut buf = Vec::new();
            tokio::net::UnixStream::from_std(ours)?
                .take(MAX_ANSWER)
                .read_to_end(&mut buf)
                .await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        let answer = match tokio::time::timeout(timeout, answer).await {
            Err(_) => {
                let _ = child.kill();
                let status = reap(child).await;
                return Err(format!(
                    "pid {pid} did not report ready within upgrade_timeout ({}); stopped it ({})",
                    humantime::format_duration(timeout),
                    describe(status)
                ));
            }
            Ok(Err(e)) => format!("FAILED\ncannot read its answer: {e}"),
            Ok(Ok(text)) => text,
        };
        if answer == "READY\n" {
            return Ok(pid);
        }
        let status = reap(child).await;
        match answer.strip_prefix("FAILED\n") {
            Some(why) => Err(format!("pid {pid} {}: {}", describe(status), why.trim_end())),
            None => Err(format!(
                "pid {pid} {} before reporting ready (its log says why)",
                describe(status)
            )),
        }
    }
}

/// Logs a refusal (nothing was started, so nothing is counted) and passes it on.
fn refused(e: UpgradeError) -> UpgradeError {
    tracing::warn!("binary upgrade refused: {e}");
    e
}

/// Waits (bounded) for `child` to exit, killing it if it does not.
async fn reap(mut child: Child) -> Option<ExitStatus> {
    let waited = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + REAP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    // An exit has no event a blocking thread could wait on with a deadline.
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
                Err(_) => return None,
            }
        }
    });
    waited.await.ok().flatten()
}

/// Asks a new process that must not stay to stop (it drains like any SIGTERM).
fn stop(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

/// "exited with status 78 (invalid configuration)", for the log and the admin answer.
fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    let Some(status) = status else {
        return "ended with an unknown status".to_string();
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            let meaning = match code {
                0 => "success",
                1 => "runtime failure",
                2 => "usage error",
                69 => "a listener cannot be bound",
                78 => "invalid configuration, certificate or key",
                _ => "unexpected",
            };
            format!("exited with status {code} ({meaning})")
        }
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended: {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_statuses_say_what_they_mean() {
        assert_eq!(
            describe(Some(ExitStatus::from_raw(78 << 8))),
            "exited with status 78 (invalid configuration, certificate or key)"
        );
        assert_eq!(describe(Some(ExitStatus::from_raw(9))), "was killed by signal 9");
        assert_eq!(describe(None), "ended with an unknown status");
    }

    #[test]
    fn sockets_for_a_child_are_fresh_inheritable_duplicates() {
        let table = ListeningSockets::default();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        table.keep_admin(&l).unwrap();
        table.keep_admin(&l).unwrap();
        let fds = table.for_child().unwrap();
        assert_eq!(fds.len(), 1, "keeping the admin socket again replaces the earlier copy");
        for f in &fds {
            assert_eq!(f.role, Role::Admin);
            assert!(!f.activated);
            let flags = rustix::io::fcntl_getfd(&f.fd).unwrap();
            assert!(!flags.contains(rustix::io::FdFlags::CLOEXEC));
            assert_ne!(f.fd.as_raw_fd(), l.as_raw_fd());
        }
        table.clear();
        assert_eq!(table.for_child().unwrap().len(), 0);
    }
}
