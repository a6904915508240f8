//! A minimal admin API client for commands like `gatehouse reload`: one request, one connection.

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

/// Largest answer read: a refusal lists findings, a few KiB at most.
const MAX_ANSWER: usize = 1024 * 1024;

/// What the admin API answered.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub body: Bytes,
}

/// Why no answer came back. The messages say what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not an admin address; write it as HOST:PORT, like 127.0.0.1:9901")]
    BadAddress(String),
    #[error("cannot reach the admin API at {addr}: {reason}; is gatehouse running with [admin] address = \"{addr}\"?")]
    Unreachable { addr: String, reason: String },
    #[error("the admin API at {addr} did not answer within {}s", timeout.as_secs())]
    Timeout { addr: String, timeout: Duration },
}

/// Resolves `HOST:PORT` (an `http://` prefix is accepted). A wildcard address, as a server may be
/// configured to listen on, is reached through loopback.
pub async fn resolve(admin: &str) -> Result<SocketAddr, ClientError> {
    let bare = admin.trim().trim_start_matches("http://").trim_end_matches('/');
    let mut addrs = tokio::net::lookup_host(bare)
        .await
        .map_err(|_| ClientError::BadAddress(admin.to_string()))?;
    let mut addr = addrs.next().ok_or_else(|| ClientError::BadAddress(admin.to_string()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(addr)
}

/// Sends `method path` with no body to `addr`, with `token` as a bearer token, within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_LENGTH, "0");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(format!("the connection broke off: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(format!("the answer broke off: {e}")))?
            .to_bytes();
        Ok(Answer { status, body })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            addr: addr.to_string(),
            timeout,
        })?
}
