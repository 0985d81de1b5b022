//! The job list (`GET /v1/jobs`): newest first, filtered by status and adapter, paged by an
//! opaque cursor, each job with its latest progress; and `GET /v1/me`, who the caller is.
//! No worker runs (0 slots), so jobs stay queued unless the test moves them.

mod common;

use common::{AppOptions, Fixture, TestApp};
use serde_json::{json, Value};

fn ids(page: &Value) -> Vec<String> {
    page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn jobs_list_newest_first_with_filters_paging_and_progress() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(AppOptions {
        slots: 0,
        ..AppOptions::default()
    })
    .await?;
    let fixture = Fixture::create()?;
    let mut submitted = Vec::new();
    for adapter in ["list-a", "list-b", "list-a"] {
        let (code, job) = app.submit(&fixture.job(adapter)).await?;
        assert_eq!(code, 201, "{job}");
        submitted.push(job["id"].as_str().unwrap().to_string());
    }
    let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();

    let (code, all) = app.get_json("/v1/jobs").await?;
    assert_eq!(code, 200, "{all}");
    assert_eq!(ids(&all), newest_first);
    assert_eq!(all["next_cursor"], Value::Null);
    assert_eq!(all["jobs"][0]["status"], "queued");
    assert_eq!(all["jobs"][0]["progress"], Value::Null);
    assert_eq!(all["jobs"][0]["spec"]["method"]["type"], "lora");

    // Two pages of two: the cursor continues exactly where the first page ended.
    let (_, first) = app.get_json("/v1/jobs?limit=2").await?;
    assert_eq!(ids(&first), newest_first[..2]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a full page has a cursor");
    let (_, second) = app
        .get_json(&format!("/v1/jobs?limit=2&cursor={cursor}"))
        .await?;
    assert_eq!(ids(&second), newest_first[2..]);
    assert_eq!(second["next_cursor"], Value::Null);

    let (_, a) = app.get_json("/v1/jobs?adapter=list-a").await?;
    assert_eq!(ids(&a), [submitted[2].clone(), submitted[0].clone()]);

    // Cancel one; the status filter takes a list.
    let (code, _) = app
        .send_json(
            reqwest::Method::POST,
            &format!("/v1/jobs/{}/cancel", submitted[1]),
            None,
        )
        .await?;
    assert_eq!(code, 202);
    let (_, cancelled) = app.get_json("/v1/jobs?status=cancelled").await?;
    assert_eq!(ids(&cancelled), [submitted[1].clone()]);
    let (_, either) = app
        .get_json("/v1/jobs?status=queued,cancelled&adapter=list-b")
        .await?;
    assert_eq!(ids(&either), [submitted[1].clone()]);

    // Progress comes from the newest progress event.
    for (step, loss) in [(1, 3.5), (2, 2.25)] {
        let event = json!({"kind": "progress", "step": step, "total_steps": 30, "loss": loss, "lr": 0.001,
                           "tokens_per_second": 10.0, "eta_seconds": null, "grad_norm": 0.5});
        sqlx::query("INSERT INTO job_events (job_id, kind, payload) VALUES ($1, 'progress', $2)")
            .bind(uuid::Uuid::parse_str(&submitted[0])?)
            .bind(&event)
            .execute(&app.pool)
            .await?;
    }
    let (_, all) = app.get_json("/v1/jobs").await?;
    assert_eq!(
        all["jobs"][2]["progress"],
        json!({"step": 2, "total_steps": 30, "loss": 2.25})
    );

    // Bad filters are named.
    for (query, field) in [
        ("status=done", "status"),
        ("cursor=nonsense", "cursor"),
        ("limit=0", "limit"),
    ] {
        let (code, problem) = app.get_json(&format!("/v1/jobs?{query}")).await?;
        assert_eq!(
            (code, problem["field"].as_str()),
            (422, Some(field)),
            "{query}: {problem}"
        );
    }

    // Dev mode: everyone is an admin of the default project.
    let (code, me) = app.get_json("/v1/me").await?;
    assert_eq!(code, 200);
    assert_eq!(
        me,
        json!({"project": "default", "scope": "admin", "auth_enabled": false})
    );
    app.stop().await
}
