//! A raw HTTP/2 client over cleartext TCP: writes any frame, however abusive, and reads frames back.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame as read from the server.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A GOAWAY's last stream id.
    pub fn last_stream(&self) -> Option<u32> {
        let b = self.payload.get(0..4).filter(|_| self.kind == GOAWAY)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
    }

    /// The `:status` of a HEADERS frame whose first field is an indexed static-table status
    /// or a literal with the `:status` name index (what h2 writes), plain or Huffman-coded.
    pub fn status(&self) -> Option<u16> {
        if self.kind != HEADERS {
            return None;
        }
        let b = &self.payload;
        match *b.first()? {
            0x88 => Some(200),
            0x89 => Some(204),
            0x8a => Some(206),
            0x8b => Some(304),
            0x8c => Some(400),
            0x8d => Some(404),
            0x8e => Some(500),
            // Literal with indexed name 8 (:status), with or without indexing.
            0x48 | 0x08 | 0x18 => {
                let len = usize::from(*b.get(1)? & 0x7f);
                let raw = b.get(2..2 + len)?;
                let text = if b[1] & 0x80 != 0 {
                    huffman_digits(raw)?
                } else {
                    String::from_utf8(raw.to_vec()).ok()?
                };
                text.parse().ok()
            }
            _ => None,
        }
    }
}

/// Decodes an HPACK Huffman string made only of digits (RFC 7541 Appendix B: '0'-'2' are the
/// 5-bit codes 0-2, '3'-'9' the 6-bit codes 25-31), as a status code is.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    let code = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |a, b| a << 1 | b);
    while i < bits.len() {
        if bits[i..].iter().all(|b| *b == 1) && bits.len() - i < 8 {
            return Some(out); // EOS padding
        }
        if bits.len() - i >= 5 && code(i, 5) <= 2 {
            out.push(char::from(b'0' + code(i, 5)));
            i += 5;
        } else if bits.len() - i >= 6 && (25..=31).contains(&code(i, 6)) {
            out.push(char::from(b'3' + code(i, 6) - 25));
            i += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

/// Encodes one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = Vec::with_capacity(9 + len);
    v.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    v.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in values {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

pub fn ping(ack: bool, data: u64) -> Vec<u8> {
    frame(PING, if ack { ACK } else { 0 }, 0, &data.to_be_bytes())
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn priority(stream: u32, depends_on: u32) -> Vec<u8> {
    let mut p = depends_on.to_be_bytes().to_vec();
    p.push(15);
    frame(PRIORITY, 0, stream, &p)
}

pub fn headers(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
    frame(HEADERS, flags, stream, block)
}

/// An HPACK string literal without Huffman coding (lengths below 127 use one byte).
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0x00, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1).
pub fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, with a new name.
pub fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A literal header field *with* incremental indexing: it enters the dynamic table at index 62.
pub fn hpack_literal_indexed(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x40);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A GET request's header block: static-table `:method GET` and `:scheme http`, literal path
/// (indexed name `:path`) and authority (indexed name `:authority`).
pub fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    b.push(0x04);
    hpack_string(&mut b, path.as_bytes());
    b.push(0x01);
    hpack_string(&mut b, b"localhost");
    b
}

/// A cleartext HTTP/2 connection (prior knowledge) split into a frame reader and a writer.
pub struct H2Raw {
    pub reader: FrameReader,
    pub writer: OwnedWriteHalf,
}

impl H2Raw {
    /// Connects and sends the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> H2Raw {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (r, mut w) = tcp.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(&[]));
        w.write_all(&hello).await.unwrap();
        H2Raw {
            reader: FrameReader { r, buf: Vec::new() },
            writer: w,
        }
    }

    /// Writes bytes; an error (the server already closed) is returned, not raised.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }
}

/// Reads whole frames from the server.
pub struct FrameReader {
    r: OwnedReadHalf,
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next frame, or `None` at EOF, on a read error, or after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = RawFrame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.r.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Every frame until the server closes the connection (or `timeout` passes).
    pub async fn until_close(&mut self, timeout: Duration) -> Vec<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(f) = self
            .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            out.push(f);
        }
        out
    }

    /// Frames until one matches `want` (returned last), or `None` at EOF or after `timeout`.
    pub async fn until(&mut self, timeout: Duration, want: impl Fn(&RawFrame) -> bool) -> Option<Vec<RawFrame>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let f = self
                .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await?;
            let done = want(&f);
            out.push(f);
            if done {
                return Some(out);
            }
        }
    }
}

/// The GOAWAY frames among `frames`.
pub fn goaways(frames: &[RawFrame]) -> Vec<&RawFrame> {
    frames.iter().filter(|f| f.kind == GOAWAY).collect()
}

/// The RST_STREAM frames among `frames`.
pub fn resets(frames: &[RawFrame]) -> Vec<&RawFrame> {
    frames.iter().filter(|f| f.kind == RST_STREAM).collect()
}
