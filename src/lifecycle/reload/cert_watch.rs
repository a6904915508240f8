//! Certificate file watching (`server.watch_certificates`): reloads the certificates when the
//! files of a TLS listener change, then stay unchanged for one interval.
//!
//! It polls rather than subscribing to inotify or kqueue events, on purpose:
//! - a Kubernetes Secret volume updates by swapping a `..data` symlink to a new directory: the
//!   watched file's inode never sees an event, and watching the directory means following renames
//!   of paths the configuration does not name;
//! - network filesystems and many bind mounts deliver no events at all;
//! - it needs no platform code and no dependency, and stays correct when a watch would have been
//!   lost (a directory deleted and recreated by a deployment tool).
//!
//! Its cost is a `stat` and a read of a few small files per interval. Each file's fingerprint is
//! its metadata (device, inode, size, modification time) *and* a hash of its content: the inode
//! catches symlink swaps and renames, the content catches an editor rewriting the file in place
//! within one timestamp tick.
//!
//! A change is applied only once the fingerprint has stayed the same for a whole interval, so a
//! certificate and key written one after the other are loaded together, not as a mismatched pair.
//! The reload is an ordinary one of the configuration in force (not of the file on disk, which may
//! hold unrelated edits nobody asked to apply yet): the same validation, counted in
//! `gatehouse_reloads_total` and logged with `trigger="cert_watch"`. A broken or mismatched pair
//! is refused and the old certificate keeps serving; the watcher tries again on the next change.

use super::{Live, ReloadStage, ReloadTrigger};
use crate::config::Config;
use crate::lifecycle::Shutdown;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

/// Watches the certificate files of `live`'s configuration until the server drains. Idle while
/// `server.watch_certificates` is unset; a reload that sets or clears it takes effect at once.
pub async fn run(live: Arc<Live>, shutdown: Shutdown) {
    let reloaded = Arc::new(tokio::sync::Notify::new());
    let wake = reloaded.clone();
    live.add_hook(Arc::new(move |stage| {
        if let ReloadStage::Finished(_) = stage {
            wake.notify_one();
        }
    }));
    let mut watch = Watch::default();
    // The load the watcher's baseline comes from: each reload (whatever its trigger) that loads
    // certificates records what it read, and that becomes the baseline.
    let mut baseline: Option<Arc<CertFiles>> = None;
    loop {
        let config = live.config();
        let Some(every) = config.server.watch_certificates else {
            watch = Watch::default();
            baseline = None;
            tokio::select! {
                _ = reloaded.notified() => continue,
                _ = shutdown.stop_accepting() => return,
            }
        };
        let loaded = live.loaded_cert_files();
        if !same_load(&loaded, &baseline) {
            watch = loaded.as_deref().cloned().map_or(Watch::Unknown, Watch::Steady);
            baseline = loaded;
        }
        let files = watched_files(&config);
        if files.is_empty() {
            watch = Watch::default();
        } else {
            // Reading and hashing files blocks; it must not hold up the runtime's other tasks.
            let seen = match tokio::task::spawn_blocking(move || CertFiles::of_paths(files)).await {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::error!(error = %e, "certificate watch: reading the files failed");
                    None
                }
            };
            if let Some(stable) = seen.and_then(|seen| watch.observe(seen)) {
                tracing::info!(
                    trigger = ReloadTrigger::CertWatch.as_str(),
                    files = %stable.describe(),
                    "certificate files changed; reloading certificates"
                );
                // Logged and counted by the reload; the watcher only needs it to be over.
                let _ = live.reload(Some((*config).clone()), ReloadTrigger::CertWatch).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every.get()) => {}
            _ = shutdown.stop_accepting() => return,
        }
    }
}

/// Whether `a` and `b` are the same load (not merely equal files: each load is its own baseline).
fn same_load(a: &Option<Arc<CertFiles>>, b: &Option<Arc<CertFiles>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Every certificate and key file of every TLS listener, sorted, without duplicates.
/// Self-signed certificates are gatehouse's own: nobody replaces them behind its back.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for tls in config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        if tls.self_signed.is_none() {
            files.extend(tls.cert.iter().cloned());
            files.extend(tls.key.iter().cloned());
        }
        for pair in &tls.certificates {
            files.push(pair.cert.clone());
            files.push(pair.key.clone());
        }
    }
    files.sort();
    files.dedup();
    files
}

/// What the watched files of a configuration look like at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    files: Vec<(PathBuf, FileState)>,
}

/// One file's identity and content, or why it could not be read (a file that disappears is a
/// change too: the reload then says what is missing).
#[derive(Clone, Debug, PartialEq, Eq)]
enum FileState {
    Present {
        dev: u64,
        ino: u64,
        len: u64,
        modified: Option<std::time::SystemTime>,
        /// Compared only within this process, so std's hasher (SipHash) is enough: the point is
        /// noticing an edit, not resisting someone who can already write the key file.
        content: u64,
    },
    Unreadable(std::io::ErrorKind),
}

impl CertFiles {
    /// Looks at the certificate and key files of `config` now. Blocks on the filesystem.
    pub fn of(config: &Config) -> CertFiles {
        CertFiles::of_paths(watched_files(config))
    }

    fn of_paths(paths: Vec<PathBuf>) -> CertFiles {
        use std::os::unix::fs::MetadataExt;
        let files = paths
            .into_iter()
            .map(|path| {
                // `metadata` and `read` follow symlinks: a swapped link shows as another inode.
                let state = match std::fs::metadata(&path).and_then(|m| Ok((m, std::fs::read(&path)?))) {
                    Ok((meta, bytes)) => {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        bytes.hash(&mut h);
                        FileState::Present {
                            dev: meta.dev(),
                            ino: meta.ino(),
                            len: meta.len(),
                            modified: meta.modified().ok(),
                            content: h.finish(),
                        }
                    }
                    Err(e) => FileState::Unreadable(e.kind()),
                };
                (path, state)
            })
            .collect();
        CertFiles { files }
    }

    fn same_files(&self, other: &CertFiles) -> bool {
        self.files.len() == other.files.len() && self.files.iter().zip(&other.files).all(|(a, b)| a.0 == b.0)
    }

    /// The watched files, for the log.
    fn describe(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The watcher's state: what is in force, and a change waiting to settle.
#[derive(Debug, Default)]
enum Watch {
    /// No baseline yet: the next look becomes it (a server whose start did not record one).
    #[default]
    Unknown,
    /// The files match what was last loaded (or last tried).
    Steady(CertFiles),
    /// The files differ from what was loaded; `seen` is how they looked at the last look.
    Settling { loaded: CertFiles, seen: CertFiles },
}

impl Watch {
    /// Takes one look; returns the fingerprint to reload when a change has settled.
    fn observe(&mut self, now: CertFiles) -> Option<CertFiles> {
        let (next, reload) = match std::mem::take(self) {
            // The first look, or a reload changed which files are watched: that reload (or the
            // start) has just loaded them, so this is the baseline.
            Watch::Unknown => (Watch::Steady(now), None),
            Watch::Steady(loaded) | Watch::Settling { loaded, .. } if !loaded.same_files(&now) => {
                (Watch::Steady(now), None)
            }
            Watch::Steady(loaded) if loaded == now => (Watch::Steady(loaded), None),
            Watch::Steady(loaded) => (Watch::Settling { loaded, seen: now }, None),
            Watch::Settling { loaded, .. } if loaded == now => (Watch::Steady(loaded), None),
            // Unchanged for a whole interval: written completely. Whatever the reload's outcome,
            // this is what was tried, so a refused pair is retried only once the files change again.
            Watch::Settling { seen, .. } if seen == now => (Watch::Steady(now.clone()), Some(now)),
            Watch::Settling { loaded, .. } => (Watch::Settling { loaded, seen: now }, None),
        };
        *self = next;
        reload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(content: u64) -> CertFiles {
        CertFiles {
            files: vec![(
                PathBuf::from("c.pem"),
                FileState::Present {
                    dev: 1,
                    ino: 2,
                    len: 3,
                    modified: None,
                    content,
                },
            )],
        }
    }

    #[test]
    fn a_change_reloads_once_it_has_stayed_the_same_for_an_interval() {
        let mut w = Watch::default();
        assert_eq!(w.observe(print(1)), None, "the first look is the baseline");
        assert_eq!(w.observe(print(1)), None);
        assert_eq!(w.observe(print(2)), None, "just written: wait for it to settle");
        assert_eq!(w.observe(print(3)), None, "still being written");
        assert_eq!(w.observe(print(3)), Some(print(3)));
        assert_eq!(w.observe(print(3)), None, "applied (or refused) once, not again");
        // A change that is undone before it settles reloads nothing.
        assert_eq!(w.observe(print(4)), None);
        assert_eq!(w.observe(print(3)), None);
        assert_eq!(w.observe(print(3)), None);
    }

    #[test]
    fn a_different_set_of_files_is_a_new_baseline() {
        let mut w = Watch::default();
        w.observe(print(1));
        let mut other = print(1);
        other.files[0].0 = PathBuf::from("d.pem");
        assert_eq!(w.observe(other.clone()), None);
        assert_eq!(w.observe(other), None);
    }

    #[test]
    fn content_and_identity_are_both_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pem");
        std::fs::write(&path, "one").unwrap();
        let first = CertFiles::of_paths(vec![path.clone()]);
        assert_eq!(first, CertFiles::of_paths(vec![path.clone()]));
        // Same length, rewritten in place: the content hash differs even if the clock did not tick.
        std::fs::write(&path, "two").unwrap();
        let second = CertFiles::of_paths(vec![path.clone()]);
        assert_ne!(first, second);
        // Replaced through a rename, as a symlink swap or certbot does: another inode.
        let tmp = dir.path().join("new.pem");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_ne!(second, CertFiles::of_paths(vec![path.clone()]));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            CertFiles::of_paths(vec![path]).files[0].1,
            FileState::Unreadable(std::io::ErrorKind::NotFound)
        ));
    }
}
