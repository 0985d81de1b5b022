//! The same walking-skeleton job publishing to an S3-compatible store (moto).

mod common;

use common::{Fixture, S3Server, TestApp};
use loraforge_storage::Store;

#[tokio::test]
async fn a_job_publishes_to_s3_and_the_registry_matches_the_objects() -> anyhow::Result<()> {
    let s3 = S3Server::start("artifacts").await?;
    s3.export_env();
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(common::AppOptions {
        storage_url: Some("s3://artifacts/loraforge".into()),
        ..Default::default()
    })
    .await?;
    let mut body = fixture.job("s3-demo");
    body["training"]["max_steps"] = 5.into();
    let (code, job) = app.submit(&body).await?;
    assert_eq!(code, 201, "{job}");
    let done = app.wait_for_job(job["id"].as_str().unwrap()).await?;
    assert_eq!(done["status"], "succeeded", "{done}");

    let (_, version) = app.get_json("/v1/adapters/s3-demo/versions/1").await?;
    assert_eq!(
        version["uri"],
        "s3://artifacts/loraforge/adapters/default/s3-demo/v1"
    );
    let store = Store::open("s3://artifacts/loraforge")?;
    for f in version["files"].as_array().unwrap() {
        let (sha, size) = store
            .digest(&format!(
                "adapters/default/s3-demo/v1/{}",
                f["name"].as_str().unwrap()
            ))
            .await?;
        assert_eq!(sha, f["sha256"].as_str().unwrap());
        assert_eq!(size, f["size"].as_u64().unwrap());
    }
    app.stop().await
}

/// An uploaded dataset lives in the S3 store; a worker, which cannot see the control plane's
/// disk, reads it from there. A refused upload leaves no object behind.
#[tokio::test]
async fn an_uploaded_dataset_is_stored_in_s3_and_trained_on() -> anyhow::Result<()> {
    let s3 = S3Server::start("uploads").await?;
    s3.export_env();
    let fixture = Fixture::create()?;
    let app = TestApp::spawn_with(common::AppOptions {
        storage_url: Some("s3://uploads/lf".into()),
        ..Default::default()
    })
    .await?;
    let upload = |name: &str, body: Vec<u8>| {
        app.client
            .post(app.url(&format!("/v1/datasets/{name}/upload")))
            .body(body)
            .send()
    };
    let resp = upload("bad", b"{\"text\": \"ok\"}\nnot json\n".to_vec()).await?;
    assert_eq!(resp.status(), 422);
    let store = Store::open("s3://uploads/lf")?;
    assert!(store.list("").await?.is_empty());

    // Over 5 MiB: more than one part of the multipart upload.
    let text = std::fs::read_to_string(fixture.train_file())?;
    let bytes: Vec<u8> = text.repeat(5 * 1024 * 1024 / text.len() + 1).into_bytes();
    let resp = upload("big-train", bytes.clone()).await?;
    assert_eq!(resp.status(), 201);
    let row: serde_json::Value = resp.json().await?;
    let uri = row["uri"].as_str().unwrap();
    assert!(
        uri.starts_with("s3://uploads/lf/datasets/default/"),
        "{row}"
    );
    let (sha, size) = store
        .digest(uri.strip_prefix("s3://uploads/lf/").unwrap())
        .await?;
    assert_eq!(
        (sha.as_str(), size),
        (row["sha256"].as_str().unwrap(), bytes.len() as u64)
    );

    let mut body = fixture.job("s3-upload");
    body["dataset"]["train"] = "big-train".into();
    body["training"]["max_steps"] = 3.into();
    let done = app.run_job(&body).await?;
    assert_eq!(done["spec"]["dataset"]["train"], uri);
    let (_, lineage) = app
        .get_json("/v1/adapters/s3-upload/versions/1/lineage")
        .await?;
    assert_eq!(lineage["dataset"]["sha256"], row["sha256"], "{lineage}");
    app.stop().await
}
