//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): `traceparent` and `tracestate`.
//!
//! A malformed `traceparent` is never the client's error to hear about: the request starts a
//! new trace, as the recommendation says a receiver must, and the reason is kept for the debug log.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The recommendation's own bound (§3.3.1.1): 32 list members of at most 256 bytes each would be
/// 8KiB, but it asks vendors to propagate at least 512 bytes and allows dropping beyond that.
/// Larger values are dropped whole, never cut: a cut list member would be a corrupt one.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The W3C `sampled` trace flag.
const FLAG_SAMPLED: u8 = 0x01;

/// A 16-byte trace id; never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The caller's span, from a valid `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub flags: u8,
}

impl Traceparent {
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }
}

/// Why a `traceparent` value was not used; the request then starts a new trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceparentError {
    #[error("wrong length or field separators")]
    Shape,
    #[error("not lowercase hexadecimal")]
    NotHex,
    #[error("version ff is forbidden")]
    ForbiddenVersion,
    #[error("the trace id is all zeros")]
    ZeroTraceId,
    #[error("the parent id is all zeros")]
    ZeroParentId,
    #[error("more than one traceparent header")]
    Repeated,
}

impl TraceparentError {
    /// A stable label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TraceparentError::Shape => "shape",
            TraceparentError::NotHex => "not_hex",
            TraceparentError::ForbiddenVersion => "forbidden_version",
            TraceparentError::ZeroTraceId => "zero_trace_id",
            TraceparentError::ZeroParentId => "zero_parent_id",
            TraceparentError::Repeated => "repeated",
        }
    }
}

/// Parses one `traceparent` value: `version-traceid-parentid-flags`.
///
/// Version `00` must be exactly 55 characters. A later version is parsed by the version-00
/// layout as §4.3 asks ("try to parse trace-id and parent-id"), and may carry more fields after
/// another `-`. Hex must be lowercase (§3.2.2.1 `HEXDIGLC`).
pub fn parse_traceparent(value: &[u8]) -> Result<Traceparent, TraceparentError> {
    if value.len() < 55 {
        return Err(TraceparentError::Shape);
    }
    let version = hex_byte(&value[0..2])?;
    match version {
        0xff => return Err(TraceparentError::ForbiddenVersion),
        0x00 if value.len() != 55 => return Err(TraceparentError::Shape),
        _ if value.len() > 55 && value[55] != b'-' => return Err(TraceparentError::Shape),
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return Err(TraceparentError::Shape);
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, b) in parent_id.iter_mut().enumerate() {
        *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&value[53..55])?;
    if trace_id == [0; 16] {
        return Err(TraceparentError::ZeroTraceId);
    }
    if parent_id == [0; 8] {
        return Err(TraceparentError::ZeroParentId);
    }
    Ok(Traceparent {
        trace_id: TraceId(trace_id),
        parent_id: SpanId(parent_id),
        flags,
    })
}

fn hex_byte(two: &[u8]) -> Result<u8, TraceparentError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceparentError::NotHex),
    };
    Ok((digit(two[0])? << 4) | digit(two[1])?)
}

/// The request's `traceparent`, if exactly one valid one was sent.
pub fn incoming_parent(headers: &HeaderMap) -> Result<Option<Traceparent>, TraceparentError> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(TraceparentError::Repeated);
    }
    parse_traceparent(first.as_bytes()).map(Some)
}

/// The request's `tracestate`, kept verbatim (several header lines joined with `,` as RFC 9110
/// §5.3 allows), or `None` when absent, empty, too long or not visible ASCII.
pub fn incoming_tracestate(headers: &HeaderMap) -> Option<Arc<str>> {
    let mut joined = String::new();
    for v in headers.get_all(TRACESTATE) {
        let s = v.to_str().ok()?.trim();
        if s.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(s);
        if joined.len() > MAX_TRACESTATE_BYTES {
            return None;
        }
    }
    (!joined.is_empty()).then(|| Arc::from(joined))
}

/// One request's place in a trace, in the request's extensions while tracing is on.
///
/// A handler that calls another service (the reverse proxy) forwards it with [`inject`]
/// (`traceparent` naming this request's server span as the parent, and `tracestate` verbatim),
/// so the next hop's spans join the same trace.
///
/// [`inject`]: TraceContext::inject
///
/// # Examples
///
/// ```
/// # fn forward(incoming: &http::Request<()>, outgoing: &mut http::Request<()>) {
/// if let Some(trace) = incoming.extensions().get::<gatehouse::observe::TraceContext>() {
///     trace.inject(outgoing.headers_mut());
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// This request's server span: the parent of any call made on the request's behalf.
    pub span_id: SpanId,
    /// Whether this trace is recorded; forwarded so the next hop decides the same way.
    pub sampled: bool,
    /// The caller's `tracestate`, verbatim (gatehouse adds no member of its own).
    pub tracestate: Option<Arc<str>>,
}

impl TraceContext {
    /// The `traceparent` value to send on an outgoing call made for this request.
    pub fn traceparent(&self) -> HeaderValue {
        let flags = if self.sampled { FLAG_SAMPLED } else { 0 };
        let text = format!("00-{}-{}-{flags:02x}", self.trace_id, self.span_id);
        // Lowercase hex and dashes only: always a valid header value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Replaces `traceparent` and `tracestate` in `headers` with this context's.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent());
        headers.remove(TRACESTATE);
        if let Some(state) = self.tracestate.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
            headers.insert(TRACESTATE, state);
        }
    }
}

/// Makes trace and span ids: SipHash-1-3 of a counter under the process's random `RandomState`
/// key. That is a keyed pseudo-random function, so ids are unpredictable to clients and
/// uniformly spread (ratio sampling reads their low bits), without a random-number dependency
/// or a system call per request.
pub struct IdSource {
    key: std::hash::RandomState,
    counter: AtomicU64,
}

impl IdSource {
    /// The process-wide source.
    pub fn global() -> &'static IdSource {
        static SOURCE: OnceLock<IdSource> = OnceLock::new();
        SOURCE.get_or_init(|| IdSource {
            key: std::hash::RandomState::new(),
            counter: AtomicU64::new(0),
        })
    }

    fn next(&self) -> u64 {
        loop {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let v = self.key.hash_one(n);
            // All-zero ids are invalid; a zero output is astronomically rare but not impossible.
            if v != 0 {
                return v;
            }
        }
    }

    pub fn trace_id(&self) -> TraceId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next().to_be_bytes());
        id[8..].copy_from_slice(&self.next().to_be_bytes());
        TraceId(id)
    }

    pub fn span_id(&self) -> SpanId {
        SpanId(self.next().to_be_bytes())
    }
}

/// Ratio sampling decided from the trace id alone, so every hop that samples at the same ratio
/// agrees. It reads the low 56 bits, the part W3C Trace Context Level 2 asks to be random, as
/// OpenTelemetry's `TraceIdRatioBased` sampler does.
pub fn ratio_sampled(trace_id: TraceId, ratio: f64) -> bool {
    const RANGE: u64 = 1 << 56;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id.0[8..]);
    let r = u64::from_be_bytes(low) & (RANGE - 1);
    // `ratio` is validated to [0, 1]; 1.0 gives RANGE, above every value of `r`.
    let threshold = (ratio.clamp(0.0, 1.0) * RANGE as f64) as u64;
    r < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent() {
        let p = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.parent_id.to_string(), "00f067aa0ba902b7");
        assert!(p.sampled());
        let p = parse_traceparent(VALID.replace("-01", "-00").as_bytes()).unwrap();
        assert!(!p.sampled());
    }

    #[test]
    fn accepts_a_later_version_with_more_fields() {
        let later = VALID.replacen("00", "01", 1) + "-what-the-future-brings";
        assert!(parse_traceparent(later.as_bytes()).is_ok());
        let glued = VALID.replacen("00", "01", 1) + "x";
        assert_eq!(parse_traceparent(glued.as_bytes()), Err(TraceparentError::Shape));
    }

    #[test]
    fn refuses_each_invalid_form() {
        let cases: &[(String, TraceparentError)] = &[
            (String::new(), TraceparentError::Shape),
            (VALID[..54].to_string(), TraceparentError::Shape),
            (format!("{VALID}-00"), TraceparentError::Shape),
            (VALID.replacen('-', "_", 1), TraceparentError::Shape),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01".to_string(),
                TraceparentError::Shape,
            ),
            (VALID.to_uppercase(), TraceparentError::NotHex),
            (VALID.replace("4bf9", "4bg9"), TraceparentError::NotHex),
            (VALID.replace("b7-01", "b7-0z"), TraceparentError::NotHex),
            (VALID.replacen("00", "ff", 1), TraceparentError::ForbiddenVersion),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
                TraceparentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".to_string(),
                TraceparentError::ZeroParentId,
            ),
        ];
        for (value, want) in cases {
            assert_eq!(parse_traceparent(value.as_bytes()), Err(*want), "{value:?}");
        }
    }

    #[test]
    fn two_traceparent_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(incoming_parent(&h).unwrap().is_some());
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(incoming_parent(&h), Err(TraceparentError::Repeated));
    }

    #[test]
    fn tracestate_is_kept_verbatim_and_bounded() {
        let mut h = HeaderMap::new();
        assert_eq!(incoming_tracestate(&h), None);
        h.append(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        h.append(TRACESTATE, HeaderValue::from_static("rojo=00f067aa0ba902b7"));
        assert_eq!(
            incoming_tracestate(&h).as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let long = HeaderValue::from_str(&format!("k={}", "v".repeat(MAX_TRACESTATE_BYTES))).unwrap();
        h.insert(TRACESTATE, long);
        assert_eq!(incoming_tracestate(&h), None);
    }

    #[test]
    fn renders_and_injects_the_forwarded_context() {
        let parent = parse_traceparent(VALID.as_bytes()).unwrap();
        let ctx = TraceContext {
            trace_id: parent.trace_id,
            span_id: SpanId([0xab; 8]),
            sampled: true,
            tracestate: Some(Arc::from("rojo=1")),
        };
        assert_eq!(
            ctx.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-abababababababab-01"
        );
        let mut h = HeaderMap::new();
        h.insert(TRACESTATE, HeaderValue::from_static("stale=1"));
        ctx.inject(&mut h);
        assert_eq!(h[TRACEPARENT], ctx.traceparent());
        assert_eq!(h[TRACESTATE], "rojo=1");
        // What we render, we parse.
        let back = parse_traceparent(ctx.traceparent().as_bytes()).unwrap();
        assert_eq!(
            (back.trace_id, back.parent_id, back.sampled()),
            (ctx.trace_id, ctx.span_id, true)
        );
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let ids = IdSource::global();
        let a = ids.trace_id();
        let b = ids.trace_id();
        assert_ne!(a, b);
        assert_ne!(a.0, [0; 16]);
        assert_ne!(ids.span_id(), ids.span_id());
    }

    #[test]
    fn ratio_sampling_is_a_pure_function_of_the_trace_id() {
        let id = |low: u64| {
            let mut b = [0x11u8; 16];
            b[8..].copy_from_slice(&low.to_be_bytes());
            TraceId(b)
        };
        assert!(ratio_sampled(id(u64::MAX), 1.0));
        assert!(!ratio_sampled(id(0), 0.0));
        assert!(ratio_sampled(id(0), 0.5));
        assert!(!ratio_sampled(id((1 << 55) + 1), 0.5));
        // About the configured share of random ids is sampled.
        let ids = IdSource::global();
        let kept = (0..10_000).filter(|_| ratio_sampled(ids.trace_id(), 0.25)).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
    }
}
