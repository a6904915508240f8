//! `Server`: runs any tower service behind gatehouse's listeners, TLS, limits, timeouts and drain.
//!
//! # Examples
//!
//! ```no_run
//! # async fn run() -> Result<(), gatehouse::StartError> {
//! let config = gatehouse::Config::from_toml(r#"
//!     [[listeners]]
//!     name = "web"
//!     address = "127.0.0.1:3000"
//! "#)?;
//! let app = tower::service_fn(|_req: http::Request<gatehouse::RequestBody>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello\n")))
//! });
//! gatehouse::Server::bind(config)?.serve(app).await
//! # }
//! ```

use crate::config::{Config, ConfigSource, Findings, Severity};
use crate::conn::{ConnSettings, Registry};
use crate::http::{HttpService, ServiceBody};
use crate::lifecycle::reload::cert_watch::CertFiles;
use crate::lifecycle::upgrade::{Handover, Launch, ListeningSockets, ReadyReport, Upgrader};
use crate::lifecycle::{
    Live, Owed, OwedGuard, Phase, ReloadError, ReloadHook, ReloadReport, ReloadTrigger, ShutdownTrigger, Signals,
    UpgradeError, UpgradeReport,
};
use crate::listen::{self, BindError, BoundListener, ConnLimits, ListenerCommon, ListenerSet, Origin};
use crate::observe::{otel, AccessLog, Metrics, Switches, Tracer};
use crate::route::Router;
use crate::tls::TlsServer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Why the server could not start. Each maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration, certificate or key problems (exit 78). Holds every finding.
    #[error("invalid configuration:\n{0}")]
    Invalid(Findings),
    /// A listener could not be bound (exit 69).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Anything else at start (exit 1).
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// The exit code SPEC.md documents for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Invalid(_) => 78,
            StartError::Bind(_) => 69,
            StartError::Other(_) => 1,
        }
    }
}

/// Everything validated and loaded, nothing bound: what `gatehouse check` inspects.
#[derive(Debug)]
pub struct Prepared {
    pub config: Config,
    pub tls: Vec<Option<TlsServer>>,
    /// Warnings (errors make `prepare` fail).
    pub findings: Findings,
    /// The certificate files as they were just before loading, when `server.watch_certificates`
    /// is on: the watcher's baseline.
    pub(crate) cert_files: Option<CertFiles>,
}

/// Validates `config` and loads every certificate and key, without binding anything.
pub fn prepare(mut config: Config) -> Result<Prepared, StartError> {
    if let Some(dir) = std::env::var_os("GATEHOUSE_STATE_DIR") {
        config.server.state_dir = dir.into();
    }
    let mut findings = config.validate();
    // Taken before the files are read: a change that lands in between is then seen as a change
    // (and reloaded once more), never mistaken for what was loaded.
    let cert_files = config.server.watch_certificates.map(|_| CertFiles::of(&config));
    let mut tls = Vec::with_capacity(config.listeners.len());
    for (i, l) in config.listeners.iter().enumerate() {
        // Building TLS for a listener whose [tls] section is already invalid would only repeat errors.
        let listener_ok = !findings
            .iter()
            .any(|f| f.severity == Severity::Error && f.key.starts_with(&format!("listeners[{i}].tls")));
        tls.push(if listener_ok {
            TlsServer::build(i, l, &config.server.state_dir, &mut findings)
        } else {
            None
        });
    }
    if findings.has_errors() {
        return Err(StartError::Invalid(findings));
    }
    Ok(Prepared {
        config,
        tls,
        findings,
        cert_files,
    })
}

/// Shared view of a running server: shutdown, readiness, metrics and the connection table.
#[derive(Clone, Debug)]
pub struct ServerHandle {
    trigger: ShutdownTrigger,
    ready: Arc<AtomicBool>,
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    pub switches: Switches,
    live: Arc<Live>,
    upgrader: Arc<Upgrader>,
    owed: Owed,
}

impl ServerHandle {
    /// Starts a graceful drain (as SIGTERM does).
    pub fn shutdown(&self) {
        self.set_ready(false);
        self.trigger.advance(Phase::Draining);
    }
    /// Closes every connection now (as a second SIGTERM does).
    pub fn force_close(&self) {
        self.trigger.advance(Phase::Forced);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.ready.set(i64::from(ready));
    }
    pub fn phase(&self) -> Phase {
        self.trigger.phase()
    }
    pub(crate) fn trigger(&self) -> &ShutdownTrigger {
        &self.trigger
    }

    /// The configuration in force: the one the server started with, or the last reloaded.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// Validates `config` in full (as `gatehouse check` does, certificates and keys included) and,
    /// only if nothing is wrong, puts it in force for new connections, handshakes and requests.
    /// Open connections are not dropped. On refusal nothing has changed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(handle: gatehouse::ServerHandle, text: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// let report = handle.reload(gatehouse::Config::from_toml(text)?).await?;
    /// println!("changed: {}", report.changed.join(", "));
    /// # Ok(()) }
    /// ```
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.run_reload(Some(config), ReloadTrigger::Library).await
    }

    /// Re-reads the configuration the server started from (as SIGHUP does) and reloads it.
    /// Refused when the configuration was given in code (see [`Server::with_config_source`]).
    pub async fn reload_from_source(&self) -> Result<ReloadReport, ReloadError> {
        self.run_reload(None, ReloadTrigger::Library).await
    }

    /// [`ServerHandle::reload_from_source`] on behalf of `trigger` (SIGHUP, the admin API), which
    /// the `reload` debug switch reports.
    pub(crate) async fn reload_from_source_by(&self, trigger: ReloadTrigger) -> Result<ReloadReport, ReloadError> {
        self.run_reload(None, trigger).await
    }

    /// Runs the reload on its own task: a caller that goes away mid-way (an admin client that
    /// hangs up) must not cut a reload short after its hooks were told it started.
    async fn run_reload(&self, next: Option<Config>, trigger: ReloadTrigger) -> Result<ReloadReport, ReloadError> {
        let live = self.live.clone();
        tokio::spawn(async move { live.reload(next, trigger).await })
            .await
            .unwrap_or_else(|e| Err(ReloadError::Unavailable(format!("the reload task failed: {e}"))))
    }

    /// Calls `hook` when each reload starts and when it finishes, whatever triggered it.
    pub fn on_reload(&self, hook: ReloadHook) {
        self.live.add_hook(hook);
    }

    /// The address listener `name` is bound to now (reloads included), if it is in force.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.live.listeners().local_addr(name)
    }

    /// Starts the binary this process was started from, hands it every listening socket, and once
    /// it serves, drains this process (as SIGUSR2 does). On failure this process keeps serving
    /// and the error says why. Needs [`Server::with_upgrade`].
    pub async fn upgrade(&self) -> Result<UpgradeReport, UpgradeError> {
        let handle = self.clone();
        // Its own task, like a reload: an admin client that hangs up must not abandon a started
        // process half-way.
        tokio::spawn(async move {
            // No reload runs meanwhile: the listeners handed over are the ones the new process
            // finds in the configuration it reads, and none is added or removed behind its back.
            // A reload asked for during the upgrade waits, then is refused if the handover went
            // through (this process no longer serves).
            let _listeners_fixed = handle.live.exclusive().await;
            let timeout = handle.config().shutdown.upgrade_timeout.get();
            handle.upgrader.run(&handle.trigger, &handle.metrics, timeout).await
        })
        .await
        .unwrap_or_else(|e| Err(UpgradeError::Failed(format!("the upgrade task failed: {e}"))))
    }

    /// The listening sockets a binary upgrade hands over: the listeners in force (a reload's
    /// changes included), and the admin API's socket once kept with
    /// [`ListeningSockets::keep_admin`].
    pub fn listening_sockets(&self) -> &ListeningSockets {
        self.upgrader.sockets()
    }

    /// Keeps the process from exiting, after its drain, until the guard is dropped (for at most
    /// 5 seconds): for an admin answer still being written.
    pub fn owe_answer(&self) -> OwedGuard {
        self.owed.hold()
    }
}

/// How long a process that has drained still waits for answers it owes (an admin API client
/// reading the answer to `POST /upgrade`) before it exits.
const OWED_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping server waits for the access log's writer to write the lines it holds:
/// normally a few milliseconds; longer only when the sink itself is stalled (a full pipe), and
/// then exiting is worth more than those lines, which are reported as not written.
const ACCESS_LOG_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes the access log lines of every request that has ended (see [`ACCESS_LOG_FLUSH_TIMEOUT`]).
/// Blocks: call it off the runtime.
fn flush_access_logs(live: &Live) {
    if !live.flush_access_logs(ACCESS_LOG_FLUSH_TIMEOUT) {
        tracing::warn!(
            timeout_ms = ACCESS_LOG_FLUSH_TIMEOUT.as_millis() as u64,
            "access log: the sink did not take every line before exit; those lines are lost"
        );
    }
}

/// A server with its listeners bound, ready to serve.
pub struct Server {
    prepared: Prepared,
    /// Shared with the reload state, which adds and removes listeners, and with the upgrader,
    /// which hands them over.
    listeners: Arc<ListenerSet>,
    limits: Arc<ConnLimits>,
    handle: ServerHandle,
    signals: bool,
    /// The OTLP exporter, started with serving (it needs the runtime) when `[tracing]` is on.
    exporter: Option<otel::Exporter>,
    /// Set in a binary upgrade's new process: told once every listener accepts.
    ready_report: Option<ReadyReport>,
    /// Run once the signal handlers are in and before any listener accepts (see
    /// [`Server::with_announcement`]).
    announce: Option<Box<dyn FnOnce() + Send>>,
}

impl Server {
    /// Validates `config`, loads certificates, and binds every listener.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        Server::bind_prepared(prepare(config)?)
    }

    /// Binds the listeners of an already prepared configuration.
    pub fn bind_prepared(prepared: Prepared) -> Result<Server, StartError> {
        Server::bind_with(prepared, None)
    }

    /// Like [`Server::bind_prepared`] in a binary upgrade's new process: listeners adopt the
    /// sockets `handover` holds (by name, on the same address); only the others are bound.
    pub fn bind_handed_over(prepared: Prepared, handover: &mut Handover) -> Result<Server, StartError> {
        Server::bind_with(prepared, Some(handover))
    }

    fn bind_with(mut prepared: Prepared, mut handover: Option<&mut Handover>) -> Result<Server, StartError> {
        let mut tls_servers = std::mem::take(&mut prepared.tls);
        let registry = Arc::new(Registry::default());
        let metrics = Metrics::new(registry.clone());
        let (trigger, shutdown) = ShutdownTrigger::new();
        let c = &prepared.config;
        let switches = Switches::new(crate::lifecycle::reload::switch_set(c));
        let access_log =
            AccessLog::open(&c.log, &c.server.state_dir, metrics.access_log_dropped.clone()).map_err(|e| {
                let mut f = Findings::default();
                f.error(e.key(), e.to_string(), e.fix());
                StartError::Invalid(f)
            })?;
        let access_log = Arc::new(access_log);
        let (tracer, exporter) = match Tracer::from_config(&c.tracing, metrics.trace.clone()) {
            Ok(Some((tracer, exporter))) => (Some(tracer), Some(exporter)),
            Ok(None) => (None, None),
            Err(problem) => {
                let mut f = Findings::default();
                f.error("tracing.otlp_endpoint", problem, "");
                return Err(StartError::Invalid(f));
            }
        };
        let settings = Arc::new(ConnSettings {
            timeouts: c.timeouts.clone(),
            limits: c.limits.clone(),
            http2: c.http2.clone(),
        });
        let mut inherit_findings = Findings::default();
        let mut inherited = listen::inherit::adopt(&c.listeners, &mut inherit_findings);
        let mut handed_over = match handover.as_deref_mut() {
            Some(h) => h.adopt_listeners(&c.listeners, &mut inherit_findings),
            None => Vec::new(),
        };
        if inherit_findings.has_errors() {
            return Err(StartError::Invalid(inherit_findings));
        }
        let common = ListenerCommon {
            metrics: metrics.clone(),
            registry: registry.clone(),
            shutdown,
            debug: switches.clone(),
            tracer,
        };
        let mut listeners = Vec::new();
        for (i, l) in c.listeners.iter().enumerate() {
            // Socket activation and a binary upgrade fill the set alike; a handed-over socket
            // keeps the origin it had in the old process, so one that systemd passed stays
            // systemd's (a reload cannot move it) after any number of upgrades.
            let adopted = inherited
                .get_mut(i)
                .and_then(Option::take)
                .map(|s| (s, Origin::Inherited));
            let (socket, origin) = match adopted.or_else(|| handed_over.get_mut(i).and_then(Option::take)) {
                Some(adopted) => adopted,
                None => (listen::bind(&l.name, l.address)?, Origin::Bound),
            };
            let tls = tls_servers.get_mut(i).and_then(Option::take);
            listeners.push(BoundListener::new(
                l,
                socket,
                origin,
                tls,
                settings.clone(),
                access_log.clone(),
                &common,
            ));
        }
        let listeners = Arc::new(ListenerSet::new(listeners));
        let upgrader = Arc::new(Upgrader::new(ListeningSockets::new(listeners.clone())));
        let limits = ConnLimits::new(c.limits.max_connections, c.limits.max_connections_per_ip);
        let live = Arc::new(Live::new(
            c.clone(),
            listeners.clone(),
            common,
            access_log,
            limits.clone(),
            switches.clone(),
            metrics.clone(),
        ));
        live.set_loaded_cert_files(prepared.cert_files.take());
        let handle = ServerHandle {
            trigger,
            ready: Arc::new(AtomicBool::new(false)),
            metrics,
            registry,
            switches,
            live,
            upgrader,
            owed: Owed::default(),
        };
        Ok(Server {
            prepared,
            listeners,
            limits,
            handle,
            signals: true,
            exporter,
            ready_report: handover.map(|h| h.report()),
            announce: None,
        })
    }

    /// The address listener `name` is bound to (useful with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.local_addr(name)
    }

    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    pub fn config(&self) -> &Config {
        &self.prepared.config
    }

    /// Warnings found while preparing (expiring certificates, loose key permissions...).
    pub fn findings(&self) -> &Findings {
        &self.prepared.findings
    }

    /// Where the configuration came from, so that SIGHUP and [`ServerHandle::reload_from_source`]
    /// can read it again. Without it, only [`ServerHandle::reload`] with a new `Config` reloads.
    pub fn with_config_source(self, source: ConfigSource) -> Self {
        self.handle.live.set_source(source);
        self
    }

    /// Declares that `router` serves this configuration's `[[routes]]`, so reloads rebuild its
    /// table. Without it a reload leaves the served service alone: a library user's own tower
    /// service keeps running unchanged across reloads, which still apply to everything else.
    pub fn with_config_routes(self, router: &Router) -> Self {
        router.set_upstream_metrics(self.handle.metrics.upstream.clone());
        router.set_resilience_metrics(self.handle.metrics.resilience.clone());
        self.handle.live.set_router(router.clone());
        self
    }

    /// Enables binary upgrades (SIGUSR2, [`ServerHandle::upgrade`]): the new process is started
    /// as `launch` describes, which should be recorded at process start ([`Launch::current`]).
    pub fn with_upgrade(self, launch: Launch) -> Self {
        self.handle.upgrader.set_launch(launch);
        self
    }

    /// Runs `announce` once serving has begun far enough that the process's signals are handled,
    /// and before any listener accepts: where a binary prints its startup report. Whoever reads
    /// that report and sends SIGTERM, SIGHUP or SIGUSR2 then reaches the server's handlers, never
    /// the signal's default action, which would end the process without a drain.
    pub fn with_announcement(mut self, announce: impl FnOnce() + Send + 'static) -> Self {
        self.announce = Some(Box::new(announce));
        self
    }

    /// Do not install SIGTERM/SIGINT/SIGHUP handlers; shut down through [`ServerHandle::shutdown`] only.
    pub fn without_signal_handling(mut self) -> Self {
        self.signals = false;
        self
    }

    /// Describes each listener: address, TLS, protocols, certificate subject and expiry.
    pub fn protocol_table(&self) -> String {
        use std::fmt::Write;
        let mut out =
            String::from("listener        address                   tls   protocols            certificate\n");
        for (shared, addr) in self.listeners.snapshot() {
            let cfg = self
                .prepared
                .config
                .listeners
                .iter()
                .find(|l| *l.name == *shared.name.0);
            let protos: Vec<&str> = cfg
                .map(|c| c.effective_protocols().iter().map(|p| p.as_str()).collect())
                .unwrap_or_default();
            let mut protos = protos.join(",");
            if cfg.is_some_and(|c| c.h2c_upgrade) {
                protos.push_str("+upgrade");
            }
            let addr = addr.map(|a| a.to_string()).unwrap_or_default();
            let (tls, cert) = match &shared.tls {
                Some(t) => {
                    let t = t.load();
                    let certs: Vec<String> = t
                        .certs
                        .iter()
                        .map(|c| {
                            format!(
                                "{} (expires {}) {}",
                                c.subject,
                                httpdate::fmt_http_date(c.not_after),
                                c.source
                            )
                        })
                        .collect();
                    ("yes", certs.join("; "))
                }
                None => ("no", "-".to_string()),
            };
            let _ = writeln!(
                out,
                "{:<15} {:<25} {:<5} {:<20} {}",
                shared.name.0, addr, tls, protos, cert
            );
        }
        out
    }

    /// Serves `svc` on the current tokio runtime until shut down, then drains.
    pub async fn serve<S, B>(self, svc: S) -> Result<(), StartError>
    where
        S: HttpService<B>,
        B: ServiceBody,
    {
        let handles = vec![tokio::runtime::Handle::current()];
        self.serve_on(svc, handles).await
    }

    /// Serves on `workers` threads, each with its own single-threaded runtime (0 = one per core),
    /// running `control` (admin API, reload) on the calling thread. Blocks until drained.
    pub fn run<S, B, F>(self, svc: S, workers: usize, control: impl FnOnce(ServerHandle) -> F) -> Result<(), StartError>
    where
        S: HttpService<B>,
        B: ServiceBody,
        F: std::future::Future<Output = ()> + 'static,
    {
        let workers = if workers == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            workers
        };
        let mut handles = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StartError::Other(format!("cannot start worker runtime: {e}")))?;
            handles.push(rt.handle().clone());
            let handle = self.handle.clone();
            let t = std::thread::Builder::new()
                .name(format!("gatehouse-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let shutdown = handle.trigger().subscribe();
                        shutdown.forced().await;
                        let _ =
                            tokio::time::timeout(std::time::Duration::from_secs(2), handle.registry.wait_empty()).await;
                    })
                })
                .map_err(|e| StartError::Other(format!("cannot start worker thread: {e}")))?;
            threads.push(t);
        }
        let control_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartError::Other(format!("cannot start control runtime: {e}")))?;
        let handle = self.handle.clone();
        let live = self.handle.live.clone();
        let result = control_rt.block_on(async move {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async move {
                    tokio::task::spawn_local(control(handle));
                    self.serve_on(svc, handles).await
                })
                .await
        });
        for t in threads {
            let _ = t.join();
        }
        // A connection the drain deadline cut may have ended its request after the drain's flush.
        flush_access_logs(&live);
        result
    }

    async fn serve_on<S, B>(mut self, svc: S, workers: Vec<tokio::runtime::Handle>) -> Result<(), StartError>
    where
        S: HttpService<B>,
        B: ServiceBody,
    {
        // First: until they are in, SIGTERM, SIGHUP and SIGUSR2 would end the process at once.
        let mut signals = if self.signals {
            match Signals::install() {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot install signal handlers; stop the server through the admin API or the library handle");
                    None
                }
            }
        } else {
            None
        };
        if let Some(announce) = self.announce.take() {
            announce();
        }
        // Kept for listeners a reload adds: the service is cloned for each of their accept loops.
        let limits = self.limits.clone();
        let svc = Mutex::new(svc);
        let start: listen::StartAccepting = Arc::new(move |l: &BoundListener| {
            let shared = &l.shared;
            // One per listener, so that an exhaustion episode is reported once, not once per worker.
            let errors = listen::AcceptErrors::new(shared.name.clone(), shared.metrics.clone(), shared.debug.clone());
            let svc = svc.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for w in &workers {
                let sock = l
                    .socket
                    .try_clone()
                    .map_err(|e| format!("cannot share listener {}: {e}", shared.name.0))?;
                let shared = shared.clone();
                let limits = limits.clone();
                let svc = svc.clone();
                let errors = errors.clone();
                let running = l.accept_loop_guard();
                w.spawn(async move {
                    match tokio::net::TcpListener::from_std(sock) {
                        Ok(l) => listen::accept_loop(listen::Acceptor::new(l, errors), shared, limits, svc).await,
                        Err(e) => tracing::error!(listener = %shared.name.0, error = %e, "cannot register listener"),
                    }
                    drop(running);
                });
            }
            Ok(())
        });
        self.listeners.start_accepting(start).map_err(StartError::Other)?;
        let export = self.exporter.map(|e| {
            tracing::info!(
                endpoint = %e.endpoint().url(),
                sample_ratio = self.prepared.config.tracing.sample_ratio,
                "tracing: exporting request spans over OTLP/HTTP"
            );
            e.spawn()
        });
        let listeners = self.listeners.clone();
        let handle = self.handle.clone();
        let reload = || {
            let handle = handle.clone();
            // Its own task, so a stop signal is not held up while certificates load.
            tokio::spawn(async move {
                // The outcome is logged and counted by the reload itself.
                let _ = handle.reload_from_source_by(ReloadTrigger::Signal).await;
            });
        };
        let upgrade = || {
            let handle = handle.clone();
            tokio::spawn(async move {
                // The outcome is logged and counted by the upgrade itself.
                let _ = handle.upgrade().await;
            });
        };
        // Active health checks of the proxy's upstreams run while serving, on this runtime.
        let routes = handle.live.router();
        if let Some(r) = &routes {
            r.start_health_checks();
        }
        handle.set_ready(true);
        let shutdown = handle.trigger().subscribe();
        // Idle unless `server.watch_certificates` is set; a reload can turn it on or off.
        tokio::spawn(crate::lifecycle::reload::cert_watch::run(
            self.handle.live.clone(),
            shutdown.clone(),
        ));
        // Every listener is bound and has an accept loop: tell systemd (Type=notify) we are up.
        let notify = crate::lifecycle::systemd::notifier();
        if notify.is_enabled() {
            let registry = handle.registry.clone();
            let listeners_now = listeners.clone();
            handle.on_reload(Arc::new(move |stage| match stage {
                crate::lifecycle::ReloadStage::Started => notify.reloading(),
                crate::lifecycle::ReloadStage::Finished(_) => {
                    notify.reloaded(&serving_status(listeners_now.len(), &registry))
                }
            }));
        }
        notify.ready(&serving_status(listeners.len(), &handle.registry));
        if let Some(report) = &self.ready_report {
            report.ready();
        }
        if notify.is_enabled() {
            let registry = handle.registry.clone();
            let shutdown = shutdown.clone();
            let listeners = listeners.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::lifecycle::systemd::STATUS_INTERVAL);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = tick.tick() => notify.status(&serving_status(listeners.len(), &registry)),
                        _ = shutdown.stop_accepting() => break,
                    }
                }
            });
        }
        match &mut signals {
            Some(s) => tokio::select! {
                _ = s.stop_requested(&reload, &upgrade) => {}
                _ = shutdown.stop_accepting() => {}
            },
            None => shutdown.stop_accepting().await,
        }
        // A binary upgrade's new process serves the sockets now: no deregistration delay, and
        // the service manager hears from that process only.
        let handed_over = handle.trigger().is_handed_over();
        // Read now rather than at start: [shutdown] is reloadable.
        let drain = handle.config().shutdown.clone();
        let drain_timeout = drain.drain_timeout.get();
        // The signal streams stay registered from startup, so a second signal sent during
        // drain_delay (or handover_grace) or right as the drain is announced is not missed.
        let forced = shutdown.clone();
        let mut second_signal = Box::pin(async move {
            match &mut signals {
                Some(s) => tokio::select! {
                    _ = s.stop_requested(&reload, &upgrade) => tracing::warn!("second signal: closing every connection now"),
                    _ = forced.forced() => {}
                },
                None => forced.forced().await,
            }
        });
        let mut second_seen = false;
        // Readiness flips first so load balancers stop sending, then serving continues for the delay.
        handle.set_ready(false);
        if handed_over {
            // Not accepting any more; HTTP/2 has its GOAWAY, and an HTTP/1.1 request already on
            // its way on an idle connection is answered (with `Connection: close`) rather than
            // met by a close. Then the drain proper closes what is idle.
            let grace = drain.handover_grace.get();
            tracing::info!(
                open = handle.registry.len(),
                grace_ms = grace.as_millis() as u64,
                "handed over; idle HTTP/1.1 connections may send one more request during handover_grace"
            );
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = handle.registry.wait_empty() => {}
                _ = second_signal.as_mut() => second_seen = true,
            }
        } else {
            notify.stopping(&format!("draining {} connection(s)", handle.registry.len()));
            let drain_delay = drain.drain_delay.get();
            if !drain_delay.is_zero() && handle.phase() == Phase::Running {
                tracing::info!(
                    delay_ms = drain_delay.as_millis() as u64,
                    "readiness is 503; still serving during drain_delay"
                );
                tokio::select! {
                    _ = tokio::time::sleep(drain_delay) => {}
                    _ = second_signal.as_mut() => second_seen = true,
                }
            }
        }
        let second_signal = async move {
            if !second_seen {
                second_signal.await;
            }
        };
        // The accept loops close their sockets as the drain begins; the listener set's (kept for
        // an upgrade) and the admin API's copy must close with them, or the kernel would keep
        // queueing connections. After a handover the upgrade closed them already.
        handle.listening_sockets().clear();
        // Connections cut at the deadline are counted by their own tasks as `drain_forced`.
        let report = crate::lifecycle::drain(handle.trigger(), &handle.registry, drain_timeout, second_signal).await;
        if !handed_over {
            notify.status(&format!(
                "drained: {} connection(s) at start, {} closed by the deadline",
                report.open_at_start, report.forced
            ));
        }
        if let Some(r) = routes {
            r.stop_health_checks().await;
        }
        // Every request has ended, so every span is queued: send them (bounded) before returning.
        if let Some(export) = export {
            export.flush_and_stop().await;
        }
        // Every request has ended, so every access log line is recorded: write them all.
        let live = handle.live.clone();
        let _ = tokio::task::spawn_blocking(move || flush_access_logs(&live)).await;
        if tokio::time::timeout(OWED_ANSWER_TIMEOUT, handle.owed.settled())
            .await
            .is_err()
        {
            tracing::warn!("an admin API answer was still being written at exit");
        }
        Ok(())
    }
}

/// The systemd status line while serving.
fn serving_status(listeners: usize, registry: &Registry) -> String {
    format!("serving {listeners} listener(s); {} connection(s)", registry.len())
}
