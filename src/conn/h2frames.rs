//! HTTP/2 framing seen from outside the codec: frame heads, error-code names, and a token bucket.
//!
//! [`FrameCursor`] follows frame boundaries in one direction of a connection's byte stream
//! without buffering payloads: it keeps the 9-byte head of the current frame, and for RST_STREAM
//! and GOAWAY the first 8 payload bytes (where the error code is), and skips everything else by
//! count. Frames split across reads or writes at any byte are handled.

use std::time::Instant;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEAD_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const FLAG_END_STREAM: u8 = 0x1;

/// RFC 9113 §7 PROTOCOL_ERROR.
pub const PROTOCOL_ERROR: u32 = 0x1;

/// RFC 9113 §7 ENHANCE_YOUR_CALM.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The 9-byte head of one frame (RFC 9113 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; HEAD_LEN]) -> FrameHead {
        FrameHead {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// How many leading payload bytes hold what we report: the error code of RST_STREAM (0..4)
    /// and GOAWAY (4..8). A frame too short to hold it is malformed; the codec rejects it.
    fn lead_wanted(&self) -> usize {
        match self.kind {
            RST_STREAM if self.len >= 4 => 4,
            GOAWAY if self.len >= 8 => 8,
            _ => 0,
        }
    }
}

/// One complete frame head, with its error code when the frame carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub head: FrameHead,
    pub code: Option<u32>,
    /// Where this frame starts in the slice passed to [`FrameCursor::advance`]; 0 when it
    /// started in an earlier slice.
    pub start: usize,
}

/// What [`FrameCursor::advance`] should do after a frame is reported.
pub enum Next {
    Continue,
    /// Stop: the rest of the slice is not examined and the cursor is left unusable.
    Stop,
}

/// Follows frame boundaries in one direction; see the module docs.
#[derive(Debug)]
pub struct FrameCursor {
    /// Client preface bytes still expected (inbound only).
    preface_left: usize,
    head: [u8; HEAD_LEN],
    head_have: usize,
    current: Option<FrameHead>,
    /// Payload bytes of `current` not yet seen.
    remaining: usize,
    lead: [u8; 8],
    lead_have: usize,
    /// Set when the bytes are not HTTP/2 (bad preface) or the caller stopped: nothing is parsed.
    off: bool,
}

impl FrameCursor {
    /// A cursor for bytes a server writes: frames from the first byte.
    pub fn outbound() -> FrameCursor {
        FrameCursor::with_preface(0)
    }

    /// A cursor for bytes a client writes: the 24-byte connection preface, then frames.
    pub fn inbound() -> FrameCursor {
        FrameCursor::with_preface(PREFACE.len())
    }

    fn with_preface(preface_left: usize) -> FrameCursor {
        FrameCursor {
            preface_left,
            head: [0; HEAD_LEN],
            head_have: 0,
            current: None,
            remaining: 0,
            lead: [0; 8],
            lead_have: 0,
            off: false,
        }
    }

    /// Whether the bytes seen so far end exactly between two frames (or before the first).
    pub fn at_boundary(&self) -> bool {
        self.off || (self.preface_left == 0 && self.head_have == 0 && self.current.is_none())
    }

    /// Examines `bytes`, calling `on` for each frame once its head (and error code, if any) is
    /// complete. Returns where in `bytes` the frame that made `on` answer [`Next::Stop`] starts.
    pub fn advance(&mut self, bytes: &[u8], mut on: impl FnMut(Frame) -> Next) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() && !self.off {
            if self.preface_left > 0 {
                let at = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(bytes.len() - i);
                if bytes[i..i + n] != PREFACE[at..at + n] {
                    // Not HTTP/2: the codec will refuse it; there is nothing for us to follow.
                    self.off = true;
                    return None;
                }
                self.preface_left -= n;
                i += n;
                continue;
            }
            let Some(head) = self.current else {
                let n = (HEAD_LEN - self.head_have).min(bytes.len() - i);
                self.head[self.head_have..self.head_have + n].copy_from_slice(&bytes[i..i + n]);
                self.head_have += n;
                i += n;
                if self.head_have == HEAD_LEN {
                    let head = FrameHead::parse(&self.head);
                    self.head_have = 0;
                    self.current = Some(head);
                    self.remaining = head.len as usize;
                    self.lead_have = 0;
                    if head.lead_wanted() == 0 && self.report(head, None, i, &mut on) {
                        return Some(i.saturating_sub(HEAD_LEN));
                    }
                    self.finish_if_empty();
                }
                continue;
            };
            let wanted = head.lead_wanted();
            if self.lead_have < wanted {
                let n = (wanted - self.lead_have).min(bytes.len() - i);
                self.lead[self.lead_have..self.lead_have + n].copy_from_slice(&bytes[i..i + n]);
                self.lead_have += n;
                self.remaining -= n;
                i += n;
                if self.lead_have == wanted {
                    let code = u32::from_be_bytes([
                        self.lead[wanted - 4],
                        self.lead[wanted - 3],
                        self.lead[wanted - 2],
                        self.lead[wanted - 1],
                    ]);
                    if self.report(head, Some(code), i, &mut on) {
                        return Some(i.saturating_sub(HEAD_LEN + wanted));
                    }
                    self.finish_if_empty();
                }
                continue;
            }
            let n = self.remaining.min(bytes.len() - i);
            self.remaining -= n;
            i += n;
            self.finish_if_empty();
        }
        None
    }

    /// Calls `on`; true when it asked to stop.
    fn report(&mut self, head: FrameHead, code: Option<u32>, end: usize, on: &mut impl FnMut(Frame) -> Next) -> bool {
        let consumed = HEAD_LEN + self.lead_have;
        let start = end.saturating_sub(consumed);
        match on(Frame { head, code, start }) {
            Next::Continue => false,
            Next::Stop => {
                self.off = true;
                true
            }
        }
    }

    fn finish_if_empty(&mut self) {
        if self.remaining == 0 && self.current.is_some_and(|h| self.lead_have >= h.lead_wanted()) {
            self.current = None;
        }
    }
}

/// The frame type's name as RFC 9113 §6 writes it.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        DATA => "DATA",
        HEADERS => "HEADERS",
        PRIORITY => "PRIORITY",
        RST_STREAM => "RST_STREAM",
        SETTINGS => "SETTINGS",
        PUSH_PROMISE => "PUSH_PROMISE",
        PING => "PING",
        GOAWAY => "GOAWAY",
        WINDOW_UPDATE => "WINDOW_UPDATE",
        CONTINUATION => "CONTINUATION",
        _ => "UNKNOWN",
    }
}

/// An error code's RFC 9113 §7 name in lower case: a bounded metric label.
pub fn error_label(code: u32) -> &'static str {
    match code {
        0x0 => "no_error",
        0x1 => "protocol_error",
        0x2 => "internal_error",
        0x3 => "flow_control_error",
        0x4 => "settings_timeout",
        0x5 => "stream_closed",
        0x6 => "frame_size_error",
        0x7 => "refused_stream",
        0x8 => "cancel",
        0x9 => "compression_error",
        0xa => "connect_error",
        0xb => "enhance_your_calm",
        0xc => "inadequate_security",
        0xd => "http_1_1_required",
        _ => "unknown",
    }
}

/// The label under which an inbound frame is charged to the control-frame budget, or `None`
/// when it is not charged.
///
/// Charged: frames that cost the server work (often an answer) but carry no request or payload:
/// PING and SETTINGS (ACKs included: unsolicited ACKs are pure noise), PRIORITY, RST_STREAM,
/// DATA that is empty and does not end its stream, and frame types we do not know (RFC 9113
/// §5.5 says to ignore them, which makes them free for an attacker unless counted).
///
/// Not charged: HEADERS and CONTINUATION (bounded by max_concurrent_streams, max requests and
/// the header-list limits), DATA with payload (flow control bounds it), GOAWAY, and
/// WINDOW_UPDATE: a client sends WINDOW_UPDATEs in proportion to the bytes it downloads, so a
/// fast download on a good link honestly sends thousands a second, and they elicit no answer.
pub fn charged(head: &FrameHead) -> Option<&'static str> {
    match head.kind {
        PING => Some("ping"),
        SETTINGS => Some("settings"),
        PRIORITY => Some("priority"),
        RST_STREAM => Some("rst_stream"),
        DATA if head.len == 0 && head.flags & FLAG_END_STREAM == 0 => Some("empty_data"),
        DATA | HEADERS | PUSH_PROMISE | GOAWAY | WINDOW_UPDATE | CONTINUATION => None,
        _ => Some("unknown"),
    }
}

/// A GOAWAY frame with no debug data (RFC 9113 §6.8).
pub fn goaway(last_stream: u32, code: u32) -> [u8; HEAD_LEN + 8] {
    let mut f = [0u8; HEAD_LEN + 8];
    f[2] = 8;
    f[3] = GOAWAY;
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f[13..17].copy_from_slice(&code.to_be_bytes());
    f
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token; false when none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn collect(c: &mut FrameCursor, bytes: &[u8], out: &mut Vec<Frame>) {
        c.advance(bytes, |f| {
            out.push(f);
            Next::Continue
        });
    }

    #[test]
    fn follows_frames_split_at_every_byte() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(SETTINGS, 0, 0, &[0; 6]));
        stream.extend(frame(DATA, 1, 1, &[7; 100]));
        stream.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
        stream.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0xb, b'x']));
        stream.extend(frame(PING, 1, 0, &[0; 8]));
        let whole = {
            let mut c = FrameCursor::inbound();
            let mut out = Vec::new();
            collect(&mut c, &stream, &mut out);
            assert!(c.at_boundary());
            out
        };
        let kinds: Vec<_> = whole.iter().map(|f| (f.head.kind, f.code)).collect();
        assert_eq!(
            kinds,
            [
                (SETTINGS, None),
                (DATA, None),
                (RST_STREAM, Some(8)),
                (GOAWAY, Some(0xb)),
                (PING, None)
            ]
        );
        let mut c = FrameCursor::inbound();
        let mut out = Vec::new();
        for b in &stream {
            collect(&mut c, std::slice::from_ref(b), &mut out);
        }
        let split: Vec<_> = out.iter().map(|f| (f.head, f.code)).collect();
        let whole: Vec<_> = whole.iter().map(|f| (f.head, f.code)).collect();
        assert_eq!(split, whole);
        assert!(c.at_boundary());
    }

    #[test]
    fn reports_where_a_stopped_frame_starts() {
        let mut bytes = frame(SETTINGS, 1, 0, &[]);
        let second = bytes.len();
        bytes.extend(frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
        let mut c = FrameCursor::outbound();
        let at = c.advance(&bytes, |f| {
            if f.head.kind == RST_STREAM {
                Next::Stop
            } else {
                Next::Continue
            }
        });
        assert_eq!(at, Some(second));
    }

    #[test]
    fn a_wrong_preface_turns_the_cursor_off() {
        let mut c = FrameCursor::inbound();
        let mut out = Vec::new();
        collect(&mut c, b"GET / HTTP/1.1\r\n\r\n", &mut out);
        assert!(out.is_empty());
        assert!(c.at_boundary());
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 20, t0);
        assert!((0..20).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(150)));
        assert!(!b.take(t0 + Duration::from_millis(150)));
    }

    #[test]
    fn goaway_frame_is_well_formed() {
        let f = goaway(7, ENHANCE_YOUR_CALM);
        let mut c = FrameCursor::outbound();
        let mut out = Vec::new();
        collect(&mut c, &f, &mut out);
        assert_eq!(out[0].head.kind, GOAWAY);
        assert_eq!(out[0].code, Some(ENHANCE_YOUR_CALM));
        assert_eq!(&f[9..13], &7u32.to_be_bytes());
    }
}
