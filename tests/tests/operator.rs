//! The LoraJob operator end to end: LoraJob objects on an API server over HTTP (the kmock
//! fake; a real cluster with `LORAFORGE_TEST_KUBECONFIG`), the real control plane with its
//! operator on, the local executor and the real trainer. An object becomes exactly one job,
//! its progress and result flow back into its status, deleting it cancels the job and
//! releases the finalizer, a bad spec is rejected with the fields named, a changed spec is
//! refused, and a restarted control plane makes no second job.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{Cluster, NAMESPACE};
use common::{AppOptions, Fixture, TestApp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use loraforge::operator::resource::LoraJob;
use loraforge::operator::OperatorSettings;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn app(database_url: Option<String>) -> anyhow::Result<TestApp> {
    // The namespace maps to the project the tests' REST calls act as (auth is off).
    let settings = OperatorSettings {
        namespace: Some(NAMESPACE.into()),
        projects: [(NAMESPACE.to_string(), "default".to_string())].into(),
    };
    TestApp::spawn_with(AppOptions {
        operator: Some(settings),
        database_url,
        ..AppOptions::default()
    })
    .await
}

fn lorajobs(cluster: &Cluster) -> Api<LoraJob> {
    Api::namespaced(cluster.client.clone(), NAMESPACE)
}

async fn create(cluster: &Cluster, name: &str, spec: Value) -> anyhow::Result<LoraJob> {
    let object: LoraJob = serde_json::from_value(json!({
        "apiVersion": "loraforge.dev/v1alpha1", "kind": "LoraJob",
        "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec,
    }))?;
    Ok(lorajobs(cluster)
        .create(&PostParams::default(), &object)
        .await?)
}

/// Waits until the object's status satisfies `done` (returns it), failing after `limit`.
async fn wait_for(
    cluster: &Cluster,
    name: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let object = serde_json::to_value(lorajobs(cluster).get(name).await?)?;
        if done(&object["status"]) {
            return Ok(object);
        }
        anyhow::ensure!(start.elapsed() < limit, "{name} never got there: {object}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn jobs_for(app: &TestApp, uid: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE idempotency_key = $1")
        .bind(format!("lorajob-{uid}"))
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn a_lorajob_trains_publishes_and_reports_back_once() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let fixture = Fixture::create()?;
    let app = app(None).await?;
    let created = create(&cluster, "from-kubectl", fixture.job("from-kubectl")).await?;
    let uid = created.uid().unwrap();

    let done = wait_for(&cluster, "from-kubectl", Duration::from_secs(300), |s| {
        ["succeeded", "failed", "rejected"].contains(&s["phase"].as_str().unwrap_or(""))
    })
    .await?;
    let status = &done["status"];
    assert_eq!(status["phase"], "succeeded", "{done}");
    assert_eq!(status["step"], "30/30");
    assert_eq!(status["maxSteps"], 30);
    assert!(
        status["loss"].as_f64().is_some_and(f64::is_finite),
        "{status}"
    );
    assert_eq!(status["adapterVersion"]["name"], "from-kubectl");
    assert_eq!(status["adapterVersion"]["version"], 1);
    assert!(status["adapterVersion"]["uri"]
        .as_str()
        .unwrap()
        .starts_with("file://"));
    assert_eq!(status["safetyDecision"], "publish");
    assert_eq!(condition(status, "Published")["status"], "True");
    assert_eq!(condition(status, "Submitted")["status"], "True");
    assert_eq!(condition(status, "Failed")["status"], "False");
    assert!(done["metadata"]["finalizers"]
        .to_string()
        .contains("loraforge.dev/job"));
    let job_id = status["jobId"].as_str().unwrap().to_string();
    let (code, job) = app.get_json(&format!("/v1/jobs/{job_id}")).await?;
    assert_eq!(
        (code, job["status"].as_str()),
        (200, Some("succeeded")),
        "{job}"
    );

    // Applying it again (any change to the object) makes no second job.
    let touch = json!({"metadata": {"labels": {"team": "ml"}}});
    lorajobs(&cluster)
        .patch(
            "from-kubectl",
            &PatchParams::default(),
            &Patch::Merge(&touch),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(jobs_for(&app, &uid).await, 1);

    // Deleting a finished one releases it at once.
    lorajobs(&cluster)
        .delete("from-kubectl", &DeleteParams::default())
        .await?;
    cluster.gone(&lorajobs(&cluster), "from-kubectl").await?;
    app.stop().await
}

#[tokio::test]
async fn a_bad_spec_is_rejected_a_changed_one_refused_and_deleting_cancels() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let fixture = Fixture::create()?;
    let app = app(None).await?;

    let mut bad = fixture.job("bad-rank");
    bad["method"]["r"] = json!(0);
    create(&cluster, "bad-rank", bad).await?;
    let rejected = wait_for(&cluster, "bad-rank", Duration::from_secs(60), |s| {
        s["phase"] == "rejected"
    })
    .await?;
    let failed = condition(&rejected["status"], "Failed");
    assert_eq!(failed["reason"], "InvalidSpec");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("spec.method.r"),
        "{failed}"
    );

    let mut long = fixture.job("long-run");
    long["training"]["max_steps"] = json!(1_000_000);
    create(&cluster, "long-run", long).await?;
    wait_for(&cluster, "long-run", Duration::from_secs(120), |s| {
        s["phase"] == "running"
    })
    .await?;
    let change = json!({"spec": {"training": {"learning_rate": 0.01}}});
    lorajobs(&cluster)
        .patch("long-run", &PatchParams::default(), &Patch::Merge(&change))
        .await?;
    let refused = wait_for(&cluster, "long-run", Duration::from_secs(60), |s| {
        condition(s, "SpecImmutable")["status"] == "True"
    })
    .await?;
    assert_eq!(
        refused["status"]["phase"], "running",
        "the job goes on: {refused}"
    );

    let job_id = refused["status"]["jobId"].as_str().unwrap().to_string();
    lorajobs(&cluster)
        .delete("long-run", &DeleteParams::default())
        .await?;
    cluster.gone(&lorajobs(&cluster), "long-run").await?;
    let (_, job) = app.get_json(&format!("/v1/jobs/{job_id}")).await?;
    assert_eq!(job["status"], "cancelled", "{job}");
    app.stop().await
}

#[tokio::test]
async fn a_restarted_control_plane_makes_no_second_job() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let fixture = Fixture::create()?;
    let first = app(None).await?;
    let created = create(&cluster, "restarted", fixture.job("restarted")).await?;
    let uid = created.uid().unwrap();
    let submitted = wait_for(&cluster, "restarted", Duration::from_secs(60), |s| {
        s["jobId"].is_string()
    })
    .await?;
    let database_url = first.database_url.clone();
    first.stop().await?;

    // Another control plane on the same database and cluster takes over the object.
    let second = app(Some(database_url)).await?;
    let after = wait_for(&cluster, "restarted", Duration::from_secs(300), |s| {
        ["succeeded", "failed", "cancelled"].contains(&s["phase"].as_str().unwrap_or(""))
            || s["attempt"].as_i64() > Some(1)
    })
    .await
    .unwrap_or(submitted.clone());
    assert_eq!(after["status"]["jobId"], submitted["status"]["jobId"]);
    assert_eq!(jobs_for(&second, &uid).await, 1);
    second.stop().await
}
