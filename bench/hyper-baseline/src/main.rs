//! hyper with nothing around it: `hyper-baseline PORT h1|h2c` serves `hello, world\n` on
//! 127.0.0.1:PORT over HTTP/1.1 or prior-knowledge HTTP/2, one current-thread runtime, with no
//! timeouts, limits, routing or metrics. A measuring stick for `bench/instructions`, not a server.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use std::convert::Infallible;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// hyper's HTTP/2 server spawns a task per stream; on a current-thread runtime that is a local task.
#[derive(Clone, Copy)]
struct Local;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for Local {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(protocol)) = (args.next().and_then(|p| p.parse::<u16>().ok()), args.next()) else {
        eprintln!("usage: hyper-baseline PORT h1|h2c");
        std::process::exit(2);
    };
    let h2 = match protocol.as_str() {
        "h1" => false,
        "h2c" => true,
        other => {
            eprintln!("protocol must be h1 or h2c, not {other}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| {
                eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello, world\n"))))
            });
            tokio::task::spawn_local(async move {
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(Local)
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
}
