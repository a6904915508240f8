//! The `static` handler's open-file cache: hot small files answered from memory, checked again after `validity`.
//!
//! Without it every static request costs a trip through tokio's blocking pool (path resolution,
//! `open`, `fstat`, `read`), which is two cross-thread wake-ups and most of the CPU a small
//! response costs. nginx's `open_file_cache` makes the same trade: a file changed or deleted on
//! disk is seen at the latest `validity` after its entry was last checked.

use super::static_files::FileMeta;
use crate::config::StaticCacheConfig;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounded map from request path (below the route prefix, as sent) to a resolved small file.
#[derive(Debug)]
pub(super) struct FileCache {
    max_entries: usize,
    max_bytes: u64,
    max_file_size: u64,
    validity: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Box<str>, Entry>,
    /// Sum of `Entry::cost` over `entries`.
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    meta: Arc<FileMeta>,
    body: Bytes,
    checked: Instant,
}

impl Entry {
    /// Contents plus key: a client choosing long distinct paths must not escape the byte budget.
    fn cost(key: &str, body: &Bytes) -> u64 {
        (key.len() + body.len()) as u64
    }
}

impl FileCache {
    /// None when the configuration turns the cache off (`max_entries = 0`).
    pub(super) fn new(config: &StaticCacheConfig) -> Option<FileCache> {
        (config.max_entries > 0).then(|| FileCache {
            max_entries: config.max_entries,
            max_bytes: config.max_bytes.0,
            max_file_size: config.max_file_size.0,
            validity: config.validity.get(),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Files up to this size are read whole during resolution, so that they can be cached.
    pub(super) fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    /// The cached file for `key` if it was checked within `validity` of `now`.
    pub(super) fn fresh(&self, key: &str, now: Instant) -> Option<(Arc<FileMeta>, Bytes)> {
        let inner = self.lock();
        let e = inner.entries.get(key)?;
        (now.saturating_duration_since(e.checked) < self.validity).then(|| (e.meta.clone(), e.body.clone()))
    }

    /// Records a file just resolved from disk, evicting entries to stay within the bounds.
    pub(super) fn insert(&self, key: &str, meta: Arc<FileMeta>, body: Bytes, now: Instant) {
        let cost = Entry::cost(key, &body);
        if body.len() as u64 > self.max_file_size || cost > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        inner.remove(key);
        if inner.entries.len() >= self.max_entries || inner.bytes + cost > self.max_bytes {
            // Expired entries go first: they would each cost a file system check anyway.
            let validity = self.validity;
            let Inner { entries, bytes } = &mut *inner;
            entries.retain(|k, e| {
                let keep = now.saturating_duration_since(e.checked) < validity;
                if !keep {
                    *bytes -= Entry::cost(k, &e.body);
                }
                keep
            });
        }
        while inner.entries.len() >= self.max_entries || inner.bytes + cost > self.max_bytes {
            // Still full of fresh entries: drop arbitrary ones. A scan of many distinct files
            // churns the cache either way; what matters is that memory stays bounded.
            let Some(victim) = inner.entries.keys().next().cloned() else {
                break;
            };
            inner.remove(&victim);
        }
        inner.bytes += cost;
        inner.entries.insert(
            key.into(),
            Entry {
                meta,
                body,
                checked: now,
            },
        );
    }

    /// Forgets `key`: the path no longer names a small regular file.
    pub(super) fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map is consistent after every statement that can panic, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn usage(&self) -> (usize, u64) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= Entry::cost(key, &old.body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Size, Span};

    fn cache(max_entries: usize, max_bytes: u64) -> FileCache {
        FileCache::new(&StaticCacheConfig {
            max_entries,
            max_file_size: Size(64),
            max_bytes: Size(max_bytes),
            validity: Span::secs(1),
        })
        .expect("enabled")
    }

    fn meta() -> Arc<FileMeta> {
        Arc::new(FileMeta::for_test())
    }

    #[test]
    fn off_when_no_entries() {
        let c = StaticCacheConfig {
            max_entries: 0,
            ..StaticCacheConfig::default()
        };
        assert!(FileCache::new(&c).is_none());
    }

    #[test]
    fn fresh_until_validity_passes() {
        let c = cache(8, 1024);
        let t0 = Instant::now();
        c.insert("/a", meta(), Bytes::from_static(b"aaaa"), t0);
        assert_eq!(
            c.fresh("/a", t0 + Duration::from_millis(999)).map(|e| e.1),
            Some(Bytes::from_static(b"aaaa"))
        );
        assert!(c.fresh("/a", t0 + Duration::from_secs(1)).is_none());
        assert!(c.fresh("/b", t0).is_none());
        c.remove("/a");
        assert!(c.fresh("/a", t0).is_none());
        assert_eq!(c.usage(), (0, 0));
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let c = cache(3, 40);
        let t0 = Instant::now();
        for k in ["/1", "/2", "/3", "/4", "/5"] {
            c.insert(k, meta(), Bytes::from_static(b"12345678"), t0);
        }
        let (n, bytes) = c.usage();
        assert_eq!(n, 3);
        assert_eq!(bytes, 30);
        // A 30-byte body needs room: entries are evicted until it fits in 40 bytes.
        c.insert("/big", meta(), Bytes::from(vec![0u8; 30]), t0);
        let (n, bytes) = c.usage();
        assert!(bytes <= 40, "{bytes}");
        assert!(n <= 2);
        assert!(c.fresh("/big", t0).is_some());
        // Larger than max_file_size: not cached.
        c.insert("/huge", meta(), Bytes::from(vec![0u8; 65]), t0);
        assert!(c.fresh("/huge", t0).is_none());
    }

    #[test]
    fn expired_entries_are_evicted_first() {
        let c = cache(2, 1024);
        let t0 = Instant::now();
        c.insert("/old", meta(), Bytes::from_static(b"o"), t0);
        let t1 = t0 + Duration::from_secs(2);
        c.insert("/new", meta(), Bytes::from_static(b"n"), t1);
        c.insert("/newer", meta(), Bytes::from_static(b"n"), t1);
        assert!(c.fresh("/new", t1).is_some());
        assert!(c.fresh("/newer", t1).is_some());
        assert_eq!(c.usage().0, 2);
    }

    #[test]
    fn replacing_an_entry_keeps_the_accounting() {
        let c = cache(4, 1024);
        let t0 = Instant::now();
        c.insert("/a", meta(), Bytes::from_static(b"1234"), t0);
        c.insert("/a", meta(), Bytes::from_static(b"12"), t0);
        assert_eq!(c.usage(), (1, 4));
    }
}
