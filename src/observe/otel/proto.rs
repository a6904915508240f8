//! The OTLP trace messages gatehouse sends, written as protobuf by hand.
//!
//! Field numbers and types are those of `opentelemetry/proto/trace/v1/trace.proto`,
//! `common/v1/common.proto`, `resource/v1/resource.proto` and
//! `collector/trace/v1/trace_service.proto` (OTLP 1.x). The integration tests decode what this
//! writes with the official generated types, so a wrong field number or wire type fails there.
//!
//! A span is encoded once, when its request ends; a batch is those bytes concatenated under one
//! resource and scope, so the exporter never re-encodes.

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `Span.SpanKind.SPAN_KIND_SERVER`.
pub const SPAN_KIND_SERVER: u64 = 2;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
pub const STATUS_CODE_ERROR: u64 = 2;
/// `SpanFlags`: bits 8 and 9 tell whether the parent span context is known to be remote.
pub const SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
pub const SPAN_FLAGS_CONTEXT_IS_REMOTE: u32 = 0x200;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 still takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from((field << 3) | wire));
}

fn tag_len(field: u32) -> usize {
    varint_len(u64::from(field << 3))
}

/// A length-delimited field: bytes, a string, or an encoded message.
pub fn bytes_field(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
    tag(buf, field, LEN);
    varint(buf, value.len() as u64);
    buf.extend_from_slice(value);
}

pub fn varint_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    tag(buf, field, VARINT);
    varint(buf, value);
}

pub fn fixed64_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    tag(buf, field, FIXED64);
    buf.extend_from_slice(&value.to_le_bytes());
}

pub fn fixed32_field(buf: &mut Vec<u8>, field: u32, value: u32) {
    tag(buf, field, FIXED32);
    buf.extend_from_slice(&value.to_le_bytes());
}

/// An attribute value (`AnyValue`).
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
}

/// A `KeyValue` message as field `field` of its parent (`attributes` is 9 in `Span`, 1 in
/// `Resource`, 3 in `InstrumentationScope`).
pub fn attribute(buf: &mut Vec<u8>, field: u32, key: &str, value: Value<'_>) {
    // AnyValue: string_value = 1, int_value = 3 (int64: two's complement as a varint).
    let any_len = match value {
        Value::Str(s) => tag_len(1) + varint_len(s.len() as u64) + s.len(),
        Value::Int(i) => tag_len(3) + varint_len(i as u64),
    };
    let kv_len =
        tag_len(1) + varint_len(key.len() as u64) + key.len() + tag_len(2) + varint_len(any_len as u64) + any_len;
    tag(buf, field, LEN);
    varint(buf, kv_len as u64);
    bytes_field(buf, 1, key.as_bytes());
    tag(buf, 2, LEN);
    varint(buf, any_len as u64);
    match value {
        Value::Str(s) => bytes_field(buf, 1, s.as_bytes()),
        Value::Int(i) => varint_field(buf, 3, i as u64),
    }
}

/// Encodes an `ExportTraceServiceRequest` holding `spans` (each an encoded `Span` message) under
/// one `ResourceSpans` (attributes `resource`) and one `ScopeSpans` (scope `name`/`version`).
pub fn export_request<'a>(
    resource: &[(&str, &str)],
    scope: (&str, &str),
    spans: impl Iterator<Item = &'a [u8]> + Clone,
) -> Vec<u8> {
    let mut res = Vec::with_capacity(128);
    for (k, v) in resource {
        attribute(&mut res, 1, k, Value::Str(v));
    }
    let mut scope_msg = Vec::with_capacity(32);
    bytes_field(&mut scope_msg, 1, scope.0.as_bytes());
    bytes_field(&mut scope_msg, 2, scope.1.as_bytes());

    let spans_len: usize = spans
        .clone()
        .map(|s| tag_len(2) + varint_len(s.len() as u64) + s.len())
        .sum();
    let scope_spans_len = tag_len(1) + varint_len(scope_msg.len() as u64) + scope_msg.len() + spans_len;
    let resource_spans_len = tag_len(1)
        + varint_len(res.len() as u64)
        + res.len()
        + tag_len(2)
        + varint_len(scope_spans_len as u64)
        + scope_spans_len;
    let mut out = Vec::with_capacity(tag_len(1) + varint_len(resource_spans_len as u64) + resource_spans_len);
    // ExportTraceServiceRequest.resource_spans = 1
    tag(&mut out, 1, LEN);
    varint(&mut out, resource_spans_len as u64);
    // ResourceSpans.resource = 1, .scope_spans = 2
    bytes_field(&mut out, 1, &res);
    tag(&mut out, 2, LEN);
    varint(&mut out, scope_spans_len as u64);
    // ScopeSpans.scope = 1, .spans = 2
    bytes_field(&mut out, 1, &scope_msg);
    for s in spans {
        bytes_field(&mut out, 2, s);
    }
    out
}

/// What a collector's `ExportTraceServiceResponse` says it refused (`partial_success`), if
/// anything: (rejected span count, its message). An unreadable body is not a refusal: the
/// status code already said the export succeeded.
pub fn partial_success(body: &[u8]) -> Option<(i64, String)> {
    let mut r = Reader(body);
    let mut found = None;
    while let Some((field, wire)) = r.key() {
        match (field, wire) {
            (1, LEN) => {
                let mut inner = Reader(r.len_delimited()?);
                let (mut rejected, mut message) = (0i64, String::new());
                while let Some((field, wire)) = inner.key() {
                    match (field, wire) {
                        (1, VARINT) => rejected = inner.varint()? as i64,
                        (2, LEN) => message = String::from_utf8_lossy(inner.len_delimited()?).into_owned(),
                        _ => inner.skip(wire)?,
                    }
                }
                found = Some((rejected, message));
            }
            _ => r.skip(wire)?,
        }
    }
    found.filter(|(rejected, message)| *rejected > 0 || !message.is_empty())
}

/// A protobuf reader over untrusted bytes: every read is bounds-checked and returns `None` on
/// truncation, never panics.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn key(&mut self) -> Option<(u64, u32)> {
        if self.0.is_empty() {
            return None;
        }
        let k = self.varint()?;
        Some((k >> 3, (k & 7) as u32))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn len_delimited(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    fn skip(&mut self, wire: u32) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.len_delimited().map(drop),
            FIXED32 => self.take(4).map(drop),
            // Groups (3, 4) are obsolete and absent from OTLP; anything else is corrupt.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        for (v, want) in [
            (0u64, &[0u8][..]),
            (1, &[1]),
            (150, &[0x96, 0x01]),
            (u64::MAX, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b, want);
            assert_eq!(varint_len(v), want.len());
        }
    }

    #[test]
    fn reads_partial_success_and_survives_garbage() {
        // partial_success { rejected_spans: 3, error_message: "no" }
        let body = [0x0a, 0x06, 0x08, 0x03, 0x12, 0x02, b'n', b'o'];
        assert_eq!(partial_success(&body), Some((3, "no".to_string())));
        assert_eq!(partial_success(&[]), None);
        // An empty partial_success means full success.
        assert_eq!(partial_success(&[0x0a, 0x00]), None);
        // Truncated or nonsense input: no panic, no refusal.
        assert_eq!(partial_success(&[0x0a, 0x09, 0x08]), None);
        assert_eq!(partial_success(&[0xff; 16]), None);
        assert_eq!(partial_success(b"<html>bad gateway</html>"), None);
    }
}
