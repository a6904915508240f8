//! HTTP request handling shared by every listener: the pipeline, body types and request context.

pub mod base64;
pub mod body;
mod head;
mod pipeline;
mod request_body;

pub use head::{check_head, fields_present, Refusal};
pub use pipeline::{strip_port, AccessLogError, Instrumented, Pipeline, RequestContext};
pub use request_body::{BodyFault, BodyLimitExceeded, BodyReadTimeout, BodyState, RequestBody};

use body::BoxError;
use bytes::Bytes;

/// A response body gatehouse can send for a served service.
pub trait ServiceBody: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<B> ServiceBody for B
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
}

/// A tower service gatehouse can run (an axum `Router`, a `tower::service_fn`, ...): what
/// [`crate::Server::serve`] accepts.
pub trait HttpService<B: ServiceBody>:
    tower_service::Service<
        ::http::Request<RequestBody>,
        Response = ::http::Response<B>,
        Error: Into<BoxError>,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S
where
    B: ServiceBody,
    S: tower_service::Service<::http::Request<RequestBody>, Response = ::http::Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
}
