//! Human-friendly units in configuration: durations (`"10s"`, `"250ms"`) and sizes (`"16KiB"`).

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration written as `"10s"`, `"250ms"`, `"1m 30s"` or `"0s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(pub Duration);

impl Span {
    pub const fn secs(s: u64) -> Self {
        Span(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Span(Duration::from_millis(ms))
    }
    pub fn get(self) -> Duration {
        self.0
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Span)
            .map_err(|e| format!("`{s}` is not a duration ({e}); write it like \"10s\", \"250ms\" or \"2m\""))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos() % 1_000_000 == 0 {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}", humantime::format_duration(d))
        }
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"10s\" or \"250ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                Err(E::custom(format!(
                    "a bare number ({v}) is ambiguous for a duration; write \"{v}s\" or \"{v}ms\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes written as `"16KiB"`, `"10MiB"`, `"1GiB"`, `"512B"` or a plain integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    pub const fn kib(n: u64) -> Self {
        Size(n * 1024)
    }
    pub const fn mib(n: u64) -> Self {
        Size(n * 1024 * 1024)
    }
    pub fn get(self) -> u64 {
        self.0
    }
    /// The size as a `u32`, saturating: HTTP/2 settings are 32-bit.
    pub fn as_u32(self) -> u32 {
        u32::try_from(self.0).unwrap_or(u32::MAX)
    }
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || format!("`{s}` is not a size; write it like \"16KiB\", \"10MiB\" or \"512B\"");
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" | "KB" | "kB" => 1024,
            "MiB" | "M" | "MB" => 1024 * 1024,
            "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
            _ => return Err(bad()),
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (m, u) in UNITS {
            if self.0 >= m && self.0 % m == 0 {
                return write!(f, "{}{}", self.0 / m, u);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"16KiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_print() {
        assert_eq!("10s".parse::<Span>().unwrap(), Span::secs(10));
        assert_eq!("250ms".parse::<Span>().unwrap(), Span::millis(250));
        assert_eq!(Span::millis(250).to_string(), "250ms");
        assert_eq!(Span::secs(75).to_string(), "75s");
        assert!("ten".parse::<Span>().is_err());
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("16KiB".parse::<Size>().unwrap(), Size(16384));
        assert_eq!("10MiB".parse::<Size>().unwrap(), Size(10 << 20));
        assert_eq!("512".parse::<Size>().unwrap(), Size(512));
        assert_eq!(Size(16384).to_string(), "16KiB");
        assert_eq!(Size(1000).to_string(), "1000B");
        assert!("12 parsecs".parse::<Size>().is_err());
        assert!("99999999999999999999GiB".parse::<Size>().is_err());
    }
}
