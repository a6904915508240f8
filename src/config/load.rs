//! Finding and parsing the configuration file.

use super::Config;
use std::path::{Path, PathBuf};

/// Where the effective configuration came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigSource {
    File(PathBuf),
    /// No `-c` and no `./gatehouse.toml`: the built-in default.
    Embedded,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Embedded => f.write_str("embedded default"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read configuration file {path}: {source}; check the path given to -c")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The default configuration file looked for in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "gatehouse.toml";

/// Loads `explicit`, else `./gatehouse.toml`, else the embedded default.
pub fn load(explicit: Option<&Path>) -> Result<(Config, ConfigSource), LoadError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG_FILE);
            if !p.exists() {
                let public = Path::new("public").is_dir();
                return Ok((Config::embedded_default(public), ConfigSource::Embedded));
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
        path: path.clone(),
        source,
    })?;
    let config = load_str(&text).map_err(|message| LoadError::Parse {
        path: path.clone(),
        message,
    })?;
    Ok((config, ConfigSource::File(path)))
}

/// Parses configuration text; the error names the line and the key.
pub fn load_str(text: &str) -> Result<Config, String> {
    toml::from_str::<Config>(text).map_err(|e| {
        let mut msg = e.message().to_string();
        if let Some(span) = e.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
            msg = format!("line {line} (`{snippet}`): {msg}");
        }
        msg
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_the_line() {
        let err = load_str("[timeouts]\nidel = \"5s\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("idel"), "{err}");
    }

    #[test]
    fn bare_numbers_for_durations_are_rejected() {
        let err = load_str("[timeouts]\nidle = 5\n").unwrap_err();
        assert!(err.contains("\"5s\""), "{err}");
    }

    #[test]
    fn spec_example_parses() {
        let c = load_str(
            r#"
[server]
workers = 0
[[listeners]]
name = "public"
address = "0.0.0.0:8443"
protocols = ["h2", "http/1.1"]
on_no_alpn = "http/1.1"
h2c_upgrade = false
[listeners.tls]
cert = "cert.pem"
key = "key.pem"
min_version = "1.2"
[limits]
max_header_bytes = "16KiB"
[[routes]]
host = "*"
path = "/"
respond = { status = 200, body = "ok" }
"#,
        )
        .unwrap();
        assert_eq!(c.listeners[0].name, "public");
        assert_eq!(c.limits.max_header_bytes.get(), 16384);
    }
}
