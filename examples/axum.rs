//! Serves an axum `Router` behind gatehouse's listeners, timeouts, limits and graceful drain.
//!
//! Run it (the address is optional; the default is 127.0.0.1:3000):
//!
//! ```text
//! cargo run --example axum
//! cargo run --example axum -- 127.0.0.1:3999
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! curl http://127.0.0.1:3000/
//! curl --http1.1 http://127.0.0.1:3000/conn                 # http/1.1
//! curl --http2-prior-knowledge http://127.0.0.1:3000/conn   # h2c
//! ```
//!
//! The listener speaks HTTP/1.1 and cleartext HTTP/2 by prior knowledge (`h2c`). gatehouse puts a
//! `gatehouse::RequestContext` into every request's extensions, so axum's `Extension` extractor
//! can read how the client is connected. Ctrl-C drains in-flight requests, then exits.

use axum::{routing::get, Extension, Router};
use gatehouse::{Config, RequestContext, Server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:3000".to_string());
    let config = Config::from_toml(&format!(
        "[[listeners]]\nname = \"web\"\naddress = \"{address}\"\nprotocols = [\"http/1.1\", \"h2c\"]\n"
    ))?;
    let app =
        Router::new()
            .route("/", get(|| async { "hello from axum behind gatehouse\n" }))
            .route(
                "/conn",
                get(|Extension(ctx): Extension<RequestContext>| async move {
                    format!("{}\n", ctx.conn.protocol().as_str())
                }),
            );
    let server = Server::bind(config)?;
    if let Some(addr) = server.local_addr("web") {
        println!("listening on http://{addr}");
    }
    server.serve(app).await?;
    Ok(())
}
