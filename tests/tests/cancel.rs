//! Cancellation from each kind of state: queued jobs at once; running ones by
//! stopping the worker's whole process group. Nothing is published.

mod common;

use common::{AppOptions, Fixture, TestApp};
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};

/// Processes whose command line names this job (the worker has `--job-id <id>`).
fn worker_processes(job_id: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains(job_id))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(AppOptions {
        slots: 0,
        ..Default::default()
    })
    .await?;
    let (_, job) = app.submit(&fixture.job("never")).await?;
    let id = job["id"].as_str().unwrap();
    let (code, cancelled) = app
        .send_json(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
        .await?;
    assert_eq!(
        (code, cancelled["status"].as_str()),
        (202, Some("cancelled"))
    );
    let (code, again) = app
        .send_json(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
        .await?;
    assert_eq!((code, again["code"].as_str()), (409, Some("job_finished")));
    assert_eq!(
        app.send_json(
            Method::POST,
            "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel",
            None
        )
        .await?
        .0,
        404
    );
    app.stop().await
}

#[tokio::test]
async fn a_running_job_is_stopped_and_publishes_nothing() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let mut body = fixture.job("long");
    body["training"]["max_steps"] = json!(1_000_000);
    let (_, job) = app.submit(&body).await?;
    let id = job["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    loop {
        let events = app.all_events(&id).await?;
        if events.iter().any(|e| e["kind"] == "progress") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(worker_processes(&id), 1);
    let (code, _) = app
        .send_json(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
        .await?;
    assert_eq!(code, 202);
    let done = app.wait_for_job(&id).await?;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["adapter_version"].is_null());
    let statuses: Vec<String> = app
        .all_events(&id)
        .await?
        .iter()
        .filter(|e| e["kind"] == "status")
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses[statuses.len() - 2..],
        ["cancel_requested", "cancelled"]
    );
    let start = Instant::now();
    while worker_processes(&id) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the worker is still running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.count("adapter_versions").await, 0);
    app.stop().await
}
