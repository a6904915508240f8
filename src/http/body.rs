//! Body types: what gatehouse's own handlers answer with, and what request handlers read.

use crate::conn::{sendfile, ConnInfo};
use bytes::Bytes;
use bytes::BytesMut;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Chunk size for file bodies: large enough for few syscalls, small enough to interleave h2 streams.
const FILE_CHUNK: usize = 64 * 1024;

/// The response body of gatehouse's built-in handlers. An enum rather than a boxed trait object,
/// so that the common cases (empty, one buffer, a file) cost no allocation or dynamic dispatch.
pub enum ResponseBody {
    Empty,
    Full(Option<Bytes>),
    File(FileBody),
    /// A proxied upstream response, streamed as it arrives (trailers included). Boxed: inline, it
    /// made every response 104 bytes larger (272 rather than 168), and a response is moved about
    /// twenty times between the handler and hyper's encoder, a `memcpy` each on every route.
    Upstream(Box<crate::proxy::UpstreamBody>),
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody::Empty
    }
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            ResponseBody::Empty
        } else {
            ResponseBody::Full(Some(b))
        }
    }
}

impl From<&'static str> for ResponseBody {
    fn from(s: &'static str) -> Self {
        ResponseBody::full(Bytes::from_static(s.as_bytes()))
    }
}
impl From<String> for ResponseBody {
    fn from(s: String) -> Self {
        ResponseBody::full(Bytes::from(s))
    }
}
impl From<Bytes> for ResponseBody {
    fn from(b: Bytes) -> Self {
        ResponseBody::full(b)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::File(f) => Pin::new(f).poll_frame(cx).map_err(Into::into),
            ResponseBody::Upstream(u) => Pin::new(u).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::File(f) => f.remaining == 0,
            ResponseBody::Upstream(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::File(f) => SizeHint::with_exact(f.remaining),
            ResponseBody::Upstream(u) => u.size_hint(),
        }
    }
}

/// `len` bytes of an open file, from `start`, read in chunks as the client accepts them.
///
/// A chunk whose pages are in the page cache (the common case for a file served often) is read
/// on the connection's own thread with `preadv2(RWF_NOWAIT)`, which copies it straight into the
/// buffer handed to hyper and never blocks. Only a chunk the kernel would have to fetch from disk
/// goes to the blocking pool. Reading every chunk through `tokio::fs::File` cost a round trip to
/// the pool and two extra copies per chunk: most of what a 1 MiB download cost
/// (docs/performance.md).
pub struct FileBody {
    file: Arc<std::fs::File>,
    offset: u64,
    remaining: u64,
    /// Cleared when the file system refuses `RWF_NOWAIT`, so that every later chunk goes straight
    /// to the blocking pool.
    nowait: bool,
    /// A chunk being read on the blocking pool.
    blocking: Option<tokio::task::JoinHandle<std::io::Result<Bytes>>>,
    /// The connection whose transport sends cached chunks with `sendfile` (see `conn::sendfile`).
    sendfile: Option<Arc<ConnInfo>>,
}

impl FileBody {
    pub fn new(file: std::fs::File, start: u64, len: u64) -> Self {
        FileBody {
            file: Arc::new(file),
            offset: start,
            remaining: len,
            nowait: cfg!(target_os = "linux"),
            blocking: None,
            sendfile: None,
        }
    }

    /// Sends this body with `sendfile` where `conn` allows it (cleartext HTTP/1.1) and the page
    /// cache holds the chunk; otherwise, and on other connections, chunks are read as usual.
    pub fn sendfile_via(&mut self, conn: &Arc<ConnInfo>) {
        if conn.sendfile().is_some() {
            self.sendfile = Some(conn.clone());
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(task) = &mut self.blocking {
            let res = ready!(Pin::new(task).poll(cx));
            self.blocking = None;
            let chunk = match res {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => return Poll::Ready(Some(Err(e))),
                Err(join) => return Poll::Ready(Some(Err(std::io::Error::other(join)))),
            };
            return Poll::Ready(Some(self.advance(chunk)));
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        if let Some(conn) = &self.sendfile {
            let want = self.remaining.min(sendfile::MAX_CHUNK as u64) as usize;
            match (sendfile::cached(&self.file, self.offset, want), conn.sendfile()) {
                (sendfile::InCache::All, Some(splice)) => {
                    let placeholder = splice.push(self.file.clone(), self.offset, want);
                    return Poll::Ready(Some(self.advance(placeholder)));
                }
                // Read from the disk on the blocking pool, as below; the next chunk may be cached.
                (sendfile::InCache::NotAll, Some(_)) => {}
                _ => self.sendfile = None,
            }
        }
        let want = (self.remaining.min(FILE_CHUNK as u64)) as usize;
        if self.nowait {
            match read_cached(&self.file, self.offset, want) {
                Cached::Read(chunk) => return Poll::Ready(Some(self.advance(chunk))),
                Cached::Failed(e) => return Poll::Ready(Some(Err(e))),
                Cached::Uncached => {}
                Cached::Unsupported => self.nowait = false,
            }
        }
        let (file, offset) = (self.file.clone(), self.offset);
        self.blocking = Some(tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(want);
            let n = std::os::unix::fs::FileExt::read_at(&*file, &mut buf, offset)?;
            buf.truncate(n);
            Ok(buf.freeze())
        }));
        // Poll the task once now, so that it registers this body's waker.
        self.poll_frame(cx)
    }

    /// Accounts for a chunk read at the current offset.
    fn advance(&mut self, chunk: Bytes) -> Result<Frame<Bytes>, std::io::Error> {
        if chunk.is_empty() {
            // Content-Length promised more: ending early would make the response a lie.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while it was being sent",
            ));
        }
        self.offset += chunk.len() as u64;
        self.remaining -= chunk.len() as u64;
        Ok(Frame::data(chunk))
    }
}

/// What a read that must not block found.
enum Cached {
    /// Bytes from the page cache (possibly fewer than asked, when only some were cached; none at
    /// end of file).
    Read(Bytes),
    /// The first byte is not cached: reading would wait for the disk.
    Uncached,
    /// This kernel or file system has no `RWF_NOWAIT` for reads.
    Unsupported,
    Failed(std::io::Error),
}

#[cfg(target_os = "linux")]
fn read_cached(file: &std::fs::File, offset: u64, want: usize) -> Cached {
    use rustix::io::{Errno, ReadWriteFlags};
    let mut buf = BytesMut::zeroed(want);
    match rustix::io::preadv2(
        file,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) => {
            buf.truncate(n);
            Cached::Read(buf.freeze())
        }
        Err(Errno::AGAIN) => Cached::Uncached,
        // Before Linux 4.14, or a file system without non-blocking buffered reads.
        Err(Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => Cached::Unsupported,
        Err(e) => Cached::Failed(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_: &std::fs::File, _: u64, _: usize) -> Cached {
    Cached::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(&data).expect("write");
        (f, data)
    }

    async fn collect(body: FileBody) -> Result<Vec<u8>, BoxError> {
        Ok(ResponseBody::File(body).collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_range_streams_exactly_from_the_cache_and_from_the_blocking_pool() {
        let (f, data) = file_of(3 * FILE_CHUNK + 17);
        for nowait in [true, false] {
            let mut body = FileBody::new(f.reopen().expect("reopen"), 1000, 2 * FILE_CHUNK as u64 + 5);
            body.nowait &= nowait;
            let got = collect(body).await.expect("body");
            assert!(got == data[1000..1000 + 2 * FILE_CHUNK + 5], "nowait {nowait}");
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_is_an_error_not_a_short_body() {
        let (f, _) = file_of(100);
        for nowait in [true, false] {
            let mut body = FileBody::new(f.reopen().expect("reopen"), 0, 200);
            body.nowait &= nowait;
            let err = collect(body).await.expect_err("shrunk file");
            assert!(err.to_string().contains("file shrank"), "{err}");
        }
    }
}
