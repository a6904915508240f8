//! WebSocket over HTTP/2 (RFC 8441) to an HTTP/1.1 upstream.
//!
//! An HTTP/2 client opens a WebSocket with an extended CONNECT (`:method CONNECT`,
//! `:protocol websocket`, a `:path`), which gatehouse allows by sending
//! `SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`. WebSocket servers overwhelmingly speak the RFC 6455
//! HTTP/1.1 handshake, so the proxy turns the stream's request into that handshake: `GET` with
//! `Upgrade: websocket`, and a `Sec-WebSocket-Key` it makes itself (RFC 8441 §5: the HTTP/2
//! request carries no key; the hop that speaks HTTP/1.1 supplies one). The upstream's `101` is
//! checked (its `Sec-WebSocket-Accept` must answer that key, RFC 6455 §4.1, or the upstream is
//! not speaking WebSocket to us) and becomes the `200` that opens the HTTP/2 stream as a tunnel.
//! `Sec-WebSocket-Version`, `-Protocol` and `-Extensions` pass through both ways, so subprotocol
//! and extension negotiation stay between the client and the upstream.

use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use http::{header, HeaderValue, Method, Request, StatusCode};

/// RFC 6455 §1.3: the GUID appended to the key before hashing.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What an HTTP/2 extended CONNECT asks to tunnel.
pub enum Extended {
    /// `:protocol websocket`: proxied as an RFC 6455 upgrade.
    WebSocket,
    /// Another protocol, which the proxy does not translate (answered 501 with its name).
    Other(String),
}

/// The extended CONNECT `req` is, if it is one.
pub fn extended<B>(req: &Request<B>) -> Option<Extended> {
    if req.method() != Method::CONNECT {
        return None;
    }
    let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
    Some(if protocol.as_str().eq_ignore_ascii_case("websocket") {
        Extended::WebSocket
    } else {
        Extended::Other(protocol.as_str().to_string())
    })
}

/// Turns the extended CONNECT's head into the RFC 6455 opening handshake's (the proxy's header
/// rewrite then adds `Connection: upgrade` and `Upgrade: websocket`). Returns the key sent, which
/// the upstream's `Sec-WebSocket-Accept` must answer.
pub fn to_handshake(parts: &mut http::request::Parts) -> Result<HeaderValue, &'static str> {
    let mut nonce = [0u8; 16];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| "the system random source failed")?;
    let key =
        HeaderValue::from_str(&crate::http::base64::encode(&nonce)).map_err(|_| "unreachable: base64 is ASCII")?;
    parts.method = Method::GET;
    parts.extensions.remove::<hyper::ext::Protocol>();
    parts.headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
    Ok(key)
}

/// The `Sec-WebSocket-Accept` value that answers `key` (RFC 6455 §4.2.2).
pub fn accept_for(key: &[u8]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    crate::http::base64::encode(ctx.finish().as_ref())
}

/// Turns the upstream's `101` to the handshake sent with `key` into the `200` that opens the
/// client's HTTP/2 stream. Fails when the upstream did not answer with WebSocket.
pub fn to_stream_response(parts: &mut http::response::Parts, key: &HeaderValue) -> Result<(), &'static str> {
    let upgrade = parts.headers.get(header::UPGRADE);
    if !upgrade.is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")) {
        return Err("the upstream switched to a protocol other than websocket");
    }
    let accept = parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    if accept.as_ref().map(HeaderValue::as_bytes) != Some(accept_for(key.as_bytes()).as_bytes()) {
        return Err("the upstream's Sec-WebSocket-Accept does not answer the key sent");
    }
    parts.status = StatusCode::OK;
    // `Connection`, `Upgrade` and the other hop-by-hop fields are the HTTP/1.1 hop's business
    // and are forbidden in HTTP/2 (RFC 9113 §8.2.2): the caller's rewrite removes them.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc6455_example() {
        assert_eq!(accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn handshake_is_a_get_with_a_fresh_16_byte_key() {
        let req = Request::connect("https://example.com/chat")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(())
            .unwrap();
        assert!(matches!(extended(&req), Some(Extended::WebSocket)));
        let (mut parts, ()) = req.into_parts();
        let key = to_handshake(&mut parts).unwrap();
        assert_eq!(parts.method, Method::GET);
        assert_eq!(key.len(), 24, "16 bytes in base64");
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_KEY], key);
        let (mut again, ()) = Request::connect("https://example.com/chat")
            .body(())
            .unwrap()
            .into_parts();
        assert_ne!(to_handshake(&mut again).unwrap(), key);
    }

    #[test]
    fn a_wrong_accept_or_protocol_is_refused() {
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let response = |upgrade: &'static str, accept: &'static str| {
            let (parts, ()) = http::Response::builder()
                .status(101)
                .header(header::UPGRADE, upgrade)
                .header(header::SEC_WEBSOCKET_ACCEPT, accept)
                .body(())
                .unwrap()
                .into_parts();
            parts
        };
        let mut good = response("websocket", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        to_stream_response(&mut good, &key).unwrap();
        assert_eq!(good.status, StatusCode::OK);
        assert!(!good.headers.contains_key(header::SEC_WEBSOCKET_ACCEPT));
        assert!(to_stream_response(&mut response("websocket", "AAAA"), &key).is_err());
        assert!(to_stream_response(&mut response("h2c", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), &key).is_err());
    }

    #[test]
    fn other_protocols_and_plain_connect_are_told_apart() {
        let plain = Request::connect("example.com:443").body(()).unwrap();
        assert!(extended(&plain).is_none());
        let other = Request::connect("https://example.com/x")
            .extension(hyper::ext::Protocol::from_static("connect-udp"))
            .body(())
            .unwrap();
        assert!(matches!(extended(&other), Some(Extended::Other(p)) if p == "connect-udp"));
    }
}
