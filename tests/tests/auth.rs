//! Every auth rule: keys are required, scoped to one project and one scope; another
//! project's jobs, adapters and files answer 404; worker tokens die with their job.

mod common;

use common::{AppOptions, Fixture, TestApp};
use loraforge::auth::{create_key, Scope};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn keys_scopes_and_tenant_isolation() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(AppOptions {
        auth: true,
        ..Default::default()
    })
    .await?;
    let a_admin = create_key(&app.pool, "team-a", Scope::Admin).await?.key;
    let a_submit = create_key(&app.pool, "team-a", Scope::Submit).await?.key;
    let a_read = create_key(&app.pool, "team-a", Scope::Read).await?.key;
    let b_admin = create_key(&app.pool, "team-b", Scope::Admin).await?.key;
    let call = |method: Method, path: &str, key: Option<&str>| {
        let mut req = app.client.request(method, app.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req
    };
    let mut job = fixture.job("secret-sauce");
    job["training"]["max_steps"] = json!(2);

    // No key, a wrong key, a read key: refused before anything happens.
    assert_eq!(
        call(Method::POST, "/v1/jobs", None)
            .json(&job)
            .send()
            .await?
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(Method::POST, "/v1/jobs", Some("lf_0000_nope"))
            .json(&job)
            .send()
            .await?
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let refused = call(Method::POST, "/v1/jobs", Some(&a_read))
        .json(&job)
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(app.count("jobs").await, 0);
    assert_eq!(
        call(Method::GET, "/healthz", None).send().await?.status(),
        StatusCode::OK
    );

    // team-a submits and publishes.
    let created: serde_json::Value = call(Method::POST, "/v1/jobs", Some(&a_submit))
        .json(&job)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(created["project"], "team-a");
    let id = created["id"].as_str().unwrap().to_string();
    let done = loop {
        let j: serde_json::Value = call(Method::GET, &format!("/v1/jobs/{id}"), Some(&a_read))
            .send()
            .await?
            .json()
            .await?;
        if ["succeeded", "failed"].contains(&j["status"].as_str().unwrap()) {
            break j;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");

    // team-b sees none of it, reading or writing.
    for path in [
        format!("/v1/jobs/{id}"),
        format!("/v1/jobs/{id}/events"),
        "/v1/adapters/secret-sauce/versions/1".into(),
        "/v1/adapters/secret-sauce/versions/1/lineage".into(),
        "/v1/adapters/secret-sauce/versions/1/files/adapter_model.safetensors".into(),
        "/v1/adapters/secret-sauce/resolve?ref=latest".into(),
    ] {
        assert_eq!(
            call(Method::GET, &path, Some(&b_admin))
                .send()
                .await?
                .status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
        assert_eq!(
            call(Method::GET, &path, Some(&a_read))
                .send()
                .await?
                .status(),
            StatusCode::OK,
            "{path}"
        );
    }
    let listed: serde_json::Value = call(Method::GET, "/v1/adapters", Some(&b_admin))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(listed["adapters"], json!([]));
    let jobs = |key: &str| {
        let req = call(Method::GET, "/v1/jobs", Some(key));
        async move { req.send().await?.json::<serde_json::Value>().await }
    };
    assert_eq!(jobs(&b_admin).await?["jobs"], json!([]));
    assert_eq!(jobs(&a_read).await?["jobs"][0]["id"], json!(id));
    // Who each key is: its project and scope.
    let me: serde_json::Value = call(Method::GET, "/v1/me", Some(&a_submit))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        me,
        json!({"project": "team-a", "scope": "submit", "auth_enabled": true})
    );
    assert_eq!(
        call(Method::GET, "/v1/me", None).send().await?.status(),
        StatusCode::UNAUTHORIZED
    );
    let alias = json!({"version": 1});
    assert_eq!(
        call(
            Method::PUT,
            "/v1/adapters/secret-sauce/aliases/prod",
            Some(&b_admin)
        )
        .json(&alias)
        .send()
        .await?
        .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(
            Method::DELETE,
            "/v1/adapters/secret-sauce/versions/1",
            Some(&b_admin)
        )
        .send()
        .await?
        .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(
            Method::POST,
            &format!("/v1/jobs/{id}/cancel"),
            Some(&b_admin)
        )
        .send()
        .await?
        .status(),
        StatusCode::NOT_FOUND
    );

    // Scopes inside team-a: aliases need admin.
    assert_eq!(
        call(
            Method::PUT,
            "/v1/adapters/secret-sauce/aliases/prod",
            Some(&a_submit)
        )
        .json(&alias)
        .send()
        .await?
        .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(
            Method::PUT,
            "/v1/adapters/secret-sauce/aliases/prod",
            Some(&a_admin)
        )
        .json(&alias)
        .send()
        .await?
        .status(),
        StatusCode::OK
    );
    assert_eq!(
        call(Method::GET, "/v1/webhooks", Some(&a_submit))
            .send()
            .await?
            .status(),
        StatusCode::FORBIDDEN
    );

    // The same adapter name in team-b is a different adapter, numbered from 1.
    let b_job: serde_json::Value = call(Method::POST, "/v1/jobs", Some(&b_admin))
        .json(&job)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(b_job["project"], "team-b");

    // A revoked key stops working.
    let prefix = a_read.split('_').nth(1).unwrap();
    assert!(loraforge::auth::revoke_key(&app.pool, prefix).await?);
    assert_eq!(
        call(Method::GET, &format!("/v1/jobs/{id}"), Some(&a_read))
            .send()
            .await?
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // Keys are stored hashed: the secret appears nowhere in the database.
    let stored: Vec<String> = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_all(&app.pool)
        .await?;
    assert!(stored.iter().all(|row| !row.contains(&a_admin[10..])));
    app.stop().await
}

#[tokio::test]
async fn a_projects_admins_manage_its_keys_through_the_api() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(AppOptions {
        auth: true,
        ..Default::default()
    })
    .await?;
    let admin = create_key(&app.pool, "team-a", Scope::Admin).await?.key;
    let submit = create_key(&app.pool, "team-a", Scope::Submit).await?.key;
    let other = create_key(&app.pool, "team-b", Scope::Admin).await?;
    let call = |method: Method, path: &str, key: &str| {
        app.client
            .request(method, app.url(path))
            .bearer_auth(key.to_string())
    };

    // Created in the caller's project, answered once, not cached on the way.
    let created = call(Method::POST, "/v1/keys", &admin)
        .json(&json!({"scope": "read"}))
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["cache-control"], "no-store");
    let created: serde_json::Value = created.json().await?;
    assert_eq!(created["project"], "team-a");
    assert_eq!(created["scope"], "read");
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("lf_{}_", created["prefix"].as_str().unwrap())));
    let me: serde_json::Value = call(Method::GET, "/v1/me", &key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        (me["project"].as_str(), me["scope"].as_str()),
        (Some("team-a"), Some("read"))
    );

    // Only admins; a scope that does not exist is named.
    for (body, key, status) in [
        (json!({"scope": "read"}), &submit, StatusCode::FORBIDDEN),
        (
            json!({"scope": "root"}),
            &admin,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"scope": "read", "project": "team-b"}),
            &admin,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = call(Method::POST, "/v1/keys", key)
            .json(&body)
            .send()
            .await?;
        assert_eq!(answer.status(), status, "{body}");
    }
    assert_eq!(
        call(Method::GET, "/v1/keys", &submit)
            .send()
            .await?
            .status(),
        StatusCode::FORBIDDEN
    );

    // The listing: the project's keys only, never a key or its hash.
    let listed: serde_json::Value = call(Method::GET, "/v1/keys", &admin)
        .send()
        .await?
        .json()
        .await?;
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3, "{listed}");
    assert_eq!(keys[0]["id"], created["id"], "newest first");
    for k in keys {
        let fields: Vec<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            ["created_at", "id", "prefix", "revoked_at", "scope"],
            "{k}"
        );
    }

    // Revoked: refused at once; again is fine; another project's key is not found.
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/keys/{id}");
    assert_eq!(
        call(Method::DELETE, &path, &admin).send().await?.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(Method::GET, "/v1/me", &key).send().await?.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(Method::DELETE, &path, &admin).send().await?.status(),
        StatusCode::NO_CONTENT
    );
    let foreign = format!("/v1/keys/{}", other.id);
    assert_eq!(
        call(Method::DELETE, &foreign, &admin)
            .send()
            .await?
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(Method::GET, "/v1/me", &other.key)
            .send()
            .await?
            .status(),
        StatusCode::OK
    );
    app.stop().await
}
