//! Process lifecycle: shutdown phases, draining, hot reload, signals, and systemd notifications.

mod drain;
pub mod reload;
mod shutdown;
mod signals;
pub mod systemd;

pub use drain::{drain, DrainReport, TaskCount, TaskGuard};
pub use reload::{Live, ReloadError, ReloadHook, ReloadReport, ReloadStage};
pub use shutdown::{Phase, Shutdown, ShutdownTrigger};
pub use signals::Signals;
