//! Connections: protocol selection, lifecycle state, timeouts and the registry of open connections.

mod context;
mod h1;
pub mod h2c;
mod h2frames;
mod h2watch;
mod io;
mod parse_error;
mod registry;
pub mod sendfile;
mod serve;
mod state;
mod timer;
mod watchdog;

pub use context::{ConnSettings, ConnShared, ListenerShared, PendingH2c, ProtocolPolicy, UpgradeGate};
pub use registry::{ConnInfo, Registry, TlsSummary};
pub use serve::serve_connection;
pub(crate) use serve::serve_connection_holding;
pub use state::{CloseReason, ConnState, Protocol};
