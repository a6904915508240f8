//! Building one access log line: a JSON object written field by field into a reused buffer.
//!
//! A line is made on the request's thread for every request, so it avoids what a general
//! serializer costs there: no allocation per field (strings are escaped in place), numbers and
//! the client address written digit by digit rather than through `core::fmt` (which showed in
//! profiles), and the timestamp's date and time of day formatted once per second per thread, not
//! once per line.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One line being built; fields appear in the order they are added.
pub struct Line<'a> {
    out: &'a mut String,
}

impl<'a> Line<'a> {
    /// Starts a line in `out` (cleared) with its `ts` field, the time of the call.
    pub(super) fn start(out: &'a mut String, clock: &mut Clock) -> Line<'a> {
        out.clear();
        out.push('{');
        let mut line = Line { out };
        line.key("ts");
        line.out.push('"');
        clock.write_now(line.out);
        line.out.push_str("\",");
        line
    }

    /// Ends the object (the trailing comma becomes the closing brace).
    pub(super) fn finish(self) {
        if self.out.ends_with(',') {
            self.out.pop();
        }
        self.out.push('}');
    }

    /// Keys are the access log's own names, which need no escaping.
    fn key(&mut self, key: &'static str) {
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    /// `"key":"value"`, escaped per RFC 8259.
    pub fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        self.out.push('"');
        escape_into(self.out, value);
        self.out.push_str("\",");
    }

    /// `"key":"value"` for anything that displays, formatted straight into the line (escaped).
    pub fn display(&mut self, key: &'static str, value: impl std::fmt::Display) {
        self.key(key);
        self.out.push('"');
        // Writing into a String cannot fail; a Display impl that errs leaves what it wrote.
        let _ = write!(Escaping(self.out), "{value}");
        self.out.push_str("\",");
    }

    /// `"key":n`.
    pub fn num(&mut self, key: &'static str, value: u64) {
        self.key(key);
        push_u64(self.out, value);
        self.out.push(',');
    }

    /// `"key":"a-b"`, the form of a request id.
    pub fn dashed(&mut self, key: &'static str, a: u64, b: u64) {
        self.key(key);
        self.out.push('"');
        push_u64(self.out, a);
        self.out.push('-');
        push_u64(self.out, b);
        self.out.push_str("\",");
    }

    /// `"key":"ip:port"` as `SocketAddr` displays it (`[v6]:port` for IPv6).
    pub fn addr(&mut self, key: &'static str, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(v4) => {
                self.key(key);
                self.out.push('"');
                let [a, b, c, d] = v4.ip().octets();
                for (i, octet) in [a, b, c, d].into_iter().enumerate() {
                    if i > 0 {
                        self.out.push('.');
                    }
                    push_u64(self.out, u64::from(octet));
                }
                self.out.push(':');
                push_u64(self.out, u64::from(v4.port()));
                self.out.push_str("\",");
            }
            SocketAddr::V6(_) => self.display(key, addr),
        }
    }

    /// `"key":m.uuu`: milliseconds with three decimals, rounded to the nearest microsecond.
    pub fn millis(&mut self, key: &'static str, d: Duration) {
        self.key(key);
        let micros = (d.as_nanos() + 500) / 1000;
        push_u64(self.out, u64::try_from(micros / 1000).unwrap_or(u64::MAX));
        self.out.push('.');
        push_padded(self.out, (micros % 1000) as u32, 3);
        self.out.push(',');
    }
}

/// Appends `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// Appends the last `width` decimal digits of `n`, zero-padded (`width` at most 9).
fn push_padded(out: &mut String, mut n: u32, width: usize) {
    let mut digits = [b'0'; 9];
    let width = width.min(digits.len());
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push_str(std::str::from_utf8(&digits[..width]).unwrap_or_default());
}

/// Appends `s` with the escapes serde_json writes: `"`, `\`, and control characters (`\n`, `\r`,
/// `\t`, `\b`, `\f`, else `\u00xx`). Everything else, non-ASCII included, is copied as is.
pub fn escape_into(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        // Every byte that needs an escape is ASCII, so these slice bounds are char boundaries.
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// A `fmt::Write` that escapes what it is given into a line.
struct Escaping<'a>(&'a mut String);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// The wall clock as the access log writes it: RFC 3339, UTC, with the milliseconds (trailing
/// zeros left out, and no fraction at all on a whole second, as the `time` crate writes it).
/// Remembers the formatted second, so that only the fraction is formatted on most lines.
#[derive(Debug, Default)]
pub struct Clock {
    /// The Unix second `date_time` holds, `None` before the first line.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS` of that second.
    date_time: String,
}

impl Clock {
    fn write_now(&mut self, out: &mut String) {
        // A clock before 1970 is a broken clock; the epoch is as good an answer as any.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.write(out, now);
    }

    /// Writes the instant `since_epoch` after the Unix epoch.
    pub fn write(&mut self, out: &mut String, since_epoch: Duration) {
        let second = since_epoch.as_secs();
        if self.second != Some(second) {
            self.date_time.clear();
            format_second(&mut self.date_time, second);
            self.second = Some(second);
        }
        out.push_str(&self.date_time);
        let mut millis = since_epoch.subsec_millis();
        if millis != 0 {
            let mut digits = 3;
            while millis % 10 == 0 {
                millis /= 10;
                digits -= 1;
            }
            out.push('.');
            push_padded(out, millis, digits);
        }
        out.push('Z');
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix second, UTC.
fn format_second(out: &mut String, second: u64) {
    let dt = i64::try_from(second)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_serde_json_does() {
        let mut all = String::new();
        for c in (0u32..0x100).chain([0x2028, 0x1f600]).filter_map(char::from_u32) {
            all.push(c);
        }
        for s in [all.as_str(), "", "plain", "a\"b\\c\n", "\u{7f}é\u{1}"] {
            let mut ours = String::new();
            escape_into(&mut ours, s);
            let theirs = serde_json::to_string(s).unwrap();
            assert_eq!(format!("\"{ours}\""), theirs);
        }
    }

    #[test]
    fn time_is_written_as_the_time_crate_writes_rfc3339_with_milliseconds() {
        let mut clock = Clock::default();
        let base = 1_767_607_923u64; // 2026-01-05T10:12:03Z
        let cases = [
            0u64,
            1,
            10,
            100,
            120,
            412,
            999,
            1_000,
            59_999,
            86_400_000,
            31_536_000_000,
        ];
        for offset_ms in cases.iter().flat_map(|&c| [c, c + 7]) {
            for nanos_extra in [0u32, 999_999] {
                let t = Duration::from_secs(base)
                    + Duration::from_millis(offset_ms)
                    + Duration::from_nanos(u64::from(nanos_extra));
                let mut ours = String::new();
                clock.write(&mut ours, t);
                let dt = time::OffsetDateTime::from_unix_timestamp_nanos(t.as_nanos() as i128).unwrap();
                let dt = dt.replace_nanosecond(dt.millisecond() as u32 * 1_000_000).unwrap();
                let theirs = dt.format(&time::format_description::well_known::Rfc3339).unwrap();
                assert_eq!(ours, theirs, "at {t:?}");
            }
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_its_fields_in_order() {
        let mut buf = String::new();
        let mut clock = Clock::default();
        let mut line = Line::start(&mut buf, &mut clock);
        line.num("conn_id", 7);
        line.dashed("req_id", 7, 3);
        line.addr("remote", "203.0.113.7:51544".parse().unwrap());
        line.addr("remote6", "[2001:db8::1]:443".parse().unwrap());
        line.num("max", u64::MAX);
        line.str("path", "/a\"b?token=***");
        line.millis("duration_ms", Duration::from_nanos(412_600));
        line.millis("zero_ms", Duration::ZERO);
        line.millis("long_ms", Duration::from_millis(123_456) + Duration::from_micros(78));
        line.finish();
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(buf.starts_with("{\"ts\":\""), "{buf}");
        assert!(buf.ends_with(
            r#""conn_id":7,"req_id":"7-3","remote":"203.0.113.7:51544","remote6":"[2001:db8::1]:443","max":18446744073709551615,"path":"/a\"b?token=***","duration_ms":0.413,"zero_ms":0.000,"long_ms":123456.078}"#
        ), "{buf}");
        assert_eq!(keys.len(), 10, "{keys:?}");
    }
}
