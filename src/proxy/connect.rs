//! Opening one upstream connection: TCP within `connect_timeout`, TLS with ALPN, the HTTP handshake.

use super::h1::{H1Conn, UpIo};
use crate::config::{UpstreamProtocol, UpstreamTls};
use crate::http::body::BoxError;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The body of a request sent upstream: the client's body, streamed.
pub type UpBody = UnsyncBoxBody<Bytes, BoxError>;

/// Detects upstreams that vanished without a FIN (a NAT dropped the flow, a host died).
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// An upstream that does not answer PING within this is gone.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`connect`] needs: one upstream's connection settings, shared by its servers' pools.
#[derive(Debug)]
pub struct ConnectSettings {
    pub protocol: UpstreamProtocol,
    pub tls: Option<TlsClient>,
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// What the settings were built from, CA file contents included: a reload keeps a server's
    /// pool (and its warm connections) exactly when this is unchanged.
    pub source: (
        UpstreamProtocol,
        Option<UpstreamTls>,
        Vec<u8>,
        Duration,
        usize,
        Duration,
    ),
}

/// A rustls client for one upstream.
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    /// `tls.server_name`; `None` uses each server's own host.
    pub server_name: Option<ServerName<'static>>,
}

/// The protocol a connection speaks once established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Http11,
    H2c,
    H2,
}

impl Wire {
    /// The `protocol` label of `gatehouse_upstream_connections_opened_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::Http11 => "http/1.1",
            Wire::H2c => "h2c",
            Wire::H2 => "h2",
        }
    }
    pub fn is_h2(self) -> bool {
        self != Wire::Http11
    }
}

/// A fresh connection, ready for requests.
pub enum Sender {
    /// HTTP/1.1: spoken by each request's own task ([`super::h1`]).
    H1(H1Conn),
    /// HTTP/2: hyper's, driven by a task of its own.
    H2(H2Sender),
}

/// An HTTP/2 connection's request handle and what its driver task reports.
pub struct H2Sender {
    pub sender: http2::SendRequest<UpBody>,
    /// Set by the driver task when the connection ends: the reason a later request must open a
    /// new one (`upstream_closed`, `goaway`).
    pub closed: Arc<OnceLock<&'static str>>,
    /// The server's current `SETTINGS_MAX_CONCURRENT_STREAMS`, kept up to date by the driver task
    /// (hyper exposes it on the connection, which that task owns).
    pub max_streams: Arc<AtomicUsize>,
}

/// A connection just established.
pub struct Connected {
    pub sender: Sender,
    pub wire: Wire,
    /// `protocol = "auto"` and the server chose http/1.1.
    pub alpn_fell_back: bool,
}

/// Why a connection could not be established. Each maps to a `cause` label.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no connection within connect_timeout ({0:?})")]
    Timeout(Duration),
    #[error("TCP connect failed: {0}")]
    Tcp(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("the server did not select h2 by ALPN (it offered {0})")]
    NoH2(String),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
}

impl ConnectError {
    /// The `cause` label and access-log word for this failure.
    pub fn cause(&self) -> &'static str {
        match self {
            ConnectError::Timeout(_) => "connect_timeout",
            ConnectError::Tcp(_) => "connect_failed",
            ConnectError::Tls(_) | ConnectError::ServerName(_) => "tls_failed",
            ConnectError::NoH2(_) => "h2_refused",
            ConnectError::Handshake(_) => "handshake_failed",
        }
    }
}

/// The host of `host:port`, without IPv6 brackets.
pub fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `server` (`host:port`) as `settings` say, within `connect_timeout`.
pub async fn connect(settings: &ConnectSettings, server: &str) -> Result<Connected, ConnectError> {
    let limit = settings.connect_timeout;
    match tokio::time::timeout(limit, establish(settings, server)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(limit)),
    }
}

async fn establish(settings: &ConnectSettings, server: &str) -> Result<Connected, ConnectError> {
    let tcp = TcpStream::connect(server).await.map_err(ConnectError::Tcp)?;
    // Requests and small responses must not wait on Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &settings.tls else {
        return match settings.protocol {
            UpstreamProtocol::H2c => handshake_h2(tcp, Wire::H2c, false).await,
            _ => Ok(h1_connection(UpIo::Plain(tcp), false)),
        };
    };
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => ServerName::try_from(host_of(server).to_string())
            .map_err(|_| ConnectError::ServerName(host_of(server).to_string()))?,
    };
    let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, tcp)
        .await
        .map_err(ConnectError::Tls)?;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    match (settings.protocol, alpn.as_deref()) {
        (UpstreamProtocol::H2 | UpstreamProtocol::Auto, Some(b"h2")) => handshake_h2(stream, Wire::H2, false).await,
        (UpstreamProtocol::H2, other) => Err(ConnectError::NoH2(match other {
            Some(p) => format!("`{}`", String::from_utf8_lossy(p)),
            None => "no ALPN".to_string(),
        })),
        (UpstreamProtocol::Auto, _) => Ok(h1_connection(UpIo::Tls(Box::new(stream)), true)),
        _ => Ok(h1_connection(UpIo::Tls(Box::new(stream)), false)),
    }
}

fn h1_connection(io: UpIo, alpn_fell_back: bool) -> Connected {
    Connected {
        sender: Sender::H1(H1Conn::new(io)),
        wire: Wire::Http11,
        alpn_fell_back,
    }
}

async fn handshake_h2<IO>(io: IO, wire: Wire, alpn_fell_back: bool) -> Result<Connected, ConnectError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    let (sender, conn) = b
        .handshake::<_, UpBody>(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    let closed = Arc::new(OnceLock::new());
    let done = closed.clone();
    let max_streams = Arc::new(AtomicUsize::new(0));
    let max = max_streams.clone();
    let mut conn = Box::pin(conn);
    max.store(conn.current_max_send_streams(), Relaxed);
    tokio::spawn(async move {
        let ended = std::future::poll_fn(|cx| {
            let r = conn.as_mut().poll(cx);
            // Every SETTINGS frame is read by this poll, so the value is current after it.
            max.store(conn.current_max_send_streams(), Relaxed);
            r
        });
        let why = match ended.await {
            Ok(()) => "goaway",
            Err(e) => {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                "upstream_closed"
            }
        };
        let _ = done.set(why);
    });
    Ok(Connected {
        sender: Sender::H2(H2Sender {
            sender,
            closed,
            max_streams,
        }),
        wire,
        alpn_fell_back,
    })
}

/// Builds the TLS client for an upstream: its CA file (PEM) or the system's CA bundle, and the
/// ALPN ids its `protocol` offers. `ca_pem` is the file's contents, already read.
pub fn tls_client(protocol: UpstreamProtocol, tls: &UpstreamTls, ca_pem: Option<&[u8]>) -> Result<TlsClient, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let bundle;
    let (pem, what) = match ca_pem {
        Some(pem) => (pem, "tls.ca"),
        None => {
            bundle = system_ca_bundle()?;
            (bundle.as_slice(), "the system CA bundle")
        }
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not PEM certificates: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{what} holds no usable CA certificate"));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot build a TLS client: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match protocol {
        UpstreamProtocol::H2 => vec![b"h2".to_vec()],
        UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    let server_name = match &tls.server_name {
        Some(n) => {
            Some(ServerName::try_from(n.clone()).map_err(|_| format!("`{n}` is not a DNS name or an IP address"))?)
        }
        None => None,
    };
    Ok(TlsClient {
        config: Arc::new(config),
        server_name,
    })
}

/// The system's CA bundle: `$SSL_CERT_FILE`, else the first of the usual distribution paths.
fn system_ca_bundle() -> Result<Vec<u8>, String> {
    const PATHS: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine
        "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
        "/etc/ssl/ca-bundle.pem",             // openSUSE
        "/etc/ssl/cert.pem",                  // macOS, some BSDs
    ];
    let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let candidates = from_env.into_iter().chain(PATHS.iter().map(std::path::PathBuf::from));
    for path in candidates {
        if let Ok(pem) = std::fs::read(&path) {
            return Ok(pem);
        }
    }
    Err(format!(
        "no system CA bundle found (SSL_CERT_FILE unset; none of {})",
        PATHS.join(", ")
    ))
}
