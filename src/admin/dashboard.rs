//! `GET /`: the dashboard, one self-contained HTML page that polls the admin API from the browser.
//!
//! The page needs no build step and loads nothing from elsewhere. Its one inline `<style>` and
//! one inline `<script>` are allowed by their SHA-256 digests in the `Content-Security-Policy`,
//! so nothing else (no injected markup, no other origin) can run or load in it.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use std::sync::OnceLock;

const PAGE: &str = include_str!("dashboard.html");

/// The page as served, with the policy that pins its inline blocks.
struct Dashboard {
    csp: HeaderValue,
}

fn dashboard() -> &'static Dashboard {
    static DASHBOARD: OnceLock<Dashboard> = OnceLock::new();
    DASHBOARD.get_or_init(|| {
        let digest = |open: &str, close: &str| {
            let body = PAGE
                .split_once(open)
                .and_then(|(_, rest)| rest.split_once(close))
                .map_or("", |(inner, _)| inner);
            let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body.as_bytes());
            format!("'sha256-{}'", crate::http::base64::encode(sha.as_ref()))
        };
        let csp = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            digest("<script>", "</script>"),
            digest("<style>", "</style>"),
        );
        Dashboard {
            // Base64 and ASCII punctuation only: always a valid header value.
            csp: HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static("default-src 'none'")),
        }
    })
}

/// The dashboard page. It holds no data, so it is served without the bearer token; the figures
/// it fetches are protected like any other admin request (see the page's script for the token).
pub fn page() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, dashboard().csp.clone());
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_pins_exactly_one_script_and_one_style() {
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        // Inline attributes would be blocked by this policy: the page must not rely on them.
        assert!(!PAGE.contains(" style=\"") && !PAGE.contains(" onclick="));
        let csp = dashboard().csp.to_str().unwrap().to_string();
        assert!(
            csp.contains("script-src 'sha256-") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
    }
}
