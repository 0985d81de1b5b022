//! The OpenAI-compatible API driven by the official `openai` Python SDK
//! (tests/python/openai_client.py): upload a file, train it to success, page through events
//! and checkpoints, cancel another job, and the error shapes; then what the SDK saw is
//! checked against the native API.

mod common;

use common::{python, Fixture, TestApp};
use loraforge::auth::{create_key, Scope};
use serde_json::{json, Value};
use std::process::Command;

#[tokio::test]
async fn the_openai_sdk_uploads_trains_pages_and_cancels() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(common::AppOptions {
        auth: true,
        ..Default::default()
    })
    .await?;
    let key = create_key(&app.pool, "sdk-team", Scope::Submit).await?.key;
    let registered = app
        .client
        .post(app.url("/v1/base-models"))
        .bearer_auth(&key)
        .json(&json!({"name": "tiny-llama", "uri": fixture.model_uri()}))
        .send()
        .await?;
    assert_eq!(registered.status(), 201, "{}", registered.text().await?);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_client.py");
    let mut command = Command::new(python());
    command
        .arg(script)
        .env("LORAFORGE_OPENAI_BASE_URL", app.url("/v1"))
        .env("LORAFORGE_API_KEY", &key)
        .env("LORAFORGE_MODEL", "tiny-llama")
        .env("LORAFORGE_TRAIN_FILE", fixture.train_file());
    let out = common::run_ok_async(command).await;
    let summary: Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    eprintln!("the SDK saw: {summary}");

    // What the SDK was told matches what the native API knows.
    let get = |path: String| {
        let request = app.client.get(app.url(&path)).bearer_auth(&key);
        async move {
            let resp = request.send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.json::<Value>().await?))
        }
    };
    let dataset = summary["file"]
        .as_str()
        .unwrap()
        .strip_prefix("file-")
        .unwrap();
    let (code, row) = get(format!("/v1/datasets/{dataset}")).await?;
    assert_eq!(code, 200, "{row}");
    assert_eq!(row["sha256"], common::sha256_file(&fixture.train_file()));
    let job_id = summary["job"]
        .as_str()
        .unwrap()
        .strip_prefix("ftjob-")
        .unwrap();
    let job_id = uuid::Uuid::parse_str(job_id)?;
    let (code, job) = get(format!("/v1/jobs/{job_id}")).await?;
    assert_eq!(code, 200, "{job}");
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["adapter_name"], "oa-demo");
    assert_eq!(job["spec"]["training"]["learning_rate"], 1e-3);
    assert_eq!(job["spec"]["method"]["r"], 4);
    // `fine_tuned_model` is a reference `resolve` takes as it is.
    let reference = summary["fine_tuned_model"].as_str().unwrap();
    let (code, resolved) = get(format!("/v1/adapters/{reference}/resolve")).await?;
    assert_eq!(code, 200, "{resolved}");
    assert_eq!(resolved["version"], 1);
    assert_eq!(resolved["status"], "ready");
    let (code, _) = get(format!("/v1/adapters/{reference}/resolve?ref=latest")).await?;
    assert_eq!(code, 422);
    let cancelled = summary["cancelled"]
        .as_str()
        .unwrap()
        .strip_prefix("ftjob-")
        .unwrap();
    let (_, other) = get(format!("/v1/jobs/{}", uuid::Uuid::parse_str(cancelled)?)).await?;
    assert_eq!(other["status"], "cancelled");
    assert_eq!(other["adapter_name"], "tiny-llama-ft");
    assert!(summary["checkpoints"].as_array().unwrap().len() >= 2);

    // Uploading takes the submit scope, in either shape.
    let reader = create_key(&app.pool, "sdk-team", Scope::Read).await?.key;
    let resp = app
        .client
        .post(app.url("/v1/datasets/more/upload"))
        .bearer_auth(&reader)
        .body("{\"text\": \"x\"}\n")
        .send()
        .await?;
    assert_eq!(resp.status(), 403);
    let resp = app
        .client
        .post(app.url("/v1/fine_tuning/jobs/ftjob-0/cancel"))
        .bearer_auth(&reader)
        .send()
        .await?;
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.json::<Value>().await?["error"]["code"], "forbidden");

    // Another project sees none of it.
    let stranger = create_key(&app.pool, "other-team", Scope::Admin).await?.key;
    let resp = app
        .client
        .get(app.url(&format!(
            "/v1/fine_tuning/jobs/{}",
            summary["job"].as_str().unwrap()
        )))
        .bearer_auth(&stranger)
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    app.stop().await
}
