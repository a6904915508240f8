//! HTTP/1.1 `Upgrade` (WebSocket and the like) through the proxy: the `101` is passed on, then
//! the two sockets are spliced until either side closes.

use super::h1::Upgraded;
use super::headers::connection_has;
use crate::http::RequestBody;
use crate::observe::Name;
use http::{header, HeaderValue, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// The client's `Upgrade` value when it asks to switch protocols (HTTP/1.1 only; `h2c` is the
/// listener's business and never reaches a route).
pub fn requested(req: &Request<RequestBody>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    // `Upgrade` first: nearly every request lacks it, and it is one lookup where `Connection`
    // (usually present, as `keep-alive`) would be a lookup and a token scan.
    let up = req.headers().get(header::UPGRADE)?;
    if !connection_has(req.headers(), "upgrade") {
        return None;
    }
    (!up.as_bytes().eq_ignore_ascii_case(b"h2c")).then(|| up.clone())
}

/// Splices the client's upgraded connection (once hyper has sent it the `101`) and the
/// upstream's on their own task.
pub fn tunnel(client: OnUpgrade, mut upstream: Upgraded, upstream_name: Name, server: Name) {
    tokio::spawn(async move {
        let client = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(upstream = %upstream_name.0, server = %server.0, error = %e, "upgrade could not complete; tunnel not opened");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(
                upstream = %upstream_name.0,
                server = %server.0,
                bytes_to_upstream = up,
                bytes_to_client = down,
                "upgraded tunnel closed"
            ),
            Err(e) => tracing::debug!(
                upstream = %upstream_name.0,
                server = %server.0,
                error = %e,
                "upgraded tunnel ended with an error"
            ),
        }
    });
}
