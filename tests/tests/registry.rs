//! The registry end to end, on the local filesystem and on an S3-compatible server:
//! registered inputs, publish, resolve, downloads with Range, presigned URLs, aliases,
//! tags, list filters and paging, lineage both ways, delete, and gc of orphans.

mod common;

use common::{sha256_file, AppOptions, Fixture, S3Server, TestApp};
use loraforge_storage::Store;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[tokio::test]
async fn registry_on_the_local_filesystem() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    registry_scenario(&app, true).await?;
    app.stop().await
}

/// Under nextest each test is its own process, so the S3 environment stays local to it.
#[tokio::test]
async fn registry_on_s3() -> anyhow::Result<()> {
    let s3 = S3Server::start("registry").await?;
    s3.export_env();
    let app = TestApp::spawn_with(AppOptions {
        storage_url: Some("s3://registry/lf".into()),
        ..Default::default()
    })
    .await?;
    registry_scenario(&app, false).await?;
    app.stop().await
}

async fn registry_scenario(app: &TestApp, local: bool) -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let store = Store::open(&app.storage_url)?;

    // Registered inputs: digest computed at registration; re-registering is idempotent.
    let base = json!({"name": "tiny", "uri": fixture.model_uri()});
    let (code, model) = app
        .send_json(Method::POST, "/v1/base-models", Some(&base))
        .await?;
    assert_eq!(code, 201, "{model}");
    assert_eq!(model["format"], "hf-safetensors");
    let (code, again) = app
        .send_json(Method::POST, "/v1/base-models", Some(&base))
        .await?;
    assert_eq!((code, &again["sha256"]), (200, &model["sha256"]));
    let other = json!({"name": "tiny", "uri": fixture.train_uri()});
    assert_eq!(
        app.send_json(Method::POST, "/v1/base-models", Some(&other))
            .await?
            .0,
        422
    );
    let (code, data) = app
        .send_json(
            Method::POST,
            "/v1/datasets",
            Some(&json!({"name": "toy", "uri": fixture.train_uri()})),
        )
        .await?;
    assert_eq!(code, 201, "{data}");
    assert_eq!(
        data["sha256"].as_str().unwrap(),
        sha256_file(&fixture.train_file())
    );

    // Two versions of `demo` by registered names, the second continuing from the first.
    let mut job = fixture.job("demo");
    job["base_model"] = json!("tiny");
    job["dataset"]["train"] = json!("toy");
    job["training"]["max_steps"] = json!(3);
    app.run_job(&job).await?;
    let mut child = job.clone();
    child["parent"] = json!({"adapter": "demo", "ref": "latest"});
    let done = app.run_job(&child).await?;
    assert_eq!(done["adapter_version"]["version"], 2);
    let mut other_job = job.clone();
    other_job["adapter_name"] = json!("other");
    app.run_job(&other_job).await?;

    // A parent of another shape is refused before anything is stored.
    let mut misfit = child.clone();
    misfit["method"]["r"] = json!(4);
    let (code, problem) = app.submit(&misfit).await?;
    assert_eq!(
        (code, problem["field"].as_str()),
        (422, Some("parent")),
        "{problem}"
    );

    // Lineage: names and digests of the inputs, the parent, and the graph both ways.
    let (_, lineage) = app
        .get_json("/v1/adapters/demo/versions/2/lineage?depth=3")
        .await?;
    assert_eq!(lineage["base_model"]["name"], "tiny");
    assert_eq!(lineage["base_model"]["sha256"], model["sha256"]);
    assert_eq!(lineage["dataset"]["name"], "toy");
    assert_eq!(
        lineage["parent"],
        json!({"adapter_name": "demo", "version": 1})
    );
    let edges = lineage["graph"]["edges"].as_array().unwrap();
    let v1_job = format!(
        "job:{}",
        app.get_json("/v1/adapters/demo/versions/1").await?.1["job_id"]
            .as_str()
            .unwrap()
    );
    assert!(edges.contains(&json!({"from": "adapter_version:demo@1", "to": format!("job:{}", lineage["job_id"].as_str().unwrap()), "relation": "parent_of"})));
    assert!(edges.contains(
        &json!({"from": v1_job, "to": "adapter_version:demo@1", "relation": "produced"})
    ));
    let (_, shallow) = app
        .get_json("/v1/adapters/demo/versions/2/lineage?depth=0")
        .await?;
    // depth=0: the parent is named by the edge but not expanded into a node.
    assert!(!shallow["graph"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["id"] == "adapter_version:demo@1"));
    assert!(lineage["graph"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["id"] == "adapter_version:demo@1"));
    let (_, desc) = app
        .get_json("/v1/adapters/demo/versions/1/descendants")
        .await?;
    assert!(
        desc["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "adapter_version:demo@2"),
        "{desc}"
    );
    let manifest: Value =
        serde_json::from_slice(&store.get("adapters/default/demo/v2/manifest.json").await?)?;
    assert_eq!(
        manifest["parent"],
        json!({"adapter_name": "demo", "version": 1})
    );

    // Resolve: latest, aliases moved atomically, numbers.
    let (_, latest) = app.get_json("/v1/adapters/demo/resolve?ref=latest").await?;
    assert_eq!(
        (latest["version"].as_i64(), latest["status"].as_str()),
        (Some(2), Some("ready"))
    );
    assert_eq!(latest["base_model"]["name"], "tiny");
    assert_eq!(latest["files"].as_array().unwrap().len(), 3);
    assert_eq!(
        app.send_json(
            Method::PUT,
            "/v1/adapters/demo/aliases/prod",
            Some(&json!({"version": 1}))
        )
        .await?
        .0,
        200
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/resolve?ref=prod").await?.1["version"],
        1
    );
    assert_eq!(
        app.send_json(
            Method::PUT,
            "/v1/adapters/demo/aliases/prod",
            Some(&json!({"version": 2}))
        )
        .await?
        .0,
        200
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/resolve?ref=prod").await?.1["version"],
        2
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/resolve?ref=1").await?.1["version"],
        1
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/resolve?ref=nope").await?.0,
        404
    );
    assert_eq!(
        app.send_json(
            Method::PUT,
            "/v1/adapters/demo/aliases/latest",
            Some(&json!({"version": 1}))
        )
        .await?
        .0,
        422
    );
    assert_eq!(
        app.send_json(
            Method::PUT,
            "/v1/adapters/demo/aliases/x",
            Some(&json!({"version": 9}))
        )
        .await?
        .0,
        404
    );

    // Tags and list filters, with cursor paging.
    assert_eq!(
        app.send_json(
            Method::PUT,
            "/v1/adapters/demo/versions/1/tags/golden",
            None
        )
        .await?
        .1,
        json!(["golden"])
    );
    let names = |page: &Value| {
        page["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&app.get_json("/v1/adapters?tag=golden").await?.1),
        ["demo"]
    );
    assert_eq!(
        names(
            &app.get_json("/v1/adapters?base_model=tiny&method=lora&status=ready")
                .await?
                .1
        ),
        ["demo", "other"]
    );
    assert_eq!(
        names(&app.get_json("/v1/adapters?method=sora").await?.1),
        Vec::<String>::new()
    );
    let (_, page1) = app.get_json("/v1/adapters?limit=1").await?;
    assert_eq!(names(&page1), ["demo"]);
    let (_, page2) = app
        .get_json(&format!(
            "/v1/adapters?limit=1&cursor={}",
            page1["next_cursor"].as_str().unwrap()
        ))
        .await?;
    assert_eq!(names(&page2), ["other"]);
    let (_, versions) = app.get_json("/v1/adapters/demo/versions?limit=1").await?;
    assert_eq!(versions["versions"][0]["version"], 2);
    assert_eq!(versions["next_before"], 2);
    assert_eq!(versions["aliases"][0]["alias"], "prod");

    // Downloads: whole files match the registry's digest; ranges are honoured.
    let (_, v2) = app.get_json("/v1/adapters/demo/versions/2").await?;
    let weights = v2["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "adapter_model.safetensors")
        .unwrap()
        .clone();
    let url = app.url("/v1/adapters/demo/versions/2/files/adapter_model.safetensors");
    let whole = app.client.get(&url).send().await?;
    assert_eq!(whole.status(), 200);
    let whole = whole.bytes().await?;
    assert_eq!(
        hex::encode(Sha256::digest(&whole)),
        weights["sha256"].as_str().unwrap()
    );
    let part = app
        .client
        .get(&url)
        .header("Range", "bytes=0-7")
        .send()
        .await?;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 0-7/{}", whole.len())
    );
    assert_eq!(part.bytes().await?, whole.slice(0..8));
    let tail = app
        .client
        .get(&url)
        .header("Range", "bytes=-4")
        .send()
        .await?
        .bytes()
        .await?;
    assert_eq!(tail, whole.slice(whole.len() - 4..));
    assert_eq!(
        app.client
            .get(&url)
            .header("Range", format!("bytes={}-", whole.len()))
            .send()
            .await?
            .status(),
        416
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/versions/2/files/secrets.txt")
            .await?
            .0,
        404
    );

    // Presigned URLs where the store can sign.
    let (code, signed) = app
        .get_json("/v1/adapters/demo/versions/2/files/adapter_model.safetensors/url")
        .await?;
    if local {
        assert_eq!(
            (code, signed["code"].as_str()),
            (409, Some("presign_unsupported"))
        );
    } else {
        assert_eq!(code, 200, "{signed}");
        let fetched = reqwest::get(signed["url"].as_str().unwrap())
            .await?
            .bytes()
            .await?;
        assert_eq!(fetched, whole);
    }

    // Delete: refused while an alias points at it; then the objects go.
    let (code, problem) = app
        .send_json(Method::DELETE, "/v1/adapters/demo/versions/2", None)
        .await?;
    assert_eq!(
        (code, problem["code"].as_str()),
        (409, Some("version_aliased"))
    );
    app.send_json(
        Method::PUT,
        "/v1/adapters/demo/aliases/prod",
        Some(&json!({"version": 1})),
    )
    .await?;
    assert_eq!(
        app.send_json(Method::DELETE, "/v1/adapters/demo/versions/2", None)
            .await?
            .0,
        204
    );
    assert!(store.list("adapters/default/demo/v2").await?.is_empty());
    assert_eq!(
        app.get_json("/v1/adapters/demo/resolve?ref=2").await?.0,
        410
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/resolve?ref=latest")
            .await?
            .1["version"],
        1
    );
    assert_eq!(
        app.get_json("/v1/adapters/demo/versions/2").await?.1["status"],
        "deleted"
    );
    assert_eq!(
        app.send_json(Method::DELETE, "/v1/adapters/demo/aliases/prod", None)
            .await?
            .0,
        204
    );
    assert_eq!(
        app.send_json(Method::DELETE, "/v1/adapters/demo/aliases/prod", None)
            .await?
            .0,
        404
    );

    // gc: planted orphans are found (dry run keeps them), then removed; ready files stay.
    store
        .put(
            "adapters/default/ghost/v1/adapter_model.safetensors",
            b"zz".to_vec().into(),
        )
        .await?;
    store
        .put(
            "adapters/default/demo/v2/leftover.bin",
            b"zz".to_vec().into(),
        )
        .await?;
    store
        .put(
            &format!("checkpoints/{}/000000001/state.bin", uuid::Uuid::new_v4()),
            b"zz".to_vec().into(),
        )
        .await?;
    let pool = &app.pool;
    let dry =
        loraforge::registry::gc::collect(pool, &store, std::time::Duration::from_secs(3600), true)
            .await?;
    let mut found: Vec<String> = dry.orphans.iter().map(|o| o.path.clone()).collect();
    found.sort();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found[0].starts_with("adapters/default/demo/v2/")
            && found[1].starts_with("adapters/default/ghost/")
    );
    assert_eq!(store.list("adapters/default/ghost").await?.len(), 1);
    let applied =
        loraforge::registry::gc::collect(pool, &store, std::time::Duration::from_secs(3600), false)
            .await?;
    assert_eq!(applied.deleted, 3);
    assert!(store.list("adapters/default/ghost").await?.is_empty());
    assert!(store.list("checkpoints").await?.is_empty());
    assert_eq!(store.list("adapters/default/demo/v1").await?.len(), 3);
    assert_eq!(store.list("adapters/default/other/v1").await?.len(), 3);
    Ok(())
}
