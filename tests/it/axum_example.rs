//! Runs `examples/axum.rs` (cargo builds examples for `cargo test`) and talks to it over h1 and h2c.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn example_binary() -> std::path::PathBuf {
    // Test binaries live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples").join("axum")
}

#[tokio::test]
async fn axum_router_served_by_gatehouse() {
    let mut child = Command::new(example_binary())
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("examples/axum is built by cargo test");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let base = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));

    let h1 = reqwest::Client::builder().http1_only().no_proxy().build().unwrap();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let hello = h1.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(hello.status(), 200);
    assert_eq!(hello.text().await.unwrap(), "hello from axum behind gatehouse\n");
    assert_eq!(
        h1.get(format!("{base}/conn"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "http/1.1\n"
    );
    let resp = h2.get(format!("{base}/conn")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "h2c\n");
    assert_eq!(h1.get(format!("{base}/missing")).send().await.unwrap().status(), 404);

    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = common::wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
}
