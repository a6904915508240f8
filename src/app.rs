//! Wires configuration, listeners, routes and the admin API into the running binary.

use crate::config::{self, ConfigSource, Findings, Severity};
use crate::route::{RouteTable, Router};
use crate::server::{prepare, Server, StartError};
use std::path::Path;
use std::sync::Arc;

/// A failure of a command, with its exit code; the message is already user-facing.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl From<StartError> for Exit {
    fn from(e: StartError) -> Self {
        let message = match &e {
            StartError::Invalid(f) => format!("configuration refused; nothing was started:\n{f}"),
            other => other.to_string(),
        };
        Exit {
            code: e.exit_code(),
            message,
        }
    }
}

fn load(path: Option<&Path>) -> Result<(config::Config, ConfigSource), Exit> {
    config::load(path).map_err(|e| Exit {
        code: 78,
        message: e.to_string(),
    })
}

fn print_warnings(f: &Findings) {
    for w in f.iter().filter(|f| f.severity == Severity::Warning) {
        eprintln!("{w}");
    }
}

/// `gatehouse check`: validates configuration, certificates and keys; binds nothing.
pub fn check(path: Option<&Path>) -> Result<String, Exit> {
    let (config, source) = load(path)?;
    let mut prepared = prepare(config)?;
    let mut routes = Findings::default();
    RouteTable::build(&prepared.config, &mut routes);
    if routes.has_errors() {
        prepared.findings.extend(routes);
        return Err(StartError::Invalid(prepared.findings).into());
    }
    prepared.findings.extend(routes);
    let mut out = String::new();
    for f in prepared.findings.iter() {
        out.push_str(&format!("{f}\n"));
    }
    out.push_str(&format!(
        "configuration OK ({source}): {} listener(s), {} route(s)\n",
        prepared.config.listeners.len(),
        prepared.config.routes.len()
    ));
    Ok(out)
}

/// `gatehouse serve`: validates everything, binds, serves until SIGTERM/SIGINT, drains.
pub fn serve(path: Option<&Path>) -> Result<(), Exit> {
    let (config, source) = load(path)?;
    let mut prepared = prepare(config)?;
    let mut route_findings = Findings::default();
    let table = RouteTable::build(&prepared.config, &mut route_findings);
    if route_findings.has_errors() {
        prepared.findings.extend(route_findings);
        return Err(StartError::Invalid(prepared.findings).into());
    }
    print_warnings(&prepared.findings);
    print_warnings(&route_findings);
    let admin_listener = match prepared.config.admin.address.as_str() {
        "" => None,
        a => {
            let addr = a.parse().map_err(|_| Exit {
                code: 78,
                message: format!("admin.address `{a}` is not an address"),
            })?;
            Some(crate::admin::bind(addr).map_err(|e| Exit {
                code: 69,
                message: e.to_string(),
            })?)
        }
    };
    let token = match &prepared.config.admin.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Exit {
                    code: 78,
                    message: format!("admin.token_file: cannot read {}: {e}", p.display()),
                })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let self_signed: Vec<(String, std::path::PathBuf)> = prepared
        .config
        .listeners
        .iter()
        .filter(|l| l.tls.as_ref().is_some_and(|t| t.self_signed.is_some()))
        .map(|l| {
            (
                l.name.clone(),
                crate::tls::selfsigned::paths(&prepared.config.server.state_dir, &l.name).0,
            )
        })
        .collect();
    let workers = prepared.config.server.workers;
    let config = Arc::new(prepared.config.clone());
    let server = Server::bind_prepared(prepared)?;
    eprintln!("gatehouse {} serving ({source})", env!("CARGO_PKG_VERSION"));
    eprint!("{}", server.protocol_table());
    for (name, cert) in &self_signed {
        let port = server.local_addr(name).map(|a| a.port()).unwrap_or(0);
        eprintln!(
            "self-signed certificate for `{name}`: {}  (try: curl --cacert {} https://localhost:{port}/)",
            cert.display(),
            cert.display()
        );
    }
    if let Some(l) = &admin_listener {
        if let Ok(a) = l.local_addr() {
            eprintln!("admin API: http://{a}/ (healthz, readyz, metrics, debug/connections, debug/switches, config)");
        }
    }
    let router = Router::new(table);
    let result = server.run(router, workers, move |handle| async move {
        if let Some(listener) = admin_listener {
            let admin = Arc::new(crate::admin::Admin { handle, config, token });
            crate::admin::serve(listener, admin).await;
        }
    });
    eprintln!("gatehouse stopped");
    result.map_err(Exit::from)
}
