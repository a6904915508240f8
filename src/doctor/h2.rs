//! A minimal raw HTTP/2 client: connection preface, SETTINGS, PING, GOAWAY, and GET requests with
//! a literal HPACK block.
//!
//! Why not the `h2` crate: it hides exactly what doctor must report. It does not expose the
//! peer's SETTINGS values, whether SETTINGS was the server's first frame and how long it took,
//! the PING round trip, or a GOAWAY's code and debug data. This client reads every frame itself;
//! it sends only GETs without bodies, so it needs no HPACK encoder state (every field is a
//! literal without indexing, no Huffman) and decodes only the response's `:status`.

use super::net::Io;
use crate::conn::h2c::hpack_int;
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// How long the server has to send its SETTINGS after our preface before doctor calls it late.
/// RFC 9113 §3.4 says the server's preface "MUST be the first frame" but sets no deadline; clients
/// commonly give up after a few seconds (and send SETTINGS_TIMEOUT), so a second is already slow.
pub const SETTINGS_ON_TIME: Duration = Duration::from_secs(1);
/// How long doctor waits for the SETTINGS frame at all, and for a PING answer.
pub const FRAME_WAIT: Duration = Duration::from_secs(5);
/// Our receive windows: as large as the protocol allows, so that doctor never has to send
/// WINDOW_UPDATE while it drains a response.
const WINDOW: u32 = 0x7fff_ffff;
/// Largest frame payload doctor accepts (it advertises the default, 16 KiB; RFC 9113 §4.2).
const MAX_FRAME: usize = 16_384;

/// One frame as read.
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A GOAWAY as received.
#[derive(Clone, Debug, Serialize)]
pub struct GoAway {
    pub code: u32,
    pub code_name: String,
    pub last_stream_id: u32,
    pub debug_data: String,
}

impl GoAway {
    fn parse(p: &[u8]) -> Option<GoAway> {
        let last = u32::from_be_bytes(p.get(0..4)?.try_into().ok()?) & 0x7fff_ffff;
        let code = u32::from_be_bytes(p.get(4..8)?.try_into().ok()?);
        Some(GoAway {
            code,
            code_name: error_name(code).to_string(),
            last_stream_id: last,
            debug_data: String::from_utf8_lossy(&p[8..]).into_owned(),
        })
    }
}

/// The server's SETTINGS (RFC 9113 §6.5.2); absent values keep their protocol default.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub header_table_size: u32,
    pub enable_push: u32,
    /// `None`: the server sent no limit (unlimited).
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: u32,
    pub max_frame_size: u32,
    /// `None`: the server sent no limit.
    pub max_header_list_size: Option<u32>,
}

impl Settings {
    fn parse(p: &[u8]) -> Settings {
        let mut s = Settings {
            header_table_size: 4096,
            enable_push: 1,
            max_concurrent_streams: None,
            initial_window_size: 65_535,
            max_frame_size: 16_384,
            max_header_list_size: None,
        };
        for e in p.chunks_exact(6) {
            let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
            match u16::from_be_bytes([e[0], e[1]]) {
                1 => s.header_table_size = v,
                2 => s.enable_push = v,
                3 => s.max_concurrent_streams = Some(v),
                4 => s.initial_window_size = v,
                5 => s.max_frame_size = v,
                6 => s.max_header_list_size = Some(v),
                _ => {}
            }
        }
        s
    }
}

/// An error code's name as RFC 9113 §7 writes it.
pub fn error_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN_ERROR",
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = Vec::with_capacity(9 + len);
    v.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    v.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A literal field without indexing (integers encoded by the server's own h2c HPACK code).; `index` names a static-table name, 0 for a literal name.
fn hpack_literal(out: &mut Vec<u8>, index: usize, name: &str, value: &str) {
    hpack_int(out, 4, 0x00, index);
    if index == 0 {
        hpack_int(out, 7, 0x00, name.len());
        out.extend_from_slice(name.as_bytes());
    }
    hpack_int(out, 7, 0x00, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The `:status` of a response header block, when the server put it first as an indexed static
/// entry or a literal with the `:status` name (what servers do); Huffman-coded digits included.
fn status_of(block: &[u8]) -> Option<u16> {
    match *block.first()? {
        0x88 => Some(200),
        0x89 => Some(204),
        0x8a => Some(206),
        0x8b => Some(304),
        0x8c => Some(400),
        0x8d => Some(404),
        0x8e => Some(500),
        0x48 | 0x08 | 0x18 => {
            let len = usize::from(*block.get(1)? & 0x7f);
            let raw = block.get(2..2 + len)?;
            let text = if block[1] & 0x80 != 0 {
                huffman_digits(raw)?
            } else {
                String::from_utf8(raw.to_vec()).ok()?
            };
            text.parse().ok()
        }
        _ => None,
    }
}

/// Decodes an HPACK Huffman string of digits (RFC 7541 Appendix B: '0'-'2' are the 5-bit codes
/// 0-2, '3'-'9' the 6-bit codes 25-31), as a status code is.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let code = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |a, b| a << 1 | b);
    let mut out = String::new();
    let mut i = 0;
    while i < bits.len() {
        if bits.len() - i < 8 && bits[i..].iter().all(|b| *b == 1) {
            break; // EOS padding
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

/// An HTTP/2 connection driven frame by frame.
pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    next_stream: u32,
    pub settings: Option<Settings>,
    pub goaway: Option<GoAway>,
    /// Whether the server closed the transport (EOF or error).
    pub closed: bool,
}

/// Why a GET did not complete on this connection.
#[derive(Clone, Debug)]
pub enum StreamEnd {
    /// The response arrived in full: its status when decodable.
    Done(Option<u16>),
    /// GOAWAY named a last stream below ours: the request was not processed (safe to retry).
    NotProcessed,
    /// RST_STREAM with this code.
    Reset(u32),
    /// The connection closed (or failed) before the response ended.
    Closed(String),
}

impl Conn {
    /// Sends the client preface and our SETTINGS (push off, maximal windows) on `io`.
    pub async fn start(mut io: Box<dyn Io>) -> std::io::Result<Conn> {
        let mut out = PREFACE.to_vec();
        let mut s = Vec::new();
        for (id, v) in [(2u16, 0u32), (4, WINDOW)] {
            s.extend_from_slice(&id.to_be_bytes());
            s.extend_from_slice(&v.to_be_bytes());
        }
        out.extend(frame(SETTINGS, 0, 0, &s));
        out.extend(frame(WINDOW_UPDATE, 0, 0, &(WINDOW - 65_535).to_be_bytes()));
        io.write_all(&out).await?;
        io.flush().await?;
        Ok(Conn {
            io,
            buf: Vec::new(),
            next_stream: 1,
            settings: None,
            goaway: None,
            closed: false,
        })
    }

    /// Reads one frame. Cancel-safe: a partial frame stays in the buffer.
    pub async fn read_frame(&mut self) -> std::io::Result<Frame> {
        loop {
            // A server without HTTP/2 on this port may answer the preface as a bad HTTP/1.1 request.
            if self.buf.starts_with(b"HTTP/1.") && self.buf.contains(&b'\n') {
                let line = String::from_utf8_lossy(&self.buf)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                return Err(std::io::Error::other(format!(
                    "the server answered in HTTP/1.x, not HTTP/2: `{line}`"
                )));
            }
            if self.buf.len() >= 9 && !self.buf.starts_with(b"HTTP/1.") {
                let len = usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
                if len > MAX_FRAME {
                    return Err(std::io::Error::other(format!(
                        "the server sent a {len}-byte frame, larger than SETTINGS_MAX_FRAME_SIZE (16384)"
                    )));
                }
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Ok(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Handles connection-level frames every state must answer; returns the frame otherwise.
    async fn handle_control(&mut self, f: Frame) -> std::io::Result<Option<Frame>> {
        match f.kind {
            SETTINGS if f.flags & ACK == 0 && f.stream == 0 => {
                self.settings = Some(Settings::parse(&f.payload));
                self.io.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
                self.io.flush().await?;
                Ok(None)
            }
            PING if f.flags & ACK == 0 => {
                self.io.write_all(&frame(PING, ACK, 0, &f.payload)).await?;
                self.io.flush().await?;
                Ok(None)
            }
            GOAWAY => {
                self.goaway = GoAway::parse(&f.payload);
                Ok(Some(f))
            }
            _ => Ok(Some(f)),
        }
    }

    /// Waits for the server's first frame: it must be SETTINGS. Returns how long it took and what
    /// came instead when it was not SETTINGS.
    pub async fn await_settings(&mut self) -> Result<Duration, String> {
        let start = Instant::now();
        match tokio::time::timeout(FRAME_WAIT, self.read_frame()).await {
            Err(_) => Err(format!("the server sent nothing within {FRAME_WAIT:?} of the preface")),
            Ok(Err(e)) => {
                self.closed = true;
                Err(format!("the server closed the connection after the preface ({e})"))
            }
            Ok(Ok(f)) if f.kind == SETTINGS && f.flags & ACK == 0 => {
                let took = start.elapsed();
                self.handle_control(f).await.map_err(|e| e.to_string())?;
                Ok(took)
            }
            Ok(Ok(f)) => {
                let what = format!("a frame of type {}", f.kind);
                let _ = self.handle_control(f).await;
                Err(format!("the server's first frame was {what}, not SETTINGS"))
            }
        }
    }

    /// Sends a PING and waits for its ACK; the round trip, or why there is none.
    pub async fn ping(&mut self) -> Result<Duration, String> {
        let payload = *b"doctor\x00\x01";
        self.io
            .write_all(&frame(PING, 0, 0, &payload))
            .await
            .map_err(|e| e.to_string())?;
        self.io.flush().await.map_err(|e| e.to_string())?;
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let f = match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Err(_) => return Err(format!("no PING acknowledgement within {FRAME_WAIT:?}")),
                Ok(Err(e)) => {
                    self.closed = true;
                    return Err(format!("the connection closed before the PING was acknowledged ({e})"));
                }
                Ok(Ok(f)) => f,
            };
            if f.kind == PING && f.flags & ACK != 0 && f.payload == payload {
                return Ok(start.elapsed());
            }
            self.handle_control(f).await.map_err(|e| e.to_string())?;
        }
    }

    /// Sends `GET path` and reads until the response ends.
    pub async fn get(&mut self, tls: bool, authority: &str, path: &str, timeout: Duration) -> StreamEnd {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        block.push(0x82); // :method GET (static index 2)
        block.push(if tls { 0x87 } else { 0x86 }); // :scheme https / http
        hpack_literal(&mut block, 4, ":path", path);
        hpack_literal(&mut block, 1, ":authority", authority);
        hpack_literal(&mut block, 0, "user-agent", super::USER_AGENT);
        if block.len() > MAX_FRAME {
            return StreamEnd::Closed("request headers too large".into());
        }
        let out = frame(HEADERS, END_STREAM | END_HEADERS, id, &block);
        if let Err(e) = self.io.write_all(&out).await.and(self.io.flush().await) {
            self.closed = true;
            return StreamEnd::Closed(e.to_string());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut status = None;
        loop {
            let f = match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Err(_) => return StreamEnd::Closed(format!("no complete response within {timeout:?}")),
                Ok(Err(e)) => {
                    self.closed = true;
                    if self.goaway.as_ref().is_some_and(|g| g.last_stream_id < id) {
                        return StreamEnd::NotProcessed;
                    }
                    return StreamEnd::Closed(e.to_string());
                }
                Ok(Ok(f)) => f,
            };
            let f = match self.handle_control(f).await {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    self.closed = true;
                    return StreamEnd::Closed(e.to_string());
                }
            };
            match f.kind {
                GOAWAY if self.goaway.as_ref().is_some_and(|g| g.last_stream_id < id) => {
                    return StreamEnd::NotProcessed;
                }
                HEADERS | CONTINUATION if f.stream == id => {
                    if status.is_none() && f.kind == HEADERS {
                        status = status_of(header_block(&f));
                    }
                    if f.flags & END_STREAM != 0 {
                        return StreamEnd::Done(status);
                    }
                }
                DATA if f.stream == id && f.flags & END_STREAM != 0 => return StreamEnd::Done(status),
                RST_STREAM if f.stream == id => {
                    let code = f
                        .payload
                        .get(0..4)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return StreamEnd::Reset(code);
                }
                _ => {}
            }
        }
    }

    /// Reads whatever arrives for up to `wait`: returns when the server closes the connection (or
    /// sends GOAWAY), with the time it took, or `None` if it stayed open.
    pub async fn watch_idle(&mut self, wait: Duration) -> Option<Duration> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Err(_) => return None,
                Ok(Err(_)) => {
                    self.closed = true;
                    return Some(start.elapsed());
                }
                Ok(Ok(f)) => match self.handle_control(f).await {
                    Ok(Some(f)) if f.kind == GOAWAY => return Some(start.elapsed()),
                    Ok(_) => {}
                    Err(_) => {
                        self.closed = true;
                        return Some(start.elapsed());
                    }
                },
            }
        }
    }

    /// Whether a new stream may be opened: no GOAWAY and not closed, as far as already-arrived
    /// frames tell (reads without waiting).
    pub async fn usable(&mut self) -> bool {
        while !self.closed && self.goaway.is_none() {
            match tokio::time::timeout(Duration::from_millis(1), self.read_frame()).await {
                Err(_) => break,
                Ok(Err(_)) => self.closed = true,
                Ok(Ok(f)) => {
                    if self.handle_control(f).await.is_err() {
                        self.closed = true;
                    }
                }
            }
        }
        !self.closed && self.goaway.is_none()
    }

    /// Says goodbye politely (GOAWAY NO_ERROR) so the server does not count a protocol error.
    pub async fn close(mut self) {
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        let _ = self.io.write_all(&frame(GOAWAY, 0, 0, &p)).await;
        let _ = self.io.shutdown().await;
    }
}

/// The header block fragment of a HEADERS frame, without padding and priority fields.
fn header_block(f: &Frame) -> &[u8] {
    let mut p = &f.payload[..];
    let mut pad = 0;
    if f.flags & PADDED != 0 && !p.is_empty() {
        pad = usize::from(p[0]);
        p = &p[1..];
    }
    if f.flags & PRIORITY_FLAG != 0 && p.len() >= 5 {
        p = &p[5..];
    }
    &p[..p.len().saturating_sub(pad)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_and_status() {
        let mut v = Vec::new();
        hpack_int(&mut v, 4, 0, 20);
        assert_eq!(v, [15, 5]);
        assert_eq!(status_of(&[0x88]), Some(200));
        assert_eq!(status_of(&[0x08, 3, b'4', b'2', b'1']), Some(421));
        assert_eq!(status_of(&[0xff]), None);
    }

    #[test]
    fn goaway_and_settings_parse() {
        let g = GoAway::parse(&[0, 0, 0, 3, 0, 0, 0, 0xb, b'h', b'i']).unwrap();
        assert_eq!(
            (g.last_stream_id, g.code, g.code_name.as_str(), g.debug_data.as_str()),
            (3, 11, "ENHANCE_YOUR_CALM", "hi")
        );
        let s = Settings::parse(&[0, 3, 0, 0, 0, 100, 0, 5, 0, 0, 0x40, 0]);
        assert_eq!((s.max_concurrent_streams, s.max_frame_size), (Some(100), 16384));
    }
}
