//! gatehouse: an HTTP/1.1 + HTTP/2 server and reverse proxy in which nothing fails silently.
//!
//! The binary is configured by a TOML file; the library runs any tower service behind the same
//! listeners, TLS, timeouts, limits and graceful drain. See [`Server`].
// `deny`, not `forbid`: socket activation (listen::inherit) must own inherited descriptors, and
// that module alone is allowed `unsafe`, each use with a SAFETY comment.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod conn;
pub mod handlers;
pub mod http;
pub mod lifecycle;
pub mod listen;
pub mod observe;
pub mod proxy;
pub mod route;
mod server;
pub mod tls;

pub use config::Config;
pub use http::{HttpService, RequestBody, RequestContext, ServiceBody};
pub use server::{prepare, Prepared, Server, ServerHandle, StartError};

impl Config {
    /// Parses configuration text (TOML). Validation happens when the server is prepared.
    pub fn from_toml(text: &str) -> Result<Config, StartError> {
        config::load_str(text).map_err(|message| {
            let mut f = config::Findings::default();
            f.error("config", message, "");
            StartError::Invalid(f)
        })
    }
}
