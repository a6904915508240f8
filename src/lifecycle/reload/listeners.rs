//! Listener changes of a reload: binding new sockets before anything changes, putting new
//! listeners in force, and taking retiring ones out of service.

use super::{ListenerChange, Live, Plan, ReloadError, Staged};
use crate::config::{Config, Findings};
use crate::conn::ConnSettings;
use crate::listen::{self, BoundListener, ClosingListener, Origin};
use crate::tls::TlsServer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The listeners a reload added, removed, moved, or switched between TLS and cleartext.
/// Addresses are the bound ones (the real port when configured with port 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerReport {
    pub added: Vec<ListenerAt>,
    /// No longer accepting; their connections drain within `shutdown.drain_timeout`.
    pub removed: Vec<ListenerAt>,
    pub moved: Vec<ListenerMove>,
    /// Same address, TLS turned on or off: a new listener took over the socket.
    pub switched: Vec<ListenerAt>,
}

impl ListenerReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.moved.is_empty() && self.switched.is_empty()
    }
}

impl std::fmt::Display for ListenerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let list = |v: &[ListenerAt]| {
            v.iter()
                .map(|l| format!("{} ({})", l.name, l.address))
                .collect::<Vec<_>>()
        };
        if !self.added.is_empty() {
            parts.push(format!("added {}", list(&self.added).join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", list(&self.removed).join(", ")));
        }
        if !self.moved.is_empty() {
            let moved: Vec<_> = self
                .moved
                .iter()
                .map(|m| format!("{} ({} -> {})", m.name, m.from, m.to))
                .collect();
            parts.push(format!("moved {}", moved.join(", ")));
        }
        if !self.switched.is_empty() {
            parts.push(format!("switched TLS on {}", list(&self.switched).join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

/// A listener and the address it is (or was) bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerAt {
    pub name: String,
    pub address: SocketAddr,
}

/// A listener that left one address for another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerMove {
    pub name: String,
    pub from: SocketAddr,
    pub to: SocketAddr,
}

impl Live {
    /// Binds (or takes over) the socket of every listener the plan adds, moves or switches. Any
    /// failure refuses the whole reload, naming the listener, the address and the OS's reason;
    /// the sockets already opened are closed as they drop.
    pub(super) fn open_sockets(&self, s: &Staged) -> Result<Vec<(usize, std::net::TcpListener, Origin)>, ReloadError> {
        let mut findings = Findings::default();
        let mut sockets = Vec::new();
        let retiring: Vec<&str> = s.plan.retiring(&s.config).collect();
        for change in &s.plan.listeners {
            let Some(i) = change.new_index() else { continue };
            let Some(l) = s.config.listeners.get(i) else { continue };
            let key = format!("listeners[{i}].address");
            if let ListenerChange::Moved { from, .. } = change {
                if matches!(self.listeners.origin(&l.name), Some((Origin::Inherited, _))) {
                    findings.error(
                        key,
                        format!(
                            "listener `{}` would move from {from} to {}, but its socket came from socket \
                             activation (LISTEN_FDS): only the service manager can bind its address",
                            l.name, l.address
                        ),
                        "change ListenStream= in the .socket unit and restart the socket and gatehouse, \
                         or keep this address to reload the rest",
                    );
                    continue;
                }
            }
            // The same address held by a listener going out of service (renamed, or switching
            // between TLS and cleartext): binding it again would fail while that socket is open,
            // so the new listener accepts on it instead. Port 0 asks for a fresh port, except for
            // the listener's own socket.
            let donor = retiring.iter().copied().find_map(|name| {
                let (origin, configured) = self.listeners.origin(name)?;
                let same = configured == l.address && (configured.port() != 0 || name == l.name);
                same.then_some((name, origin))
            });
            match donor {
                Some((name, origin)) => match self.listeners.dup_socket(name) {
                    Some(Ok(socket)) => sockets.push((i, socket, origin)),
                    Some(Err(e)) => findings.error(
                        key,
                        format!("cannot share the socket of listener `{name}` on {}: {e}", l.address),
                        "free file descriptors (see limits.max_connections and `ulimit -n`), then reload again",
                    ),
                    None => findings.error(key, format!("listener `{name}` is no longer in force"), ""),
                },
                None => match listen::bind(&l.name, l.address) {
                    Ok(socket) => sockets.push((i, socket, Origin::Bound)),
                    Err(e) => findings.error(
                        key,
                        format!(
                            "cannot listen on {} (listener `{}`): {}",
                            e.address, e.listener, e.reason
                        ),
                        e.fix,
                    ),
                },
            }
        }
        if findings.has_errors() {
            return Err(ReloadError::Invalid(findings));
        }
        Ok(sockets)
    }

    /// Puts the new listeners in force on `sockets` and takes the retiring ones out of the set.
    pub(super) fn swap_listeners(
        &self,
        plan: &Plan,
        config: &Config,
        mut tls: Vec<Option<TlsServer>>,
        sockets: Vec<(usize, std::net::TcpListener, Origin)>,
        settings: &Arc<ConnSettings>,
    ) -> (ListenerReport, Vec<ClosingListener>, Findings) {
        let mut report = ListenerReport::default();
        let mut warnings = Findings::default();
        let retired: Vec<BoundListener> = plan
            .retiring(config)
            .filter_map(|name| self.listeners.remove(name))
            .collect();
        let was: HashMap<&str, SocketAddr> = retired
            .iter()
            .map(|l| (l.name(), l.socket.local_addr().unwrap_or(l.configured)))
            .collect();
        let access_log = self.access_log.load_full();
        for (i, socket, origin) in sockets {
            let Some(l) = config.listeners.get(i) else { continue };
            let address = socket.local_addr().unwrap_or(l.address);
            let tls = tls.get_mut(i).and_then(Option::take);
            self.listeners.insert(BoundListener::new(
                l,
                socket,
                origin,
                tls,
                settings.clone(),
                access_log.clone(),
                &self.common,
            ));
            let at = ListenerAt {
                name: l.name.clone(),
                address,
            };
            match plan.listeners.iter().find(|c| c.new_index() == Some(i)) {
                Some(ListenerChange::Moved { from, .. }) => report.moved.push(ListenerMove {
                    from: was.get(l.name.as_str()).copied().unwrap_or(*from),
                    name: at.name,
                    to: at.address,
                }),
                Some(ListenerChange::Switched { .. }) => report.switched.push(at),
                _ => report.added.push(at),
            }
        }
        for change in &plan.listeners {
            if let ListenerChange::Removed { name, address } = change {
                report.removed.push(ListenerAt {
                    name: name.clone(),
                    address: was.get(name.as_str()).copied().unwrap_or(*address),
                });
            }
        }
        for l in retired.iter().filter(|l| l.origin == Origin::Inherited) {
            if !config.listeners.iter().any(|n| n.name == l.name()) {
                warnings.warning(
                    "listeners",
                    format!(
                        "listener `{}` was removed, but its socket came from socket activation: the \
                         service manager still holds {} open, and connections to it wait unanswered",
                        l.name(),
                        l.configured
                    ),
                    "remove its ListenStream= from the .socket unit too",
                );
            }
        }
        let closing = retired.into_iter().map(BoundListener::close).collect();
        (report, closing, warnings)
    }
}
