//! HTTP/2 abuse on raw frames: each attack is bounded by a setting, answered on the wire with
//! GOAWAY(ENHANCE_YOUR_CALM) or a stream reset, and counted.

use crate::common;

use common::h2raw::{self, frame, get_block, goaways, headers, resets, H2Raw, RawFrame};
use common::TestServer;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

/// A cleartext h2c-only listener named `clear` answering `200 ok`, with `[http2]` keys and any
/// other tables appended.
fn server_toml(http2: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"clear\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"h2c\"]\n\
         [http2]\n{http2}\n{extra}\n[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
    )
}

fn goaway_metric(reason: &str) -> String {
    format!(r#"gatehouse_h2_goaway_sent_total{{listener="clear",reason="{reason}"}}"#)
}

fn reset_metric(reason: &str) -> String {
    format!(r#"gatehouse_h2_resets_sent_total{{listener="clear",reason="{reason}"}}"#)
}

fn flood_metric(frame: &str) -> String {
    format!(r#"gatehouse_h2_flood_total{{listener="clear",frame="{frame}"}}"#)
}

const CLOSED_LIMIT: &str = r#"gatehouse_connections_closed_total{listener="clear",reason="limit"}"#;

/// The one GOAWAY among `frames`, which must carry ENHANCE_YOUR_CALM.
fn calm_goaway(frames: &[RawFrame]) -> &RawFrame {
    let g = goaways(frames);
    assert_eq!(g.len(), 1, "expected one GOAWAY, got {frames:?}");
    assert_eq!(g[0].code(), Some(h2raw::ENHANCE_YOUR_CALM), "{:?}", g[0]);
    g[0]
}

/// Floods `frames` from a separate task while reading everything the server sends until it closes.
async fn flood_and_read(c: H2Raw, flood: Vec<u8>) -> Vec<RawFrame> {
    let H2Raw { mut reader, mut writer } = c;
    let w = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        // The server closes mid-flood: write errors are expected.
        let _ = writer.write_all(&flood).await;
        writer
    });
    let frames = reader.until_close(WAIT).await;
    drop(w.await.unwrap());
    frames
}

#[tokio::test]
async fn rapid_reset_burst_gets_goaway_enhance_your_calm() {
    let srv = TestServer::start(&server_toml("max_pending_reset_streams = 5", "")).await;
    let c = H2Raw::connect(srv.addr("clear")).await;
    let mut burst = Vec::new();
    for i in 0..200u32 {
        let id = 2 * i + 1;
        burst.extend(headers(id, h2raw::END_HEADERS | h2raw::END_STREAM, &get_block("/")));
        burst.extend(h2raw::rst_stream(id, h2raw::CANCEL));
    }
    let frames = flood_and_read(c, burst).await;
    let g = calm_goaway(&frames);
    // Bounded: the connection ended long before the 200th stream.
    assert!(g.last_stream().unwrap() < 399, "{g:?}");
    assert!(srv.wait_metric(CLOSED_LIMIT, 1.0).await);
    assert_eq!(srv.metric(&goaway_metric("enhance_your_calm")), 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn continuation_flood_gets_goaway_enhance_your_calm() {
    let srv = TestServer::start(&server_toml("", "")).await;
    let c = H2Raw::connect(srv.addr("clear")).await;
    // One header block cut into a HEADERS frame and 100 CONTINUATION frames, none ending it.
    let mut block = get_block("/");
    for i in 0..100 {
        h2raw::hpack_literal(&mut block, format!("x-h{i}").as_bytes(), b"v");
    }
    let mut flood = Vec::new();
    let mut chunks = block.chunks(block.len() / 100 + 1);
    flood.extend(headers(1, 0, chunks.next().unwrap()));
    for chunk in chunks {
        flood.extend(frame(h2raw::CONTINUATION, 0, 1, chunk));
    }
    let frames = flood_and_read(c, flood).await;
    calm_goaway(&frames);
    assert!(srv.wait_metric(CLOSED_LIMIT, 1.0).await);
    assert_eq!(srv.metric(&goaway_metric("enhance_your_calm")), 1.0);
    srv.stop().await;
}

/// A header block that inserts one ~4000-byte field into the HPACK dynamic table, then refers
/// to it `copies` times with a single byte each: small on the wire, large decoded.
fn hpack_bomb(copies: usize) -> Vec<u8> {
    let mut block = get_block("/");
    h2raw::hpack_literal_indexed(&mut block, b"x-bomb", &[b'a'; 4000]);
    block.extend(std::iter::repeat_n(0xbe, copies)); // indexed field 62: the newest entry
    block
}

#[tokio::test]
async fn hpack_bomb_over_header_list_size_gets_431() {
    // 5 copies decode to ~20KB: over max_header_bytes (16KiB), under h2's 4x abuse bound.
    let srv = TestServer::start(&server_toml("", "")).await;
    let mut c = H2Raw::connect(srv.addr("clear")).await;
    c.send(&headers(1, h2raw::END_HEADERS, &hpack_bomb(5))).await.unwrap();
    let frames = c
        .reader
        .until(WAIT, |f| f.kind == h2raw::RST_STREAM && f.stream == 1)
        .await
        .expect("stream 1 was not reset");
    let answer = frames.iter().find(|f| f.kind == h2raw::HEADERS && f.stream == 1);
    assert_eq!(answer.and_then(|f| f.status()), Some(431), "{frames:?}");
    assert_eq!(resets(&frames)[0].code(), Some(h2raw::PROTOCOL_ERROR));
    assert!(srv.wait_metric(&reset_metric("protocol_error"), 1.0).await);
    // The connection survives: the next request is answered.
    c.send(&headers(3, h2raw::END_HEADERS | h2raw::END_STREAM, &get_block("/")))
        .await
        .unwrap();
    let frames = c
        .reader
        .until(WAIT, |f| f.kind == h2raw::HEADERS && f.stream == 3)
        .await;
    assert_eq!(frames.unwrap().last().unwrap().status(), Some(200));
    srv.stop().await;
}

#[tokio::test]
async fn hpack_bomb_gets_goaway_enhance_your_calm() {
    // 40 copies decode to ~160KB in a ~4KB frame: over h2's abuse bound (4x max_header_bytes).
    let srv = TestServer::start(&server_toml("", "")).await;
    let c = H2Raw::connect(srv.addr("clear")).await;
    let frames = flood_and_read(c, headers(1, h2raw::END_HEADERS, &hpack_bomb(40))).await;
    calm_goaway(&frames);
    assert!(srv.wait_metric(CLOSED_LIMIT, 1.0).await);
    assert_eq!(srv.metric(&goaway_metric("enhance_your_calm")), 1.0);
    srv.stop().await;
}

/// Floods 1000 copies of `one` at a budget of 50/s (burst 100); asserts the GOAWAY, how many
/// answers got through, and the counters.
async fn control_flood(one: Vec<u8>, label: &str, answer: impl Fn(&RawFrame) -> bool) {
    let srv = TestServer::start(&server_toml("max_control_frames_per_second = 50", "")).await;
    let c = H2Raw::connect(srv.addr("clear")).await;
    let frames = flood_and_read(c, one.repeat(1000)).await;
    let g = calm_goaway(&frames);
    assert_eq!(g.last_stream(), Some(0));
    let answered = frames.iter().filter(|f| answer(f)).count();
    // The burst (100, minus the client's first SETTINGS) at most, plus what trickled in meanwhile.
    assert!(answered <= 150, "{answered} answers: the flood was not bounded");
    assert!(srv.wait_metric(CLOSED_LIMIT, 1.0).await);
    assert_eq!(srv.metric(&flood_metric(label)), 1.0);
    assert_eq!(srv.metric(&goaway_metric("enhance_your_calm")), 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn ping_flood_gets_goaway_enhance_your_calm() {
    control_flood(h2raw::ping(false, 7), "ping", |f| {
        f.kind == h2raw::PING && f.flags & h2raw::ACK != 0
    })
    .await;
}

#[tokio::test]
async fn settings_flood_gets_goaway_enhance_your_calm() {
    control_flood(h2raw::settings(&[(0x4, 65_535)]), "settings", |f| {
        f.kind == h2raw::SETTINGS && f.flags & h2raw::ACK != 0
    })
    .await;
}

#[tokio::test]
async fn unknown_and_priority_frame_floods_get_goaway_enhance_your_calm() {
    control_flood(frame(0xfa, 0, 0, b"noise"), "unknown", |_| false).await;
    control_flood(h2raw::priority(1, 0), "priority", |_| false).await;
}

#[tokio::test]
async fn streams_over_max_concurrent_are_refused() {
    let srv = TestServer::start(&server_toml("max_concurrent_streams = 2", "")).await;
    let mut c = H2Raw::connect(srv.addr("clear")).await;
    // Requests whose bodies never end keep their streams open.
    let mut three = Vec::new();
    for id in [1, 3, 5] {
        three.extend(headers(id, h2raw::END_HEADERS, &get_block("/")));
    }
    c.send(&three).await.unwrap();
    let frames = c
        .reader
        .until(WAIT, |f| f.kind == h2raw::RST_STREAM)
        .await
        .expect("no stream was refused");
    let rst = frames.last().unwrap();
    assert_eq!((rst.stream, rst.code()), (5, Some(h2raw::REFUSED_STREAM)));
    assert!(srv.wait_metric(&reset_metric("refused_stream"), 1.0).await);
    srv.stop().await;
}

#[tokio::test]
async fn made_you_reset_gets_stream_resets_then_goaway_enhance_your_calm() {
    // Each stream provokes a server reset: DATA beyond the declared content-length makes the
    // request malformed, a stream error PROTOCOL_ERROR (RFC 9113 §8.1.1).
    let srv = TestServer::start(&server_toml("max_local_reset_streams = 5", "")).await;
    let mut c = H2Raw::connect(srv.addr("clear")).await;
    let mut block = get_block("/");
    h2raw::hpack_literal(&mut block, b"content-length", b"0");
    let provoke = |id: u32| [headers(id, h2raw::END_HEADERS, &block), frame(h2raw::DATA, 0, id, b"x")].concat();
    for id in [1, 3, 5, 7, 9] {
        c.send(&provoke(id)).await.unwrap();
        let frames = c
            .reader
            .until(WAIT, |f| f.kind == h2raw::RST_STREAM && f.stream == id)
            .await
            .unwrap_or_else(|| panic!("stream {id} was not reset"));
        assert_eq!(frames.last().unwrap().code(), Some(h2raw::PROTOCOL_ERROR));
    }
    // The sixth reset would exceed max_local_reset_streams: the connection ends instead.
    c.send(&provoke(11)).await.unwrap();
    let frames = c.reader.until_close(WAIT).await;
    assert!(resets(&frames).is_empty(), "{frames:?}");
    assert_eq!(calm_goaway(&frames).last_stream(), Some(11));
    assert!(srv.wait_metric(CLOSED_LIMIT, 1.0).await);
    assert_eq!(srv.metric(&reset_metric("protocol_error")), 5.0);
    assert_eq!(srv.metric(&goaway_metric("enhance_your_calm")), 1.0);
    srv.stop().await;
}

/// Collects this thread's log events: the test runtime and the server share the thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn h2_frames_switch_logs_frames_both_ways() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let srv = TestServer::start(&server_toml("", "[debug]\nswitches = [\"h2_frames\"]\n")).await;
    let mut c = H2Raw::connect(srv.addr("clear")).await;
    c.send(&headers(1, h2raw::END_HEADERS | h2raw::END_STREAM, &get_block("/")))
        .await
        .unwrap();
    c.reader
        .until(WAIT, |f| f.kind == h2raw::DATA && f.flags & h2raw::END_STREAM != 0)
        .await
        .expect("no response");
    c.send(&h2raw::rst_stream(3, h2raw::CANCEL)).await.unwrap();
    c.reader.until(WAIT, |f| f.kind == h2raw::GOAWAY).await;
    let text = logs.text();
    for want in [
        "h2 recv SETTINGS flags=0x00 stream=0 length=0",
        "h2 recv HEADERS flags=0x05 stream=1",
        "h2 send SETTINGS flags=0x00 stream=0",
        "h2 send HEADERS flags=0x04 stream=1",
        "h2 send DATA flags=0x01 stream=1 length=2",
        // RST_STREAM on an idle stream is a connection error: h2 answers with GOAWAY.
        "h2 recv RST_STREAM flags=0x00 stream=3 length=4 error=cancel",
        "h2 send GOAWAY flags=0x00 stream=0 length=8 error=protocol_error",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    assert!(
        text.contains("switch=\"h2_frames\"") || text.contains("switch=h2_frames"),
        "{text}"
    );
    assert_eq!(srv.metric(&goaway_metric("protocol_error")), 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn well_behaved_client_with_2000_requests_is_not_a_flood() {
    let srv = TestServer::start(&server_toml("", "[limits]\nmax_requests_per_connection = 5000\n")).await;
    let url = format!("http://{}/", srv.addr("clear"));
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    // One request first, so the rest share its connection.
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let mut ok = 1;
    for _ in 0..(1999 / 25 + 1) {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..25.min(2000 - ok) {
            let (client, url) = (client.clone(), url.clone());
            batch.spawn(async move {
                let r = client.get(&url).send().await.unwrap();
                (r.status(), r.text().await.unwrap())
            });
        }
        while let Some(r) = batch.join_next().await {
            assert_eq!(r.unwrap(), (reqwest::StatusCode::OK, "ok".to_string()));
            ok += 1;
        }
    }
    assert_eq!(ok, 2000);
    assert_eq!(
        srv.metric(r#"gatehouse_connections_accepted_total{listener="clear"}"#),
        1.0
    );
    let text = srv.handle.metrics.encode();
    assert!(!text.contains("gatehouse_h2_flood_total{"), "{text}");
    assert!(!text.contains("reason=\"enhance_your_calm\""), "{text}");
    srv.stop().await;
}
