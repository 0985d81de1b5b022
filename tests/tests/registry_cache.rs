//! The registry's read cache answers repeated `resolve` and `versions/{v}` reads from memory,
//! yet never serves a stale answer for longer than a notification takes: changes made behind
//! the API's back (another replica, `loraforge gc`, plain SQL) reach it through Postgres
//! NOTIFY, and a write through the API is visible to the writer's next read at once.

mod common;

use common::TestApp;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Adds version `v` of `adapter`, ready, as another replica's publish would.
async fn insert_version(app: &TestApp, adapter: &str, v: i32) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO adapters (project, name, next_version) VALUES ('default', $1, $2 + 1)
         ON CONFLICT (project, name) DO UPDATE SET next_version = $2 + 1",
    )
    .bind(adapter)
    .bind(v)
    .execute(&app.pool)
    .await?;
    let job = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO jobs (id, project, adapter_name, spec, status, request_sha256)
         VALUES ($1, 'default', $2, '{}'::jsonb, 'succeeded', '\\x00')",
    )
    .bind(job)
    .bind(adapter)
    .execute(&app.pool)
    .await?;
    sqlx::query(
        "INSERT INTO adapter_versions (project, adapter_name, version, status, job_id, storage_prefix, files, method,
                                       hyperparameters, base_model_uri, dataset_uri, ready_at)
         VALUES ('default', $1, $2, 'ready', $3, 'adapters/default/' || $1 || '/v' || $2,
                 '[{\"name\":\"adapter_config.json\",\"sha256\":\"00\",\"size\":800}]',
                 '{\"type\":\"lora\",\"r\":4}', '{\"max_steps\":1,\"learning_rate\":0.001}',
                 'file:///models/base', 'file:///data/train.jsonl', now())",
    )
    .bind(adapter)
    .bind(v)
    .bind(job)
    .execute(&app.pool)
    .await?;
    Ok(())
}

/// This replica's cache hits so far, from `/metrics`.
async fn cache_hits(app: &TestApp) -> anyhow::Result<u64> {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("loraforge_registry_cache_requests_total{result=\"hit\"}"))
        .ok_or_else(|| anyhow::anyhow!("no cache metric in {text}"))?;
    Ok(line.rsplit(' ').next().unwrap().parse()?)
}

async fn get(app: &TestApp, path: &str) -> anyhow::Result<Value> {
    let (status, body) = app.get_json(path).await?;
    anyhow::ensure!(status == 200, "{path}: {status} {body}");
    Ok(body)
}

/// Reads `path` until `done` holds of the answer, for at most 5 s; returns the last answer.
async fn poll(app: &TestApp, path: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = get(app, path).await?;
        if done(&body) || Instant::now() > deadline {
            return Ok(body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `path` until the cache answers it (the listener connects shortly after start).
async fn until_cached(app: &TestApp, path: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = cache_hits(app).await?;
        let body = get(app, path).await?;
        if cache_hits(app).await? > before {
            return Ok(body);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{path} is never served from the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cached_answers_follow_every_change() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let resolve = "/v1/adapters/served/resolve?ref=latest";
    insert_version(&app, "served", 1).await?;
    insert_version(&app, "served", 2).await?;
    assert_eq!(until_cached(&app, resolve).await?["version"], 2);
    assert_eq!(
        until_cached(&app, "/v1/adapters/served/versions/1").await?["tags"],
        json!([])
    );

    // Behind the API's back: quarantine v2 and tag v1. Only the notification can tell the
    // cache, which would otherwise keep answering v2 and no tags.
    sqlx::query("UPDATE adapter_versions SET status = 'quarantined' WHERE adapter_name = 'served' AND version = 2")
        .execute(&app.pool)
        .await?;
    sqlx::query("UPDATE adapter_versions SET tags = '{canary}' WHERE adapter_name = 'served' AND version = 1")
        .execute(&app.pool)
        .await?;
    let now = poll(&app, resolve, |b| b["version"] == 1).await?;
    assert_eq!(
        now["version"], 1,
        "latest still resolves to the quarantined v2: {now}"
    );
    let v1 = poll(&app, "/v1/adapters/served/versions/1", |b| {
        b["tags"] == json!(["canary"])
    })
    .await?;
    assert_eq!(v1["tags"], json!(["canary"]), "{v1}");

    // A write through the API: the writer's very next read sees it, alias moves included.
    insert_version(&app, "served", 3).await?;
    let prod = "/v1/adapters/served/resolve?ref=prod";
    for target in [1, 3, 1] {
        let (status, body) = app
            .send_json(
                reqwest::Method::PUT,
                "/v1/adapters/served/aliases/prod",
                Some(&json!({ "version": target })),
            )
            .await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(get(&app, prod).await?["version"], target);
        assert_eq!(until_cached(&app, prod).await?["version"], target);
    }

    // The listener's connection drops: notifications sent meanwhile are lost, so the cache
    // starts over once it reconnects, and later changes still arrive.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN %loraforge_registry%'",
    )
    .fetch_all(&app.pool)
    .await?;
    assert_eq!(killed, [true], "one listener connection");
    sqlx::query("UPDATE adapter_versions SET status = 'ready' WHERE adapter_name = 'served' AND version = 2")
        .execute(&app.pool)
        .await?;
    sqlx::query("UPDATE adapter_versions SET status = 'quarantined' WHERE adapter_name = 'served' AND version = 3")
        .execute(&app.pool)
        .await?;
    let now = poll(&app, resolve, |b| b["version"] == 2).await?;
    assert_eq!(now["version"], 2, "{now}");
    assert_eq!(until_cached(&app, resolve).await?["version"], 2);
    app.stop().await
}
