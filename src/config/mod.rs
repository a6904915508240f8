//! The configuration file: serde types, their defaults, loading, and validation.
//!
//! Every default has a `DEFAULT_*` constant with the reason for its value. Types
//! reject unknown keys, so a misspelt key is an error rather than a silent no-op.

mod admission;
mod load;
mod telemetry;
mod units;
mod upstream;
mod validate;

pub use load::{load, load_str, ConfigSource, LoadError};
pub use telemetry::TracingConfig;
pub use units::{Size, Span};
pub use upstream::*;
pub use validate::{Finding, Findings, Severity};

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The state directory: self-signed certificates live here between runs.
pub const DEFAULT_STATE_DIR: &str = ".gatehouse";

/// Long enough for a slow mobile handshake, short enough that half-open handshakes cannot pile up.
pub const DEFAULT_TLS_HANDSHAKE: Span = Span::secs(10);
/// Slowloris bound: a well-behaved client sends a whole header block in one round trip.
pub const DEFAULT_HEADER_READ: Span = Span::secs(10);
/// Slow POST bound: a gap of 30s between two body reads means the client has stalled.
pub const DEFAULT_BODY_READ: Span = Span::secs(30);
/// Slow read bound: a client that accepts no bytes for 30s is not downloading.
pub const DEFAULT_WRITE: Span = Span::secs(30);
/// Longer than common load balancer idle timeouts (60s), so the balancer closes first and never races a close.
pub const DEFAULT_IDLE: Span = Span::secs(75);
/// Whole-request bound; handlers that need longer say so in their route.
pub const DEFAULT_REQUEST: Span = Span::secs(60);
/// Browsers preconnect sockets they may never use; they must not be held for the whole idle timeout.
pub const DEFAULT_FIRST_REQUEST: Span = Span::secs(10);

/// Far below the default file-descriptor limits of a tuned host, far above one machine's honest load.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Browsers open at most ~6 connections per origin; 256 leaves room for NAT and proxies.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 256;
/// Rotates long-lived connections so load spreads after scaling, like nginx's `keepalive_requests`.
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: u32 = 1000;
/// Fits any legitimate header block (cookies included) while bounding memory per request.
pub const DEFAULT_MAX_HEADER_BYTES: Size = Size::kib(16);
/// Large enough for form posts and API payloads; uploads raise it per deployment.
pub const DEFAULT_MAX_BODY_BYTES: Size = Size::mib(10);
/// nginx's default request-line buffer; longer targets are almost always abuse or a client bug.
pub const DEFAULT_MAX_URI_BYTES: Size = Size::kib(8);
/// No global limit on proxied requests in flight (0): the right figure is the upstreams' capacity,
/// which gatehouse cannot know, and `max_connections` × `max_concurrent_streams` already bounds
/// what clients can hold open. A made-up default would shed healthy traffic on a large host.
pub const DEFAULT_MAX_PROXY_IN_FLIGHT: u32 = 0;
/// At once, as nginx does: freed later, the buffers of a burst of connections stay resident (the
/// allocator keeps freed memory between live allocations; measured 12.9 KB per idle connection
/// with "1s" against 2.7 KB). A busy connection holds its state longer (`conn::h1`, `BUSY_HOLD`),
/// so the rebuild is not paid per request (docs/performance.md).
pub const DEFAULT_IDLE_RELEASE_AFTER: Span = Span::secs(0);

/// RFC 9113 recommends at least 100; 128 matches common browsers' expectations.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// 1MiB per stream keeps a 100ms-RTT download near 80Mbit/s without unbounded buffering.
pub const DEFAULT_H2_INITIAL_STREAM_WINDOW: Size = Size::mib(1);
/// Twice the stream window so two streams can progress at full speed together.
pub const DEFAULT_H2_INITIAL_CONNECTION_WINDOW: Size = Size::mib(2);
/// The protocol minimum (RFC 9113 §4.2); larger frames only add head-of-line blocking.
pub const DEFAULT_H2_MAX_FRAME_SIZE: Size = Size::kib(16);
/// Detects dead peers behind NATs that drop idle flows after ~60s.
pub const DEFAULT_H2_KEEPALIVE_INTERVAL: Span = Span::secs(30);
/// A peer that does not answer PING within 10s is gone.
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT: Span = Span::secs(10);
/// Browsers send a handful of PING/SETTINGS/PRIORITY/RST_STREAM frames per page; 1000/s (burst
/// 2000) is far above that and far below the rates of the 2019 ping/settings/reset flood attacks.
pub const DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND: u32 = 1000;
/// The h2 crate's default against rapid reset (CVE-2023-44487): streams reset before we accept them.
pub const DEFAULT_H2_MAX_PENDING_RESET_STREAMS: u32 = 20;
/// hyper's default against MadeYouReset: streams the server had to reset for the client's errors.
pub const DEFAULT_H2_MAX_LOCAL_RESET_STREAMS: u32 = 1024;
/// hyper's default per-stream send buffer: bounds memory a client that stops reading can pin.
pub const DEFAULT_H2_MAX_SEND_BUFFER: Size = Size::kib(400);

/// No delay by default: deregistration delay belongs to deployments with a load balancer.
pub const DEFAULT_DRAIN_DELAY: Span = Span::secs(0);
/// Matches Kubernetes' default termination grace period, so the server finishes before SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT: Span = Span::secs(30);
/// Starting the new binary takes well under a second (a self-signed certificate included); a
/// process not ready in 30s is stuck, and the old one must get back to serving alone.
pub const DEFAULT_UPGRADE_TIMEOUT: Span = Span::secs(30);
/// Long enough for a client in the middle of a request/response cycle to send its next request
/// (which is answered, with `Connection: close`), short enough that the old process leaves soon.
pub const DEFAULT_HANDOVER_GRACE: Span = Span::secs(2);

pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub listeners: Vec<ListenerConfig>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub http2: Http2Config,
    pub shutdown: ShutdownConfig,
    pub routes: Vec<RouteConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub traffic_classes: Vec<TrafficClassConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitConfig>,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub debug: DebugConfig,
    pub tracing: TracingConfig,
    pub static_cache: StaticCacheConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads, each running its own event loop. 0 = one per core.
    pub workers: usize,
    pub state_dir: PathBuf,
    /// How often to look at every TLS listener's certificate and key files, and reload the
    /// certificates when they changed. Default is off (absent): certificates change on reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_certificates: Option<Span>,
}

/// Below this, polling certificate files costs CPU and gains nothing: a rotation is applied one
/// stable interval after it is written anyway.
pub const MIN_WATCH_CERTIFICATES: Span = Span::millis(100);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 0,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            watch_certificates: None,
        }
    }
}

/// An application protocol a listener may speak.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[serde(rename = "h2")]
    H2,
    #[serde(rename = "http/1.1")]
    Http11,
    #[serde(rename = "h2c")]
    H2c,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H2 => "h2",
            Protocol::Http11 => "http/1.1",
            Protocol::H2c => "h2c",
        }
    }
}

/// What a TLS listener does with a client that offers no ALPN at all.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum OnNoAlpn {
    /// Serve HTTP/1.1, counted as `gatehouse_alpn_fallback_total{reason="client_offered_none"}`.
    #[default]
    #[serde(rename = "http/1.1")]
    Http11,
    /// Fail the handshake with a `no_application_protocol` alert.
    #[serde(rename = "reject")]
    Reject,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    /// TLS: ALPN ids in preference order. Cleartext: "http/1.1" and/or "h2c".
    /// Default: `["h2", "http/1.1"]` with TLS, `["http/1.1", "h2c"]` without.
    #[serde(default)]
    pub protocols: Option<Vec<Protocol>>,
    #[serde(default)]
    pub on_no_alpn: OnNoAlpn,
    /// Cleartext only: honour `Upgrade: h2c` (RFC 7540 §3.2). Default is false: RFC 9113 deprecates it.
    #[serde(default)]
    pub h2c_upgrade: bool,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl ListenerConfig {
    /// The protocols this listener offers, defaults applied.
    pub fn effective_protocols(&self) -> Vec<Protocol> {
        match (&self.protocols, self.tls.is_some()) {
            (Some(p), _) => p.clone(),
            (None, true) => vec![Protocol::H2, Protocol::Http11],
            (None, false) => vec![Protocol::Http11, Protocol::H2c],
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// Default number of stateful TLS sessions remembered per listener (about 0.5 MiB).
pub const DEFAULT_TLS_SESSION_CACHE: usize = 4096;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the full chain, leaf first.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Generate a self-signed certificate for these names instead (development).
    #[serde(default)]
    pub self_signed: Option<Vec<String>>,
    /// More certificates, chosen by SNI against each certificate's names.
    #[serde(default)]
    pub certificates: Vec<CertKeyPair>,
    /// Stateless resumption (RFC 8446 §4.6.1 tickets). Default is true.
    #[serde(default = "default_true")]
    pub session_tickets: bool,
    /// Stateful resumption cache entries; 0 turns it off.
    #[serde(default = "default_session_cache")]
    pub session_cache: usize,
}

fn default_true() -> bool {
    true
}
fn default_session_cache() -> usize {
    DEFAULT_TLS_SESSION_CACHE
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertKeyPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub tls_handshake: Span,
    pub header_read: Span,
    pub body_read: Span,
    pub write: Span,
    pub idle: Span,
    pub request: Span,
    pub first_request: Span,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tls_handshake: DEFAULT_TLS_HANDSHAKE,
            header_read: DEFAULT_HEADER_READ,
            body_read: DEFAULT_BODY_READ,
            write: DEFAULT_WRITE,
            idle: DEFAULT_IDLE,
            request: DEFAULT_REQUEST,
            first_request: DEFAULT_FIRST_REQUEST,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub max_requests_per_connection: u32,
    pub max_header_bytes: Size,
    pub max_body_bytes: Size,
    pub max_uri_bytes: Size,
    /// Proxied requests in flight, all routes together, above which traffic classes are shed
    /// (lowest `shed_order` first). 0 = no global limit.
    pub max_proxy_in_flight: u32,
    /// How long an HTTP/1.1 keep-alive connection (cleartext) waits with no request before it
    /// drops hyper's buffers and keeps only its socket; the next request rebuilds them.
    pub idle_release_after: Span,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_requests_per_connection: DEFAULT_MAX_REQUESTS_PER_CONNECTION,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            max_proxy_in_flight: DEFAULT_MAX_PROXY_IN_FLIGHT,
            idle_release_after: DEFAULT_IDLE_RELEASE_AFTER,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    pub max_concurrent_streams: u32,
    pub initial_stream_window: Size,
    pub initial_connection_window: Size,
    pub max_frame_size: Size,
    pub keepalive_interval: Span,
    pub keepalive_timeout: Span,
    /// Inbound PING, SETTINGS, PRIORITY, RST_STREAM, empty DATA and unknown frames per second
    /// (burst twice that); beyond it the connection gets GOAWAY(ENHANCE_YOUR_CALM).
    pub max_control_frames_per_second: u32,
    /// Streams the client may reset before the server accepts them (rapid reset).
    pub max_pending_reset_streams: u32,
    /// Streams the server may reset for the client's protocol errors over a connection's life.
    pub max_local_reset_streams: u32,
    /// Bytes buffered for sending per stream before the handler is made to wait.
    pub max_send_buffer: Size,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            initial_stream_window: DEFAULT_H2_INITIAL_STREAM_WINDOW,
            initial_connection_window: DEFAULT_H2_INITIAL_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_H2_MAX_FRAME_SIZE,
            keepalive_interval: DEFAULT_H2_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_H2_KEEPALIVE_TIMEOUT,
            max_control_frames_per_second: DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
            max_pending_reset_streams: DEFAULT_H2_MAX_PENDING_RESET_STREAMS,
            max_local_reset_streams: DEFAULT_H2_MAX_LOCAL_RESET_STREAMS,
            max_send_buffer: DEFAULT_H2_MAX_SEND_BUFFER,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub drain_delay: Span,
    pub drain_timeout: Span,
    /// Binary upgrade: how long the new process has to report ready before it is stopped.
    pub upgrade_timeout: Span,
    /// Binary upgrade: how long the old process keeps idle HTTP/1.1 connections, and connections
    /// that have not sent a request yet, before its drain closes them.
    pub handover_grace: Span,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: DEFAULT_DRAIN_DELAY,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            handover_grace: DEFAULT_HANDOVER_GRACE,
        }
    }
}

/// A fixed response: `respond = { status = 200, body = "ok" }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FixedResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub content_type: Option<String>,
}

/// Pages built into the binary.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// Tells the visitor how they are connected: protocol, TLS version, ALPN, connection id.
    ConnectionInfo,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
    /// Redirect status: 301, 302, 303, 307 or 308. Default is 308 (keeps the method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond: Option<FixedResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<Builtin>,
    /// A `[[rate_limits]]` name applied to this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
}

fn default_host() -> String {
    "*".to_string()
}
fn default_path() -> String {
    "/".to_string()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Empty string turns the admin API off.
    pub address: String,
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: DEFAULT_ADMIN_ADDRESS.to_string(),
            token_file: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RedactMode {
    #[default]
    Mask,
    Hash,
    Drop,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// "stdout", a file path, or "off".
    pub access_log: String,
    pub redact_headers: Vec<String>,
    pub redact_query: Vec<String>,
    pub redact_mode: RedactMode,
    /// The key of `hash` mode digests. Default: `<state_dir>/log-hash.key`, made on first need.
    pub hash_key_file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            access_log: "stdout".to_string(),
            redact_headers: ["authorization", "cookie", "set-cookie", "proxy-authorization"]
                .map(String::from)
                .to_vec(),
            redact_query: ["token", "access_token", "password"].map(String::from).to_vec(),
            redact_mode: RedactMode::Mask,
            hash_key_file: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    pub switches: Vec<String>,
    pub listener: Option<String>,
    pub peer: Option<String>,
}

/// Enough for a site's hot pages and assets; each entry is a path, its validators and (if small) its bytes.
pub const DEFAULT_STATIC_CACHE_MAX_ENTRIES: usize = 1024;
/// Typical pages, scripts, stylesheets and icons fit; larger files are streamed from disk as before.
pub const DEFAULT_STATIC_CACHE_MAX_FILE_SIZE: Size = Size::kib(64);
/// Bounds the memory held by file contents, whatever the mix of entries.
pub const DEFAULT_STATIC_CACHE_MAX_BYTES: Size = Size::mib(16);
/// A changed or deleted file is seen within a second, while a hot file costs one check per second, not per request.
pub const DEFAULT_STATIC_CACHE_VALIDITY: Span = Span::secs(1);

/// `[static_cache]`: the `static` handler's open-file cache (nginx's `open_file_cache`).
///
/// Small files are held in memory with their validators and answered without touching the file
/// system; an entry older than `validity` is checked again on its next request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StaticCacheConfig {
    /// Files held per `static` route; 0 turns the cache off.
    pub max_entries: usize,
    /// Files up to this size are read whole and held; larger ones are streamed and not cached.
    pub max_file_size: Size,
    /// Bytes of file contents held per `static` route.
    pub max_bytes: Size,
    /// How long a cached file is served before the file system is asked again.
    pub validity: Span,
}

impl Default for StaticCacheConfig {
    fn default() -> Self {
        StaticCacheConfig {
            max_entries: DEFAULT_STATIC_CACHE_MAX_ENTRIES,
            max_file_size: DEFAULT_STATIC_CACHE_MAX_FILE_SIZE,
            max_bytes: DEFAULT_STATIC_CACHE_MAX_BYTES,
            validity: DEFAULT_STATIC_CACHE_VALIDITY,
        }
    }
}

impl Config {
    /// The embedded default used when no configuration file exists (see SPEC.md).
    pub fn embedded_default(public_dir_exists: bool) -> Config {
        let route = if public_dir_exists {
            RouteConfig {
                static_dir: Some(PathBuf::from("./public")),
                ..RouteConfig::catch_all()
            }
        } else {
            RouteConfig {
                builtin: Some(Builtin::ConnectionInfo),
                ..RouteConfig::catch_all()
            }
        };
        Config {
            listeners: vec![
                ListenerConfig {
                    name: "http".into(),
                    address: SocketAddr::from(([127, 0, 0, 1], 8080)),
                    protocols: Some(vec![Protocol::Http11, Protocol::H2c]),
                    on_no_alpn: OnNoAlpn::Http11,
                    h2c_upgrade: false,
                    tls: None,
                },
                ListenerConfig {
                    name: "https".into(),
                    address: SocketAddr::from(([127, 0, 0, 1], 8443)),
                    protocols: Some(vec![Protocol::H2, Protocol::Http11]),
                    on_no_alpn: OnNoAlpn::Http11,
                    h2c_upgrade: false,
                    tls: Some(TlsConfig {
                        cert: None,
                        key: None,
                        min_version: TlsVersion::V1_2,
                        self_signed: Some(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]),
                        certificates: Vec::new(),
                        session_tickets: true,
                        session_cache: DEFAULT_TLS_SESSION_CACHE,
                    }),
                },
            ],
            routes: vec![route],
            ..Config::default()
        }
    }
}

impl RouteConfig {
    /// A route matching every host and path, with no handler set yet.
    pub fn catch_all() -> RouteConfig {
        RouteConfig {
            host: default_host(),
            path: default_path(),
            static_dir: None,
            proxy: None,
            redirect: None,
            redirect_status: None,
            respond: None,
            builtin: None,
            rate_limit: None,
        }
    }
}
