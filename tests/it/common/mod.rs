//! Shared test harness: real certificates, a real server on loopback, real clients.
#![allow(dead_code)]

pub mod binary;
pub mod h2raw;
pub mod nginx;
pub mod upstream;

use gatehouse::config::{load_str, Findings};
use gatehouse::route::{RouteTable, Router};
use gatehouse::{Server, ServerHandle};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A private CA and leaf certificates it issued, written as PEM files in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gatehouse test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        Pki {
            dir,
            ca_pem,
            ca_cert,
            ca_key,
        }
    }

    /// Issues a leaf for `names`; returns (cert path, key path). The cert file holds the chain.
    pub fn leaf(&self, file_stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.leaf_with(file_stem, names, rcgen::KeyPair::generate().unwrap())
    }

    /// Like `leaf`, with a key of the caller's algorithm.
    pub fn leaf_with(&self, file_stem: &str, names: &[&str], key: rcgen::KeyPair) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let cert_path = self.dir.path().join(format!("{file_stem}.crt"));
        let key_path = self.dir.path().join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), self.ca_pem)).unwrap();
        write_key(&key_path, &key.serialize_pem());
        (cert_path, key_path)
    }

    /// Signs `params` for `key` with this CA; returns the leaf's PEM.
    pub fn sign(&self, params: rcgen::CertificateParams, key: &rcgen::KeyPair) -> String {
        params.signed_by(key, &self.ca_cert, &self.ca_key).unwrap().pem()
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A rustls client config trusting this CA, offering `alpn` (empty = no ALPN extension).
    pub fn client_config(&self, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let der = rustls::pki_types::CertificateDer::from(self.ca_cert.der().to_vec());
        roots.add(der).unwrap();
        let mut c =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(c)
    }

    /// A reqwest client trusting this CA.
    pub fn reqwest(&self, http2: bool) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        let b = reqwest::Client::builder()
            .add_root_certificate(ca)
            .use_rustls_tls()
            .no_proxy();
        let b = if http2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        };
        b.build().unwrap()
    }
}

pub fn write_key(path: &Path, pem: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}

/// A running server started from TOML text; listener addresses by name.
pub struct TestServer {
    pub handle: ServerHandle,
    pub addrs: HashMap<String, SocketAddr>,
    pub access_log: PathBuf,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server from `toml` (listeners should use port 0). `{dir}` in the text is replaced
    /// by a fresh temp directory, which also holds the access log and state.
    pub async fn start(toml: &str) -> TestServer {
        let (dir, access_log, config) = test_config(toml);
        let mut f = Findings::default();
        let table = RouteTable::build(&config, &mut f);
        assert!(!f.has_errors(), "{f}");
        let router = Router::new(table);
        let server = Server::bind(config)
            .unwrap_or_else(|e| panic!("server did not start: {e}"))
            .with_config_routes(&router);
        Self::spawn(server, router, dir, access_log)
    }

    /// Like `start`, with `svc` answering every request instead of the configured routes (tests
    /// of what a handler observes, e.g. a request body that stalls while it reads it).
    pub async fn start_service<S, B>(toml: &str, svc: S) -> TestServer
    where
        S: gatehouse::HttpService<B>,
        B: gatehouse::ServiceBody,
    {
        let (dir, access_log, config) = test_config(toml);
        let server = Server::bind(config).unwrap_or_else(|e| panic!("server did not start: {e}"));
        Self::spawn(server, svc, dir, access_log)
    }

    fn spawn<S, B>(server: Server, svc: S, dir: tempfile::TempDir, access_log: PathBuf) -> TestServer
    where
        S: gatehouse::HttpService<B>,
        B: gatehouse::ServiceBody,
    {
        let server = server.without_signal_handling();
        let addrs = server
            .config()
            .listeners
            .iter()
            .map(|l| (l.name.clone(), server.local_addr(&l.name).unwrap()))
            .collect();
        let handle = server.handle();
        let task = tokio::spawn(async move {
            server.serve(svc).await.unwrap();
        });
        TestServer {
            handle,
            addrs,
            access_log,
            dir,
            task,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    /// The value of one metric series in the exposition, 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.handle.metrics.encode();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// Waits (bounded) until `cond` holds on the metrics; returns whether it did.
    pub async fn wait_metric(&self, series: &str, want: f64) -> bool {
        for _ in 0..200 {
            if self.metric(series) == want {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    pub async fn stop(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.task).await;
    }
}

/// Opens a TLS connection to `addr` with SNI `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// Sends raw bytes and reads until the server closes (or `timeout`).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits (bounded) for a child process to exit; panics if it does not.
pub fn wait_exit(child: &mut std::process::Child, timeout: std::time::Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        // A child's exit has no awaitable event short of blocking in wait(), which cannot time out.
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Parses a test config: `{dir}` becomes a fresh temp dir holding state and the access log; the
/// admin API is off (tests read metrics through the handle).
fn test_config(toml: &str) -> (tempfile::TempDir, PathBuf, gatehouse::Config) {
    let dir = tempfile::tempdir().unwrap();
    let text = toml.replace("{dir}", dir.path().to_str().unwrap());
    let mut config = load_str(&text).unwrap_or_else(|e| panic!("test config does not parse: {e}\n{text}"));
    let access_log = dir.path().join("access.log");
    if config.log.access_log == "stdout" {
        config.log.access_log = access_log.to_string_lossy().into_owned();
    }
    config.server.state_dir = dir.path().join("state");
    config.admin.address = String::new();
    (dir, access_log, config)
}
