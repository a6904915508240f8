//! Route handlers: static files, redirects, fixed responses and the built-in connection page.

mod file_cache;
mod info;
mod static_files;

pub use info::connection_info;
pub use static_files::StaticFiles;

use crate::http::body::ResponseBody;
use http::{header, HeaderValue, Response, StatusCode};

/// A short plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
