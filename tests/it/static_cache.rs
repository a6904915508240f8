//! The static handler's open-file cache: cached answers, and changes on disk seen within `validity`.

use crate::common;

use common::{Pki, TestServer};
use std::path::Path;
use std::time::{Duration, Instant};

/// Comfortably longer than two loopback requests on a loaded machine, short enough for a test.
const VALIDITY: Duration = Duration::from_secs(1);
/// How long past `VALIDITY` a change may take to show before the test fails: generous for CI.
const SLACK: Duration = Duration::from_secs(4);

fn config(site: &Path, cache: &str) -> String {
    format!(
        "[[listeners]]\nname = \"clear\"\naddress = \"127.0.0.1:0\"\nprotocols = [\"http/1.1\", \"h2c\"]\n\
         [[routes]]\nstatic = \"{}\"\n[static_cache]\n{cache}\n",
        site.display()
    )
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let resp = client.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, etag, resp.text().await.unwrap())
}

/// Polls until `url` answers `want_status` with `want_body`; returns how long that took.
async fn wait_for(client: &reqwest::Client, url: &str, want_status: u16, want_body: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _, body) = get(client, url).await;
        if status == want_status && body == want_body {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < VALIDITY + SLACK,
            "{url} still answers {status} {body:?}, want {want_status} {want_body:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn changed_and_deleted_files_are_seen_within_validity() {
    for http2 in [false, true] {
        let site = tempfile::tempdir().unwrap();
        let file = site.path().join("page.txt");
        std::fs::write(&file, "first version\n").unwrap();
        let srv = TestServer::start(&config(site.path(), "validity = \"1s\"")).await;
        let client = Pki::new().reqwest(http2);
        let url = format!("http://{}/page.txt", srv.addr("clear"));

        let (status, etag1, body) = get(&client, &url).await;
        assert_eq!((status, body.as_str()), (200, "first version\n"));

        // Replaced on disk: the cache answers the old bytes until its entry is checked again.
        std::fs::write(&file, "second, longer version\n").unwrap();
        let (status, etag, body) = get(&client, &url).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "first version\n"),
            "served from the cache"
        );
        assert_eq!(etag, etag1, "the cached validators go with the cached bytes");

        wait_for(&client, &url, 200, "second, longer version\n").await;
        let (_, etag2, _) = get(&client, &url).await;
        assert_ne!(etag2, etag1, "the new version has a new ETag");
        // A conditional request with the old validator gets the new representation, not a 304.
        let resp = client.get(&url).header("if-none-match", &etag1).send().await.unwrap();
        assert_eq!(resp.status(), 200);

        std::fs::remove_file(&file).unwrap();
        wait_for(&client, &url, 404, "not found\n").await;
        srv.stop().await;
    }
}

#[tokio::test]
async fn cached_answers_keep_conditionals_and_ranges() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("data.txt"), "0123456789").unwrap();
    let srv = TestServer::start(&config(site.path(), "validity = \"1m\"")).await;
    let client = Pki::new().reqwest(false);
    let url = format!("http://{}/data.txt", srv.addr("clear"));
    let (_, etag, _) = get(&client, &url).await;
    // Every request below is a cache hit: the entry is fresh for a minute.
    for _ in 0..2 {
        let resp = client.get(&url).header("range", "bytes=2-4").send().await.unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.headers()["content-range"], "bytes 2-4/10");
        assert_eq!(resp.text().await.unwrap(), "234");
        let resp = client.get(&url).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!(resp.status(), 304);
        assert_eq!(resp.headers()["etag"], etag.as_str());
        let resp = client.head(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "10");
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    }
    srv.stop().await;
}

#[tokio::test]
async fn cache_off_sees_changes_at_once() {
    let site = tempfile::tempdir().unwrap();
    let file = site.path().join("page.txt");
    std::fs::write(&file, "first\n").unwrap();
    let srv = TestServer::start(&config(site.path(), "max_entries = 0\nvalidity = \"1h\"")).await;
    let client = Pki::new().reqwest(false);
    let url = format!("http://{}/page.txt", srv.addr("clear"));
    assert_eq!(get(&client, &url).await.2, "first\n");
    std::fs::write(&file, "second\n").unwrap();
    assert_eq!(get(&client, &url).await.2, "second\n");
    std::fs::remove_file(&file).unwrap();
    assert_eq!(get(&client, &url).await.0, 404);
    srv.stop().await;
}
