//! Upstream servers for the proxy tests: hyper servers on loopback speaking HTTP/1.1, h2c or
//! HTTP/2 over TLS, with handlers written in each test, and a gatehouse proxying to them.

use super::{Pki, TestServer};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

pub const LISTENER: &str =
    "[[listeners]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n";

/// A proxy with one cleartext listener (`c`) and `/` proxied to upstream `api` = `servers`;
/// `extra` follows the upstream's keys, so it may hold more keys and its sub-tables.
pub async fn proxy(servers: &[SocketAddr], extra: &str) -> TestServer {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    TestServer::start(&format!(
        "{LISTENER}[[routes]]\nproxy = \"api\"\n[[upstreams]]\nname = \"api\"\nservers = [{}]\n{extra}\n",
        list.join(", ")
    ))
    .await
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Resp = Response<BoxBody<Bytes, BoxError>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync>;

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

pub fn text(body: impl Into<Bytes>) -> Resp {
    Response::new(Full::new(body.into()).map_err(|e: Infallible| match e {}).boxed())
}

pub type FrameTx = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A body whose frames the test sends through a channel.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx)
    }
}

pub fn channel_body() -> (FrameTx, BoxBody<Bytes, BoxError>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    (tx, ChannelBody(rx).boxed())
}

#[derive(Clone)]
pub enum Kind {
    H1,
    H2c,
    Tls(Arc<rustls::ServerConfig>),
}

/// An upstream server on loopback. `kill` closes its listener and every connection at once.
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    /// Requests other than health checks (`/healthz`).
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub struct OpenGuard(Arc<AtomicUsize>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Backend {
    pub async fn start(kind: Kind, h: Handler) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (acc, op) = (accepted.clone(), open.clone());
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let h: Handler = Arc::new(move |req: Request<Incoming>| {
            if req.uri().path() != "/healthz" {
                counted.fetch_add(1, SeqCst);
            }
            h(req)
        });
        let task = tokio::spawn(async move {
            // Owned here: aborting this task drops every connection task with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((tcp, _)) = r else { continue };
                        acc.fetch_add(1, SeqCst);
                        op.fetch_add(1, SeqCst);
                        let guard = OpenGuard(op.clone());
                        conns.spawn(serve(kind.clone(), tcp, h.clone(), guard));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Backend {
            addr,
            accepted,
            open,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    pub fn kill(&self) {
        self.task.abort();
    }
}

pub async fn serve(kind: Kind, tcp: tokio::net::TcpStream, h: Handler, _guard: OpenGuard) {
    let svc = hyper::service::service_fn(move |req| {
        let h = h.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    match kind {
        Kind::H1 => {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        }
        Kind::H2c => {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
        Kind::Tls(config) => {
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        }
    }
}

/// A TLS server config for `localhost` from `pki`, offering `alpn`.
pub fn tls_server(pki: &Pki, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.leaf("upstream", &["localhost"]);
    let certs = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(c)
}

pub fn client(http2: bool) -> reqwest::Client {
    let b = reqwest::Client::builder().no_proxy();
    let b = if http2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

pub fn series(name: &str, labels: &str) -> String {
    format!("gatehouse_{name}{{{labels}}}")
}

pub async fn access_log(srv: &TestServer, want: &str) -> String {
    for _ in 0..200 {
        let log = std::fs::read_to_string(&srv.access_log).unwrap_or_default();
        if log.contains(want) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "access log never contained {want}:\n{}",
        std::fs::read_to_string(&srv.access_log).unwrap_or_default()
    );
}
