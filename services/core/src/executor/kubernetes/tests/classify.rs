// One row per failure class, each from the shape the kubelet, the scheduler or the Job
// controller writes (status excerpts as `kubectl get -o json` shows them).
use super::*;
use serde_json::{json, Value};

fn pod_from(status: Value, extra_meta: Value) -> Pod {
    let mut meta = json!({"name": "lf-x-1-abcde", "labels": {"loraforge.dev/attempt": "1"}});
    if let (Value::Object(m), Value::Object(e)) = (&mut meta, extra_meta) {
        m.extend(e);
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {"containers": [{"name": "worker", "image": "w", "resources": {"limits": {"memory": "64Gi"}}}]},
        "status": status,
    }))
    .unwrap()
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"phase": "Pending", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]})
}

/// What the classifier made of a case, as (kind, message) for the table.
fn summary(seen: &Seen) -> (&'static str, String) {
    match seen {
        Seen::Waiting { event } => ("waiting", event.clone().unwrap_or_default()),
        Seen::Running => ("running", String::new()),
        Seen::Ended { outcome, .. } => {
            let message = match outcome {
                Outcome::WorkerExited { description } => description.clone(),
                Outcome::Infrastructure { message }
                | Outcome::ResourceExhausted { message }
                | Outcome::DeadlineExceeded { message } => message.clone(),
                other => format!("{other:?}"),
            };
            (outcome.label(), message)
        }
    }
}

#[test]
fn pods() {
    let cases: Vec<(&str, Value, Value, bool, &str, &str)> = vec![
        (
            "unschedulable: waiting for capacity, not a failure",
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}),
            json!({}),
            false,
            "waiting",
            "waiting for capacity: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        ),
        (
            "scheduled and pulling: waiting quietly",
            waiting("ContainerCreating", ""),
            json!({}),
            false,
            "waiting",
            "",
        ),
        (
            "image pull back-off",
            waiting(
                "ImagePullBackOff",
                "Back-off pulling image \"registry.example.com/w:9\"",
            ),
            json!({}),
            false,
            "infrastructure",
            "ImagePullBackOff: Back-off pulling image",
        ),
        (
            "image pull error",
            waiting(
                "ErrImagePull",
                "rpc error: code = NotFound desc = manifest unknown",
            ),
            json!({}),
            false,
            "infrastructure",
            "ErrImagePull",
        ),
        (
            "config error (a missing Secret)",
            waiting(
                "CreateContainerConfigError",
                "secret \"loraforge-store\" not found",
            ),
            json!({}),
            false,
            "infrastructure",
            "CreateContainerConfigError: secret \"loraforge-store\" not found",
        ),
        (
            "out of memory",
            json!({"phase": "Failed", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
            json!({}),
            false,
            "resource_exhausted",
            "memory limit (64Gi, resources.memory; exit code 137)",
        ),
        (
            "evicted by the kubelet",
            json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: ephemeral-storage."}),
            json!({}),
            false,
            "infrastructure",
            "evicted: The node was low on resource: ephemeral-storage.",
        ),
        (
            "preempted (DisruptionTarget)",
            json!({"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True",
                "reason": "PreemptionByScheduler", "message": "higher priority pod"}]}),
            json!({"deletionTimestamp": "2026-12-06T07:00:00Z"}),
            false,
            "infrastructure",
            "disrupted (PreemptionByScheduler",
        ),
        (
            "deleted under a running worker (node lost)",
            json!({"phase": "Running"}),
            json!({}),
            true,
            "infrastructure",
            "deleted before it finished",
        ),
        (
            "the worker crashed",
            json!({"phase": "Failed", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 101, "reason": "Error"}}}]}),
            json!({}),
            false,
            "worker_exited",
            "exit code 101 (Error)",
        ),
        (
            "the worker finished",
            json!({"phase": "Succeeded"}),
            json!({}),
            false,
            "worker_exited",
            "succeeded",
        ),
        (
            "running",
            json!({"phase": "Running", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": true,
                "restartCount": 0, "state": {"running": {}}}]}),
            json!({}),
            false,
            "running",
            "",
        ),
    ];
    for (name, status, meta, deleted, kind, message) in cases {
        let seen = pod(&pod_from(status, meta), deleted);
        let (got_kind, got_message) = summary(&seen);
        assert_eq!(got_kind, kind, "{name}: {seen:?}");
        assert!(
            got_message.contains(message),
            "{name}: {got_message:?} lacks {message:?}"
        );
    }
}

fn job_from(spec: Value, status: Value) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": "lf-x-1", "labels": {"kueue.x-k8s.io/queue-name": "team-a"}},
        "spec": spec, "status": status,
    }))
    .unwrap()
}

#[test]
fn jobs() {
    let template = json!({"spec": {"containers": []}});
    let deadline = job_from(
        json!({"template": template, "activeDeadlineSeconds": 5400}),
        json!({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
            "message": "Job was active longer than specified deadline"}]}),
    );
    let (kind, message) = summary(&job(&deadline, false).unwrap());
    assert_eq!(kind, "deadline_exceeded");
    assert!(
        message.contains("training.max_duration (5400s)"),
        "{message}"
    );
    assert!(job_finished(&deadline));

    let suspended = job_from(json!({"template": template, "suspend": true}), json!({}));
    let (kind, message) = summary(&job(&suspended, false).unwrap());
    assert_eq!(
        (kind, message.as_str()),
        ("waiting", "waiting for admission by Kueue (queue team-a)")
    );

    let running = job_from(json!({"template": template}), json!({"active": 1}));
    assert!(job(&running, false).is_none());
    let (kind, _) = summary(&job(&running, true).unwrap());
    assert_eq!(
        kind, "infrastructure",
        "a Job deleted under a running worker"
    );

    let complete = job_from(
        json!({"template": template}),
        json!({"conditions": [{"type": "Complete", "status": "True"}]}),
    );
    assert!(
        job(&complete, true).is_none(),
        "a finished Job's deletion is cleanup"
    );
    assert!(job_finished(&complete));
}
