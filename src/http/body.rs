//! Body types: what gatehouse's own handlers answer with, and what request handlers read.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::io::SeekFrom;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Chunk size for file bodies: large enough for few syscalls, small enough to interleave h2 streams.
const FILE_CHUNK: usize = 64 * 1024;

/// The response body of gatehouse's built-in handlers. An enum rather than a boxed trait object,
/// so that the common cases (empty, one buffer, a file) cost no allocation or dynamic dispatch.
pub enum ResponseBody {
    Empty,
    Full(Option<Bytes>),
    File(FileBody),
    /// A proxied upstream response, streamed as it arrives (trailers included).
    Upstream(crate::proxy::UpstreamBody),
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
pub struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    seek: Seek,
    buf: Vec<u8>,
}

/// Where the file body is in positioning itself at the range start.
enum Seek {
    Done,
    To(u64),
    Started,
}

impl FileBody {
    pub fn new(file: tokio::fs::File, start: u64, len: u64) -> Self {
        FileBody {
            file,
            remaining: len,
            seek: if start > 0 { Seek::To(start) } else { Seek::Done },
            buf: Vec::new(),
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Seek::To(pos) = self.seek {
            if let Err(e) = Pin::new(&mut self.file).start_seek(SeekFrom::Start(pos)) {
                return Poll::Ready(Some(Err(e)));
            }
            self.seek = Seek::Started;
        }
        if let Seek::Started = self.seek {
            if let Err(e) = ready!(Pin::new(&mut self.file).poll_complete(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            self.seek = Seek::Done;
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = (self.remaining.min(FILE_CHUNK as u64)) as usize;
        self.buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut self.buf[..want]);
        if let Err(e) = ready!(Pin::new(&mut self.file).poll_read(cx, &mut rb)) {
            return Poll::Ready(Some(Err(e)));
        }
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while it was being sent",
            ))));
        }
        self.remaining -= n as u64;
        let chunk = Bytes::copy_from_slice(&self.buf[..n]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}
