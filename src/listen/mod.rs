//! Listening sockets: binding, socket activation, the set in force, the accept loop, and
//! connection limits.

mod acceptor;
#[allow(unsafe_code)]
pub mod inherit;
mod limits;
mod set;

pub use acceptor::{AcceptErrors, Acceptor};
pub use limits::{Admission, ConnLimits};
pub use set::{BoundListener, ClosingListener, ListenerCommon, ListenerSet, Origin, StartAccepting};

use crate::conn::{serve_connection_holding, ListenerShared};
use crate::http::{HttpService, ServiceBody};
use crate::observe::Switch;
use std::net::SocketAddr;
use std::sync::Arc;

/// Kernel accept queue length: absorbs bursts while workers are busy (nginx uses 511).
const BACKLOG: i32 = 1024;

/// Why a listener could not be bound (exit code 69).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} (listener `{listener}`): {reason}; {fix}")]
pub struct BindError {
    pub listener: String,
    pub address: SocketAddr,
    pub reason: String,
    pub fix: &'static str,
}

/// Binds `address` for listener `name`: non-blocking, SO_REUSEADDR (so a restart does not wait for
/// TIME_WAIT), not SO_REUSEPORT (a second server on the same port must fail loudly, not share it).
pub fn bind(name: &str, address: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    use socket2::{Domain, Socket, Type};
    let err = |e: std::io::Error| {
        let (reason, fix) = match e.kind() {
            std::io::ErrorKind::AddrInUse => (
                "address already in use".to_string(),
                "stop the other process on that port (see `ss -ltnp`) or choose another address",
            ),
            std::io::ErrorKind::PermissionDenied => (
                "permission denied".to_string(),
                "ports below 1024 need root or CAP_NET_BIND_SERVICE; use a higher port or grant the capability",
            ),
            std::io::ErrorKind::AddrNotAvailable => (
                "address not available on this host".to_string(),
                "use an address assigned to a local interface, or 0.0.0.0",
            ),
            _ => (e.to_string(), "check the address"),
        };
        BindError {
            listener: name.to_string(),
            address,
            reason,
            fix,
        }
    };
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None).map_err(err)?;
    if address.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&address.into()).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)?;
    Ok(socket.into())
}

/// Accepts connections until draining begins (or a binary upgrade hands the socket over),
/// serving each with `svc` on the current runtime.
/// Accept errors never end the loop; [`Acceptor`] explains how each is handled.
pub async fn accept_loop<S, B>(mut acceptor: Acceptor, shared: Arc<ListenerShared>, limits: Arc<ConnLimits>, svc: S)
where
    S: HttpService<B>,
    B: ServiceBody,
{
    while let Some((tcp, peer)) = acceptor.next(shared.shutdown.stop_accepting()).await {
        shared
            .metrics
            .connections_accepted
            .get_or_create(&crate::observe::metrics::ListenerLabels {
                listener: shared.name.clone(),
            })
            .inc();
        let permit = match limits.admit(peer.ip()) {
            Admission::Admitted(p) => p,
            Admission::Refused(reason) => {
                shared.metrics.rejected(&shared.name, reason);
                shared.debug.event(Switch::Accept, &shared.name.0, peer, || {
                    format!("refused {peer}: {reason}")
                });
                drop(tcp);
                continue;
            }
        };
        shared
            .debug
            .event(Switch::Accept, &shared.name.0, peer, || format!("accepted {peer}"));
        let open = shared.open.enter();
        let shared = shared.clone();
        let svc = svc.clone();
        tokio::spawn(serve_connection_holding(tcp, peer, shared, svc, (permit, open)));
    }
    tracing::debug!(listener = %shared.name.0, "stopped accepting");
}
