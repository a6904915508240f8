//! Hot reload: validate a whole new configuration, then swap it in, or change nothing at all.
//!
//! A reload has two stages. *Staging* does everything that can fail — reads the file, validates
//! it exactly as `gatehouse check` does, loads every certificate and key, compiles the routes,
//! opens the access log — without touching the running server. *Applying* then stores each
//! prepared piece into the `ArcSwap` that connections read from, and cannot fail. So a reload is
//! either whole or refused with its findings; there is no half-reloaded server.
//!
//! Listeners are part of it. New sockets are bound while staging, so an address in use refuses
//! the reload before anything changed; applying then starts accepting on them, and takes the
//! removed ones out of service, each draining its own connections as a server drain would.
//!
//! Every trigger (SIGHUP, `POST /reload`, `gatehouse reload`, a library call, the certificate
//! watcher) goes through `Live::reload`, which serialises reloads, counts
//! `gatehouse_reloads_total{result}`, logs the outcome and tells [`ReloadHook`]s (for example, to
//! send systemd `RELOADING=1`).

pub mod cert_watch;
mod listeners;
mod plan;

pub use listeners::{ListenerAt, ListenerMove, ListenerReport};
pub use plan::{plan, ListenerChange, Plan};

use crate::config::{self, Config, ConfigSource, Finding, Findings, ListenerConfig, Severity};
use crate::conn::{ConnSettings, ProtocolPolicy};
use crate::listen::{ClosingListener, ConnLimits, ListenerCommon, ListenerSet, Origin};
use crate::observe::access_log::Flusher;
use crate::observe::metrics::ResultLabels;
use crate::observe::{AccessLog, Metrics, PeerFilter, Switch, SwitchSet, Switches};
use crate::route::{RouteTable, Router};
use crate::tls::TlsServer;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::sync::{Arc, Mutex};

/// What a reload that went through did.
#[derive(Clone, Debug, Default)]
pub struct ReloadReport {
    /// Sections now in force, like `routes`, `timeouts` or `listeners.public.tls`. Empty when the
    /// new configuration equals the running one.
    pub changed: Vec<String>,
    /// Listeners that now accept, stopped accepting, or moved.
    pub listeners: ListenerReport,
    /// Changed keys that wait for a restart, and certificate warnings (expiring soon...).
    pub warnings: Vec<Finding>,
}

/// Why a reload was refused. Either way the running configuration is untouched.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration, a certificate or a key has errors (all of them are listed).
    #[error("reload refused; still serving the previous configuration:\n{0}")]
    Invalid(Findings),
    /// The server cannot reload now: it is draining, or has no file to re-read.
    #[error("reload refused: {0}")]
    Unavailable(String),
}

impl ReloadError {
    /// The refusal as findings (one for `Unavailable`), for answers that list them.
    pub fn findings(&self) -> Findings {
        match self {
            ReloadError::Invalid(f) => f.clone(),
            ReloadError::Unavailable(why) => {
                let mut f = Findings::default();
                f.error("server", why.clone(), "");
                f
            }
        }
    }
}

/// What asked for a reload, as the log and the `reload` debug switch report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// SIGHUP.
    Signal,
    /// `POST /reload` on the admin API (which `gatehouse reload` calls).
    Admin,
    /// A call to `ServerHandle::reload` or `reload_from_source`.
    Library,
    /// The certificate watcher saw certificate or key files change (`server.watch_certificates`).
    CertWatch,
}

impl ReloadTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadTrigger::Signal => "sighup",
            ReloadTrigger::Admin => "admin",
            ReloadTrigger::Library => "library",
            ReloadTrigger::CertWatch => "cert_watch",
        }
    }
}

/// Where a reload is in its course, as told to hooks.
#[derive(Clone, Copy, Debug)]
pub enum ReloadStage<'a> {
    /// A reload has the lock and is about to read and validate.
    Started,
    /// The reload is over: applied or refused.
    Finished(&'a Result<ReloadReport, ReloadError>),
}

/// Called at each [`ReloadStage`], on the task that runs the reload; keep it quick.
pub type ReloadHook = Arc<dyn Fn(ReloadStage<'_>) + Send + Sync>;

/// The server state a reload replaces, and what it needs to rebuild it.
pub struct Live {
    config: ArcSwap<Config>,
    /// Where `reload_from_source` reads from; `None` when the configuration was given in code.
    source: ArcSwapOption<ConfigSource>,
    /// The built-in route table, when the server serves its configuration's `[[routes]]`. A
    /// library user's own service is never replaced.
    router: ArcSwapOption<Router>,
    listeners: Arc<ListenerSet>,
    /// What a listener added by a reload shares with the others.
    common: ListenerCommon,
    /// The access log in force, for listeners added by a reload.
    access_log: ArcSwap<AccessLog>,
    /// Access logs a reload replaced whose writers may still hold lines, for the final flush.
    retired_logs: Mutex<Vec<Flusher>>,
    limits: Arc<ConnLimits>,
    switches: Switches,
    metrics: Metrics,
    hooks: Mutex<Vec<ReloadHook>>,
    /// The certificate files as last loaded (see [`cert_watch`]); `None` while watching is off.
    cert_files: ArcSwapOption<cert_watch::CertFiles>,
    /// Held for a whole reload so two triggers at once run one after the other, never interleaved.
    lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("source", &self.source.load())
            .field("listeners", &self.listeners)
            .field("routes", &self.router.load().is_some())
            .finish_non_exhaustive()
    }
}

/// Everything a candidate configuration needs, built and checked, not yet in force.
struct Staged {
    config: Arc<Config>,
    plan: Plan,
    /// Per listener of the new configuration, in its order.
    tls: Vec<Option<TlsServer>>,
    routes: Option<RouteTable>,
    /// `None`: keep the running access log.
    access_log: Option<Arc<AccessLog>>,
    cert_files: Option<cert_watch::CertFiles>,
    warnings: Findings,
}

/// What staging needs from the running server; owned, so staging can run on a blocking thread.
struct StageInput {
    next: Option<Config>,
    source: Option<Arc<ConfigSource>>,
    old: Arc<Config>,
    rebuild_routes: bool,
    access_log_dropped: prometheus_client::metrics::counter::Counter,
}

impl Live {
    /// The reload state over a freshly bound server. `config` is the prepared (running) one.
    pub(crate) fn new(
        config: Config,
        listeners: Arc<ListenerSet>,
        common: ListenerCommon,
        access_log: Arc<AccessLog>,
        limits: Arc<ConnLimits>,
        switches: Switches,
        metrics: Metrics,
    ) -> Live {
        // Both series exist from the start so a dashboard can tell "no reload yet" from "no data".
        for result in ["ok", "refused"] {
            let _ = metrics.reloads.get_or_create(&ResultLabels { result });
        }
        Live {
            config: ArcSwap::from_pointee(config),
            source: ArcSwapOption::empty(),
            router: ArcSwapOption::empty(),
            listeners,
            common,
            access_log: ArcSwap::new(access_log),
            retired_logs: Mutex::new(Vec::new()),
            limits,
            switches,
            metrics,
            hooks: Mutex::new(Vec::new()),
            cert_files: ArcSwapOption::empty(),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Writes every access log line recorded so far, by the log in force and by those a reload
    /// replaced, waiting at most `timeout` (blocking); returns whether all were written.
    pub(crate) fn flush_access_logs(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let retired = self.retired_logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let current = self.access_log.load_full().flusher();
        let mut all = true;
        for log in retired.iter().chain(&current) {
            all &= log.flush(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        all
    }

    /// The listeners in force.
    pub fn listeners(&self) -> &Arc<ListenerSet> {
        &self.listeners
    }

    /// Holds off every reload until the guard drops (one under way finishes first): for a binary
    /// upgrade, which hands over the listeners in force and must not see them change meanwhile.
    pub(crate) async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    pub(crate) fn set_source(&self, source: ConfigSource) {
        self.source.store(Some(Arc::new(source)));
    }

    pub(crate) fn set_loaded_cert_files(&self, files: Option<cert_watch::CertFiles>) {
        self.cert_files.store(files.map(Arc::new));
    }

    /// The certificate files as the configuration in force loaded them.
    pub(crate) fn loaded_cert_files(&self) -> Option<Arc<cert_watch::CertFiles>> {
        self.cert_files.load_full()
    }

    pub(crate) fn set_router(&self, router: Router) {
        self.router.store(Some(Arc::new(router)));
    }

    /// The router whose routes reloads rebuild, if any.
    pub(crate) fn router(&self) -> Option<Arc<Router>> {
        self.router.load_full()
    }

    pub(crate) fn add_hook(&self, hook: ReloadHook) {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    fn tell(&self, stage: ReloadStage<'_>) {
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for h in hooks {
            h(stage);
        }
    }

    /// Reloads `next`, or (with `None`) re-reads the source the server started from.
    /// The one entry point of every trigger (through `ServerHandle`, which runs it on its own task).
    pub(crate) async fn reload(
        &self,
        next: Option<Config>,
        trigger: ReloadTrigger,
    ) -> Result<ReloadReport, ReloadError> {
        let asked = std::time::Instant::now();
        let _serial = self.lock.lock().await;
        let waited = asked.elapsed();
        self.switches.process_event(Switch::Reload, || {
            format!(
                "reload started: trigger {}, source {}, waited {} ms for an earlier reload",
                trigger.as_str(),
                match &next {
                    Some(_) => "configuration given in code".to_string(),
                    None => self
                        .source
                        .load()
                        .as_deref()
                        .map_or_else(|| "none".to_string(), |s| s.to_string()),
                },
                waited.as_millis()
            )
        });
        self.tell(ReloadStage::Started);
        let result = self.reload_locked(next).await;
        let label = if result.is_ok() { "ok" } else { "refused" };
        self.metrics
            .reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics
            .reload_timestamp
            .get_or_create(&ResultLabels { result: label })
            .set(now);
        self.switches.process_event(Switch::Reload, || {
            let total = asked.elapsed().as_millis();
            match &result {
                Ok(r) => format!(
                    "reload ok: trigger {}, changed [{}], {} warning(s), {total} ms in all",
                    trigger.as_str(),
                    r.changed.join(", "),
                    r.warnings.len()
                ),
                Err(e) => format!(
                    "reload refused: trigger {}, {} finding(s): {}, {total} ms in all",
                    trigger.as_str(),
                    e.findings().iter().count(),
                    e.findings()
                        .iter()
                        .map(|f| format!("{}: {}", f.key, f.problem))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }
        });
        match &result {
            Ok(r) => {
                for w in &r.warnings {
                    tracing::warn!(trigger = trigger.as_str(), key = %w.key, fix = %w.fix, "reload: {}", w.problem);
                }
                if r.changed.is_empty() {
                    tracing::info!(trigger = trigger.as_str(), "configuration reloaded; nothing changed");
                } else if r.listeners.is_empty() {
                    tracing::info!(trigger = trigger.as_str(), changed = %r.changed.join(", "), "configuration reloaded");
                } else {
                    tracing::info!(
                        trigger = trigger.as_str(),
                        changed = %r.changed.join(", "),
                        listeners = %r.listeners,
                        "configuration reloaded"
                    );
                }
            }
            Err(e) => {
                let findings = e.findings();
                let summary: Vec<String> = findings.iter().map(|f| format!("{}: {}", f.key, f.problem)).collect();
                tracing::warn!(
                    trigger = trigger.as_str(),
                    findings = %summary.join("; "),
                    "reload refused; still serving the previous configuration"
                );
            }
        }
        self.tell(ReloadStage::Finished(&result));
        result
    }

    async fn reload_locked(&self, next: Option<Config>) -> Result<ReloadReport, ReloadError> {
        if self.common.shutdown.phase() != super::Phase::Running {
            return Err(ReloadError::Unavailable(
                "the server is shutting down; configuration unchanged".into(),
            ));
        }
        let input = StageInput {
            next,
            source: self.source.load_full(),
            old: self.config.load_full(),
            rebuild_routes: self.router.load().is_some(),
            access_log_dropped: self.metrics.access_log_dropped.clone(),
        };
        // Reading files, loading keys and maybe generating a self-signed certificate block.
        let staging = std::time::Instant::now();
        let staged = tokio::task::spawn_blocking(move || stage(input))
            .await
            .map_err(|e| ReloadError::Unavailable(format!("the reload task failed: {e}")))?;
        let staged_in = staging.elapsed();
        self.switches.process_event(Switch::Reload, || match &staged {
            Ok(s) => format!(
                "reload staged in {} ms (read, validated, certificates and keys loaded): sections differing [{}]",
                staged_in.as_millis(),
                s.plan.changed.join(", ")
            ),
            Err(_) => format!("reload staging failed after {} ms", staged_in.as_millis()),
        });
        let staged = staged?;
        let sockets = self.open_sockets(&staged)?;
        let applying = std::time::Instant::now();
        let (report, closing) = self.apply(staged, sockets);
        self.switches.process_event(Switch::Reload, || {
            format!(
                "reload applied in {} us: changed [{}]",
                applying.elapsed().as_micros(),
                report.changed.join(", ")
            )
        });
        // Answer once the removed listeners' ports are closed: a client that connects after the
        // reload reported them removed is refused, not queued on a socket nobody accepts on.
        futures_util::future::join_all(closing.iter().map(ClosingListener::accept_stopped)).await;
        let drain_timeout = self.config.load().shutdown.drain_timeout.get();
        for listener in closing {
            // The outcome is logged by the drain; forced closes are counted by each connection.
            tokio::spawn(listener.drain(drain_timeout));
        }
        Ok(report)
    }

    /// Puts a staged configuration in force. Cannot fail: everything fallible happened in `stage`.
    ///
    /// Each piece is its own atomic swap. Requests and handshakes read their piece when they
    /// start, so each sees either the old or the new value of it, never a mix within one piece.
    ///
    /// Listeners: new ones start accepting before retiring ones stop, so a listener that takes
    /// over a socket leaves no moment in which nothing accepts on it. Returns the retired
    /// listeners, already refusing new connections, for the caller to drain.
    fn apply(
        &self,
        s: Staged,
        sockets: Vec<(usize, std::net::TcpListener, Origin)>,
    ) -> (ReloadReport, Vec<ClosingListener>) {
        let Staged {
            config,
            mut plan,
            tls,
            routes,
            access_log,
            cert_files,
            warnings,
        } = s;
        self.set_loaded_cert_files(cert_files);
        match (self.router.load().as_deref(), routes) {
            (Some(router), Some(table)) => {
                if plan.changed.iter().any(|c| c == "routes" || c == "upstreams") {
                    router.replace(table);
                }
            }
            // The server runs its user's own service: `[[routes]]` is not what it serves.
            _ => plan.changed.retain(|c| c != "routes" && c != "upstreams"),
        }
        let settings = Arc::new(ConnSettings {
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            http2: config.http2.clone(),
        });
        let old = self.config.load_full();
        let mut tls = tls;
        for (i, l) in config.listeners.iter().enumerate() {
            if !plan.keeps(&l.name, &config) {
                continue;
            }
            let Some(shared) = self.listeners.shared(&l.name) else {
                continue;
            };
            shared.settings.store(settings.clone());
            shared.policy.store(Arc::new(ProtocolPolicy::from_config(l)));
            if let (Some(slot), Some(next)) = (&shared.tls, tls.get_mut(i).and_then(Option::take)) {
                let old_cfg = old.listeners.iter().find(|o| o.name == l.name);
                if !same_tls(old_cfg, l, &slot.load(), &next) {
                    slot.store(Arc::new(next));
                    plan.changed.push(format!("listeners.{}.tls", l.name));
                }
            }
            if let Some(log) = &access_log {
                shared.access_log.store(log.clone());
            }
        }
        if let Some(log) = access_log {
            let old = self.access_log.swap(log);
            let mut retired = self.retired_logs.lock().unwrap_or_else(|p| p.into_inner());
            retired.retain(Flusher::is_live);
            retired.extend(old.flusher());
        }
        let (listeners, closing, warnings_listeners) = self.swap_listeners(&plan, &config, tls, sockets, &settings);
        self.limits
            .set(config.limits.max_connections, config.limits.max_connections_per_ip);
        if plan.changed.iter().any(|c| c == "debug") {
            self.switches.replace(switch_set(&config));
        }
        self.config.store(config);
        let mut all = plan.findings;
        all.extend(warnings_listeners);
        all.extend(warnings);
        let report = ReloadReport {
            changed: plan.changed,
            listeners,
            warnings: all.0.into_iter().filter(|f| f.severity == Severity::Warning).collect(),
        };
        (report, closing)
    }
}

/// Builds and checks everything the candidate needs. Touches nothing that is serving.
fn stage(input: StageInput) -> Result<Staged, ReloadError> {
    let next = match input.next {
        Some(c) => c,
        None => read_source(input.source.as_deref())?,
    };
    let plan = plan(&input.old, &next);
    // Listener refusals first: they explain why the rest would not matter yet.
    let mut findings = Findings(
        plan.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .cloned()
            .collect(),
    );
    let mut route_findings = Findings::default();
    let routes = input
        .rebuild_routes
        .then(|| RouteTable::build(&next, &mut route_findings));
    // The same validation as `gatehouse check`: every key, every certificate and key file.
    let prepared = crate::prepare(next);
    let mut prepared = match prepared {
        Ok(p) => {
            findings.extend(route_findings);
            p
        }
        Err(e) => {
            match e {
                crate::StartError::Invalid(f) => findings.extend(f),
                other => findings.error("config", other.to_string(), ""),
            }
            findings.extend(route_findings);
            return Err(ReloadError::Invalid(findings));
        }
    };
    findings.extend(std::mem::take(&mut prepared.findings));
    if findings.has_errors() {
        return Err(ReloadError::Invalid(findings));
    }
    // Reopened when its settings changed, and for a file every time: after logrotate renames the
    // file, SIGHUP makes gatehouse write to a fresh one (as nginx does on USR1).
    let log = &prepared.config.log;
    let reopen =
        plan.changed.iter().any(|c| c == "log") || !matches!(log.access_log.as_str(), "stdout" | "stderr" | "off");
    let access_log = if reopen {
        match AccessLog::open(log, &prepared.config.server.state_dir, input.access_log_dropped) {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                findings.error(e.key(), e.to_string(), e.fix());
                return Err(ReloadError::Invalid(findings));
            }
        }
    } else {
        None
    };
    Ok(Staged {
        tls: std::mem::take(&mut prepared.tls),
        cert_files: prepared.cert_files.take(),
        config: Arc::new(prepared.config),
        plan,
        routes,
        access_log,
        warnings: findings,
    })
}

/// Reads the configuration the server started from, as `serve` did.
fn read_source(source: Option<&ConfigSource>) -> Result<Config, ReloadError> {
    match source {
        Some(ConfigSource::File(path)) => config::load(Some(path)).map(|(c, _)| c).map_err(|e| {
            let mut f = Findings::default();
            f.error(
                "config",
                e.to_string(),
                "fix the file; the running configuration is unchanged",
            );
            ReloadError::Invalid(f)
        }),
        Some(ConfigSource::Embedded) => Ok(Config::embedded_default(std::path::Path::new("public").is_dir())),
        None => Err(ReloadError::Unavailable(
            "this server's configuration was given in code, not read from a file; \
             pass the new configuration to ServerHandle::reload"
                .into(),
        )),
    }
}

/// The same certificates and the same TLS settings: keeping the running `TlsServer` keeps its
/// session ticket key and cache, so clients still resume across a reload that changed nothing
/// here. Comparing chains suffices for keys: loading checks that each key matches its certificate.
fn same_tls(old_cfg: Option<&ListenerConfig>, new_cfg: &ListenerConfig, old: &TlsServer, new: &TlsServer) -> bool {
    let chains = |t: &TlsServer| t.certs.iter().map(|c| c.key.cert.clone()).collect::<Vec<_>>();
    old_cfg.is_some_and(|o| o.tls == new_cfg.tls && !plan::protocols_differ(o, new_cfg))
        && old.alpn == new.alpn
        && old.on_no_alpn == new.on_no_alpn
        && chains(old) == chains(new)
}

/// The `[debug]` switches as configured (validation rejected unknown names and bad peers).
pub(crate) fn switch_set(c: &Config) -> SwitchSet {
    SwitchSet::new(
        &c.debug
            .switches
            .iter()
            .filter_map(|s| Switch::parse(s))
            .collect::<Vec<_>>(),
        c.debug.listener.clone(),
        c.debug.peer.as_deref().and_then(|p| PeerFilter::parse(p).ok()),
    )
}
