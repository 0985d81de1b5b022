//! The web UI in a real browser: the control plane serves web/dist (built by `npm run build`,
//! which .ci/env.sh runs) with API keys required, the real trainer trains on the fixture
//! model, and web/e2e/ui.mjs drives headless Chromium through playwright-core: sign-in, a
//! refused form and a good one, live charts, an adaptive job's rank heatmap, the version
//! and a download checked against the registry's digest, an alias moved, a comparison and
//! the lineage graph, with axe-core on every page. It saves the pages' screenshots into
//! web/screenshots/. Afterwards the server's own state is checked here.

mod common;

use anyhow::{bail, Context};
use common::{run_ok_async, AppOptions, Fixture, TestApp};
use loraforge::auth::{self, Scope};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into())
}

#[tokio::test]
async fn the_web_ui_takes_a_user_from_sign_in_to_lineage() -> anyhow::Result<()> {
    let web = web_dir();
    let dist = web.join("dist");
    for (path, fix) in [
        (
            dist.join("index.html"),
            "build the UI: (cd web && npm ci && npm run build), as .ci/env.sh does",
        ),
        (
            web.join("node_modules/playwright-core"),
            "install the UI's packages: (cd web && npm ci)",
        ),
        (
            chromium(),
            "install Chromium (apt-get install chromium) or set CHROMIUM",
        ),
    ] {
        if !path.exists() {
            bail!("{} is missing: {fix}", path.display());
        }
    }
    let app = TestApp::spawn_with(AppOptions {
        auth: true,
        slots: 1,
        web_dir: Some(dist),
        ..AppOptions::default()
    })
    .await?;
    let fixture = Fixture::create()?;
    let key = auth::create_key(&app.pool, "ui-team", Scope::Admin)
        .await?
        .key;
    let post = |path: &str, body: Value| {
        app.client
            .post(app.url(path))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    for (path, body) in [
        (
            "/v1/base-models",
            json!({"name": "fixture-llama", "uri": fixture.model_uri()}),
        ),
        (
            "/v1/datasets",
            json!({"name": "fixture-chat", "uri": fixture.train_uri()}),
        ),
    ] {
        let resp = post(path, body).await?;
        if resp.status() != 201 {
            bail!("{path} answered {}: {}", resp.status(), resp.text().await?);
        }
    }

    let mut browser = Command::new("node");
    browser
        .arg("e2e/ui.mjs")
        .current_dir(&web)
        .env("LF_URL", &app.base_url)
        .env("LF_KEY", &key)
        .env("LF_BASE_MODEL", "fixture-llama")
        .env("LF_DATASET", "fixture-chat")
        .env("LF_SCREENSHOTS", web.join("screenshots"))
        .env("CHROMIUM", chromium());
    let output = run_ok_async(browser).await;
    println!("{output}");

    // What the clicks did, as the server sees it: two jobs (the double click made one), both
    // succeeded, two ready versions, `prod` on the second, a tag on it.
    let get = |path: String| {
        let req = app.client.get(app.url(&path)).bearer_auth(&key);
        async move {
            let resp = req.send().await?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            anyhow::ensure!(status == 200, "GET {path} answered {status}: {body}");
            Ok::<Value, anyhow::Error>(body)
        }
    };
    let jobs = get("/v1/jobs?adapter=ui-demo".into()).await?;
    let statuses: Vec<&str> = jobs["jobs"]
        .as_array()
        .context("jobs")?
        .iter()
        .map(|j| j["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["succeeded", "succeeded"], "{jobs}");
    let versions = get("/v1/adapters/ui-demo/versions".into()).await?;
    assert_eq!(versions["aliases"][0]["alias"], "prod", "{versions}");
    assert_eq!(versions["aliases"][0]["version"], 2, "{versions}");
    assert_eq!(
        versions["versions"][0]["tags"],
        json!(["candidate"]),
        "{versions}"
    );
    assert_eq!(versions["versions"][0]["method"]["type"], "adalora");
    app.stop().await
}
