//! A worker that dies between uploading and registering leaves no `ready` version, and
//! what it (or a zombie of it) uploaded is found and removed by gc. The test plays the
//! worker itself over the worker protocol (no local slots, so nothing else claims).

mod common;

use common::{AppOptions, Fixture, TestApp};
use loraforge_storage::Store;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_crash_between_upload_and_registration_publishes_nothing() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(AppOptions {
        slots: 0,
        lease: Duration::from_secs(2),
        max_attempts: 1,
        ..Default::default()
    })
    .await?;
    let store = Store::open(&app.storage_url)?;
    let (code, job) = app.submit(&fixture.job("crashy")).await?;
    assert_eq!(code, 201);
    let id = job["id"].as_str().unwrap().to_string();

    // Claim as the scheduler would, with a token we know.
    let token = "t".repeat(64);
    let claimed = loraforge::jobs::claim(
        &app.pool,
        Duration::from_secs(2),
        &Sha256::digest(token.as_bytes()),
    )
    .await?
    .expect("the queued job");
    assert_eq!(claimed.job_id.to_string(), id);
    let worker = |path: &str| {
        app.client
            .post(app.url(&format!("/v1/worker/jobs/{id}{path}")))
            .bearer_auth(&token)
    };
    assert_eq!(
        worker("/stage")
            .json(&json!({"status": "running"}))
            .send()
            .await?
            .status(),
        204
    );
    let reserved: Value = worker("/versions").send().await?.json().await?;
    assert_eq!(reserved["version"], 1);
    let prefix = reserved["prefix"].as_str().unwrap().to_string();
    store
        .put(
            &format!("{prefix}/adapter_model.safetensors"),
            b"partial".to_vec().into(),
        )
        .await?;
    // ... and the worker dies here: no heartbeat, no complete.

    let start = Instant::now();
    let failed = loop {
        let (_, j) = app.get_json(&format!("/v1/jobs/{id}")).await?;
        if j["status"] == "failed" {
            break j;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(failed["error"]["kind"], "system_error");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lease"),
        "{failed}"
    );
    let (_, version) = app.get_json("/v1/adapters/crashy/versions/1").await?;
    assert_eq!(version["status"], "failed");
    assert_eq!(
        app.get_json("/v1/adapters/crashy/resolve?ref=latest")
            .await?
            .0,
        404
    );
    let ready: i64 =
        sqlx::query_scalar("SELECT count(*) FROM adapter_versions WHERE status = 'ready'")
            .fetch_one(&app.pool)
            .await?;
    assert_eq!(ready, 0);

    // The dead worker's token no longer works, and no answer, event or stored row repeats it.
    let refused = worker("/heartbeat").send().await?;
    assert_eq!(refused.status(), 401);
    assert!(!refused.text().await?.contains(&token));
    let (_, job) = app.get_json(&format!("/v1/jobs/{id}")).await?;
    let events = app.all_events(&id).await?;
    assert!(!job.to_string().contains(&token) && !serde_json::to_string(&events)?.contains(&token));
    let stored: Vec<String> = sqlx::query_scalar("SELECT row_to_json(j)::text FROM jobs j")
        .fetch_all(&app.pool)
        .await?;
    assert!(
        stored.iter().all(|row| !row.contains(&token)),
        "tokens are stored only as hashes"
    );
    // A zombie that keeps uploading leaves orphans.
    store
        .put(&format!("{prefix}/manifest.json"), b"{}".to_vec().into())
        .await?;
    let report =
        loraforge::registry::gc::collect(&app.pool, &store, Duration::from_secs(3600), false)
            .await?;
    assert_eq!(report.orphans.len(), 1, "{:?}", report.orphans);
    assert_eq!(report.orphans[0].reason, "version is failed");
    assert!(store.list(&prefix).await?.is_empty());
    app.stop().await
}
