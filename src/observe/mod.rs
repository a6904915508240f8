//! Observability: metrics, access log, diagnostic logging, run-time debug switches and tracing.

pub mod access_log;
pub mod logging;
pub mod metrics;
pub mod otel;
mod process;
pub mod redact;
mod switches;

pub use access_log::AccessLog;
pub use metrics::{Metrics, Name};
pub use otel::{TraceContext, Tracer};
pub use switches::{PeerFilter, Switch, SwitchSet, Switches};
