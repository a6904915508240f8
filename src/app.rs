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

/// `gatehouse serve`: validates everything, binds, serves until SIGTERM/SIGINT, drains. Started
/// by a binary upgrade, it takes over the old process's sockets and tells it how the start went.
pub fn serve(path: Option<&Path>) -> Result<(), Exit> {
    // First, before any thread exists (it edits the environment), and before the configuration
    // is read, so that a configuration that does not load is reported to the old process too.
    let launch = crate::lifecycle::upgrade::Launch::current();
    let mut findings = Findings::default();
    let mut handover = crate::lifecycle::upgrade::Handover::from_env(&mut findings);
    let report = handover.as_ref().map(|h| h.report());
    let result = if findings.has_errors() {
        Err(StartError::Invalid(findings).into())
    } else {
        serve_with(path, launch, handover.as_mut())
    };
    if let (Err(e), Some(report)) = (&result, report) {
        report.failed(&e.message);
    }
    result
}

fn serve_with(
    path: Option<&Path>,
    launch: std::io::Result<crate::lifecycle::upgrade::Launch>,
    mut handover: Option<&mut crate::lifecycle::upgrade::Handover>,
) -> Result<(), Exit> {
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
            let mut findings = Findings::default();
            let adopted = handover.as_deref_mut().and_then(|h| h.adopt_admin(addr, &mut findings));
            if findings.has_errors() {
                return Err(StartError::Invalid(findings).into());
            }
            match adopted {
                Some(l) => Some(l),
                None => Some(crate::admin::bind(addr).map_err(|e| Exit {
                    code: 69,
                    message: e.to_string(),
                })?),
            }
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
    let router = Router::new(table);
    let server = match handover {
        Some(h) => {
            let server = Server::bind_handed_over(prepared, h)?;
            h.close_unused();
            server
        }
        None => Server::bind_prepared(prepared)?,
    }
    .with_config_source(source.clone())
    .with_config_routes(&router);
    let server = match launch {
        Ok(launch) => server.with_upgrade(launch),
        Err(e) => {
            eprintln!("warning: binary upgrade is unavailable: cannot tell which executable this is: {e}");
            server
        }
    };
    if let Some(l) = &admin_listener {
        server.handle().listening_sockets().keep_admin(l).map_err(|e| Exit {
            code: 1,
            message: format!("cannot keep the admin API's socket for upgrades: {e}"),
        })?;
    }
    // Printed once the signal handlers are in (see `Server::with_announcement`): whoever reads
    // this and signals the process reaches the handlers, not the signals' default action.
    let mut banner = format!("gatehouse {} serving ({source})\n", env!("CARGO_PKG_VERSION"));
    banner.push_str(&server.protocol_table());
    for (name, cert) in &self_signed {
        let port = server.local_addr(name).map(|a| a.port()).unwrap_or(0);
        banner.push_str(&format!(
            "self-signed certificate for `{name}`: {}  (try: curl --cacert {} https://localhost:{port}/)\n",
            cert.display(),
            cert.display()
        ));
    }
    if let Some(l) = &admin_listener {
        if let Ok(a) = l.local_addr() {
            banner.push_str(&format!(
                "admin API: http://{a}/ (healthz, readyz, metrics, debug/connections, debug/switches, config, reload, upgrade)\n"
            ));
        }
    }
    let server = server.with_announcement(move || eprint!("{banner}"));
    let result = server.run(router, workers, move |handle| async move {
        if let Some(listener) = admin_listener {
            let admin = Arc::new(crate::admin::Admin { handle, token });
            crate::admin::serve(listener, admin).await;
        }
    });
    eprintln!("gatehouse stopped");
    result.map_err(Exit::from)
}

/// How long `gatehouse reload` waits for the server's answer: loading certificates and keys takes
/// milliseconds, generating a self-signed certificate well under a second.
const RELOAD_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `gatehouse reload`: asks a running server, through its admin API, to reload its configuration.
/// Exit 0 when applied, 78 when refused as invalid, 69 when the server cannot be reached or
/// cannot reload now. `admin` wins over `[admin] address` from `path` (or the default file).
pub fn reload(admin: Option<&str>, path: Option<&Path>, token_file: Option<&Path>) -> Result<String, Exit> {
    let (address, answer) = admin_post(admin, path, token_file, "/reload", "SIGHUP", |_| RELOAD_ANSWER_TIMEOUT)?;
    reload_outcome(&address, answer.status, &answer.body)
}

/// `POST path` to a running server's admin API, found as `gatehouse reload` documents; `signal`
/// is the alternative to suggest when the admin API is off, `timeout` how long to wait for the
/// answer given the configuration file (when one was read). Returns the address and the answer.
fn admin_post(
    admin: Option<&str>,
    path: Option<&Path>,
    token_file: Option<&Path>,
    endpoint: &str,
    signal: &str,
    timeout: impl FnOnce(Option<&config::Config>) -> std::time::Duration,
) -> Result<(String, crate::admin::client::Answer), Exit> {
    use crate::admin::client;
    let unavailable = |message: String| Exit { code: 69, message };
    // The file gives the address and the token unless flags do; with --admin and no -c it is
    // only consulted for a token, so a broken or absent default file does not matter then.
    let config = match (admin, path) {
        (Some(_), None) => config::load(None).ok().map(|(c, _)| c),
        _ => Some(load(path)?.0),
    };
    let address = match admin {
        Some(a) => a.to_string(),
        None => config.as_ref().map(|c| c.admin.address.clone()).unwrap_or_default(),
    };
    if address.is_empty() {
        return Err(unavailable(format!(
            "the admin API is turned off ([admin] address = \"\"); send {signal} to the server instead"
        )));
    }
    let timeout = timeout(config.as_ref());
    let token_file = token_file
        .map(Path::to_path_buf)
        .or_else(|| config.and_then(|c| c.admin.token_file));
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .map_err(|e| Exit {
                    code: 78,
                    message: format!("cannot read the admin token file {}: {e}", p.display()),
                })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit {
            code: 1,
            message: format!("cannot start a runtime: {e}"),
        })?;
    let answer = rt
        .block_on(async {
            let addr = client::resolve(&address).await?;
            client::request(addr, http::Method::POST, endpoint, token.as_deref(), timeout).await
        })
        .map_err(|e| unavailable(e.to_string()))?;
    Ok((address, answer))
}

/// `gatehouse upgrade`: asks a running server, through its admin API, to start its binary anew
/// and hand over. Exit 0 once the new process serves, 1 when it failed (the server keeps serving;
/// the message says why), 69 when the server cannot be reached or cannot upgrade now.
pub fn upgrade(admin: Option<&str>, path: Option<&Path>, token_file: Option<&Path>) -> Result<String, Exit> {
    let (address, answer) = admin_post(admin, path, token_file, "/upgrade", "SIGUSR2", |c| {
        // The server bounds the wait by its upgrade_timeout (this file may not be the server's,
        // so never less than the default); then allow for stopping a new process that hung.
        c.map(|c| c.shutdown.upgrade_timeout.get())
            .unwrap_or(config::DEFAULT_UPGRADE_TIMEOUT.get())
            .max(config::DEFAULT_UPGRADE_TIMEOUT.get())
            + UPGRADE_ANSWER_MARGIN
    })?;
    upgrade_outcome(&address, answer.status, &answer.body)
}

/// Beyond the server's own upgrade_timeout: time to stop and reap a new process that hung.
const UPGRADE_ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_secs(15);

/// Turns the admin API's answer to `POST /upgrade` into the command's output and exit code.
fn upgrade_outcome(address: &str, status: http::StatusCode, body: &[u8]) -> Result<String, Exit> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = v["reason"].as_str().unwrap_or("").trim_end();
    match status.as_u16() {
        200 => Ok(format!(
            "upgrade ok: pid {} is serving; pid {} is draining and will exit\n",
            v["pid"], v["previous_pid"]
        )),
        500 if !reason.is_empty() => Err(Exit {
            code: 1,
            message: format!(
                "upgrade failed; pid {} keeps serving: {reason}",
                v["pid"]
            ),
        }),
        409 | 503 if !reason.is_empty() => Err(Exit {
            code: 69,
            message: format!("upgrade refused: {reason}"),
        }),
        401 => Err(Exit {
            code: 1,
            message: format!(
                "the admin API at {address} requires a bearer token; pass --token-file, or -c with the server's configuration file"
            ),
        }),
        other => Err(Exit {
            code: 1,
            message: format!(
                "the admin API at {address} answered {other} to POST /upgrade: {}",
                String::from_utf8_lossy(body).trim()
            ),
        }),
    }
}

/// Turns the admin API's answer into the command's output and exit code.
fn reload_outcome(address: &str, status: http::StatusCode, body: &[u8]) -> Result<String, Exit> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let findings = |field: &str, severity: &str| -> String {
        v[field]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| {
                        let (key, message, fix) = (
                            f["key"].as_str().unwrap_or(""),
                            f["message"].as_str().unwrap_or(""),
                            f["fix"].as_str().unwrap_or(""),
                        );
                        if fix.is_empty() {
                            format!("{severity}: {key}: {message}\n")
                        } else {
                            format!("{severity}: {key}: {message}; {fix}\n")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    match status.as_u16() {
        200 => {
            let changed: Vec<&str> = v["changed"]
                .as_array()
                .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
                .unwrap_or_default();
            let mut out = findings("warnings", "warning");
            if changed.is_empty() {
                out.push_str("reload ok: nothing changed\n");
            } else {
                out.push_str(&format!("reload ok: changed {}\n", changed.join(", ")));
            }
            Ok(out)
        }
        422 => Err(Exit {
            code: 78,
            message: format!(
                "reload refused; the server keeps serving its previous configuration:\n{}",
                findings("findings", "error")
            ),
        }),
        503 => Err(Exit {
            code: 69,
            message: format!("reload refused: {}", findings("findings", "error")),
        }),
        401 => Err(Exit {
            code: 1,
            message: format!(
                "the admin API at {address} requires a bearer token; pass --token-file, or -c with the server's configuration file"
            ),
        }),
        other => Err(Exit {
            code: 1,
            message: format!(
                "the admin API at {address} answered {other} to POST /reload: {}",
                String::from_utf8_lossy(body).trim()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn upgrade_answers_map_to_output_and_exit_codes() {
        let ok = br#"{"result":"ok","pid":42,"previous_pid":7}"#;
        assert_eq!(
            upgrade_outcome("a", StatusCode::OK, ok).unwrap(),
            "upgrade ok: pid 42 is serving; pid 7 is draining and will exit\n"
        );
        let failed = br#"{"result":"failed","reason":"pid 42 exited with status 78 (invalid configuration, certificate or key): bad","pid":7}"#;
        let e = upgrade_outcome("a", StatusCode::INTERNAL_SERVER_ERROR, failed).unwrap_err();
        assert_eq!(e.code, 1);
        assert_eq!(
            e.message,
            "upgrade failed; pid 7 keeps serving: pid 42 exited with status 78 (invalid configuration, certificate or key): bad"
        );
        let busy = br#"{"result":"refused","reason":"an upgrade is already in progress (new process pid 42); wait for its outcome"}"#;
        assert_eq!(upgrade_outcome("a", StatusCode::CONFLICT, busy).unwrap_err().code, 69);
        assert_eq!(upgrade_outcome("a", StatusCode::UNAUTHORIZED, b"").unwrap_err().code, 1);
        // An older server without the endpoint.
        let e = upgrade_outcome("a", StatusCode::NOT_FOUND, b"not found\n").unwrap_err();
        assert_eq!(e.code, 1);
        assert!(
            e.message.contains("answered 404 to POST /upgrade: not found"),
            "{}",
            e.message
        );
    }

    #[test]
    fn reload_answers_map_to_output_and_exit_codes() {
        let ok = br#"{"result":"ok","changed":["routes","timeouts"],"warnings":[{"key":"server.workers","message":"changed","fix":"restart"}]}"#;
        let out = reload_outcome("a", StatusCode::OK, ok).unwrap();
        assert_eq!(
            out,
            "warning: server.workers: changed; restart\nreload ok: changed routes, timeouts\n"
        );
        let same = br#"{"result":"ok","changed":[],"warnings":[]}"#;
        assert_eq!(
            reload_outcome("a", StatusCode::OK, same).unwrap(),
            "reload ok: nothing changed\n"
        );
        let refused =
            br#"{"result":"refused","findings":[{"key":"timeouts.idle","message":"must not be 0s","fix":""}]}"#;
        let e = reload_outcome("a", StatusCode::UNPROCESSABLE_ENTITY, refused).unwrap_err();
        assert_eq!(e.code, 78);
        assert!(
            e.message.contains("error: timeouts.idle: must not be 0s\n"),
            "{}",
            e.message
        );
        assert_eq!(
            reload_outcome("a", StatusCode::SERVICE_UNAVAILABLE, b"{}")
                .unwrap_err()
                .code,
            69
        );
        assert_eq!(reload_outcome("a", StatusCode::UNAUTHORIZED, b"").unwrap_err().code, 1);
        assert_eq!(
            reload_outcome("a", StatusCode::NOT_FOUND, b"not found")
                .unwrap_err()
                .code,
            1
        );
    }
}
