//! `sendfile(2)` for file responses on cleartext HTTP/1.1 connections.
//!
//! hyper writes a response body only from bytes in memory: its `Body` trait has no way to name a
//! file region, and it owns the socket while a response is being written. Copying a file through
//! user space cost as much CPU as everything else in a large download (two copies and a `memset`
//! per chunk; docs/performance.md). So a [`FileBody`](crate::http::body::FileBody) on such a
//! connection hands hyper, for each chunk, a *placeholder*: a slice of one static zeroed region,
//! of the chunk's length, and queues the chunk's real place in the file here, in
//! [`Splice`]. When hyper writes that placeholder, [`MeteredIo`](super::io::MeteredIo) recognises
//! its address and calls `sendfile` for the queued region instead: the kernel copies from the page
//! cache to the socket, and the placeholder's bytes are never read.
//!
//! Why this is sound:
//! - hyper copies no body bytes on a connection whose writes are queued rather than flattened, and
//!   gatehouse forces that strategy on every connection that may splice (`H1::build`); a
//!   `Content-Length` body (every file response has one) is written as given.
//! - A placeholder is written only where the queue says it belongs: its address must be the next
//!   unsent byte of the oldest queued region. Anything else fails the connection with an error
//!   rather than sending a byte that is not the file's.
//! - A chunk is spliced only when the page cache holds all of it (`cachestat(2)`), so `sendfile`
//!   does not wait for the disk on the connection's thread; any other chunk is read as before.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// The largest chunk spliced at once: the length of the placeholder region.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Never read: only its addresses matter. Zeroed, so that it costs no memory.
static PLACEHOLDER: [u8; MAX_CHUNK] = [0; MAX_CHUNK];

/// Whether `slice` lies in the placeholder region.
pub fn is_placeholder(slice: &[u8]) -> bool {
    let base = PLACEHOLDER.as_ptr() as usize;
    let p = slice.as_ptr() as usize;
    !slice.is_empty() && p >= base && p < base + MAX_CHUNK
}

/// A file region whose bytes hyper holds as a placeholder.
#[derive(Debug)]
struct Region {
    file: Arc<File>,
    offset: u64,
    len: usize,
    sent: usize,
}

/// One connection's file regions, queued by its response body and sent by its transport.
#[derive(Debug, Default)]
pub struct Splice {
    /// Set for a cleartext TCP transport, whose writes can go through `sendfile`.
    enabled: AtomicBool,
    queue: Mutex<VecDeque<Region>>,
    /// Bytes sent with `sendfile` (part of the connection's bytes out).
    sent: AtomicU64,
}

impl Splice {
    pub(super) fn enable(&self) {
        self.enabled.store(true, Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// Bytes this connection has sent with `sendfile`.
    pub fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    /// Queues `len` bytes of `file` from `offset` (at most [`MAX_CHUNK`]) and returns the
    /// placeholder to hand hyper in their place.
    pub fn push(&self, file: Arc<File>, offset: u64, len: usize) -> bytes::Bytes {
        debug_assert!(len > 0 && len <= MAX_CHUNK);
        self.lock().push_back(Region {
            file,
            offset,
            len,
            sent: 0,
        });
        bytes::Bytes::from_static(&PLACEHOLDER[..len])
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Region>> {
        // Poisoned only by a panic between two plain field updates: the queue is intact.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the bytes that `placeholder` (which [`is_placeholder`]) stands for, as far as the
    /// socket takes them now.
    pub(super) fn poll_send<T: SpliceTarget>(
        &self,
        target: &T,
        cx: &mut Context<'_>,
        placeholder: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut queue = self.lock();
        let Some(front) = queue.front_mut() else {
            return Poll::Ready(Err(mismatch("no file region is queued")));
        };
        let at = placeholder.as_ptr() as usize - PLACEHOLDER.as_ptr() as usize;
        if at != front.sent || placeholder.len() > front.len - front.sent {
            return Poll::Ready(Err(mismatch("it is not the next unsent part of the queued region")));
        }
        let n = std::task::ready!(target.poll_sendfile(
            cx,
            &front.file,
            front.offset + front.sent as u64,
            placeholder.len()
        ))?;
        front.sent += n;
        self.sent.fetch_add(n as u64, Relaxed);
        if front.sent == front.len {
            queue.pop_front();
        }
        Poll::Ready(Ok(n))
    }
}

fn mismatch(why: &str) -> io::Error {
    tracing::error!("a file response's placeholder reached the socket out of place ({why}); closing the connection");
    io::Error::other(format!("sendfile placeholder out of place: {why}"))
}

/// A transport that can send file bytes itself.
pub trait SpliceTarget {
    /// `sendfile` of up to `len` bytes of `file` from `offset`; `Ok(0)` if the file ends there.
    fn poll_sendfile(&self, cx: &mut Context<'_>, file: &File, offset: u64, len: usize) -> Poll<io::Result<usize>>;
}

impl SpliceTarget for tokio::net::TcpStream {
    fn poll_sendfile(&self, cx: &mut Context<'_>, file: &File, offset: u64, len: usize) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_write_ready(cx))?;
            let res = self.try_io(tokio::io::Interest::WRITABLE, || {
                let mut off = offset;
                rustix::fs::sendfile(self, file, Some(&mut off), len).map_err(io::Error::from)
            });
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return Poll::Ready(res),
            }
        }
    }
}

impl SpliceTarget for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    /// Never called: a TLS connection never enables its [`Splice`].
    fn poll_sendfile(&self, _: &mut Context<'_>, _: &File, _: u64, _: usize) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(mismatch("the connection is TLS")))
    }
}

/// How much of `len` bytes of `file` from `offset` the page cache holds.
pub enum InCache {
    All,
    NotAll,
    /// This kernel has no `cachestat(2)` (before Linux 6.5), or this file system none.
    Unknown,
}

/// Asks the page cache (`cachestat(2)`), without reading or mapping the file.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // One raw syscall: neither rustix nor std wraps cachestat(2).
pub fn cached(file: &File, offset: u64, len: usize) -> InCache {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The number is the same on every architecture (added after the tables were unified); the
    // libc crate does not name it for all of them yet.
    const SYS_CACHESTAT: libc::c_long = 451;
    const PAGE: u64 = 4096;
    let first = offset / PAGE * PAGE;
    let range = Range {
        off: first,
        len: offset + len as u64 - first,
    };
    let mut stat = Stat::default();
    // SAFETY: the descriptor is open for the call, both structs match the kernel's layout
    // (`struct cachestat_range`, `struct cachestat`) and outlive it, and flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        static SAID: std::sync::Once = std::sync::Once::new();
        let e = io::Error::last_os_error();
        SAID.call_once(|| {
            tracing::warn!(
                error = %e,
                "sendfile is off for file responses: the kernel cannot say what the page cache holds (cachestat(2) needs Linux 6.5); files are read and copied instead"
            )
        });
        return InCache::Unknown;
    }
    let pages = range.len.div_ceil(PAGE);
    if stat.nr_cache >= pages {
        InCache::All
    } else {
        InCache::NotAll
    }
}

#[cfg(not(target_os = "linux"))]
pub fn cached(_: &File, _: u64, _: usize) -> InCache {
    InCache::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_placeholder_is_sent_as_the_file_and_out_of_place_it_is_refused() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&content).expect("write");
        let file = Arc::new(f);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");

        let splice = Splice::default();
        let placeholder = splice.push(file.clone(), 1000, 150_000);
        assert!(is_placeholder(&placeholder));
        assert!(!is_placeholder(b"head"));
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        let mut rest = &placeholder[..];
        while !rest.is_empty() {
            let n = std::future::poll_fn(|cx| splice.poll_send(&server, cx, rest))
                .await
                .expect("sendfile");
            assert!(n > 0);
            rest = &rest[n..];
        }
        assert!(splice.lock().is_empty(), "a region sent whole leaves the queue");
        assert_eq!(splice.sent(), 150_000);
        // With nothing queued, or out of order, a placeholder is refused and nothing is sent.
        let err = std::future::poll_fn(|cx| splice.poll_send(&server, cx, &placeholder[..10]))
            .await
            .expect_err("nothing queued");
        assert!(err.to_string().contains("placeholder out of place"), "{err}");
        let again = splice.push(file.clone(), 0, 100);
        let err = std::future::poll_fn(|cx| splice.poll_send(&server, cx, &again[1..]))
            .await
            .expect_err("not the next byte");
        assert!(err.to_string().contains("placeholder out of place"), "{err}");
        let mut server = server;
        server.shutdown().await.expect("shutdown");
        drop(server);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), 150_000);
        assert!(got == content[1000..151_000], "the file's bytes, not the placeholder's");
    }

    #[test]
    fn the_page_cache_is_asked_about_whole_pages() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(&[1u8; 3 * 4096 + 10]).expect("write");
        // Just written, so cached (or the kernel cannot say).
        assert!(matches!(cached(&f, 100, 3 * 4096), InCache::All | InCache::Unknown));
    }
}
