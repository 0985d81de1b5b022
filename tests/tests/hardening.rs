//! Defects a hostile-but-fair audit found, each pinned by a test that failed before its fix:
//! the artifact store and the worker logs are never inputs, symlinks cannot lead a model
//! directory out of the allowed roots, duplicate JSON keys are refused with the key named,
//! a trailing slash is refused at submission, worker routes check the token before reading
//! the body, and a request refused before its body was read says `Connection: close`.

mod common;

use common::{AppOptions, Fixture, TestApp};
use serde_json::{json, Value};
use std::io::{Read, Write};

async fn post(app: &TestApp, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    app.send_json(reqwest::Method::POST, path, Some(body)).await
}

fn field_errors(problem: &Value) -> String {
    problem["errors"].to_string()
}

#[tokio::test]
async fn the_store_and_the_logs_are_never_inputs() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    // The test's roots (the temp dir) contain the data dir: the roots alone would allow it.
    let store = app.store_dir.clone().expect("a local store");
    let planted = store.join("adapters/other-project/secret/v1/train.jsonl");
    std::fs::create_dir_all(planted.parent().unwrap())?;
    std::fs::copy(fixture.train_file(), &planted)?;
    let logs = app.data_dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::copy(fixture.train_file(), logs.join("worker.log"))?;

    for target in [planted.clone(), logs.join("worker.log")] {
        let uri = format!("file://{}", target.display());
        let (code, problem) =
            post(&app, "/v1/datasets", &json!({"name": "stolen", "uri": uri})).await?;
        assert_eq!(code, 422, "{problem}");
        assert!(
            field_errors(&problem).contains("never read as inputs"),
            "{problem}"
        );
        let mut job = fixture.job("stolen");
        job["dataset"]["train"] = json!(uri);
        let (code, problem) = app.submit(&job).await?;
        assert_eq!(code, 422, "{problem}");
        assert_eq!(problem["errors"][0]["field"], "dataset.train", "{problem}");
    }
    assert_eq!(app.count("jobs").await, 0);
    app.stop().await
}

#[tokio::test]
async fn a_symlink_cannot_lead_a_model_out_of_the_roots() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let outside = tempfile::tempdir_in("/var/tmp")?;
    std::fs::write(outside.path().join("secret.txt"), "not for you")?;
    let model = tempfile::tempdir()?;
    for entry in std::fs::read_dir(fixture.model_dir())? {
        let entry = entry?;
        std::fs::copy(entry.path(), model.path().join(entry.file_name()))?;
    }
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        model.path().join("extra.json"),
    )?;
    let uri = format!("file://{}", model.path().display());
    let (code, problem) = post(
        &app,
        "/v1/base-models",
        &json!({"name": "linked", "uri": uri}),
    )
    .await?;
    assert_eq!(code, 422, "{problem}");
    let errors = field_errors(&problem);
    assert!(
        errors.contains("extra.json is a link to a file outside"),
        "{problem}"
    );
    assert!(
        !errors.contains("/var/tmp"),
        "the link's target is not revealed: {problem}"
    );
    // Without the link the same directory is fine.
    std::fs::remove_file(model.path().join("extra.json"))?;
    let (code, row) = post(
        &app,
        "/v1/base-models",
        &json!({"name": "linked", "uri": uri}),
    )
    .await?;
    assert_eq!(code, 201, "{row}");
    app.stop().await
}

#[tokio::test]
async fn duplicate_keys_and_trailing_slashes_are_refused_naming_the_field() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let good = fixture.job("dup").to_string();
    let twice = good.replacen("{", r#"{"adapter_name":"BAD NAME","#, 1);
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(twice)
        .send()
        .await?;
    let code = resp.status().as_u16();
    let problem: Value = resp.json().await?;
    assert_eq!(code, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "adapter_name", "{problem}");
    assert!(problem["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("twice"));

    let mut slash = fixture.job("slash");
    slash["dataset"]["train"] = json!(format!("{}/", fixture.train_uri()));
    let (code, problem) = app.submit(&slash).await?;
    assert_eq!(code, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "dataset.train", "{problem}");
    assert_eq!(app.count("jobs").await, 0);
    app.stop().await
}

/// Sends raw HTTP/1.1 and returns the response head, lower-cased.
fn raw_head(addr: &str, request: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    Ok(text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test]
async fn a_refused_body_is_never_read_and_the_connection_says_close() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(AppOptions {
        auth: true,
        ..AppOptions::default()
    })
    .await?;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    // Blocking sockets on a thread of their own: the server runs on this test's runtime.
    let heads = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        Ok(vec![
            // A worker route without a token: 401, not a complaint about the malformed body.
            raw_head(
                &addr,
                &format!(
                    "POST /v1/worker/jobs/{}/stage HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1\r\n\r\n{{",
                    uuid::Uuid::new_v4()
                ),
            )?,
            // A user route refused for its key before the body is read.
            raw_head(
                &addr,
                "POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            )?,
            // A request without a body keeps its connection.
            raw_head(&addr, "GET /v1/jobs HTTP/1.1\r\nhost: x\r\n\r\n")?,
        ])
    })
    .await??;
    for head in &heads[..2] {
        assert!(head.starts_with("http/1.1 401"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
    }
    assert!(heads[2].starts_with("http/1.1 401"), "{}", heads[2]);
    assert!(!heads[2].contains("connection: close"), "{}", heads[2]);
    app.stop().await
}

/// Reads until the server closes the socket; how long that took (`None`: still open).
fn closed_within(
    stream: &mut std::net::TcpStream,
    limit: std::time::Duration,
) -> Option<std::time::Duration> {
    let start = std::time::Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(start.elapsed())
            }
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn slow_and_surplus_connections_are_closed() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(AppOptions {
        header_timeout: std::time::Duration::from_secs(1),
        max_connections: 4,
        ..AppOptions::default()
    })
    .await?;
    let addr = app.base_url.trim_start_matches("http://").to_string();
    let limit = std::time::Duration::from_secs(5);
    tokio::task::spawn_blocking(move || {
        // Half a request line, then nothing: closed at the header deadline.
        let mut slow = std::net::TcpStream::connect(&addr).unwrap();
        slow.write_all(b"GET /v1/jo").unwrap();
        let took = closed_within(&mut slow, limit).expect("a half request is not kept open");
        assert!(took >= std::time::Duration::from_millis(800), "{took:?}");

        // Four silent sockets fill the cap: a fifth is closed at once.
        let held: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut surplus = std::net::TcpStream::connect(&addr).unwrap();
        let took = closed_within(&mut surplus, limit).expect("a connection past the cap is closed");
        assert!(took < std::time::Duration::from_millis(800), "{took:?}");
        // Once the silent ones time out, requests are served again.
        drop(held);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let head = raw_head(&addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
    })
    .await?;
    app.stop().await
}
