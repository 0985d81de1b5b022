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
