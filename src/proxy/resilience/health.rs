//! Server health: the active check state machine, passive ejection on request errors, and the
//! checker task that probes every server on a jittered interval.
//!
//! Shape and reasons:
//! - **Active**: `unhealthy_after` consecutive failed checks mark a server unhealthy,
//!   `healthy_after` consecutive successful checks mark it healthy again. Consecutive counts
//!   (not ratios) because checks are sparse and regular: three misses in a row at a 5s interval
//!   is an unambiguous signal, and a single blip does not flap the server.
//! - Servers **start healthy**: starting unhealthy would refuse all traffic for
//!   `interval × healthy_after` after every start and reload. A dead server is found by the
//!   first checks or, sooner, by passive ejection.
//! - **Passive**: `unhealthy_after` consecutive request failures (the caller decides: connect
//!   errors, timeouts, 5xx) eject the server for `interval × healthy_after`, the time the active
//!   checker would need to re-admit it. Ejection is timed rather than tied to the active state
//!   so that it also works where no active check is configured, and a success in between resets
//!   the count, so a server failing one request in ten is never ejected (that is the breaker's
//!   job, with a ratio).
//! - The **checker** probes through a caller-provided [`Probe`] (the proxy supplies a real
//!   `GET path` over its pool), all servers of a round concurrently, each probe bounded by the
//!   interval. Rounds are spaced by the interval ±10% so that many gatehouse instances (or many
//!   upstreams) do not probe in lock-step. It stops when its [`CheckerHandle`] is stopped or
//!   dropped.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Default `path`: the conventional liveness endpoint.
pub const DEFAULT_PATH: &str = "/healthz";
/// Default `interval`: notices a dead server within seconds without loading it with checks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default `unhealthy_after`: one lost check is noise; three in a row is an outage.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
/// Default `healthy_after`: two good checks before traffic returns, so a flapping server waits.
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// Interval jitter: ±10% desynchronises checkers while keeping the interval recognisable.
pub const JITTER_FRACTION: f64 = 0.1;

/// Health settings: the `[upstreams.health]` keys, plus the passive ejection derived from them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    /// `path`: what the checker asks for (`GET path`).
    pub path: String,
    /// `interval`: time between check rounds (jittered), and the bound on one probe.
    pub interval: Duration,
    /// `unhealthy_after`: consecutive failed checks (and request failures) that take a server out.
    pub unhealthy_after: u32,
    /// `healthy_after`: consecutive successful checks that bring it back.
    pub healthy_after: u32,
    /// How long passive ejection lasts: `interval × healthy_after`.
    pub eject_for: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings::from_keys(
            DEFAULT_PATH.to_owned(),
            DEFAULT_INTERVAL,
            DEFAULT_UNHEALTHY_AFTER,
            DEFAULT_HEALTHY_AFTER,
        )
    }
}

impl HealthSettings {
    /// Settings from `[upstreams.health]`: `path`, `interval`, `unhealthy_after`, `healthy_after`.
    /// Counts below 1 are raised to 1 (config validation reports them).
    pub fn from_keys(path: String, interval: Duration, unhealthy_after: u32, healthy_after: u32) -> Self {
        let healthy_after = healthy_after.max(1);
        HealthSettings {
            path,
            interval,
            unhealthy_after: unhealthy_after.max(1),
            healthy_after,
            eject_for: interval.saturating_mul(healthy_after),
        }
    }
}

/// What an active check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// A change of a server's availability and the run of results that caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthEvent {
    /// Active checks changed the server's health after `consecutive` results in a row.
    Changed { to: Health, consecutive: u32 },
    /// `consecutive` request failures in a row ejected the server for `for_`.
    Ejected { consecutive: u32, for_: Duration },
}

impl HealthEvent {
    /// Logs the event: a warning when a server leaves rotation, info when it returns.
    pub fn log(&self, upstream: &str, server: &str, last_error: Option<&str>) {
        match *self {
            HealthEvent::Changed {
                to: Health::Unhealthy,
                consecutive,
            } => tracing::warn!(
                upstream,
                server,
                consecutive_failures = consecutive,
                error = last_error.unwrap_or(""),
                "upstream server unhealthy: active checks failing"
            ),
            HealthEvent::Changed {
                to: Health::Healthy,
                consecutive,
            } => tracing::info!(
                upstream,
                server,
                consecutive_successes = consecutive,
                "upstream server healthy again"
            ),
            HealthEvent::Ejected { consecutive, for_ } => tracing::warn!(
                upstream,
                server,
                consecutive_failures = consecutive,
                ejected_for_ms = for_.as_millis() as u64,
                error = last_error.unwrap_or(""),
                "upstream server ejected: requests failing"
            ),
        }
    }
}

#[derive(Debug)]
struct State {
    health: Health,
    /// Consecutive active results agreeing with each other (successes or failures).
    run: u32,
    run_ok: bool,
    request_failures: u32,
    ejected_until: Option<Instant>,
}

/// One server's health, shared by the checker task and the request path.
#[derive(Debug)]
pub struct ServerHealth {
    settings: HealthSettings,
    state: Mutex<State>,
}

impl ServerHealth {
    pub fn new(settings: HealthSettings) -> Self {
        ServerHealth {
            settings,
            state: Mutex::new(State {
                health: Health::Healthy,
                run: 0,
                run_ok: true,
                request_failures: 0,
                ejected_until: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters: always consistent, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the balancer may pick this server: actively healthy and not ejected.
    pub fn is_available(&self, now: Instant) -> bool {
        let s = self.lock();
        s.health == Health::Healthy && s.ejected_until.is_none_or(|until| now >= until)
    }

    /// Why the balancer may not pick this server now, if it may not: `unhealthy` (active
    /// checks) or `ejected` (passive), one lock for both answers.
    pub fn unavailable(&self, now: Instant) -> Option<&'static str> {
        let s = self.lock();
        if s.health == Health::Unhealthy {
            Some("unhealthy")
        } else if s.ejected_until.is_some_and(|until| now < until) {
            Some("ejected")
        } else {
            None
        }
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    pub fn health(&self) -> Health {
        self.lock().health
    }

    /// Records an active check; returns the event when the server's health changed.
    pub fn record_check(&self, ok: bool) -> Option<HealthEvent> {
        let mut s = self.lock();
        if s.run_ok == ok {
            s.run = s.run.saturating_add(1);
        } else {
            s.run_ok = ok;
            s.run = 1;
        }
        let (to, needed) = if ok {
            (Health::Healthy, self.settings.healthy_after)
        } else {
            (Health::Unhealthy, self.settings.unhealthy_after)
        };
        if s.health != to && s.run >= needed {
            s.health = to;
            if ok {
                // A server the checks have re-admitted starts with a clean passive record.
                s.request_failures = 0;
                s.ejected_until = None;
            }
            return Some(HealthEvent::Changed { to, consecutive: s.run });
        }
        None
    }

    /// Records the outcome of a proxied request; returns the event when it ejected the server.
    pub fn record_request(&self, ok: bool, now: Instant) -> Option<HealthEvent> {
        let mut s = self.lock();
        if ok {
            s.request_failures = 0;
            return None;
        }
        s.request_failures = s.request_failures.saturating_add(1);
        let ejected = s.ejected_until.is_some_and(|until| now < until);
        if !ejected && s.request_failures >= self.settings.unhealthy_after {
            let consecutive = s.request_failures;
            s.request_failures = 0;
            s.ejected_until = Some(now + self.settings.eject_for);
            return Some(HealthEvent::Ejected {
                consecutive,
                for_: self.settings.eject_for,
            });
        }
        None
    }
}

/// The result of one probe: `Err` carries a short reason for the log ("connect refused",
/// "status 503", "timeout").
pub type ProbeResult = Result<(), String>;

/// Performs one health check of one server. The proxy implements it as `GET path` over its pool.
pub trait Probe: Send + Sync + 'static {
    /// Checks `server` (an index into the checker's server list) by requesting `path`.
    fn probe(&self, server: usize, path: &str) -> Pin<Box<dyn Future<Output = ProbeResult> + Send>>;
}

/// One server as the checker sees it.
#[derive(Clone, Debug)]
pub struct CheckedServer {
    /// The server's name for logs (its address as configured).
    pub name: Arc<str>,
    pub health: Arc<ServerHealth>,
}

/// Called with every health change the checker causes: log it, update gauges.
pub type HealthObserver = Arc<dyn Fn(&CheckedServer, &HealthEvent, Option<&str>) + Send + Sync>;

/// Stops the checker task when stopped or dropped.
#[derive(Debug)]
pub struct CheckerHandle {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CheckerHandle {
    /// Stops the checker and waits for the round in progress to be abandoned.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for CheckerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The time before the next round: `interval` scaled by `1 + JITTER_FRACTION × (2u − 1)`
/// for a uniform `u` in [0, 1).
pub fn jittered(interval: Duration, u: f64) -> Duration {
    let factor = 1.0 + JITTER_FRACTION * (2.0 * u.clamp(0.0, 1.0) - 1.0);
    interval.mul_f64(factor)
}

/// A uniform sample in [0, 1) from the process's randomly keyed SipHash: jitter needs no
/// cryptographic quality, and this avoids a dependency on a random number crate.
fn unit_random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Starts the active checker on the current tokio runtime: every jittered `interval`, probes
/// every server concurrently (each probe bounded by `interval`), records the results and reports
/// changes to `observer`. The first round starts immediately.
pub fn spawn_checker(
    settings: HealthSettings,
    servers: Vec<CheckedServer>,
    probe: Arc<dyn Probe>,
    observer: HealthObserver,
) -> CheckerHandle {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let round = futures_util::future::join_all(servers.iter().enumerate().map(|(i, server)| {
                let fut = probe.probe(i, &settings.path);
                let interval = settings.interval;
                async move {
                    let result = match tokio::time::timeout(interval, fut).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("timeout after {}ms", interval.as_millis())),
                    };
                    (server, result)
                }
            }));
            let results = tokio::select! {
                r = round => r,
                _ = stopped.changed() => return,
            };
            for (server, result) in results {
                if let Some(event) = server.health.record_check(result.is_ok()) {
                    observer(server, &event, result.as_ref().err().map(String::as_str));
                }
            }
            let pause = jittered(settings.interval, unit_random());
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped.changed() => return,
            }
        }
    });
    CheckerHandle { stop, task: Some(task) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings() -> HealthSettings {
        HealthSettings::from_keys("/healthz".into(), Duration::from_secs(5), 3, 2)
    }

    #[test]
    fn consecutive_check_failures_then_successes_flip_health() {
        let h = ServerHealth::new(settings());
        let now = Instant::now();
        assert!(h.is_available(now), "servers start healthy");
        assert_eq!(h.record_check(false), None);
        assert_eq!(h.record_check(false), None);
        assert_eq!(
            h.record_check(false),
            Some(HealthEvent::Changed {
                to: Health::Unhealthy,
                consecutive: 3
            })
        );
        assert!(!h.is_available(now));
        assert_eq!(h.record_check(false), None, "no repeated event");
        assert_eq!(h.record_check(true), None);
        assert_eq!(
            h.record_check(true),
            Some(HealthEvent::Changed {
                to: Health::Healthy,
                consecutive: 2
            })
        );
        assert!(h.is_available(now));
    }

    #[test]
    fn an_interrupted_run_starts_over() {
        let h = ServerHealth::new(settings());
        h.record_check(false);
        h.record_check(false);
        h.record_check(true);
        h.record_check(false);
        h.record_check(false);
        assert_eq!(h.health(), Health::Healthy, "2 + 2 failures, never 3 in a row");
        assert!(h.record_check(false).is_some());
    }

    #[test]
    fn consecutive_request_failures_eject_for_a_period() {
        let h = ServerHealth::new(settings());
        let t0 = Instant::now();
        h.record_request(false, t0);
        h.record_request(false, t0);
        h.record_request(true, t0);
        h.record_request(false, t0);
        assert!(h.is_available(t0), "a success reset the count");
        assert_eq!(h.record_request(false, t0), None);
        assert_eq!(
            h.record_request(false, t0),
            Some(HealthEvent::Ejected {
                consecutive: 3,
                for_: Duration::from_secs(10)
            })
        );
        assert!(!h.is_available(t0 + Duration::from_millis(9999)));
        assert!(h.is_available(t0 + Duration::from_secs(10)));
        assert_eq!(h.health(), Health::Healthy, "passive ejection is separate");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let i = Duration::from_secs(10);
        assert_eq!(jittered(i, 0.0), Duration::from_secs(9));
        assert_eq!(jittered(i, 0.5), Duration::from_secs(10));
        assert!(jittered(i, 0.999_999) < Duration::from_secs(11));
        for _ in 0..100 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
        }
    }

    struct Scripted {
        calls: AtomicUsize,
        /// Server 1 fails, server 0 succeeds; server 0 hangs forever on call 5+ to test stop.
        tx: tokio::sync::mpsc::UnboundedSender<usize>,
    }

    impl Probe for Scripted {
        fn probe(&self, server: usize, path: &str) -> Pin<Box<dyn Future<Output = ProbeResult> + Send>> {
            assert_eq!(path, "/healthz");
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let _ = self.tx.send(n);
            Box::pin(async move {
                if server == 1 {
                    Err("status 503".to_owned())
                } else {
                    Ok(())
                }
            })
        }
    }

    #[tokio::test]
    async fn checker_marks_a_failing_server_unhealthy_and_stops() {
        let s = HealthSettings::from_keys("/healthz".into(), Duration::from_millis(10), 2, 1);
        let servers: Vec<CheckedServer> = (0..2)
            .map(|i| CheckedServer {
                name: format!("s{i}").into(),
                health: Arc::new(ServerHealth::new(s.clone())),
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let probe = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            tx,
        });
        let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
        let observer: HealthObserver = Arc::new(move |server, event, err| {
            let _ = etx.send((server.name.to_string(), *event, err.map(str::to_owned)));
        });
        let handle = spawn_checker(s, servers.clone(), probe.clone(), observer);
        let (name, event, err) = tokio::time::timeout(Duration::from_secs(10), erx.recv())
            .await
            .expect("an event within 10s")
            .expect("observer alive");
        assert_eq!(name, "s1");
        assert_eq!(
            event,
            HealthEvent::Changed {
                to: Health::Unhealthy,
                consecutive: 2
            }
        );
        assert_eq!(err.as_deref(), Some("status 503"));
        assert!(servers[0].health.is_available(Instant::now()));
        assert!(!servers[1].health.is_available(Instant::now()));

        tokio::time::timeout(Duration::from_secs(5), handle.stop())
            .await
            .expect("the checker stops promptly");
        // The task is gone, and with it its reference to the probe: once the test drops its own,
        // the channel closes, so nothing can probe any more.
        while rx.try_recv().is_ok() {}
        let after = probe.calls.load(Ordering::SeqCst);
        drop(probe);
        assert_eq!(rx.recv().await, None, "no probe after stop");
        assert!(after >= 4, "two rounds of two servers ran");
    }

    struct Hanging;

    impl Probe for Hanging {
        fn probe(&self, _: usize, _: &str) -> Pin<Box<dyn Future<Output = ProbeResult> + Send>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_hanging_probe_times_out_as_a_failure() {
        let s = HealthSettings::from_keys("/healthz".into(), Duration::from_millis(20), 1, 1);
        let server = CheckedServer {
            name: "slow".into(),
            health: Arc::new(ServerHealth::new(s.clone())),
        };
        let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
        let observer: HealthObserver = Arc::new(move |_, event, err| {
            let _ = etx.send((*event, err.map(str::to_owned)));
        });
        let _handle = spawn_checker(s, vec![server.clone()], Arc::new(Hanging), observer);
        let (event, err) = tokio::time::timeout(Duration::from_secs(10), erx.recv())
            .await
            .expect("an event within 10s")
            .expect("observer alive");
        assert_eq!(
            event,
            HealthEvent::Changed {
                to: Health::Unhealthy,
                consecutive: 1
            }
        );
        assert_eq!(err.as_deref(), Some("timeout after 20ms"));
    }
}
