//! The TLS side of the probe: a client that records the chain the server presents and verifies it
//! without failing the handshake, so that an invalid certificate is reported, not fatal.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Bound on one TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the system's trusted roots usually are (Debian/Ubuntu, Fedora/RHEL, Alpine/macOS-style);
/// `SSL_CERT_FILE` wins when set, as it does for OpenSSL.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Trusted roots and where they came from.
pub struct Roots {
    pub store: Arc<rustls::RootCertStore>,
    pub source: String,
}

/// Loads `--cacert FILE` (which replaces the system store, as in curl), else the system bundle.
pub fn load_roots(cacert: Option<&Path>) -> Result<Roots, String> {
    let path = match cacert {
        Some(p) => p.to_path_buf(),
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
            match env.or_else(|| SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from).find(|p| p.exists())) {
                Some(p) => p,
                None => {
                    return Ok(Roots {
                        store: Arc::new(rustls::RootCertStore::empty()),
                        source: "none (no system CA bundle found; use --cacert FILE)".into(),
                    })
                }
            }
        }
    };
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() && cacert.is_some() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    Ok(Roots {
        store: Arc::new(store),
        source: format!(
            "{} ({added} certificate{})",
            path.display(),
            if added == 1 { "" } else { "s" }
        ),
    })
}

/// What the server presented and what verification said about it.
#[derive(Clone, Debug, Default)]
pub struct Presented {
    pub chain: Vec<CertificateDer<'static>>,
    pub ocsp_stapled: bool,
    /// `None` when the chain verifies against the roots for this name.
    pub error: Option<rustls::Error>,
    pub hostname_ok: bool,
}

/// Records every chain it is shown and verifies it with webpki, then lets the handshake proceed.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: Arc<Mutex<Option<Presented>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let error = match &self.inner {
            Some(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .err(),
            None => Some(rustls::Error::General("no trusted root certificates".into())),
        };
        let hostname_ok = rustls::server::ParsedCertificate::try_from(end_entity)
            .and_then(|p| rustls::client::verify_server_name(&p, server_name))
            .is_ok();
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(Presented {
                chain,
                ocsp_stapled: !ocsp_response.is_empty(),
                error,
                hostname_ok,
            });
        }
        // The verdict is reported, never enforced: doctor must see what lies behind a bad chain.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration offering `alpn`, with its own session store (for the resumption test)
/// and a slot where the verifier leaves what it saw.
#[derive(Clone)]
pub struct Client {
    pub config: Arc<rustls::ClientConfig>,
    pub seen: Arc<Mutex<Option<Presented>>>,
    pub alpn: Vec<String>,
}

impl Client {
    pub fn new(roots: &Roots, alpn: &[&str]) -> Result<Client, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let inner = if roots.store.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(roots.store.clone(), provider.clone())
                    .build()
                    .map_err(|e| format!("cannot build the certificate verifier: {e}"))?,
            )
        };
        let seen = Arc::new(Mutex::new(None));
        let verifier = Arc::new(RecordingVerifier {
            inner,
            provider: provider.clone(),
            seen: seen.clone(),
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot build the TLS client: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Client {
            config: Arc::new(config),
            seen,
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Runs one handshake over `tcp` for `host` (SNI unless `host` is an IP address).
    pub async fn handshake(&self, tcp: TcpStream, host: &str) -> Result<(TlsStream<TcpStream>, Duration), String> {
        let name =
            ServerName::try_from(host.to_string()).map_err(|e| format!("`{host}` is not a valid TLS name: {e}"))?;
        let start = Instant::now();
        let connect = tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
            Ok(Ok(s)) => Ok((s, start.elapsed())),
            Ok(Err(e)) => Err(describe_handshake_error(&e)),
            Err(_) => Err(format!("the TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")),
        }
    }

    pub fn take_presented(&self) -> Option<Presented> {
        self.seen.lock().ok().and_then(|mut s| s.take())
    }
}

/// A handshake failure in words; a received alert is named as the TLS registry names it.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => format!("the server sent TLS alert {}", alert_name(*a)),
        Some(other) => format!("TLS handshake failed: {other}"),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the server closed the connection during the TLS handshake".into()
        }
        None => format!("TLS handshake failed: {e}"),
    }
}

/// `no_application_protocol` for `NoApplicationProtocol`: the RFC 8446 §6 spelling.
pub fn alert_name(a: rustls::AlertDescription) -> String {
    let debug = format!("{a:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// What one successful handshake negotiated.
#[derive(Clone, Debug, Serialize)]
pub struct Negotiated {
    pub version: String,
    pub cipher_suite: String,
    pub key_exchange_group: Option<String>,
    pub alpn: Option<String>,
    pub resumed: bool,
}

pub fn negotiated(conn: &rustls::ClientConnection) -> Negotiated {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    Negotiated {
        version,
        cipher_suite: conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default(),
        key_exchange_group: conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
        alpn: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        resumed: matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
    }
}

/// One certificate as a person reads it.
#[derive(Clone, Debug, Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    pub days_to_expiry: i64,
    pub sans: Vec<String>,
    pub self_issued: bool,
}

pub fn describe_cert(der: &CertificateDer<'_>) -> Option<CertInfo> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let fmt = |t: ASN1Time| {
        t.to_datetime()
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let not_after = cert.validity().not_after.to_datetime();
    let days_to_expiry = (not_after - ::time::OffsetDateTime::now_utc()).whole_days();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        _ => None,
                    };
                    sans.push(format!("IP:{}", ip.unwrap_or_else(|| "?".into())));
                }
                _ => {}
            }
        }
    }
    Some(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: fmt(cert.validity().not_before),
        not_after: fmt(cert.validity().not_after),
        days_to_expiry,
        sans,
        self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
    })
}

/// Why a chain does not verify, as a stable id and a sentence.
pub fn classify(error: &rustls::Error, chain: &[CertInfo]) -> (&'static str, String) {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(ce) = error else {
        return ("untrusted", format!("{error}"));
    };
    match ce {
        C::Expired | C::ExpiredContext { .. } => (
            "expired",
            format!(
                "the certificate expired on {}",
                chain.first().map(|c| c.not_after.as_str()).unwrap_or("?")
            ),
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => (
            "not_yet_valid",
            format!(
                "the certificate is not valid before {}",
                chain.first().map(|c| c.not_before.as_str()).unwrap_or("?")
            ),
        ),
        C::NotValidForName | C::NotValidForNameContext { .. } => (
            "hostname_mismatch",
            "the certificate is not valid for this host name".into(),
        ),
        C::UnknownIssuer => {
            let last = chain.last();
            if last.is_some_and(|c| !c.self_issued) {
                (
                    "incomplete_chain",
                    format!(
                        "the chain ends at `{}`, issued by `{}`, which the server did not send and which is not a trusted root: an intermediate certificate is probably missing",
                        last.map(|c| c.subject.as_str()).unwrap_or("?"),
                        last.map(|c| c.issuer.as_str()).unwrap_or("?")
                    ),
                )
            } else {
                ("untrusted", "the chain ends at a root that is not trusted".into())
            }
        }
        other => ("invalid", format!("{other:?}")),
    }
}
