//! The kubernetes executor end to end: the real control plane (REST, Postgres, scheduler)
//! with `LORAFORGE_EXECUTOR=kubernetes` against an API server over HTTP (the kmock fake in
//! CI; a real cluster with `LORAFORGE_TEST_KUBECONFIG`), the test playing the cluster's
//! controllers and kubelet, and the real trainer as the worker.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{container, Cluster, NAMESPACE};
use common::{AppOptions, Fixture, TestApp};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use loraforge::settings::{ExecutorSettings, KubernetesSettings, SharedVolume};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The control plane on the kubernetes executor (the cluster: `KUBECONFIG`, which
/// `Cluster::start` sets), with the fixture's folder as the shared
/// volume (so its file:// inputs are allowed) and the token Secret of each attempt.
async fn app_on(fixture: &Fixture) -> anyhow::Result<TestApp> {
    let settings = KubernetesSettings {
        namespace: Some(NAMESPACE.into()),
        worker_image: "loraforge-worker:test".into(),
        queue: None,
        gpu_label: "nvidia.com/gpu.product".into(),
        storage_secret: None,
        shared_volume: Some(SharedVolume {
            claim: "datasets".into(),
            mount_path: fixture.dir.path().to_path_buf(),
        }),
        max_workers: 4,
        worker_service_account: None,
        image_pull_secret: None,
    };
    TestApp::spawn_with(AppOptions {
        executor: Some(ExecutorSettings::Kubernetes(settings)),
        ..AppOptions::default()
    })
    .await
}

fn job_on(fixture: &Fixture, name: &str, training: Value) -> Value {
    let mut job = fixture.job(name);
    job["resources"] = json!({"gpus": 1, "memory": "2Gi"});
    job["training"] = training;
    job
}

async fn events_of(app: &TestApp, id: &str) -> Vec<Value> {
    app.all_events(id).await.expect("events")
}

/// Waits for an event whose text contains `needle`.
async fn wait_for_event(app: &TestApp, id: &str, needle: &str) -> Value {
    let start = Instant::now();
    loop {
        let events = events_of(app, id).await;
        if let Some(e) = events.iter().find(|e| e.to_string().contains(needle)) {
            return e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no event with {needle:?}: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the worker of `pod` to its end as the kubelet would, and reports it.
async fn run_pod_to_completion(cluster: &Cluster, pod: &Pod) -> anyhow::Result<()> {
    cluster
        .set_pod_status(
            pod,
            json!({"phase": "Running", "containerStatuses": container(json!({"running": {}}))}),
        )
        .await?;
    let mut worker = cluster.start_worker(pod).await?;
    let status = tokio::task::spawn_blocking(move || worker.wait()).await??;
    let code = status.code().unwrap_or(137);
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let reason = if code == 0 { "Completed" } else { "Error" };
    cluster
        .set_pod_status(
            pod,
            json!({"phase": phase, "containerStatuses": container(json!({"terminated": {"exitCode": code, "reason": reason}}))}),
        )
        .await
}

#[tokio::test]
async fn a_job_runs_as_a_kubernetes_job_and_publishes() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let fixture = Fixture::create()?;
    let app = app_on(&fixture).await?;
    let training = json!({"max_steps": 20, "learning_rate": 0.001, "batch_size": 4, "seq_len": 64, "device": "cpu"});
    let (code, job) = app.submit(&job_on(&fixture, "on-k8s", training)).await?;
    assert_eq!(code, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    // The Job and its Secret: labels, the GPU limit, and the token only in the Secret.
    let k8s_job = cluster.job_of(&id, 1).await?;
    let text = serde_json::to_string(&k8s_job)?;
    let labels = k8s_job.labels();
    assert_eq!(labels["app.kubernetes.io/name"], "loraforge");
    assert_eq!(labels["loraforge.dev/job-id"], id);
    assert_eq!(labels["loraforge.dev/attempt"], "1");
    assert_eq!(labels["loraforge.dev/project"], "default");
    let spec = k8s_job.spec.clone().unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    let pod_spec = spec.template.spec.clone().unwrap();
    let limits = pod_spec.containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(limits["memory"].0, "2Gi");
    let secret_name = format!("lf-{id}-1-token");
    let token = cluster.secret_value(&secret_name, "token").await?;
    assert_eq!(token.len(), 64);
    assert!(
        !text.contains(&token),
        "the worker token is in the Job: {text}"
    );

    // Pending and unschedulable: the job waits, scheduled, with the scheduler's reason.
    let pod = cluster.pod_of(&k8s_job).await?;
    assert!(!serde_json::to_string(&pod)?.contains(&token));
    cluster
        .set_pod_status(
            &pod,
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}),
        )
        .await?;
    wait_for_event(&app, &id, "waiting for capacity: 0/3 nodes are available").await;
    let (_, now) = app.get_json(&format!("/v1/jobs/{id}")).await?;
    assert_eq!(now["status"], "scheduled", "{now}");

    // Capacity comes: the worker runs with the Pod's environment and publishes.
    run_pod_to_completion(&cluster, &pod).await?;
    cluster
        .finish_job(&k8s_job, "Complete", "Completed")
        .await?;
    let done = app.wait_for_job(&id).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["adapter_version"]["version"], 1, "{done}");
    let (code, version) = app.get_json("/v1/adapters/on-k8s/versions/1").await?;
    assert_eq!(
        (code, version["status"].as_str()),
        (200, Some("ready")),
        "{version}"
    );

    // The finished attempt's Job and Secret are cleaned up.
    cluster.gone(&cluster.jobs(), &k8s_job.name_any()).await?;
    cluster.gone(&cluster.secrets(), &secret_name).await?;
    app.stop().await
}

#[tokio::test]
async fn an_oom_killed_worker_fails_the_job_as_resource_exhausted() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let fixture = Fixture::create()?;
    let app = app_on(&fixture).await?;
    let training = json!({"max_steps": 20, "learning_rate": 0.001, "batch_size": 4, "seq_len": 64, "device": "cpu"});
    let (code, job) = app.submit(&job_on(&fixture, "oom", training)).await?;
    assert_eq!(code, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let k8s_job = cluster.job_of(&id, 1).await?;
    let pod = cluster.pod_of(&k8s_job).await?;
    cluster
        .set_pod_status(
            &pod,
            json!({"phase": "Running", "containerStatuses": container(json!({"running": {}}))}),
        )
        .await?;
    std::fs::write(
        cluster.log_path(&pod),
        "loading the base model\nallocating 3.1 GiB of activations\n",
    )?;
    cluster
        .set_pod_status(
            &pod,
            json!({"phase": "Failed", "containerStatuses": container(json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))}),
        )
        .await?;
    let done = app.wait_for_job(&id).await?;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["kind"], "resource_exhausted", "{done}");
    assert_eq!(done["attempt"], 1, "not retried: {done}");
    let message = done["error"]["message"].as_str().unwrap();
    for needle in ["2Gi", "resources.memory", "training.batch_size"] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    // The fake serves the Pod's log as a kubelet would; a real cluster here has no kubelet.
    if !cluster.real {
        assert!(
            message.contains("allocating 3.1 GiB"),
            "the log tail: {message:?}"
        );
    }
    app.stop().await
}

#[tokio::test]
async fn an_evicted_worker_is_retried_and_resumes_from_its_checkpoint() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let fixture = Fixture::create()?;
    let app = app_on(&fixture).await?;
    let training = json!({"max_steps": 60, "learning_rate": 0.001, "batch_size": 4, "seq_len": 64,
        "checkpoint_every": 10, "device": "cpu"});
    let (code, job) = app.submit(&job_on(&fixture, "evicted", training)).await?;
    assert_eq!(code, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    let first = cluster.job_of(&id, 1).await?;
    let pod = cluster.pod_of(&first).await?;
    cluster
        .set_pod_status(
            &pod,
            json!({"phase": "Running", "containerStatuses": container(json!({"running": {}}))}),
        )
        .await?;
    let mut worker = cluster.start_worker(&pod).await?;
    // Evicted once it saved a checkpoint: the node is drained, the worker killed.
    wait_for_event(&app, &id, "\"kind\":\"checkpoint\"").await;
    worker.kill()?;
    worker.wait()?;
    cluster
        .set_pod_status(
            &pod,
            json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
                "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                    "message": "The node was low on resource: memory."}],
                "containerStatuses": container(json!({"terminated": {"exitCode": 137, "reason": "Error"}}))}),
        )
        .await?;

    // The control plane retries: attempt 2 is a new Job, which resumes.
    let second = cluster.job_of(&id, 2).await?;
    let pod = cluster.pod_of(&second).await?;
    run_pod_to_completion(&cluster, &pod).await?;
    cluster.finish_job(&second, "Complete", "Completed").await?;
    let done = app.wait_for_job(&id).await?;
    assert_eq!(
        (done["status"].as_str(), done["attempt"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{done}"
    );
    let events = events_of(&app, &id).await;
    let retried = events.iter().any(|e| {
        e["kind"] == "status"
            && e["message"].as_str().is_some_and(|m| {
                m.contains("attempt 1 failed") && m.contains("disrupted (TerminationByKubelet")
            })
    });
    assert!(retried, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "checkpoint" && e["resumed"] == true),
        "attempt 2 resumed from a checkpoint: {events:?}"
    );
    cluster.gone(&cluster.jobs(), &first.name_any()).await?;
    app.stop().await
}
