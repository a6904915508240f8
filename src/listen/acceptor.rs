//! Accepting connections without failing silently: accept errors are classified, counted and
//! logged; running out of descriptors or memory backs off instead of spinning, and recovers alone.
//!
//! An accept error is one of two things. Either it concerns one connection that the client gave up
//! on between the handshake and `accept(2)` (`ECONNABORTED`, and on Linux any network error
//! pending on the new socket, see accept(2) "Error handling"): it is skipped at once. Or the
//! process cannot take *any* connection now (`EMFILE`, `ENFILE`, `ENOMEM`, `ENOBUFS`): the queued
//! connection stays in the kernel's backlog and the listening socket stays readable, so retrying
//! at once would spin a core at 100% until something closes. Then the loop sleeps, 10ms doubling
//! up to 1s, and tries again; connections that close meanwhile free what it lacks.
//!
//! One exhaustion *episode* spans every worker's accept loop of a listener: the operator gets one
//! warning when it starts, saying what is missing and what to change, and one line when accepting
//! works again, with how long it lasted and how many accepts failed. Every error is counted in
//! `gatehouse_accept_errors_total{listener,reason}`.

use crate::observe::{Metrics, Name, Switch, Switches};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// First pause after a resource error: long enough that a spinning loop becomes ~100 wake-ups a
/// second, short enough that a momentary shortage is invisible to clients.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// Longest pause: a listener never waits more than this to notice that descriptors came back
/// (Go's net/http uses the same 5ms..1s shape).
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// An episode is over once no accept has failed for this long. Twice [`MAX_BACKOFF`], so that a
/// loop still failing at its slowest pace keeps the episode open instead of logging a recovery
/// and a new warning every second.
const RECOVERY_QUIET: Duration = Duration::from_secs(2);

/// Error numbers that std has no stable `ErrorKind` for. EMFILE, ENFILE, ENOMEM and EPERM have
/// the same values on every Unix; the others differ between Linux and the BSDs.
mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub const ENOBUFS: i32 = 105;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub const ENOBUFS: i32 = 55;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub const EPROTO: i32 = 71;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub const EPROTO: i32 = 100;
    /// Linux reports a network error already pending on the new socket as accept's error; these
    /// concern that one connection (accept(2), "Error handling"): ENONET, ENOPROTOOPT, EOPNOTSUPP,
    /// EHOSTDOWN.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub const PENDING_NETWORK: [i32; 4] = [64, 92, 95, 112];
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub const PENDING_NETWORK: [i32; 0] = [];
}

/// What one failed accept means for the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptFailure {
    /// The process or the host is out of something every connection needs; retrying at once
    /// would fail the same way.
    Exhausted {
        reason: &'static str,
        cause: &'static str,
        fix: &'static str,
    },
    /// Only this connection is lost (the client reset it, or a firewall refused it).
    OneConnection { reason: &'static str },
    /// Not a documented accept error. Backed off like exhaustion: if it persists, retrying at
    /// once would spin.
    Unexpected,
}

impl AcceptFailure {
    fn classify(e: &io::Error) -> AcceptFailure {
        use io::ErrorKind as K;
        match e.raw_os_error() {
            Some(errno::EMFILE) => AcceptFailure::Exhausted {
                reason: "emfile",
                cause: "the process has no file descriptor left (EMFILE)",
                fix: "raise the process's descriptor limit (`ulimit -n`, systemd `LimitNOFILE=`) above limits.max_connections plus a margin, or lower limits.max_connections",
            },
            Some(errno::ENFILE) => AcceptFailure::Exhausted {
                reason: "enfile",
                cause: "the system-wide file table is full (ENFILE)",
                fix: "raise `fs.file-max` (sysctl) or find the process holding descriptors; lower limits.max_connections",
            },
            Some(errno::ENOMEM) => AcceptFailure::Exhausted {
                reason: "enomem",
                cause: "the kernel has no memory for a new socket (ENOMEM)",
                fix: "free memory or raise the socket memory limits (`net.ipv4.tcp_mem`); lower limits.max_connections",
            },
            Some(errno::ENOBUFS) => AcceptFailure::Exhausted {
                reason: "enobufs",
                cause: "the kernel has no buffer space for a new socket (ENOBUFS)",
                fix: "free memory or raise the socket memory limits (`net.core.rmem_default`, `net.ipv4.tcp_mem`); lower limits.max_connections",
            },
            Some(n) if n == errno::EPERM || n == errno::EPROTO || errno::PENDING_NETWORK.contains(&n) => {
                AcceptFailure::OneConnection { reason: "other" }
            }
            _ => match e.kind() {
                K::ConnectionAborted | K::ConnectionReset => AcceptFailure::OneConnection {
                    reason: "econnaborted",
                },
                K::PermissionDenied | K::NetworkDown | K::NetworkUnreachable | K::HostUnreachable | K::Interrupted => {
                    AcceptFailure::OneConnection { reason: "other" }
                }
                _ => AcceptFailure::Unexpected,
            },
        }
    }

    /// The `reason` label of `gatehouse_accept_errors_total`.
    fn reason(self) -> &'static str {
        match self {
            AcceptFailure::Exhausted { reason, .. } | AcceptFailure::OneConnection { reason } => reason,
            AcceptFailure::Unexpected => "other",
        }
    }
}

/// A period in which a listener could not accept: from its first failure until accepts have
/// stopped failing for [`RECOVERY_QUIET`].
#[derive(Debug)]
struct Episode {
    reason: &'static str,
    started: Instant,
    last_error: Instant,
    /// The first accept that succeeded after `last_error`: when the listener really recovered.
    recovered: Option<Instant>,
    errors: u64,
}

/// The accept errors of one listener, shared by its accept loops on every worker: counting,
/// logging, and the exhaustion episode in progress.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: Name,
    metrics: Metrics,
    debug: Switches,
    /// Whether `episode` is `Some`; lets a successful accept skip the lock.
    exhausted: AtomicBool,
    episode: Mutex<Option<Episode>>,
}

impl AcceptErrors {
    pub fn new(listener: Name, metrics: Metrics, debug: Switches) -> Arc<AcceptErrors> {
        Arc::new(AcceptErrors {
            listener,
            metrics,
            debug,
            exhausted: AtomicBool::new(false),
            episode: Mutex::new(None),
        })
    }

    fn episode(&self) -> std::sync::MutexGuard<'_, Option<Episode>> {
        self.episode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts and logs a failed accept; returns whether the loop must back off before retrying.
    fn failed(&self, e: &io::Error, now: Instant) -> bool {
        let failure = AcceptFailure::classify(e);
        let reason = failure.reason();
        self.metrics.accept_error(&self.listener, reason);
        let listener = &*self.listener.0;
        let (cause, fix) = match failure {
            AcceptFailure::OneConnection { .. } => {
                tracing::debug!(listener, reason, error = %e, "accept failed for one connection; continuing");
                self.debug.listener_event(Switch::Accept, listener, || {
                    format!("accept failed for one connection ({e}); continuing")
                });
                return false;
            }
            AcceptFailure::Exhausted { cause, fix, .. } => (cause, fix),
            AcceptFailure::Unexpected => (
                "unexpected accept error",
                "if it persists, report it with this log line",
            ),
        };
        let mut episode = self.episode();
        match episode.as_mut() {
            Some(ep) => {
                ep.errors += 1;
                ep.last_error = now;
                ep.recovered = None;
            }
            None => {
                *episode = Some(Episode {
                    reason,
                    started: now,
                    last_error: now,
                    recovered: None,
                    errors: 1,
                });
                self.exhausted.store(true, Ordering::Release);
                // Once per episode: a line per failed accept would flood the log exactly when the
                // machine is short of resources. The counter has every one.
                tracing::warn!(
                    listener,
                    reason,
                    error = %e,
                    fix,
                    "cannot accept connections: {cause}; retrying with backoff ({}ms..{}s) until it clears",
                    FIRST_BACKOFF.as_millis(),
                    MAX_BACKOFF.as_secs()
                );
            }
        }
        drop(episode);
        self.debug
            .listener_event(Switch::Accept, listener, || format!("accept failed ({e}); backing off"));
        true
    }

    /// Notes a successful accept: the first one after a failure is when the listener recovered.
    /// Also ends the episode when it has been quiet long enough: on a listener busy enough that
    /// accept is always ready, the loop's quiet timer never gets its turn.
    fn accepted(&self, now: Instant) {
        if !self.exhausted.load(Ordering::Acquire) {
            return;
        }
        if let Some(ep) = self.episode().as_mut() {
            ep.recovered.get_or_insert(now);
        }
        self.end_if_quiet(now);
    }

    /// When the episode in progress may be declared over, if there is one.
    fn quiet_deadline(&self) -> Option<Instant> {
        if !self.exhausted.load(Ordering::Acquire) {
            return None;
        }
        self.episode().as_ref().map(|ep| ep.last_error + RECOVERY_QUIET)
    }

    /// Ends the episode in progress if no accept has failed for [`RECOVERY_QUIET`], and says so.
    fn end_if_quiet(&self, now: Instant) {
        let mut episode = self.episode();
        let Some(ep) = episode.as_ref() else { return };
        if now.saturating_duration_since(ep.last_error) < RECOVERY_QUIET {
            return;
        }
        // Without a successful accept since, nobody has connected: the listener stopped failing
        // when the last error happened, as far as anyone can tell.
        let lasted = ep.recovered.unwrap_or(ep.last_error) - ep.started;
        tracing::info!(
            listener = &*self.listener.0,
            reason = ep.reason,
            errors = ep.errors,
            lasted_ms = lasted.as_millis() as u64,
            "accepting connections again after {}ms in which {} accept(s) failed",
            lasted.as_millis(),
            ep.errors
        );
        *episode = None;
        self.exhausted.store(false, Ordering::Release);
    }
}

/// The loop-local pause before retrying after a resource error: doubles up to [`MAX_BACKOFF`],
/// starts over after a success.
#[derive(Debug, Default)]
struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = match self.last {
            None => FIRST_BACKOFF,
            Some(d) => (d * 2).min(MAX_BACKOFF),
        };
        self.last = Some(d);
        d
    }
    fn reset(&mut self) {
        self.last = None;
    }
}

/// One accept loop's side of a listener: the socket, its own backoff, the listener's shared
/// [`AcceptErrors`].
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    errors: Arc<AcceptErrors>,
    backoff: Backoff,
}

impl Acceptor {
    pub fn new(listener: TcpListener, errors: Arc<AcceptErrors>) -> Acceptor {
        Acceptor {
            listener,
            errors,
            backoff: Backoff::default(),
        }
    }

    /// The next connection, or `None` once `stop` completes. Errors never end the loop: one
    /// connection's error is skipped, anything else is waited out (see the module docs). `stop` is
    /// also watched while backing off, so a drain is never delayed by a pause.
    pub async fn next(&mut self, stop: impl Future<Output = ()>) -> Option<(TcpStream, SocketAddr)> {
        tokio::pin!(stop);
        loop {
            let quiet = self.errors.quiet_deadline();
            let result = tokio::select! {
                biased;
                _ = &mut stop => return None,
                r = self.listener.accept() => r,
                _ = sleep_until(quiet) => {
                    self.errors.end_if_quiet(Instant::now());
                    continue;
                }
            };
            match result {
                Ok(conn) => {
                    self.backoff.reset();
                    self.errors.accepted(Instant::now());
                    return Some(conn);
                }
                Err(e) => {
                    if !self.errors.failed(&e, Instant::now()) {
                        continue;
                    }
                    let pause = self.backoff.next();
                    tokio::select! {
                        biased;
                        _ = &mut stop => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_backs_off_and_one_connection_errors_do_not() {
        let exhausted = |n| AcceptFailure::classify(&io::Error::from_raw_os_error(n));
        assert!(matches!(
            exhausted(errno::EMFILE),
            AcceptFailure::Exhausted { reason: "emfile", .. }
        ));
        assert!(matches!(
            exhausted(errno::ENFILE),
            AcceptFailure::Exhausted { reason: "enfile", .. }
        ));
        assert!(matches!(
            exhausted(errno::ENOMEM),
            AcceptFailure::Exhausted { reason: "enomem", .. }
        ));
        assert!(matches!(
            exhausted(errno::ENOBUFS),
            AcceptFailure::Exhausted { reason: "enobufs", .. }
        ));
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(
            AcceptFailure::classify(&aborted),
            AcceptFailure::OneConnection { reason: "econnaborted" }
        );
        assert_eq!(
            exhausted(errno::EPROTO),
            AcceptFailure::OneConnection { reason: "other" }
        );
        assert_eq!(
            exhausted(errno::EPERM),
            AcceptFailure::OneConnection { reason: "other" }
        );
        assert_eq!(
            AcceptFailure::classify(&io::Error::other("?")),
            AcceptFailure::Unexpected
        );
    }

    #[test]
    fn an_episode_spans_failures_and_ends_after_a_quiet_period() {
        let metrics = Metrics::new(Arc::new(crate::conn::Registry::default()));
        let errors = AcceptErrors::new(Name(Arc::from("web")), metrics.clone(), Switches::default());
        let emfile = io::Error::from_raw_os_error(errno::EMFILE);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(errors.quiet_deadline(), None);
        assert!(errors.failed(&emfile, t0));
        assert!(errors.failed(&emfile, at(1500)));
        errors.accepted(at(1600));
        // Quiet for less than RECOVERY_QUIET since the last failure: still the same episode.
        assert_eq!(errors.quiet_deadline(), Some(at(1500) + RECOVERY_QUIET));
        errors.end_if_quiet(at(3400));
        assert!(errors.quiet_deadline().is_some());
        errors.end_if_quiet(at(3500));
        assert_eq!(errors.quiet_deadline(), None);
        // A busy listener ends its episode on an accept once quiet long enough.
        assert!(errors.failed(&emfile, at(4000)));
        errors.accepted(at(4100));
        assert!(errors.quiet_deadline().is_some());
        errors.accepted(at(6000));
        assert_eq!(errors.quiet_deadline(), None);
        // One connection's error is counted but neither backs off nor starts an episode.
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert!(!errors.failed(&aborted, at(3600)));
        assert_eq!(errors.quiet_deadline(), None);
        let text = metrics.encode();
        for series in [
            r#"gatehouse_accept_errors_total{listener="web",reason="emfile"} 3"#,
            r#"gatehouse_accept_errors_total{listener="web",reason="econnaborted"} 1"#,
        ] {
            assert!(text.contains(series), "{text}");
        }
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_starts_over() {
        let mut b = Backoff::default();
        let seq: Vec<u128> = (0..9).map(|_| b.next().as_millis()).collect();
        assert_eq!(seq, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), FIRST_BACKOFF);
    }
}
