//! What a reload would change: sections applied live, keys that wait for a restart, and refusals.
//!
//! Pure comparison of two configurations; loading files and swapping state happen elsewhere.

use crate::config::{Config, Findings, ListenerConfig};

/// The outcome of comparing the running configuration with a candidate.
#[derive(Debug, Default)]
pub struct Plan {
    /// Sections that will be in force after the swap, like `routes` or `listeners.public`.
    /// TLS certificates are compared after they load (see `reload.rs`), so they are not here.
    pub changed: Vec<String>,
    /// Errors: changes a reload cannot make (a listener added, removed or moved).
    /// Warnings: changed keys that take effect on the next restart.
    pub findings: Findings,
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

/// Listeners are matched by name. Their sockets are bound once, so a listener that appears,
/// disappears, moves or switches between TLS and cleartext refuses the reload: half-applying it
/// would leave the file describing a server that is not the one running.
fn listeners(old: &Config, new: &Config, p: &mut Plan) {
    let restart_fix = "restart gatehouse to apply listener changes, or undo this change to reload the rest";
    for (i, n) in new.listeners.iter().enumerate() {
        let Some(o) = old.listeners.iter().find(|o| o.name == n.name) else {
            p.findings.error(
                format!("listeners[{i}].name"),
                format!(
                    "`{}` ({}) is a new listener; adding a listener needs a restart",
                    n.name, n.address
                ),
                restart_fix,
            );
            continue;
        };
        if o.address != n.address {
            p.findings.error(
                format!("listeners[{i}].address"),
                format!(
                    "listener `{}` would move from {} to {}; moving a listener needs a restart",
                    n.name, o.address, n.address
                ),
                restart_fix,
            );
        }
        if o.tls.is_some() != n.tls.is_some() {
            let (from, to) = if o.tls.is_some() {
                ("TLS", "cleartext")
            } else {
                ("cleartext", "TLS")
            };
            p.findings.error(
                format!("listeners[{i}].tls"),
                format!(
                    "listener `{}` would switch from {from} to {to}; that needs a restart",
                    n.name
                ),
                restart_fix,
            );
        } else if protocols_differ(o, n) {
            p.changed.push(format!("listeners.{}", n.name));
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|n| n.name == o.name) {
            p.findings.error(
                "listeners",
                format!(
                    "listener `{}` ({}) is missing; removing a listener needs a restart",
                    o.name, o.address
                ),
                restart_fix,
            );
        }
    }
}

pub(super) fn protocols_differ(o: &ListenerConfig, n: &ListenerConfig) -> bool {
    o.effective_protocols() != n.effective_protocols() || o.on_no_alpn != n.on_no_alpn || o.h2c_upgrade != n.h2c_upgrade
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, Severity};

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
    fn listener_set_changes_are_refused_naming_the_listener() {
        let old = cfg("");
        let moved = load_str("[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:8081\"\n").unwrap();
        let p = plan(&old, &moved);
        assert!(p.findings.iter().any(|f| f.severity == Severity::Error
            && f.key == "listeners[0].address"
            && f.problem.contains("`web`")
            && f.problem.contains("restart")));

        let renamed = load_str("[[listeners]]\nname = \"www\"\naddress = \"127.0.0.1:8080\"\n").unwrap();
        let p = plan(&old, &renamed);
        let errors: Vec<_> = p.findings.iter().map(|f| f.problem.as_str()).collect();
        assert!(
            errors.iter().any(|e| e.contains("`www`") && e.contains("new listener")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("`web`") && e.contains("missing")),
            "{errors:?}"
        );

        let tls = cfg("[listeners.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        let p = plan(&old, &tls);
        assert!(p
            .findings
            .iter()
            .any(|f| f.key == "listeners[0].tls" && f.problem.contains("cleartext to TLS")));
    }

    #[test]
    fn protocol_changes_apply_to_the_listener() {
        let p = plan(&cfg(""), &cfg("protocols = [\"http/1.1\"]\n"));
        assert_eq!(p.changed, ["listeners.web"]);
        assert!(p.findings.is_empty());
    }
}
