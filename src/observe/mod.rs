//! Observability: metrics, access log, diagnostic logging and run-time debug switches.

pub mod access_log;
pub mod logging;
pub mod metrics;
mod process;
pub mod redact;
mod switches;

pub use access_log::AccessLog;
pub use metrics::{Metrics, Name};
pub use switches::{PeerFilter, Switch, SwitchSet, Switches};
