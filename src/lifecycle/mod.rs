//! Process lifecycle: shutdown phases, draining, hot reload, and signals.

mod drain;
pub mod reload;
mod shutdown;
mod signals;

pub use drain::{drain, DrainReport};
pub use reload::{Live, ReloadError, ReloadHook, ReloadReport, ReloadStage};
pub use shutdown::{Phase, Shutdown, ShutdownTrigger};
pub use signals::Signals;
