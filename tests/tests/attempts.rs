//! How an attempt ends is decided in one place (`jobs::attempts::settle`): here, a worker
//! that cannot even be started is a system error like any other, retried with backoff
//! until the attempts run out, then failed with the reason.

mod common;

use common::{AppOptions, Fixture, TestApp};

#[tokio::test]
async fn a_worker_that_cannot_start_is_retried_then_fails_with_the_reason() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(AppOptions {
        max_attempts: 2,
        trainer_bin: Some("/nonexistent/loraforge-trainer".into()),
        ..AppOptions::default()
    })
    .await?;
    let (code, submitted) = app.submit(&fixture.job("unlaunchable")).await?;
    assert_eq!(code, 201, "{submitted}");
    let job = app.wait_for_job(submitted["id"].as_str().unwrap()).await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "system_error", "{job}");
    assert_eq!(job["attempt"], 2, "both attempts were made: {job}");
    let message = job["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("could not start the worker") && message.contains("attempt 2 of 2"),
        "{message}"
    );
    // The first failure sent the job back to the queue, and said why.
    let id = job["id"].as_str().unwrap();
    let events = app.all_events(id).await?;
    let requeued = events.iter().any(|e| {
        e["kind"] == "status"
            && e["status"] == "queued"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("attempt 1 failed, retrying in"))
    });
    assert!(requeued, "{events:?}");
    // Nothing was reserved, so nothing is left behind.
    assert_eq!(app.count("adapter_versions").await, 0);
    app.stop().await
}

/// `training.max_duration` bounds an attempt on the local executor too: the worker is stopped
/// and the job fails as `deadline_exceeded` (final, as a user error is), naming the limit,
/// without another attempt.
#[tokio::test]
async fn an_attempt_past_its_max_duration_is_stopped_and_fails_naming_the_limit(
) -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let mut job = fixture.job("too-slow");
    job["training"]["max_steps"] = serde_json::json!(1_000_000);
    job["training"]["max_duration"] = serde_json::json!("3s");
    let (code, submitted) = app.submit(&job).await?;
    assert_eq!(code, 201, "{submitted}");
    let job = app.wait_for_job(submitted["id"].as_str().unwrap()).await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "deadline_exceeded", "{job}");
    assert_eq!(job["attempt"], 1, "not retried: {job}");
    let message = job["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("training.max_duration (3s)"), "{message}");
    app.stop().await
}
