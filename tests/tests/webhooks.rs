//! Webhooks against a receiver in the test that verifies every signature; a failed
//! delivery is retried with backoff and the delivery log shows it.

mod common;

use axum::http::{HeaderMap, StatusCode};
use common::{Fixture, TestApp};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<(HeaderMap, bytes::Bytes)>>>,
}

/// Answers 503 to the very first request (to exercise retries), 200 afterwards.
async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> StatusCode {
    let mut seen = r.seen.lock().unwrap();
    seen.push((headers, body));
    if seen.len() == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let ts = headers["x-loraforge-timestamp"].to_str().unwrap();
    let sig = headers["x-loraforge-signature"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    let expected = hex::decode(sig.strip_prefix("sha256=").unwrap()).unwrap();
    mac.verify_slice(&expected).is_ok()
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_logged() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", listener.local_addr()?);
    let router = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let (code, hook) = app
        .send_json(Method::POST, "/v1/webhooks", Some(&json!({"url": hook_url, "events": ["job.succeeded", "job.failed", "adapter_version.ready", "alias.moved"]})))
        .await?;
    assert_eq!(code, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap().to_string();
    let (code, bad) = app
        .send_json(
            Method::POST,
            "/v1/webhooks",
            Some(&json!({"url": hook_url, "events": ["job.exploded"]})),
        )
        .await?;
    assert_eq!((code, bad["field"].as_str()), (422, Some("events[0]")));
    assert!(
        app.get_json("/v1/webhooks").await?.1.as_array().unwrap()[0]
            .get("secret")
            .is_none(),
        "secrets are shown once"
    );

    let mut job = fixture.job("hooked");
    job["training"]["max_steps"] = json!(2);
    app.run_job(&job).await?;
    app.send_json(
        Method::PUT,
        "/v1/adapters/hooked/aliases/prod",
        Some(&json!({"version": 1})),
    )
    .await?;
    // A job that fails on its data: job.failed.
    let broken = fixture.dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"fine\"}\nnot json at all\n")?;
    let mut failing = job.clone();
    failing["dataset"]["train"] = json!(format!("file://{}", broken.display()));
    let (_, f) = app.submit(&failing).await?;
    let failed = app.wait_for_job(f["id"].as_str().unwrap()).await?;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["kind"], "user_error", "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2"),
        "{failed}"
    );

    // Wait until all four events are delivered (one of them after a retry).
    let deliveries_path = format!("/v1/webhooks/{}/deliveries", hook["id"].as_str().unwrap());
    let start = Instant::now();
    let deliveries = loop {
        let (_, d) = app.get_json(&deliveries_path).await?;
        let list = d.as_array().unwrap().clone();
        if list.len() == 4 && list.iter().all(|x| x["status"] == "delivered") {
            break list;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "deliveries: {d}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut events: Vec<&str> = deliveries
        .iter()
        .map(|d| d["event"].as_str().unwrap())
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            "adapter_version.ready",
            "alias.moved",
            "job.failed",
            "job.succeeded"
        ]
    );
    assert_eq!(
        deliveries
            .iter()
            .map(|d| d["attempts"].as_i64().unwrap())
            .sum::<i64>(),
        5,
        "one retry: {deliveries:?}"
    );
    let retried = deliveries.iter().find(|d| d["attempts"] == 2).unwrap();
    assert!(retried["last_status"] == 200);

    // Every request the receiver saw carries a valid signature over its body.
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    for (headers, body) in &seen {
        assert!(
            verify(&secret, headers, body),
            "bad signature on {}",
            String::from_utf8_lossy(body)
        );
        let payload: Value = serde_json::from_slice(body)?;
        assert_eq!(
            payload["event"],
            headers["x-loraforge-event"].to_str().unwrap()
        );
    }
    let ready: Value = serde_json::from_slice(
        &seen
            .iter()
            .find(|(h, _)| h["x-loraforge-event"] == "adapter_version.ready")
            .unwrap()
            .1,
    )?;
    assert_eq!(ready["data"]["adapter_name"], "hooked");
    assert_eq!(ready["data"]["version"], 1);
    app.stop().await
}

/// A subscription deleted while an event is being queued for it: the event's transaction waits
/// for the delete, then queues nothing for the deleted subscription and commits. (It failed
/// the deliveries' foreign key, a 500 to whoever caused the event, when the delete committed
/// between the queueing's read of the subscriptions and its insert.)
#[tokio::test]
async fn an_event_queued_while_its_webhook_is_deleted_skips_it() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let (code, hook) = app
        .send_json(
            Method::POST,
            "/v1/webhooks",
            Some(&json!({"url": "http://127.0.0.1:9/hook", "events": ["alias.moved"]})),
        )
        .await?;
    assert_eq!(code, 201, "{hook}");
    let id: uuid::Uuid = hook["id"].as_str().unwrap().parse()?;
    let project: String = sqlx::query_scalar("SELECT project FROM webhooks WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await?;

    let mut deleter = app.pool.begin().await?;
    sqlx::query("DELETE FROM webhooks WHERE id = $1")
        .bind(id)
        .execute(&mut *deleter)
        .await?;
    let pool = app.pool.clone();
    let queueing = tokio::spawn(async move {
        let mut tx = pool.begin().await?;
        loraforge_core::webhooks::enqueue(&mut tx, &project, "alias.moved", json!({})).await?;
        tx.commit().await?;
        anyhow::Ok(())
    });
    // The queueing reaches the subscription's row lock and waits there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queueing.is_finished(), "the queueing waits for the delete");
    deleter.commit().await?;
    queueing.await??;
    let deliveries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await?;
    assert_eq!(deliveries, 0);
    Ok(())
}
