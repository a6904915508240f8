//! What a reload would change: sections applied live, listeners to bind or drain, and keys that
//! wait for a restart.
//!
//! Pure comparison of two configurations; loading files and swapping state happen elsewhere.

use crate::config::{Config, Findings, ListenerConfig};
use std::net::SocketAddr;

/// The outcome of comparing the running configuration with a candidate.
#[derive(Debug, Default)]
pub struct Plan {
    /// Sections that will be in force after the swap, like `routes` or `listeners.public`.
    /// TLS certificates are compared after they load (see `reload.rs`), so they are not here.
    pub changed: Vec<String>,
    /// Listeners that appear, disappear, move, or switch between TLS and cleartext.
    pub listeners: Vec<ListenerChange>,
    /// Warnings: changed keys that take effect on the next restart.
    pub findings: Findings,
}

/// A listener whose socket or kind changes. Listeners are matched by name; a listener whose
/// address and kind (TLS or cleartext) stay the same keeps its socket and its connections, and
/// gets its new settings in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerChange {
    /// New name: bind its address (index in the new configuration).
    Added { index: usize },
    /// Same name, new address: bind the new one, drain the old one.
    Moved { index: usize, from: SocketAddr },
    /// Same name and address, TLS switched on or off: a new listener takes over the socket, the
    /// old one's connections (speaking the other kind) drain.
    Switched { index: usize },
    /// Gone from the new configuration: stop accepting, drain its connections.
    Removed { name: String, address: SocketAddr },
}

impl ListenerChange {
    /// The index in the new configuration of a listener that needs a socket.
    pub fn new_index(&self) -> Option<usize> {
        match self {
            ListenerChange::Added { index }
            | ListenerChange::Moved { index, .. }
            | ListenerChange::Switched { index } => Some(*index),
            ListenerChange::Removed { .. } => None,
        }
    }
}

impl Plan {
    /// Listener `name` of the running configuration keeps its socket and its connections.
    pub fn keeps(&self, name: &str, new: &Config) -> bool {
        new.listeners
            .iter()
            .enumerate()
            .any(|(i, l)| l.name == name && !self.listeners.iter().any(|c| c.new_index() == Some(i)))
    }

    /// Names of the running listeners that go out of service: removed, moved or switched.
    pub fn retiring<'a>(&'a self, new: &'a Config) -> impl Iterator<Item = &'a str> + 'a {
        self.listeners.iter().filter_map(move |c| match c {
            ListenerChange::Added { .. } => None,
            ListenerChange::Removed { name, .. } => Some(name.as_str()),
            ListenerChange::Moved { index, .. } | ListenerChange::Switched { index } => {
                new.listeners.get(*index).map(|l| l.name.as_str())
            }
        })
    }
}

/// Compares `old` (running) with `new` (candidate).
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    listeners(old, new, &mut p);
    for (section, differs) in [
        ("timeouts", old.timeouts != new.timeouts),
        ("limits", old.limits != new.limits),
        ("http2", old.http2 != new.http2),
        ("shutdown", old.shutdown != new.shutdown),
        ("routes", old.routes != new.routes),
        ("upstreams", old.upstreams != new.upstreams),
        ("traffic_classes", old.traffic_classes != new.traffic_classes),
        ("rate_limits", old.rate_limits != new.rate_limits),
        ("debug", old.debug != new.debug),
        ("log", log_sink_differs(old, new)),
        ("server.state_dir", old.server.state_dir != new.server.state_dir),
        (
            "server.watch_certificates",
            old.server.watch_certificates != new.server.watch_certificates,
        ),
    ] {
        if differs {
            p.changed.push(section.to_string());
        }
    }
    let restart = "takes effect when gatehouse restarts; the running server keeps the old value";
    if old.server.workers != new.server.workers {
        p.findings.warning(
            "server.workers",
            format!(
                "changed from {} to {}: worker threads are started once",
                old.server.workers, new.server.workers
            ),
            restart,
        );
    }
    if old.admin.address != new.admin.address {
        p.findings.warning(
            "admin.address",
            format!(
                "changed from `{}` to `{}`: the admin API keeps its socket",
                old.admin.address, new.admin.address
            ),
            restart,
        );
    }
    if old.admin.token_file != new.admin.token_file {
        p.findings.warning(
            "admin.token_file",
            "changed: the admin API read its token at start",
            restart,
        );
    }
    if old.log.format != new.log.format {
        p.findings.warning(
            "log.format",
            "changed: the diagnostic log is set up once at start",
            restart,
        );
    }
    if old.tracing != new.tracing {
        p.findings
            .warning("tracing", "changed: tracing export is set up once at start", restart);
    }
    p
}

/// The access log's destination or redaction changed (`format` is the diagnostic log's).
fn log_sink_differs(old: &Config, new: &Config) -> bool {
    let (o, n) = (&old.log, &new.log);
    o.access_log != n.access_log
        || o.redact_headers != n.redact_headers
        || o.redact_query != n.redact_query
        || o.redact_mode != n.redact_mode
        || o.hash_key_file != n.hash_key_file
}

/// Listeners are matched by name (see [`ListenerChange`]).
fn listeners(old: &Config, new: &Config, p: &mut Plan) {
    for (i, n) in new.listeners.iter().enumerate() {
        let Some(o) = old.listeners.iter().find(|o| o.name == n.name) else {
            p.listeners.push(ListenerChange::Added { index: i });
            p.changed.push(format!("listeners.{}", n.name));
            continue;
        };
        if o.address != n.address {
            p.listeners.push(ListenerChange::Moved {
                index: i,
                from: o.address,
            });
            p.changed.push(format!("listeners.{}", n.name));
        } else if o.tls.is_some() != n.tls.is_some() {
            p.listeners.push(ListenerChange::Switched { index: i });
            p.changed.push(format!("listeners.{}", n.name));
        } else if protocols_differ(o, n) {
            p.changed.push(format!("listeners.{}", n.name));
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|n| n.name == o.name) {
            p.listeners.push(ListenerChange::Removed {
                name: o.name.clone(),
                address: o.address,
            });
            p.changed.push(format!("listeners.{}", o.name));
        }
    }
}

pub(super) fn protocols_differ(o: &ListenerConfig, n: &ListenerConfig) -> bool {
    o.effective_protocols() != n.effective_protocols() || o.on_no_alpn != n.on_no_alpn || o.h2c_upgrade != n.h2c_upgrade
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn cfg(extra: &str) -> Config {
        load_str(&format!(
            "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:8080\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn identical_configurations_change_nothing() {
        let p = plan(&cfg(""), &cfg(""));
        assert!(p.changed.is_empty(), "{:?}", p.changed);
        assert!(p.findings.is_empty(), "{}", p.findings);
    }

    #[test]
    fn live_sections_are_listed_and_restart_keys_warn() {
        let p = plan(
            &cfg(""),
            &cfg("[timeouts]\nidle = \"5s\"\n[server]\nworkers = 3\n[admin]\naddress = \"127.0.0.1:1\"\n[log]\nformat = \"text\"\n"),
        );
        assert_eq!(p.changed, ["timeouts"]);
        assert!(!p.findings.has_errors());
        let keys: Vec<_> = p.findings.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["server.workers", "admin.address", "log.format"]);
    }

    #[test]
    fn listener_set_changes_are_planned_by_name() {
        let old = cfg("");
        let moved = load_str("[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:8081\"\n").unwrap();
        let p = plan(&old, &moved);
        assert_eq!(
            p.listeners,
            [ListenerChange::Moved {
                index: 0,
                from: "127.0.0.1:8080".parse().unwrap()
            }]
        );
        assert!(!p.keeps("web", &moved));
        assert_eq!(p.retiring(&moved).collect::<Vec<_>>(), ["web"]);

        let renamed = load_str("[[listeners]]\nname = \"www\"\naddress = \"127.0.0.1:8080\"\n").unwrap();
        let p = plan(&old, &renamed);
        assert_eq!(
            p.listeners,
            [
                ListenerChange::Added { index: 0 },
                ListenerChange::Removed {
                    name: "web".into(),
                    address: "127.0.0.1:8080".parse().unwrap()
                }
            ]
        );
        assert_eq!(p.changed, ["listeners.www", "listeners.web"]);
        assert_eq!(p.retiring(&renamed).collect::<Vec<_>>(), ["web"]);
        assert!(!p.findings.has_errors());

        let tls = cfg("[listeners.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        let p = plan(&old, &tls);
        assert_eq!(p.listeners, [ListenerChange::Switched { index: 0 }]);

        let p = plan(&old, &cfg("protocols = [\"http/1.1\"]\n"));
        assert!(p.listeners.is_empty());
        assert!(p.keeps("web", &old));
    }

    #[test]
    fn protocol_changes_apply_to_the_listener() {
        let p = plan(&cfg(""), &cfg("protocols = [\"http/1.1\"]\n"));
        assert_eq!(p.changed, ["listeners.web"]);
        assert!(p.findings.is_empty());
    }
}
