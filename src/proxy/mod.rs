//! The reverse proxy: `proxy = "NAME"` routes forward to `[[upstreams]]` over pooled HTTP/1.1
//! and HTTP/2 connections, and say what happened when an upstream fails.
//!
//! The pool is gatehouse's own, over its own HTTP/1.1 client ([`h1`], spoken by each request's
//! task) and `hyper::client::conn::http2`, rather than hyper-util's legacy `Client`: that client
//! opens, reuses and drops connections out of sight,
//! and gatehouse's promise is that connection reuse never fails silently. Here every new
//! connection is counted with the reason it was needed (see [`pool`]), the reuse ratio is a
//! metric, and an ALPN fall back to HTTP/1.1 is counted and logged.
//!
//! Layout: [`connect`] opens one connection (TCP, TLS, ALPN, handshake); [`h1`] speaks HTTP/1.1
//! on one; [`pool`] keeps them per
//! server; [`upstream`] holds the configured upstreams, reconciles them on reload and balances
//! over the servers their [`guard`]s (health, breaker) allow; [`checker`] runs the active health
//! checks; [`headers`] rewrites heads both ways; [`forward`] runs a request's attempts and
//! retries; [`answer`] makes its errors and fallbacks; [`body`] streams the response back (and
//! tees it into the stale cache); [`upgrade`] tunnels `101 Switching Protocols`, and [`websocket`] carries HTTP/2 WebSocket
//! (RFC 8441) to HTTP/1.1 upstreams. The
//! [`resilience`] blocks are the state machines behind guards, retries and fallbacks.

pub mod answer;
pub mod body;
pub mod checker;
pub mod connect;
pub mod forward;
pub mod guard;
pub mod h1;
pub mod headers;
pub mod metrics;
pub mod pool;
pub mod upgrade;
pub mod upstream;
pub mod websocket;

pub use body::UpstreamBody;
pub use forward::forward;
pub use metrics::UpstreamMetrics;
pub use upstream::{compile, Gateway, Upstream, UpstreamSpec};
pub mod resilience;
