//! Process signals: SIGTERM and SIGINT stop, SIGHUP reloads, SIGUSR2 starts a binary upgrade.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals the server acts on. Installed before the startup report is printed and before any
/// listener accepts (see `Server::with_announcement`), so before readiness too: until then SIGHUP's
/// default action would kill the process, so a reload sent right after startup must find these.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr2: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for SIGTERM or SIGINT. Each SIGHUP meanwhile calls `reload`, and each SIGUSR2
    /// `upgrade`; both should start their work and return at once, so a stop signal is never held
    /// up behind it.
    pub async fn stop_requested(&mut self, reload: &impl Fn(), upgrade: &impl Fn()) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return tracing::info!(signal = "SIGTERM", "shutdown requested"),
                _ = self.int.recv() => return tracing::info!(signal = "SIGINT", "shutdown requested"),
                _ = self.hup.recv() => {
                    tracing::info!(signal = "SIGHUP", "reload requested");
                    reload();
                }
                _ = self.usr2.recv() => {
                    tracing::info!(signal = "SIGUSR2", "binary upgrade requested");
                    upgrade();
                }
            }
        }
    }
}
