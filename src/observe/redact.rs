//! Redaction of secrets before anything is written: query parameters, header values and cookies.
//!
//! One [`Redactor`] serves the access log and the `h1_headers` debug switch, so both apply the
//! same `[log]` lists and mode. In `hash` mode a value becomes a keyed digest (HMAC-SHA256): equal
//! values give equal digests, so requests can be correlated, but without the key nobody can test
//! a guess against a logged digest, which a plain hash of a short token would allow.

use crate::config::{LogConfig, RedactMode};
use http::HeaderMap;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The key file made in the state directory when `[log] hash_key_file` is not set.
pub const STATE_HASH_KEY_FILE: &str = "log-hash.key";

/// Random bytes in a generated key: the HMAC-SHA256 block-size recommendation (RFC 2104 §3).
const GENERATED_KEY_BYTES: usize = 32;

/// Why the hash key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum HashKeyError {
    #[error("cannot read the log hash key {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the log hash key {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("cannot create the log hash key {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot generate a random log hash key: {0}")]
    Random(String),
}

/// The secret that keys `hash` mode digests.
///
/// Taken from `[log] hash_key_file` when set (share one file across instances to correlate
/// their logs), else from `<state_dir>/log-hash.key`, generated on first need. Either way it
/// outlives restarts and reloads, so a digest keeps naming the same value.
#[derive(Clone)]
pub struct HashKey(std::sync::Arc<aws_lc_rs::hmac::Key>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    pub fn from_bytes(secret: &[u8]) -> HashKey {
        HashKey(std::sync::Arc::new(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            secret,
        )))
    }

    /// Loads the configured key file, or the state directory's (making it when absent).
    pub fn load(cfg: &LogConfig, state_dir: &Path) -> Result<HashKey, HashKeyError> {
        match &cfg.hash_key_file {
            Some(path) => read_key(path),
            None => {
                let path = state_dir.join(STATE_HASH_KEY_FILE);
                match read_key(&path) {
                    Err(HashKeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        create_key(&path)
                    }
                    other => other,
                }
            }
        }
    }

    /// `h:` and the first 64 bits of HMAC-SHA256(key, value), in hex: short enough to read,
    /// long enough that two different values in one log practically never collide.
    pub fn digest(&self, value: &[u8]) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.0, value);
        let mut out = String::with_capacity(18);
        out.push_str("h:");
        for b in &tag.as_ref()[..8] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

fn read_key(path: &Path) -> Result<HashKey, HashKeyError> {
    let bytes = std::fs::read(path).map_err(|source| HashKeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let secret = bytes.trim_ascii();
    if secret.is_empty() {
        return Err(HashKeyError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(HashKey::from_bytes(secret))
}

/// Writes a fresh random key readable by this user only. `create_new`, so two processes
/// sharing a state directory never overwrite each other's key: the loser reads the winner's.
fn create_key(path: &Path) -> Result<HashKey, HashKeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let create = |source| HashKeyError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(create)?;
    }
    let mut raw = [0u8; GENERATED_KEY_BYTES];
    aws_lc_rs::rand::fill(&mut raw).map_err(|e| HashKeyError::Random(e.to_string()))?;
    let mut hex = String::with_capacity(2 * GENERATED_KEY_BYTES + 1);
    for b in raw {
        let _ = write!(hex, "{b:02x}");
    }
    hex.push('\n');
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(hex.as_bytes()).map_err(create)?;
            f.sync_all().map_err(create)?;
            Ok(HashKey::from_bytes(hex.trim_ascii().as_bytes()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(create(e)),
    }
}

/// Applies the `[log]` redaction lists and mode.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    query: Vec<String>,
    headers: Vec<String>,
    mode: RedactMode,
    /// Present in `hash` mode only.
    key: Option<HashKey>,
}

impl Redactor {
    /// `key` must be `Some` in `hash` mode (see [`HashKey::load`]); without one, hash mode masks.
    pub fn new(cfg: &LogConfig, key: Option<HashKey>) -> Self {
        Redactor {
            query: cfg.redact_query.iter().map(|n| n.to_ascii_lowercase()).collect(),
            headers: cfg.redact_headers.iter().map(|n| n.to_ascii_lowercase()).collect(),
            mode: cfg.redact_mode,
            key,
        }
    }

    /// What a sensitive value becomes; `None` in `drop` mode.
    fn replace(&self, value: &[u8]) -> Option<String> {
        match (self.mode, &self.key) {
            (RedactMode::Drop, _) => None,
            (RedactMode::Hash, Some(key)) => Some(key.digest(value)),
            _ => Some("***".to_string()),
        }
    }

    /// `path_and_query` (or an absolute URI) with the values of listed query parameters masked,
    /// hashed or dropped. Parameter names are compared after percent-decoding, ignoring case.
    pub fn path<'a>(&self, path_and_query: &'a str) -> Cow<'a, str> {
        let Some((path, query)) = path_and_query.split_once('?') else {
            return path_and_query.into();
        };
        let sensitive = |k: &str| {
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            self.query.iter().any(|n| n.eq_ignore_ascii_case(&k))
        };
        if !query.split('&').any(|kv| sensitive(kv.split('=').next().unwrap_or(""))) {
            return path_and_query.into();
        }
        let mut out = String::with_capacity(path_and_query.len());
        out.push_str(path);
        let mut first = true;
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let value = if sensitive(k) {
                match self.replace(v.as_bytes()) {
                    None => continue,
                    Some(r) => Cow::Owned(r),
                }
            } else {
                Cow::Borrowed(v)
            };
            out.push(if first { '?' } else { '&' });
            first = false;
            out.push_str(k);
            out.push('=');
            out.push_str(&value);
        }
        out.into()
    }

    /// A header value as it may be logged: `None` when it must not appear at all (a listed header
    /// in `drop` mode). Listed `cookie` and `set-cookie` headers keep their cookie names and
    /// attributes, which help debugging, and lose every value.
    pub fn header<'a>(&self, name: &str, value: &'a [u8]) -> Option<Cow<'a, str>> {
        let listed = self.headers.iter().any(|n| n.eq_ignore_ascii_case(name));
        if !listed {
            return Some(String::from_utf8_lossy(value));
        }
        if self.mode == RedactMode::Drop {
            return None;
        }
        let text = String::from_utf8_lossy(value);
        if name.eq_ignore_ascii_case("cookie") {
            let pairs: Vec<String> = text.split(';').map(|p| self.cookie_pair(p.trim())).collect();
            return Some(pairs.join("; ").into());
        }
        if name.eq_ignore_ascii_case("set-cookie") {
            // `name=value; Path=/; HttpOnly`: only the first pair carries the secret.
            let (pair, attributes) = text.split_once(';').unwrap_or((text.as_ref(), ""));
            let mut out = self.cookie_pair(pair.trim());
            if !attributes.is_empty() {
                out.push(';');
                out.push_str(attributes);
            }
            return Some(out.into());
        }
        self.replace(value).map(Cow::Owned)
    }

    fn cookie_pair(&self, pair: &str) -> String {
        match pair.split_once('=') {
            Some((k, v)) => format!("{k}={}", self.replace(v.as_bytes()).unwrap_or_default()),
            None => self.replace(pair.as_bytes()).unwrap_or_default(),
        }
    }

    /// One line for the `h1_headers` switch: the start line (`shown`, already redacted) and every
    /// field, values redacted, with the block's size on the wire: `raw_start_len` (the start line
    /// as received or sent) and every field before redaction, CRLFs included.
    pub fn head_line(&self, what: &str, raw_start_len: usize, shown: &str, headers: &HeaderMap) -> String {
        let size = raw_start_len
            + 2
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
                .sum::<usize>()
            + 2;
        let mut out = String::with_capacity(64 + size);
        let _ = write!(out, "{what} ({size} bytes, {} fields): {shown}", headers.len());
        for (name, value) in headers {
            if let Some(v) = self.header(name.as_str(), value.as_bytes()) {
                let _ = write!(out, " | {name}: {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(mode: RedactMode) -> Redactor {
        let cfg = LogConfig {
            redact_mode: mode,
            ..LogConfig::default()
        };
        Redactor::new(&cfg, Some(HashKey::from_bytes(b"test key")))
    }

    #[test]
    fn query_values_are_redacted_by_mode() {
        let r = redactor(RedactMode::Mask);
        assert_eq!(r.path("/a?token=s3cret&x=1"), "/a?token=***&x=1");
        assert_eq!(r.path("/a?x=1"), "/a?x=1");
        assert_eq!(r.path("/a?To%6Ben=s3cret"), "/a?To%6Ben=***");
        let r = redactor(RedactMode::Drop);
        assert_eq!(r.path("/a?x=1&password=p"), "/a?x=1");
        let r = redactor(RedactMode::Hash);
        let a = r.path("/a?token=s3cret").into_owned();
        assert!(!a.contains("s3cret"));
        assert_eq!(a, r.path("/b?token=s3cret").replace("/b", "/a"));
        assert_ne!(a, r.path("/a?token=other"));
    }

    #[test]
    fn digests_depend_on_the_key() {
        let a = HashKey::from_bytes(b"one").digest(b"v");
        assert_eq!(a, HashKey::from_bytes(b"one").digest(b"v"));
        assert_ne!(a, HashKey::from_bytes(b"two").digest(b"v"));
        assert_eq!(a.len(), 18);
    }

    #[test]
    fn headers_and_cookies_keep_names_and_lose_values() {
        let r = redactor(RedactMode::Mask);
        assert_eq!(r.header("Authorization", b"Bearer abc").unwrap(), "***");
        assert_eq!(r.header("accept", b"*/*").unwrap(), "*/*");
        assert_eq!(r.header("cookie", b"a=1; b=2").unwrap(), "a=***; b=***");
        assert_eq!(
            r.header("set-cookie", b"sid=xyz; Path=/; HttpOnly").unwrap(),
            "sid=***; Path=/; HttpOnly"
        );
        assert!(redactor(RedactMode::Drop).header("cookie", b"a=1").is_none());
        let h = redactor(RedactMode::Hash);
        let c = h.header("cookie", b"a=1; b=1").unwrap().into_owned();
        let (a, b) = c.split_once("; ").unwrap();
        assert_eq!(a.trim_start_matches("a="), b.trim_start_matches("b="));
    }

    #[test]
    fn state_key_is_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::default();
        let one = HashKey::load(&cfg, &dir.path().join("state")).unwrap().digest(b"x");
        let two = HashKey::load(&cfg, &dir.path().join("state")).unwrap().digest(b"x");
        assert_eq!(one, two);
        let cfg = LogConfig {
            hash_key_file: Some(dir.path().join("missing")),
            ..LogConfig::default()
        };
        assert!(HashKey::load(&cfg, dir.path()).is_err());
    }
}
