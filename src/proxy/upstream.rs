//! Upstreams as configured and as running: compiled specs, the live set a reload reconciles,
//! and the balancing that picks a server for each request.

use super::connect::{self, ConnectSettings};
use super::pool::{MetricsSlot, ServerPool};
use crate::config::{Balance, Config, Findings, UpstreamConfig, UpstreamProtocol};
use crate::observe::Name;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

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
    Some(UpstreamSpec {
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

/// One upstream as running: its servers' pools and the balancer's state.
#[derive(Debug)]
pub struct Upstream {
    pub spec: Arc<UpstreamSpec>,
    pub servers: Vec<Arc<ServerPool>>,
    next: AtomicUsize,
    rng: AtomicU64,
}

impl Upstream {
    /// The server for the next request, by the configured `balance`.
    pub fn pick(&self) -> Option<&Arc<ServerPool>> {
        let n = self.servers.len();
        if n <= 1 {
            return self.servers.first();
        }
        let i = match self.spec.balance {
            Balance::RoundRobin => self.next.fetch_add(1, Relaxed) % n,
            Balance::LeastRequests => {
                // Rotate the starting point so ties spread instead of piling on server 0.
                let start = self.next.fetch_add(1, Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|&i| self.servers[i].in_flight())
                    .unwrap_or(0)
            }
            Balance::P2cEwma => {
                let r = self.random();
                let a = (r % n as u64) as usize;
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let cost = |p: &ServerPool| p.ewma() * (p.in_flight() as f64 + 1.0);
                if cost(&self.servers[b]) < cost(&self.servers[a]) {
                    b
                } else {
                    a
                }
            }
        };
        self.servers.get(i)
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
#[derive(Debug)]
pub struct Gateway {
    live: ArcSwap<HashMap<Arc<str>, Arc<Upstream>>>,
    metrics: Arc<MetricsSlot>,
    /// Serialises `apply`, so two reloads cannot interleave their reconciliation.
    applying: std::sync::Mutex<()>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            live: ArcSwap::from_pointee(HashMap::new()),
            metrics: Arc::new(ArcSwap::from_pointee(super::UpstreamMetrics::default())),
            applying: std::sync::Mutex::new(()),
        }
    }
}

impl Gateway {
    /// Records into `metrics` from now on (the server's registry, which exposes them).
    pub fn set_metrics(&self, metrics: super::UpstreamMetrics) {
        self.metrics.store(Arc::new(metrics));
    }

    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.live.load().get(name).cloned()
    }

    /// Puts `specs` in force for new requests.
    pub fn apply(&self, specs: &[Arc<UpstreamSpec>]) {
        let _serial = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.live.load_full();
        let mut kept: Vec<Arc<ServerPool>> = Vec::new();
        let mut next = HashMap::with_capacity(specs.len());
        for spec in specs {
            let previous = old.get(&*spec.name.0);
            let servers = spec
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
            let upstream = Upstream {
                spec: spec.clone(),
                servers,
                next: AtomicUsize::new(0),
                rng: AtomicU64::new(seed()),
            };
            next.insert(spec.name.0.clone(), Arc::new(upstream));
        }
        self.live.store(Arc::new(next));
        for u in old.values() {
            for p in &u.servers {
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
