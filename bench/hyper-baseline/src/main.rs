//! hyper with nothing around it: `hyper-baseline PORT h1|h2c [PORT h1|h2c ...]` serves
//! `hello, world\n` on 127.0.0.1:PORT over HTTP/1.1 or prior-knowledge HTTP/2 (one listener per
//! pair), on one current-thread runtime, with no timeouts, limits, routing or metrics. A measuring
//! stick for `bench/instructions` and `bench/run` (the `hyper` server), not a server.

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

fn usage(problem: &str) -> ! {
    eprintln!("{problem}\nusage: hyper-baseline PORT h1|h2c [PORT h1|h2c ...]");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.len() % 2 != 0 {
        usage("expected PORT PROTOCOL pairs");
    }
    let listeners: Vec<(u16, bool)> = args
        .chunks(2)
        .map(|pair| {
            let port = pair[0]
                .parse::<u16>()
                .unwrap_or_else(|_| usage(&format!("not a port: {}", pair[0])));
            let h2 = match pair[1].as_str() {
                "h1" => false,
                "h2c" => true,
                other => usage(&format!("protocol must be h1 or h2c, not {other}")),
            };
            (port, h2)
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let mut accepting = Vec::new();
        for (port, h2) in listeners {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap_or_else(|e| {
                    eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
                    std::process::exit(1);
                });
            accepting.push(tokio::task::spawn_local(accept(listener, h2)));
        }
        for task in accepting {
            let _ = task.await;
        }
    });
}

async fn accept(listener: tokio::net::TcpListener, h2: bool) {
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
}
