//! Process lifecycle: shutdown phases, draining, hot reload, binary upgrade, signals, and systemd
//! notifications.

mod drain;
pub mod reload;
mod shutdown;
mod signals;
pub mod systemd;
pub mod upgrade;

pub use drain::{drain, DrainReport, TaskCount, TaskGuard};
pub use reload::{Live, ReloadError, ReloadHook, ReloadReport, ReloadStage, ReloadTrigger};
pub use shutdown::{Owed, OwedGuard, Phase, Shutdown, ShutdownTrigger};
pub use signals::Signals;
pub use upgrade::{UpgradeError, UpgradeReport};
