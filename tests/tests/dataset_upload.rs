//! `POST /v1/datasets/{name}/upload`: a good file is stored and registered with the digest of
//! its bytes, and a job trains on it; a bad file is refused naming its lines, an oversized one
//! with 413, and neither leaves anything in the store or the database.

mod common;

use common::{Fixture, TestApp};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn upload(app: &TestApp, name: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    let resp = app
        .client
        .post(app.url(&format!("/v1/datasets/{name}/upload")))
        .header("content-type", "application/jsonl")
        .body(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

/// Every file under `dir` (staged parts included), relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

async fn datasets(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM datasets")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_upload_is_checked_stored_registered_and_trained_on() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let store = app.store_dir.clone().unwrap();

    // A bad file: refused with its first bad lines, nothing kept.
    let bad = b"{\"text\": \"fine\"}\n{\"prompt\": \"p\"}\n\n{\"text\": \"ok\"}\n[1, 2]\n".to_vec();
    let (code, problem) = upload(&app, "bad", bad).await?;
    assert_eq!(code, 422, "{problem}");
    assert_eq!(problem["code"], "validation_failed");
    let lines: Vec<u64> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 5], "{problem}");
    assert!(problem["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("has \"prompt\" but no \"completion\""));
    // A chat file with nothing to learn says how it was read.
    let chat = b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n".to_vec();
    let (code, problem) = upload(&app, "chat", chat).await?;
    assert_eq!(code, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("read as chat (\"messages\")"),
        "{problem}"
    );
    let (code, _) = upload(&app, "Not A Name", b"{\"text\": \"x\"}\n".to_vec()).await?;
    assert_eq!(code, 422);
    assert_eq!(files_under(&store), Vec::<String>::new());
    assert_eq!(datasets(&app).await, 0);

    // A good one: 201 with the digest of the bytes, the object in the store.
    let bytes = std::fs::read(fixture.train_file())?;
    let (code, row) = upload(&app, "train", bytes.clone()).await?;
    assert_eq!(code, 201, "{row}");
    assert_eq!(row["name"], "train");
    assert_eq!(row["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(row["size"], bytes.len());
    assert_eq!(row["format"], "jsonl");
    let uri = row["uri"].as_str().unwrap();
    let stored = files_under(&store);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].starts_with("datasets/default/") && stored[0].ends_with(".jsonl"));
    assert_eq!(uri, format!("{}/{}", app.storage_url, stored[0]));
    assert_eq!(std::fs::read(store.join(&stored[0]))?, bytes);
    // The same again: nothing new; other content under the name: a conflict.
    let (code, again) = upload(&app, "train", bytes.clone()).await?;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["uri"], row["uri"]);
    let (code, problem) = upload(&app, "train", b"{\"text\": \"other\"}\n".to_vec()).await?;
    assert_eq!(code, 409, "{problem}");
    assert_eq!(files_under(&store).len(), 1);
    let (code, listed) = app.get_json("/v1/datasets/train").await?;
    assert_eq!((code, &listed["sha256"]), (200, &row["sha256"]));

    // The artifact store is never a `file://` input, but the upload is read from it.
    let (code, problem) = app
        .send_json(
            reqwest::Method::POST,
            "/v1/datasets",
            Some(&serde_json::json!({"name": "sneaky", "uri": uri})),
        )
        .await?;
    assert_eq!(code, 422, "{problem}");
    let mut job = fixture.job("from-upload");
    job["dataset"]["train"] = "train".into();
    job["training"]["max_steps"] = 5.into();
    let done = app.run_job(&job).await?;
    let (_, lineage) = app
        .get_json("/v1/adapters/from-upload/versions/1/lineage")
        .await?;
    assert_eq!(lineage["dataset"]["sha256"], row["sha256"], "{lineage}");
    assert_eq!(lineage["dataset"]["uri"], row["uri"], "{lineage}");
    assert_eq!(done["spec"]["dataset"]["train"], row["uri"]);
    app.stop().await
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_and_leaves_nothing() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(common::AppOptions {
        max_upload_bytes: 1000,
        ..Default::default()
    })
    .await?;
    let store = app.store_dir.clone().unwrap();
    let line = b"{\"text\": \"the cat sat on the mat\"}\n";
    let big: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 100)
        .collect();

    // Declared too large: refused unread.
    let (code, problem) = upload(&app, "big", big.clone()).await?;
    assert_eq!(code, 413, "{problem}");
    assert_eq!(problem["code"], "body_too_large");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("LORAFORGE_MAX_UPLOAD_BYTES"));

    // Streamed without a length: refused once past the limit.
    let address = app.base_url.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&address).await?;
    let head = format!(
        "POST /v1/datasets/big/upload HTTP/1.1\r\nHost: {address}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await?;
    for chunk in big.chunks(300) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if socket.write_all(&framed).await.is_err() {
            break; // the server answered and closed
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A small file still fits.
    let (code, row) = upload(&app, "small", line.to_vec()).await?;
    assert_eq!(code, 201, "{row}");
    assert_eq!(files_under(&store).len(), 1);
    assert_eq!(datasets(&app).await, 1);
    app.stop().await
}
