//! Bad submissions get a problem+json answer naming the field, and leave nothing behind.

mod common;

use common::{Fixture, TestApp};
use serde_json::{json, Value};

/// Posts a raw body; returns status, content type and the parsed problem.
async fn post_raw(app: &TestApp, body: String) -> anyhow::Result<(u16, String, Value)> {
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    Ok((status, content_type, resp.json().await?))
}

#[tokio::test]
async fn each_bad_input_names_its_field_and_stores_nothing() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let good = fixture.job("demo");

    let with = |path: &[&str], value: Value| {
        let mut body = good.clone();
        let mut at = &mut body;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = value;
        body.to_string()
    };
    let missing = format!("file://{}/nope.jsonl", fixture.dir.path().display());
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"adapter_name\": \"demo\",".into(),
            400,
            "",
        ),
        (
            "unknown method",
            with(&["method", "type"], json!("lorax")),
            422,
            "method.type",
        ),
        (
            "rank zero",
            with(&["method", "r"], json!(0)),
            422,
            "method.r",
        ),
        (
            "memory that is not a quantity",
            with(&["resources"], json!({"memory": "64GB"})),
            422,
            "resources.memory",
        ),
        (
            "a toleration value with Exists",
            with(
                &["resources"],
                json!({"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
            ),
            422,
            "resources.tolerations[0].value",
        ),
        (
            "a duration without units",
            with(&["training", "max_duration"], json!("90")),
            422,
            "training.max_duration",
        ),
        (
            "missing dataset file",
            with(&["dataset", "train"], json!(missing)),
            422,
            "dataset.train",
        ),
        (
            "unknown target module",
            with(
                &["method", "target_modules"],
                json!(["q_proj", "attn.c_proj"]),
            ),
            422,
            "method.target_modules[1]",
        ),
        (
            "unknown field",
            with(&["training", "epochz"], json!(3)),
            422,
            "training.epochz",
        ),
        (
            "relative file URI",
            with(&["base_model"], json!("file://model")),
            422,
            "base_model",
        ),
        (
            "model dir without config",
            with(
                &["base_model"],
                json!(format!("file://{}", fixture.dir.path().display())),
            ),
            422,
            "base_model",
        ),
        (
            "unsafe adapter name",
            with(&["adapter_name"], json!("../etc")),
            422,
            "adapter_name",
        ),
        (
            "negative learning rate",
            with(&["training", "learning_rate"], json!(-1.0)),
            422,
            "training.learning_rate",
        ),
    ];
    for (what, body, status, field) in cases {
        let (code, content_type, problem) = post_raw(&app, body).await?;
        assert_eq!(code, status, "{what}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{what}");
        assert_eq!(problem["status"], status, "{what}");
        assert!(
            problem["code"].is_string() && problem["detail"].is_string(),
            "{what}: {problem}"
        );
        if field.is_empty() {
            assert_eq!(problem["code"], "malformed_body", "{what}: {problem}");
        } else {
            assert_eq!(problem["code"], "validation_failed", "{what}: {problem}");
            assert_eq!(problem["field"], field, "{what}: {problem}");
            assert!(
                problem["detail"].as_str().unwrap().contains(field),
                "{what}: {problem}"
            );
        }
    }
    assert_eq!(app.count("jobs").await, 0);
    assert_eq!(app.count("job_events").await, 0);

    // Every problem in one document is reported, not only the first.
    let mut many = good.clone();
    many["method"]["r"] = json!(0);
    many["training"]["batch_size"] = json!(0);
    let (code, _, problem) = post_raw(&app, many.to_string()).await?;
    assert_eq!(code, 422);
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["method.r", "training.batch_size"]);

    // A reused Idempotency-Key with another body is a conflict, not the old job.
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "same")
        .json(&good)
        .send()
        .await?;
    assert_eq!(resp.status(), 201);
    let mut other = good.clone();
    other["training"]["seed"] = json!(7);
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "same")
        .json(&other)
        .send()
        .await?;
    assert_eq!(resp.status(), 409);
    assert_eq!(
        resp.json::<Value>().await?["code"],
        "idempotency_key_reused"
    );
    assert_eq!(app.count("jobs").await, 1);

    // Unknown ids and paths are problem+json 404s too.
    for path in [
        "/v1/jobs/not-a-uuid",
        "/v1/jobs/00000000-0000-0000-0000-000000000000",
        "/v1/adapters/x/versions/1",
        "/nope",
    ] {
        let resp = app.client.get(app.url(path)).send().await?;
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    // Worker routes refuse callers without the job's token.
    let job_id: String = sqlx::query_scalar("SELECT id::text FROM jobs")
        .fetch_one(&app.pool)
        .await?;
    let resp = app
        .client
        .get(app.url(&format!("/v1/worker/jobs/{job_id}")))
        .bearer_auth("guess")
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    app.stop().await
}
