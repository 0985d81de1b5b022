//! The errors a newcomer hits first say how to get past them: a `file://` path outside the
//! allowed roots names the setting to change, an unknown base model lists the registered ones,
//! and a dataset with nothing to learn says which format it was read as.

mod common;

use common::{Fixture, TestApp};
use serde_json::{json, Value};

fn detail(problem: &Value) -> &str {
    problem["detail"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn first_mistakes_come_with_a_way_out() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let post = |path: &'static str, body: Value| {
        let app = &app;
        async move {
            app.send_json(reqwest::Method::POST, path, Some(&body))
                .await
        }
    };

    // A file outside the roots the server reads: the setting to change.
    let outside = "file:///var/lib/loraforge-elsewhere/train.jsonl";
    let (code, problem) = post("/v1/datasets", json!({"name": "far", "uri": outside})).await?;
    assert_eq!(code, 422, "{problem}");
    let roots = std::env::temp_dir().display().to_string();
    for hint in [
        "LORAFORGE_FILE_ROOTS",
        roots.as_str(),
        "/v1/datasets/{name}/upload",
    ] {
        assert!(detail(&problem).contains(hint), "{hint}: {problem}");
    }
    let mut job = fixture.job("hints");
    job["base_model"] = "file:///var/lib/loraforge-elsewhere/model".into();
    let (code, problem) = app.submit(&job).await?;
    assert_eq!(code, 422, "{problem}");
    assert_eq!(problem["field"], "base_model");
    assert!(
        detail(&problem).contains("LORAFORGE_FILE_ROOTS"),
        "{problem}"
    );

    // An unknown base model: first how to register one, then the ones there are.
    job["base_model"] = "tiny".into();
    let (_, problem) = app.submit(&job).await?;
    assert!(
        detail(&problem).contains("POST /v1/base-models"),
        "{problem}"
    );
    for name in ["tiny-llama", "tiny-llama-2"] {
        let (code, row) = post(
            "/v1/base-models",
            json!({"name": name, "uri": fixture.model_uri()}),
        )
        .await?;
        assert_eq!(code, 201, "{row}");
    }
    let (code, problem) = app.submit(&job).await?;
    assert_eq!(code, 422, "{problem}");
    assert!(
        detail(&problem).contains("no registered base model named \"tiny\"; the registered base models are: tiny-llama, tiny-llama-2"),
        "{problem}"
    );

    // Nothing to learn: every completion is cut off by seq_len. The job says how it read them.
    let text = std::fs::read_to_string(fixture.train_file())?;
    let first: Value = serde_json::from_str(text.lines().next().unwrap())?;
    let prompt = first["text"].as_str().unwrap();
    let path = fixture.dir.path().join("cut.jsonl");
    let line = json!({"prompt": prompt, "completion": " end"}).to_string();
    std::fs::write(&path, format!("{line}\n{line}\n"))?;
    let mut job = fixture.job("nothing-to-learn");
    job["dataset"]["train"] = format!("file://{}", path.display()).into();
    job["training"]["seq_len"] = 2.into();
    let (code, submitted) = app.submit(&job).await?;
    assert_eq!(code, 201, "{submitted}");
    let done = app.wait_for_job(submitted["id"].as_str().unwrap()).await?;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["kind"], "user_error", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message
            .contains("read as prompt-completion (\"prompt\", \"completion\") for all 2 examples")
            && message.contains("training.seq_len"),
        "{message}"
    );
    app.stop().await
}
