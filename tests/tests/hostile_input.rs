//! Hostile input: oversized bodies, NUL bytes, unsafe names, file URIs outside the
//! configured roots (also through symlinks), absurd numbers. Every answer is a
//! problem+json with a stable code; nothing is stored; the server stays up. And a
//! database outage answers 503 and heals by itself.

mod common;

use common::{Fixture, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn problem(resp: reqwest::Response) -> anyhow::Result<(u16, Value)> {
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "status {status}"
    );
    Ok((status, resp.json().await?))
}

#[tokio::test]
async fn hostile_requests_get_problems_and_store_nothing() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let jobs = app.url("/v1/jobs");

    // 5 MiB body: refused by size, before parsing.
    let big = format!("{{\"adapter_name\": \"{}\"}}", "a".repeat(5 * 1024 * 1024));
    let (code, p) = problem(
        app.client
            .post(&jobs)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await?,
    )
    .await?;
    assert_eq!((code, p["code"].as_str()), (413, Some("body_too_large")));

    // NUL bytes in a body, a path, a query.
    let mut nul = fixture.job("demo");
    nul["dataset"]["train"] = json!(format!("{}\u{0}", fixture.train_uri()));
    let (code, p) = problem(app.client.post(&jobs).json(&nul).send().await?).await?;
    assert_eq!((code, p["code"].as_str()), (400, Some("malformed_body")));
    let (code, _) = problem(
        app.client
            .get(app.url("/v1/adapters/a%00b/versions"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(code, 400);
    let (code, _) = problem(
        app.client
            .get(app.url("/v1/adapters?cursor=%00"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(code, 400);

    // file:// URIs outside the roots, directly, with `..`, and through a symlink.
    let link = fixture.dir.path().join("etc-link");
    std::os::unix::fs::symlink("/etc", &link)?;
    for (uri, field) in [
        ("file:///etc/passwd".to_string(), "dataset.train"),
        (
            format!("file://{}/../../etc/passwd", fixture.dir.path().display()),
            "dataset.train",
        ),
        (format!("file://{}/passwd", link.display()), "dataset.train"),
    ] {
        let mut job = fixture.job("demo");
        job["dataset"]["train"] = json!(uri);
        let (code, p) = problem(app.client.post(&jobs).json(&job).send().await?).await?;
        assert_eq!(
            (code, p["field"].as_str()),
            (422, Some(field)),
            "{uri}: {p}"
        );
    }
    let (code, p) = app
        .send_json(
            Method::POST,
            "/v1/datasets",
            Some(&json!({"name": "pw", "uri": "file:///etc/passwd"})),
        )
        .await?;
    assert_eq!((code, p["field"].as_str()), (422, Some("uri")), "{p}");

    // Unsafe names anywhere a name becomes a path or a key.
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/base-models",
            Some(json!({"name": "../x", "uri": fixture.model_uri()})),
        ),
        (
            Method::PUT,
            "/v1/adapters/demo/aliases/Bad..Alias",
            Some(json!({"version": 1})),
        ),
        (
            Method::PUT,
            "/v1/adapters/demo/versions/1/tags/%2E%2E",
            None,
        ),
    ] {
        let (code, p) = app.send_json(method, path, body.as_ref()).await?;
        assert!(code == 422 || code == 404, "{path}: {code} {p}");
    }

    // Absurd numbers and shapes.
    for path in [
        "/v1/adapters/demo/versions/99999999999999",
        "/v1/jobs/%7Bid%7D",
        "/v1/adapters/demo/versions/-1/lineage?depth=4294967296",
    ] {
        let (code, _) = problem(app.client.get(app.url(path)).send().await?).await?;
        assert!(code == 404 || code == 422, "{path}: {code}");
    }
    let (code, p) = problem(
        app.client
            .get(app.url("/v1/adapters?limit=0"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!((code, p["field"].as_str()), (422, Some("limit")));
    let (code, p) = problem(
        app.client
            .post(&jobs)
            .header("Idempotency-Key", "x".repeat(300))
            .json(&fixture.job("demo"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!((code, p["field"].as_str()), (422, Some("Idempotency-Key")));
    let mut huge = fixture.job("demo");
    huge["training"]["max_steps"] = json!(1u64 << 40);
    huge["method"]["r"] = json!(-3);
    let (code, _) = problem(app.client.post(&jobs).json(&huge).send().await?).await?;
    assert_eq!(code, 422);

    assert_eq!(app.count("jobs").await, 0);
    assert_eq!(
        app.client.get(app.url("/healthz")).send().await?.status(),
        200
    );
    app.stop().await
}

#[tokio::test]
async fn a_database_outage_answers_503_and_heals() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.pool)
        .await?;
    let admin = sqlx::PgPool::connect(&common::admin_database_url()).await?;
    let set_connections = |allow: bool| {
        let sql = if allow {
            format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true")
        } else {
            format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
    };
    set_connections(false).execute(&admin).await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db)
        .execute(&admin)
        .await?;
    let probe = app.url("/v1/jobs/00000000-0000-0000-0000-000000000000");
    let mut saw_503 = false;
    for _ in 0..20 {
        let resp = app.client.get(&probe).send().await?;
        let status = resp.status().as_u16();
        assert_ne!(status, 500, "an outage must not look like a bug");
        if status == 503 {
            assert_eq!(resp.headers()["content-type"], "application/problem+json");
            saw_503 = true;
            break;
        }
    }
    assert!(saw_503);
    assert_eq!(
        app.client.get(app.url("/readyz")).send().await?.status(),
        503
    );
    set_connections(true).execute(&admin).await?;
    let start = Instant::now();
    loop {
        let status = app.client.get(&probe).send().await?.status().as_u16();
        if status == 404 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still {status} after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        app.client.get(app.url("/readyz")).send().await?.status(),
        200
    );
    app.stop().await
}

/// The largest and smallest finite numbers a field accepts come back as they went in: Postgres
/// keeps JSON numbers as exact decimals and prints them in full (309 digits for f64::MAX),
/// which a parser that rounds on the way back reads as out of range (a 500 schemathesis found).
#[tokio::test]
async fn extreme_numbers_survive_the_database() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(common::AppOptions {
        slots: 0,
        ..Default::default()
    })
    .await?;
    let policy = json!({"max_benign_kl": f64::MAX, "max_refusal_direction_shift": 5e-324});
    let (code, body) = app
        .send_json(Method::PUT, "/v1/safety-policy", Some(&policy))
        .await?;
    assert_eq!(code, 200, "{body}");
    let (code, stored) = app.get_json("/v1/safety-policy").await?;
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["max_benign_kl"].as_f64(), Some(f64::MAX));
    assert_eq!(stored["max_refusal_direction_shift"].as_f64(), Some(5e-324));

    let mut job = fixture.job("extreme");
    job["training"]["max_grad_norm"] = json!(f64::MAX);
    job["training"]["learning_rate"] = json!(5e-324);
    let (code, created) = app.submit(&job).await?;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (code, read) = app.get_json(&format!("/v1/jobs/{id}")).await?;
    assert_eq!(code, 200, "{read}");
    assert_eq!(
        read["spec"]["training"]["max_grad_norm"].as_f64(),
        Some(f64::MAX)
    );
    assert_eq!(
        read["spec"]["training"]["learning_rate"].as_f64(),
        Some(5e-324)
    );
    let (code, listed) = app.get_json("/v1/jobs").await?;
    assert_eq!(code, 200, "{listed}");
    app.stop().await
}

/// A cloud URI the control plane cannot reach (no network, no credentials) is refused within
/// seconds, naming the URI, instead of holding the request while the client retries.
#[tokio::test]
async fn an_unreachable_store_is_refused_promptly() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(common::AppOptions {
        slots: 0,
        ..Default::default()
    })
    .await?;
    for (path, uri) in [
        ("/v1/base-models", "gs://loraforge-unreachable/model"),
        ("/v1/datasets", "gs://loraforge-unreachable/train.jsonl"),
    ] {
        let started = Instant::now();
        let (code, p) = problem(
            app.client
                .post(app.url(path))
                .json(&json!({"name": "far", "uri": uri}))
                .send()
                .await?,
        )
        .await?;
        let took = started.elapsed();
        assert_eq!(code, 422, "{p}");
        assert!(p.to_string().contains(uri), "{p}");
        assert!(took < Duration::from_secs(8), "{path} took {took:?}");
    }
    assert_eq!(app.count("base_models").await, 0);
    assert_eq!(app.count("datasets").await, 0);
    app.stop().await
}
