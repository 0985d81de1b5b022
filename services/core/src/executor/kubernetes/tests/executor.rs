// The executor's calls against kube's tower-test mock: the test plays the API server and
// checks each request the executor makes, in order.
use super::*;
use crate::executor::kubernetes::test_support::{launch, settings, TOKEN};
use crate::executor::reconcile;
use crate::kube_mock::{expect, mock_client, not_found, ApiServer};
use http::Method;
use serde_json::{json, Value};

fn executor() -> (KubernetesExecutor, ApiServer) {
    let (client, handle) = mock_client();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // The reports channel is unused by these calls; keep the receiver alive anyway.
    std::mem::forget(rx);
    let executor = KubernetesExecutor::new(client, settings(), Duration::from_secs(60), tx);
    (executor, handle)
}

fn list(items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": "JobList", "apiVersion": "batch/v1", "metadata": {"resourceVersion": "7"}, "items": items}),
    )
}

fn listed_job(job_id: &str, attempt: i32) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": format!("lf-{job_id}-{attempt}"), "namespace": "ml",
            "labels": {"app.kubernetes.io/name": "loraforge", "app.kubernetes.io/component": "worker",
                "loraforge.dev/job-id": job_id, "loraforge.dev/attempt": attempt.to_string()}},
        "spec": {"template": {"spec": {"containers": []}}}})
}

const JOB: &str = "6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f";

#[tokio::test]
async fn launch_creates_the_secret_then_the_job_and_makes_the_job_own_the_secret() {
    let (executor, mut server) = executor();
    let run = tokio::spawn(async move { executor.launch(launch(json!({}))).await });

    let (_, secret) = expect(
        &mut server,
        Method::POST,
        "/api/v1/namespaces/ml/secrets",
        (201, json!({})),
    )
    .await;
    assert_eq!(secret["stringData"]["token"], TOKEN);
    assert_eq!(secret["metadata"]["name"], format!("lf-{JOB}-2-token"));

    let created = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": format!("lf-{JOB}-2"), "namespace": "ml", "uid": "job-uid-1"},
        "spec": {"template": {"spec": {"containers": []}}}});
    let (_, job) = expect(
        &mut server,
        Method::POST,
        "/apis/batch/v1/namespaces/ml/jobs",
        (201, created),
    )
    .await;
    assert!(!job.to_string().contains(TOKEN));
    assert_eq!(job["spec"]["backoffLimit"], 0);

    let (_, patch) = expect(
        &mut server,
        Method::PATCH,
        &format!("/api/v1/namespaces/ml/secrets/lf-{JOB}-2-token"),
        (200, json!({})),
    )
    .await;
    assert_eq!(
        patch["metadata"]["ownerReferences"],
        json!([{"apiVersion": "batch/v1", "kind": "Job", "name": format!("lf-{JOB}-2"), "uid": "job-uid-1"}])
    );
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_refused_job_takes_its_secret_with_it_and_says_why() {
    let (executor, mut server) = executor();
    let run = tokio::spawn(async move { executor.launch(launch(json!({}))).await });
    expect(
        &mut server,
        Method::POST,
        "/api/v1/namespaces/ml/secrets",
        (201, json!({})),
    )
    .await;
    let refused = (
        422,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
        "message": "Job.batch \"x\" is invalid: spec.template.spec.containers[0].resources.limits: exceeded quota"}),
    );
    expect(
        &mut server,
        Method::POST,
        "/apis/batch/v1/namespaces/ml/jobs",
        refused,
    )
    .await;
    expect(
        &mut server,
        Method::DELETE,
        &format!("/api/v1/namespaces/ml/secrets/lf-{JOB}-2-token"),
        (200, json!({})),
    )
    .await;
    let err = run.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("creating the worker Job") && err.contains("exceeded quota"),
        "{err}"
    );
}

#[tokio::test]
async fn cancel_deletes_the_jobs_of_the_job_in_the_foreground_and_their_secrets() {
    let (executor, mut server) = executor();
    let job_id: Uuid = JOB.parse().unwrap();
    let run = tokio::spawn(async move { executor.stop(job_id).await });
    let (query, _) = expect(
        &mut server,
        Method::GET,
        "/apis/batch/v1/namespaces/ml/jobs",
        list(vec![listed_job(JOB, 2)]),
    )
    .await;
    let selector = query
        .replace("%3D", "=")
        .replace("%2C", ",")
        .replace("%2F", "/");
    assert!(
        selector.contains(&format!("loraforge.dev/job-id={JOB}")),
        "{selector}"
    );
    let (_, delete) = expect(
        &mut server,
        Method::DELETE,
        &format!("/apis/batch/v1/namespaces/ml/jobs/lf-{JOB}-2"),
        (200, json!({})),
    )
    .await;
    assert_eq!(delete["propagationPolicy"], "Foreground");
    expect(
        &mut server,
        Method::DELETE,
        &format!("/api/v1/namespaces/ml/secrets/lf-{JOB}-2-token"),
        not_found(),
    )
    .await;
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn after_a_restart_reconciliation_sees_every_worker_and_removes_a_stale_one() {
    // A fresh executor (a restarted control plane) knows nothing in memory: it lists.
    let (executor, mut server) = executor();
    let executor = Arc::new(executor);
    let listing = {
        let executor = executor.clone();
        tokio::spawn(async move { executor.workers().await })
    };
    let other = "0b6b0a41-93c4-4d6f-9a57-61e3b7a1c2d0";
    expect(
        &mut server,
        Method::GET,
        "/apis/batch/v1/namespaces/ml/jobs",
        list(vec![listed_job(JOB, 1), listed_job(other, 3)]),
    )
    .await;
    let workers = listing.await.unwrap().unwrap().unwrap();
    let stale = WorkerRef {
        job_id: JOB.parse().unwrap(),
        attempt: 1,
    };
    assert_eq!(
        workers,
        vec![
            stale,
            WorkerRef {
                job_id: other.parse().unwrap(),
                attempt: 3
            }
        ]
    );

    // The jobs table says job JOB is on attempt 2 now: its attempt-1 Job goes.
    let plan = reconcile::plan(
        &workers,
        &[
            reconcile::InFlight {
                worker: WorkerRef {
                    job_id: JOB.parse().unwrap(),
                    attempt: 2,
                },
                claimed_at: Some(chrono::Utc::now()),
            },
            reconcile::InFlight {
                worker: WorkerRef {
                    job_id: other.parse().unwrap(),
                    attempt: 3,
                },
                claimed_at: None,
            },
        ],
        chrono::Utc::now(),
        true,
    );
    assert_eq!(plan.remove, vec![stale]);
    assert!(plan.vanished.is_empty());
    let removing = tokio::spawn(async move { executor.remove(stale).await });
    expect(
        &mut server,
        Method::DELETE,
        &format!("/apis/batch/v1/namespaces/ml/jobs/lf-{JOB}-1"),
        (200, json!({})),
    )
    .await;
    expect(
        &mut server,
        Method::DELETE,
        &format!("/api/v1/namespaces/ml/secrets/lf-{JOB}-1-token"),
        (200, json!({})),
    )
    .await;
    removing.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_workers_log_is_read_from_its_newest_pod_while_it_exists() {
    let (executor, mut server) = executor();
    let executor = Arc::new(executor);
    let worker = WorkerRef {
        job_id: JOB.parse().unwrap(),
        attempt: 2,
    };
    let reading = {
        let executor = executor.clone();
        tokio::spawn(async move { executor.worker_log(worker, 12).await })
    };
    let pod = |name: &str, created: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created}})
    };
    let (query, _) = expect(
        &mut server,
        Method::GET,
        "/api/v1/namespaces/ml/pods",
        (
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                pod("old", "2026-12-06T09:00:00Z"), pod("new", "2026-12-06T09:05:00Z")]}),
        ),
    )
    .await;
    let selector = query
        .replace("%3D", "=")
        .replace("%2C", ",")
        .replace("%2F", "/");
    assert!(
        selector.contains(&format!(
            "loraforge.dev/job-id={JOB},loraforge.dev/attempt=2"
        )),
        "{selector}"
    );
    // The log is text, not JSON: answered by hand.
    let (request, respond) = server.next_request().await.expect("a request");
    assert_eq!(request.uri().path(), "/api/v1/namespaces/ml/pods/new/log");
    assert!(request
        .uri()
        .query()
        .unwrap_or_default()
        .contains("container=worker"));
    respond.send_response(
        http::Response::builder()
            .status(200)
            .body(kube::client::Body::from(
                b"loading\nstep 1/2\nstep 2/2\n".to_vec(),
            ))
            .unwrap(),
    );
    let log = reading.await.unwrap().unwrap();
    assert_eq!(log.as_deref(), Some("/2\nstep 2/2\n"), "the last 12 bytes");

    // No Pod (the attempt was cleaned up): no log.
    let reading = tokio::spawn(async move { executor.worker_log(worker, 100).await });
    expect(
        &mut server,
        Method::GET,
        "/api/v1/namespaces/ml/pods",
        (
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}),
        ),
    )
    .await;
    assert_eq!(reading.await.unwrap().unwrap(), None);
}
