//! Process lifecycle: shutdown phases, draining, and signals.

mod drain;
mod shutdown;

pub use drain::{drain, DrainReport};
pub use shutdown::{Phase, Shutdown, ShutdownTrigger};
