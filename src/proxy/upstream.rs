//! Upstreams as configured and as running: compiled specs, the live set a reload reconciles,
//! and the balancing that picks a server for each request.

use super::checker::HealthChecks;
use super::connect::{self, ConnectSettings};
use super::guard::ServerGuard;
use super::metrics::ServerLabels;
use super::pool::{MetricsSlot, ServerPool};
use super::resilience::breaker::{Breaker, BreakerPermit, BreakerSettings, TransitionObserver};
use super::resilience::health::{Health, HealthSettings, ServerHealth};
use super::resilience::metrics::ResilienceMetrics;
use super::resilience::retry::{RetryBudget, RetrySettings};
use super::resilience::stale::{RespondFallback, StaleCache, StaleSettings};
use crate::config::{Balance, Config, Findings, UpstreamConfig, UpstreamProtocol};
use crate::observe::Name;
use arc_swap::ArcSwap;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The resilience series, swapped in once the server that exposes them exists.
pub type ResilienceSlot = ArcSwap<ResilienceMetrics>;

/// The `Host` an upstream receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRewrite {
    /// The client's `Host` (HTTP/2: `:authority`), unchanged.
    Preserve,
    /// The chosen server's `host:port`.
    Upstream,
    /// A fixed value.
    Fixed(http::HeaderValue),
}

/// One `[[upstreams]]` entry, checked and with its TLS client built.
#[derive(Debug)]
pub struct UpstreamSpec {
    pub name: Name,
    pub servers: Vec<String>,
    pub balance: Balance,
    pub response_header_timeout: Duration,
    pub host: HostRewrite,
    pub connect: Arc<ConnectSettings>,
    /// `[upstreams.health]`: active checks; `None` runs none.
    pub health: Option<HealthSettings>,
    /// Passive ejection: `[upstreams.health]`'s counts when set, else the defaults
    /// (3 consecutive failures eject for 10s).
    pub passive: HealthSettings,
    pub breaker: Option<BreakerSettings>,
    pub retry: Option<RetrySettings>,
    /// `[upstreams.fallback] stale_for`.
    pub stale: Option<StaleSettings>,
    /// `[upstreams.fallback] respond`.
    pub respond: Option<RespondFallback>,
}

impl UpstreamSpec {
    /// Whether requests go over TLS (which sets `:scheme` for HTTP/2).
    pub fn tls(&self) -> bool {
        self.connect.tls.is_some()
    }
}

/// Compiles every `[[upstreams]]` entry: reads CA files and builds TLS clients. Problems go to
/// `f` under the entry's key; an entry with problems is left out.
pub fn compile(config: &Config, f: &mut Findings) -> Vec<Arc<UpstreamSpec>> {
    config
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, u)| compile_one(i, u, f).map(Arc::new))
        .collect()
}

fn compile_one(i: usize, u: &UpstreamConfig, f: &mut Findings) -> Option<UpstreamSpec> {
    let key = format!("upstreams[{i}]");
    let needs_tls = matches!(u.protocol, UpstreamProtocol::H2 | UpstreamProtocol::Auto) || u.tls.is_some();
    let tls_cfg = u
        .tls
        .clone()
        .filter(|_| needs_tls)
        .or_else(|| needs_tls.then(Default::default));
    let mut ca_bytes = Vec::new();
    let tls = match &tls_cfg {
        None => None,
        Some(t) => {
            if let Some(ca) = &t.ca {
                match std::fs::read(ca) {
                    Ok(b) => ca_bytes = b,
                    Err(e) => {
                        f.error(
                            format!("{key}.tls.ca"),
                            format!("cannot read {}: {e}", ca.display()),
                            "point ca at a readable PEM file of the CA certificates that issued the upstream's certificate",
                        );
                        return None;
                    }
                }
            }
            let ca = t.ca.as_ref().map(|_| ca_bytes.as_slice());
            match connect::tls_client(u.protocol, t, ca) {
                Ok(c) => Some(c),
                Err(why) => {
                    f.error(
                        format!("{key}.tls"),
                        why,
                        "set tls.ca to a PEM file of the CA certificates to trust",
                    );
                    return None;
                }
            }
        }
    };
    let host = match u.host.as_str() {
        "preserve" => HostRewrite::Preserve,
        "upstream" => HostRewrite::Upstream,
        other => HostRewrite::Fixed(http::HeaderValue::from_str(other).ok()?),
    };
    let connect_timeout = u.connect_timeout.get();
    let max_idle = u.max_idle_per_server as usize;
    let idle_timeout = u.idle_timeout.get();
    let health = u
        .health
        .as_ref()
        .map(|h| HealthSettings::from_keys(h.path.clone(), h.interval.get(), h.unhealthy_after, h.healthy_after));
    let fallback = u.fallback.clone().unwrap_or_default();
    let respond = match &fallback.respond {
        None => None,
        Some(r) => Some(RespondFallback::from_keys(
            http::StatusCode::from_u16(r.status).ok()?,
            r.body.clone(),
            r.retry_after.map(|d| d.get()),
        )),
    };
    Some(UpstreamSpec {
        passive: health.clone().unwrap_or_default(),
        health,
        breaker: u.breaker.as_ref().map(|b| {
            BreakerSettings::from_keys(
                b.failure_ratio,
                b.min_requests,
                b.window.get(),
                b.open_for.get(),
                b.half_open_probes,
            )
        }),
        retry: u.retry.as_ref().map(|r| RetrySettings::from_keys(r.attempts, r.budget)),
        stale: fallback.stale_for.map(|d| StaleSettings::from_keys(d.get())),
        respond,
        name: Name(Arc::from(u.name.as_str())),
        servers: u.servers.clone(),
        balance: u.balance,
        response_header_timeout: u.response_header_timeout.get(),
        host,
        connect: Arc::new(ConnectSettings {
            protocol: u.protocol,
            tls,
            connect_timeout,
            max_idle,
            idle_timeout,
            source: (u.protocol, tls_cfg, ca_bytes, connect_timeout, max_idle, idle_timeout),
        }),
    })
}

/// One upstream as running: its servers' pools, their guards (health and breaker), the
/// balancer's state, the retry budget and the stale cache.
#[derive(Debug)]
pub struct Upstream {
    pub spec: Arc<UpstreamSpec>,
    pub servers: Vec<Arc<ServerPool>>,
    /// One per server, same order.
    pub guards: Vec<Arc<ServerGuard>>,
    pub retry: Option<Arc<RetryBudget>>,
    pub stale: Option<Arc<StaleCache>>,
    pub(super) resilience: Arc<ResilienceSlot>,
    pub(super) metrics: Arc<MetricsSlot>,
    next: AtomicUsize,
    rng: AtomicU64,
}

/// The server a request goes to, with the breaker's permit when there is a breaker.
pub struct Chosen {
    pub index: usize,
    pub permit: Option<BreakerPermit>,
}

impl Upstream {
    pub fn resilience(&self) -> arc_swap::Guard<Arc<ResilienceMetrics>> {
        self.resilience.load()
    }

    /// The server for the next attempt, by the configured `balance`, among servers that are
    /// healthy, not ejected and not in `tried`, whose breaker admits the request. When every
    /// available server was tried, one is tried again. `Err` names why the last server
    /// considered was skipped (`breaker_open`, `unhealthy`, `ejected`).
    pub fn select(&self, tried: &[usize], now: Instant) -> Result<Chosen, &'static str> {
        match self.select_among(tried, now) {
            Err(None) if !tried.is_empty() => self.select_among(&[], now),
            other => other,
        }
        .map_err(|why| why.unwrap_or("no_server"))
    }

    fn select_among(&self, tried: &[usize], now: Instant) -> Result<Chosen, Option<&'static str>> {
        let skipped: Cell<Option<&'static str>> = Cell::new(None);
        // Allocates only when a breaker refuses, which is rare next to the requests it admits.
        let mut refused: Vec<usize> = Vec::new();
        for _ in 0..self.servers.len() {
            let usable = |i: usize| {
                if tried.contains(&i) || refused.contains(&i) {
                    return false;
                }
                match self.guards[i].unavailable(now) {
                    Some(why) => {
                        skipped.set(Some(why));
                        false
                    }
                    None => true,
                }
            };
            let Some(i) = self.pick(usable) else { break };
            match self.guards[i].admit(now) {
                Ok(permit) => return Ok(Chosen { index: i, permit }),
                Err(why) => {
                    skipped.set(Some(why));
                    refused.push(i);
                }
            }
        }
        Err(skipped.get())
    }

    /// A server among those `usable` says yes to, by the configured `balance`.
    fn pick(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.servers.len();
        if n <= 1 {
            return (n == 1 && usable(0)).then_some(0);
        }
        match self.spec.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
            }
            Balance::LeastRequests => {
                // Rotate the starting point so ties spread instead of piling on server 0.
                let start = self.next.fetch_add(1, Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| usable(i))
                    .min_by_key(|&i| self.servers[i].in_flight())
            }
            Balance::P2cEwma => {
                let r = self.random();
                let a0 = (r % n as u64) as usize;
                let b0 = (a0 + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                // The first usable server at or after each random start: with every server
                // usable these are the two random choices.
                let a = (0..n).map(|k| (a0 + k) % n).find(|&i| usable(i))?;
                let Some(b) = (0..n).map(|k| (b0 + k) % n).find(|&i| i != a && usable(i)) else {
                    return Some(a);
                };
                let cost = |p: &ServerPool| p.ewma() * (p.in_flight() as f64 + 1.0);
                Some(if cost(&self.servers[b]) < cost(&self.servers[a]) {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// Each server and why it cannot take a request now, for the log of a 503.
    pub fn availability_report(&self, now: Instant) -> String {
        let mut out = String::new();
        for (pool, guard) in self.servers.iter().zip(&self.guards) {
            let why = guard.unavailable(now).or_else(|| {
                guard.breaker.as_ref().and_then(|b| {
                    (b.poll(now) != super::resilience::breaker::BreakerState::Closed).then_some("breaker_open")
                })
            });
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&pool.server.0);
            out.push(' ');
            out.push_str(why.unwrap_or("available"));
        }
        out
    }

    /// SplitMix64 over an atomic counter: cheap, lock-free, and random enough to pick two servers.
    fn random(&self) -> u64 {
        let mut z = self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The running upstreams, by name. A reload replaces the set in one swap and keeps each
/// server's pool (its warm connections) when the server and its connection settings are
/// unchanged; pools of servers that are gone are retired: idle connections close at once,
/// busy ones when their exchange ends.
///
/// Resilience state survives a reload where its settings do: a server that stays keeps its
/// health (active and passive) when `[upstreams.health]` is unchanged and its breaker when
/// `[upstreams.breaker]` is; an upstream keeps its retry budget and stale cache when
/// `[upstreams.retry]` and `stale_for` are unchanged. Anything else starts afresh. Active
/// checkers are restarted on every reload (their first round runs at once).
#[derive(Debug)]
pub struct Gateway {
    live: ArcSwap<HashMap<Arc<str>, Arc<Upstream>>>,
    metrics: Arc<MetricsSlot>,
    resilience: Arc<ResilienceSlot>,
    checks: HealthChecks,
    /// Serialises `apply`, so two reloads cannot interleave their reconciliation.
    applying: std::sync::Mutex<()>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            live: ArcSwap::from_pointee(HashMap::new()),
            metrics: Arc::new(ArcSwap::from_pointee(super::UpstreamMetrics::default())),
            resilience: Arc::new(ArcSwap::from_pointee(ResilienceMetrics::default())),
            checks: HealthChecks::default(),
            applying: std::sync::Mutex::new(()),
        }
    }
}

impl Gateway {
    /// Records into `metrics` from now on (the server's registry, which exposes them).
    pub fn set_metrics(&self, metrics: super::UpstreamMetrics) {
        self.metrics.store(Arc::new(metrics));
        self.publish_gauges();
    }

    /// Records the resilience series (breaker state, retries, fallbacks) into `metrics`.
    pub fn set_resilience_metrics(&self, metrics: ResilienceMetrics) {
        self.resilience.store(Arc::new(metrics));
        self.publish_gauges();
    }

    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.live.load().get(name).cloned()
    }

    /// Starts the active health checkers on the current tokio runtime, and those of every later
    /// reload; until then none runs (the upstreams can be built before the runtime exists).
    pub fn start_health_checks(&self) {
        let _serial = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        self.checks.start(&self.live.load(), &self.metrics);
    }

    /// Stops every active health checker (at shutdown), waiting for each task to end.
    pub async fn stop_health_checks(&self) {
        let stopping = {
            let _serial = self.applying.lock().unwrap_or_else(|p| p.into_inner());
            self.checks.stop()
        };
        for handle in stopping {
            handle.stop().await;
        }
    }

    /// Puts `specs` in force for new requests.
    pub fn apply(&self, specs: &[Arc<UpstreamSpec>]) {
        let _serial = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.live.load_full();
        let mut kept: Vec<Arc<ServerPool>> = Vec::new();
        let mut next = HashMap::with_capacity(specs.len());
        let now = Instant::now();
        for spec in specs {
            let previous = old.get(&*spec.name.0);
            let servers: Vec<Arc<ServerPool>> = spec
                .servers
                .iter()
                .map(|s| {
                    let reuse = previous.and_then(|u| {
                        u.servers
                            .iter()
                            .find(|p| &*p.server.0 == s.as_str() && p.settings.source == spec.connect.source)
                    });
                    match reuse {
                        Some(p) => {
                            kept.push(p.clone());
                            p.clone()
                        }
                        None => Arc::new(ServerPool::new(
                            spec.name.clone(),
                            s,
                            spec.connect.clone(),
                            self.metrics.clone(),
                        )),
                    }
                })
                .collect();
            let guards = servers
                .iter()
                .map(|pool| self.guard(spec, previous.map(|u| &**u), pool, now))
                .collect();
            let retry = spec.retry.clone().map(|r| {
                let keep = previous
                    .filter(|u| u.spec.retry.as_ref() == Some(&r))
                    .and_then(|u| u.retry.clone());
                keep.unwrap_or_else(|| Arc::new(RetryBudget::new(r, now)))
            });
            let stale = spec.stale.clone().map(|st| {
                let keep = previous
                    .filter(|u| u.spec.stale.as_ref() == Some(&st))
                    .and_then(|u| u.stale.clone());
                keep.unwrap_or_else(|| Arc::new(StaleCache::new(st)))
            });
            let upstream = Upstream {
                spec: spec.clone(),
                servers,
                guards,
                retry,
                stale,
                resilience: self.resilience.clone(),
                metrics: self.metrics.clone(),
                next: AtomicUsize::new(0),
                rng: AtomicU64::new(seed()),
            };
            next.insert(spec.name.0.clone(), Arc::new(upstream));
        }
        let next = Arc::new(next);
        self.live.store(next.clone());
        self.checks.replace(&next, &self.metrics);
        for u in old.values() {
            let still = next.get(&*u.spec.name.0);
            for (p, g) in u.servers.iter().zip(&u.guards) {
                let stays = still.and_then(|n| n.servers.iter().position(|q| q.server.0 == p.server.0));
                let labels = ServerLabels {
                    upstream: p.upstream.clone(),
                    server: p.server.clone(),
                };
                // Series of servers that left (or lost their breaker or checks) would otherwise
                // show a state nobody maintains any more.
                let new_guard = still.zip(stays).map(|(n, i)| &n.guards[i]);
                if g.breaker.is_some() && new_guard.is_none_or(|ng| ng.breaker.is_none()) {
                    self.resilience
                        .load()
                        .breaker_state
                        .remove(&super::resilience::metrics::ServerLabels {
                            upstream: labels.upstream.clone(),
                            server: labels.server.clone(),
                        });
                }
                if u.spec.health.is_some() && still.is_none_or(|n| stays.is_none() || n.spec.health.is_none()) {
                    self.metrics.load().server_healthy.remove(&labels);
                }
                if !kept.iter().any(|k| Arc::ptr_eq(k, p)) {
                    tracing::info!(
                        upstream = %p.upstream.0,
                        server = %p.server.0,
                        "upstream server removed or its connection settings changed; closing its pooled connections"
                    );
                    p.retire();
                }
            }
        }
        self.publish_gauges();
    }

    /// The guard of `pool`'s server: the previous one when its settings are unchanged.
    fn guard(
        &self,
        spec: &UpstreamSpec,
        previous: Option<&Upstream>,
        pool: &ServerPool,
        now: Instant,
    ) -> Arc<ServerGuard> {
        let old = previous.and_then(|u| {
            u.servers
                .iter()
                .position(|p| p.server.0 == pool.server.0)
                .map(|i| (&u.spec, &u.guards[i]))
        });
        let health = match old {
            Some((s, g)) if s.health == spec.health && s.passive == spec.passive => g.health.clone(),
            _ => Arc::new(ServerHealth::new(spec.passive.clone())),
        };
        let breaker = spec.breaker.as_ref().map(|b| {
            old.filter(|(s, _)| s.breaker.as_ref() == Some(b))
                .and_then(|(_, g)| g.breaker.clone())
                .unwrap_or_else(|| self.breaker(b.clone(), pool, now))
        });
        Arc::new(ServerGuard { health, breaker })
    }

    /// A breaker whose transitions are logged with their figures and set the state gauge.
    fn breaker(&self, settings: BreakerSettings, pool: &ServerPool, now: Instant) -> Arc<Breaker> {
        let slot = self.resilience.clone();
        let (upstream, server) = (pool.upstream.clone(), pool.server.clone());
        let observer: TransitionObserver = Arc::new(move |t| {
            t.log(&upstream.0, &server.0);
            slot.load().breaker(&upstream, &server, t.to);
        });
        Breaker::new(settings, now, observer)
    }

    /// Sets the gauges that describe state rather than count events (breaker state, active
    /// health), for the registry in use: after a reload, and when the registry is swapped in.
    fn publish_gauges(&self) {
        let now = Instant::now();
        let (metrics, resilience) = (self.metrics.load(), self.resilience.load());
        for u in self.live.load().values() {
            for (p, g) in u.servers.iter().zip(&u.guards) {
                if let Some(b) = &g.breaker {
                    resilience.breaker(&p.upstream, &p.server, b.poll(now));
                }
                if u.spec.health.is_some() {
                    let labels = ServerLabels {
                        upstream: p.upstream.clone(),
                        server: p.server.clone(),
                    };
                    let up = g.health.health() == Health::Healthy;
                    metrics.server_healthy.get_or_create(&labels).set(i64::from(up));
                }
            }
        }
    }
}

/// A seed that differs between processes and upstreams, so p2c choices do not correlate.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
