//! HTTP request handling shared by every listener: the pipeline, body types and request context.

pub mod body;
mod pipeline;
mod request_body;

pub use pipeline::{strip_port, Instrumented, Pipeline, RequestContext};
pub use request_body::{BodyLimitExceeded, BodyState, RequestBody};
