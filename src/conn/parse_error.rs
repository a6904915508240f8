//! HTTP/1.1 request heads hyper refused while parsing: counted and logged, never silent.
//!
//! hyper answers a head it cannot parse itself (400, 414 or 431) and ends the connection with the
//! parse error, so the request pipeline never sees such a request. This is where it becomes a
//! `gatehouse_requests_total` sample and a log line with `error = "malformed_request: ..."`.

use super::{CloseReason, ConnInfo, ListenerShared, Protocol};
use crate::observe::metrics::RequestLabels;
use http::StatusCode;

/// The status hyper wrote for a head it could not parse (its `Server::on_error`), or `None` when
/// it closed without answering (an HTTP/2 preface on HTTP/1.1, an internal parser error).
fn hyper_status(e: &hyper::Error) -> Option<StatusCode> {
    if !e.is_parse() {
        return None;
    }
    // hyper exposes no kind for these; its error text is the only distinction it offers.
    let text = e.to_string();
    if e.is_parse_too_large() {
        return Some(if text.starts_with("URI too long") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        });
    }
    if text.contains("HTTP2 preface") || text.starts_with("internal error") {
        return None;
    }
    Some(StatusCode::BAD_REQUEST)
}

/// Reports an HTTP/1.1 connection that ended with a parse error; returns its close reason, or
/// `None` when `e` is not a parse error. A head over `limits.max_header_bytes` (431), or a target
/// over hyper's own URI ceiling (414, above any valid `limits.max_uri_bytes`), closes with `limit`
/// like every other configured bound; anything else the parser refused is `protocol_error`.
pub(super) fn report(e: &hyper::Error, info: &ConnInfo, listener: &ListenerShared) -> Option<CloseReason> {
    if !e.is_parse() || info.protocol() != Protocol::Http11 {
        return None;
    }
    let status = hyper_status(e);
    if let Some(status) = status {
        listener
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                listener: listener.name.clone(),
                protocol: Protocol::Http11.as_str(),
                // The method is unknown (or not trusted) when the head did not parse.
                method: "OTHER",
                status: status.as_u16(),
            })
            .inc();
    }
    tracing::info!(
        conn_id = info.id,
        listener = %listener.name.0,
        remote = %info.peer,
        status = status.map_or(0, |s| s.as_u16()),
        error = %format_args!("malformed_request: {e}"),
        "request refused by the HTTP/1.1 parser; connection closed"
    );
    Some(match status {
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE | StatusCode::URI_TOO_LONG) => CloseReason::Limit,
        _ => CloseReason::ProtocolError,
    })
}
