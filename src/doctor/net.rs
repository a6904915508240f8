//! Getting a byte stream to the origin: DNS, TCP, and an HTTP CONNECT tunnel when a proxy applies.

use super::target::{ProxyChoice, Target};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on DNS, TCP connect and the proxy's CONNECT answer: long enough for a slow network, short
/// enough that doctor does not look hung.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest CONNECT response head doctor reads before calling the proxy broken.
const MAX_PROXY_HEAD: usize = 16 * 1024;

/// Any byte stream doctor speaks HTTP over (TCP, TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The result of name resolution.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub addresses: Vec<SocketAddr>,
    pub elapsed: Duration,
}

/// Resolves `host:port` (an IP literal resolves to itself at no cost).
pub async fn resolve(host: &str, port: u16) -> Result<Resolved, String> {
    let start = Instant::now();
    let lookup = tokio::net::lookup_host((host, port));
    let addresses: Vec<SocketAddr> = match tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
        Ok(Ok(it)) => it.collect(),
        Ok(Err(e)) => return Err(format!("cannot resolve {host}: {e}")),
        Err(_) => return Err(format!("resolving {host} took longer than {CONNECT_TIMEOUT:?}")),
    };
    if addresses.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    Ok(Resolved {
        addresses,
        elapsed: start.elapsed(),
    })
}

/// Where TCP connections go: straight to the origin's address, or to a proxy that tunnels.
#[derive(Clone, Debug)]
pub enum Route {
    Direct(SocketAddr),
    Proxy { proxy: ProxyChoice, addr: SocketAddr },
}

/// One opened stream and how long each part took.
pub struct Opened {
    pub stream: TcpStream,
    pub tcp: Duration,
    /// Time from sending CONNECT to the proxy's 2xx, when tunnelled.
    pub tunnel: Option<Duration>,
}

/// Why a stream could not be opened.
#[derive(Debug)]
pub enum OpenError {
    Tcp(String),
    /// The proxy answered CONNECT with something other than 2xx: status and reason line.
    ProxyRefused(u16, String),
    Proxy(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Tcp(m) | OpenError::Proxy(m) => f.write_str(m),
            OpenError::ProxyRefused(_, line) => write!(f, "the proxy refused CONNECT: {line}"),
        }
    }
}

/// Opens a TCP stream along `route`; through a proxy, sends CONNECT and waits for its 2xx.
pub async fn open(route: &Route, target: &Target) -> Result<Opened, OpenError> {
    let addr = match route {
        Route::Direct(a) | Route::Proxy { addr: a, .. } => *a,
    };
    let start = Instant::now();
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(OpenError::Tcp(format!("cannot connect to {addr}: {e}"))),
        Err(_) => {
            return Err(OpenError::Tcp(format!(
                "connecting to {addr} took longer than {CONNECT_TIMEOUT:?}"
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let tcp = start.elapsed();
    let Route::Proxy { proxy, .. } = route else {
        return Ok(Opened {
            stream,
            tcp,
            tunnel: None,
        });
    };
    let start = Instant::now();
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_tunnel(stream, proxy, target)).await {
        Ok(Ok(stream)) => Ok(Opened {
            stream,
            tcp,
            tunnel: Some(start.elapsed()),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::Proxy(format!(
            "the proxy did not answer CONNECT within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

async fn connect_tunnel(mut stream: TcpStream, proxy: &ProxyChoice, target: &Target) -> Result<TcpStream, OpenError> {
    let hp = target.host_port();
    let mut req = format!(
        "CONNECT {hp} HTTP/1.1\r\nHost: {hp}\r\nUser-Agent: {}\r\n",
        super::USER_AGENT
    );
    if let Some(auth) = &proxy.authorization {
        req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    req.push_str("\r\n");
    let io = |e: std::io::Error| OpenError::Proxy(format!("proxy {}:{}: {e}", proxy.host, proxy.port));
    stream.write_all(req.as_bytes()).await.map_err(io)?;
    // Byte at a time up to the blank line, so that no tunnelled byte (a TLS ServerHello from an
    // eager proxy) is consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD {
            return Err(OpenError::Proxy(format!(
                "the proxy's CONNECT answer has no end of headers within {MAX_PROXY_HEAD} bytes"
            )));
        }
        let b = stream.read_u8().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                OpenError::Proxy("the proxy closed the connection instead of answering CONNECT".into())
            } else {
                io(e)
            }
        })?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| OpenError::Proxy(format!("the proxy's answer to CONNECT is not HTTP: `{line}`")))?;
    if !(200..300).contains(&status) {
        return Err(OpenError::ProxyRefused(status, line));
    }
    Ok(stream)
}
