//! Process lifecycle: shutdown phases, draining, signals, and systemd notifications.

mod drain;
mod shutdown;
pub mod systemd;

pub use drain::{drain, DrainReport};
pub use shutdown::{Phase, Shutdown, ShutdownTrigger};
