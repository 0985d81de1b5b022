//! The objects one attempt becomes: a per-attempt Secret holding the worker token, and a
//! `batch/v1` Job whose Pod reads it by `secretKeyRef`, so the token is never in a Job or
//! Pod spec. Pure functions of the launch and the settings, so tests read them directly.

use super::super::{WorkerLaunch, WorkerRef};
use crate::settings::KubernetesSettings;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use loraforge_spec::resources::{label_value, Resources};
use loraforge_spec::worker::TOKEN_ENV;
use serde_json::{json, Map, Value};
use uuid::Uuid;

pub const APP_LABEL: &str = "app.kubernetes.io/name";
pub const APP: &str = "loraforge";
pub const JOB_ID_LABEL: &str = "loraforge.dev/job-id";
pub const ATTEMPT_LABEL: &str = "loraforge.dev/attempt";
pub const PROJECT_LABEL: &str = "loraforge.dev/project";
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Every object the executor makes carries this label; its watches select on it.
pub const SELECTOR: &str = "app.kubernetes.io/name=loraforge,app.kubernetes.io/component=worker";
/// The worker's container name (its logs are read by this name).
pub const CONTAINER: &str = "worker";
const TOKEN_KEY: &str = "token";
const SCRATCH: &str = "/scratch";
/// Finished Jobs the control plane did not clean up (it was down) go after a day.
const TTL_AFTER_FINISHED: i64 = 24 * 3600;

/// `lf-<job id>-<attempt>`: unique per attempt, and short enough for the Job controller's
/// `job-name` label (63 characters).
pub fn job_name(worker: WorkerRef) -> String {
    format!("lf-{}-{}", worker.job_id, worker.attempt)
}

pub fn secret_name(worker: WorkerRef) -> String {
    format!("{}-token", job_name(worker))
}

/// Which attempt an object belongs to, from its labels.
pub fn worker_of(labels: Option<&std::collections::BTreeMap<String, String>>) -> Option<WorkerRef> {
    let labels = labels?;
    Some(WorkerRef {
        job_id: labels.get(JOB_ID_LABEL)?.parse::<Uuid>().ok()?,
        attempt: labels.get(ATTEMPT_LABEL)?.parse().ok()?,
    })
}

fn labels(launch: &WorkerLaunch) -> Map<String, Value> {
    let mut labels = Map::new();
    labels.insert(APP_LABEL.into(), APP.into());
    labels.insert("app.kubernetes.io/component".into(), "worker".into());
    labels.insert("app.kubernetes.io/managed-by".into(), "loraforge".into());
    labels.insert(JOB_ID_LABEL.into(), launch.job_id.to_string().into());
    labels.insert(ATTEMPT_LABEL.into(), launch.attempt.to_string().into());
    // Project names are label-safe today; a label is only an index, so one that is not is
    // left out rather than refused (the annotation keeps it).
    if label_value(&launch.project).is_ok() {
        labels.insert(PROJECT_LABEL.into(), launch.project.clone().into());
    }
    labels
}

fn annotations(launch: &WorkerLaunch) -> Value {
    json!({
        "loraforge.dev/project": launch.project,
        "loraforge.dev/adapter": launch.spec.adapter_name.as_str(),
    })
}

/// The Secret with the attempt's worker token (owned by the Job once it exists).
pub fn secret(launch: &WorkerLaunch, namespace: &str) -> Secret {
    let worker = WorkerRef {
        job_id: launch.job_id,
        attempt: launch.attempt,
    };
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(worker),
            "namespace": namespace,
            "labels": labels(launch),
            "annotations": annotations(launch),
        },
        "type": "Opaque",
        "stringData": { TOKEN_KEY: launch.token },
    });
    serde_json::from_value(manifest).expect("a Secret manifest matches the Secret schema")
}

/// The GPUs a worker gets on this executor: the job's `resources.gpus`, else one.
pub fn gpus(resources: &Resources) -> u32 {
    resources.gpus.unwrap_or(1)
}

/// The attempt's Job.
pub fn job(launch: &WorkerLaunch, namespace: &str, settings: &KubernetesSettings) -> Job {
    let worker = WorkerRef {
        job_id: launch.job_id,
        attempt: launch.attempt,
    };
    let resources = &launch.spec.resources;
    let mut job_labels = labels(launch);
    let queue = resources.queue.as_ref().or(settings.queue.as_ref());
    if let Some(q) = queue {
        job_labels.insert(KUEUE_QUEUE_LABEL.into(), q.clone().into());
    }

    let mut limits = Map::new();
    let gpus = gpus(resources);
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), gpus.to_string().into());
    }
    for (name, value) in [
        ("cpu", &resources.cpu),
        ("memory", &resources.memory),
        ("ephemeral-storage", &resources.ephemeral_storage),
    ] {
        if let Some(v) = value {
            limits.insert(name.into(), v.clone().into());
        }
    }

    let mut env = vec![
        json!({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret_name(worker), "key": TOKEN_KEY}}}),
        json!({"name": "TMPDIR", "value": SCRATCH}),
        json!({"name": "HOME", "value": SCRATCH}),
        json!({"name": "RUST_LOG", "value": "info"}),
    ];
    if gpus == 0 {
        env.push(json!({"name": "CUDA_VISIBLE_DEVICES", "value": ""}));
    }
    let mut mounts = vec![json!({"name": "scratch", "mountPath": SCRATCH})];
    let mut scratch = json!({});
    if let Some(size) = &resources.ephemeral_storage {
        scratch = json!({"sizeLimit": size});
    }
    let mut volumes = vec![json!({"name": "scratch", "emptyDir": scratch})];
    if let Some(shared) = &settings.shared_volume {
        mounts.push(json!({"name": "shared", "mountPath": shared.mount_path, "readOnly": true}));
        volumes.push(json!({"name": "shared", "persistentVolumeClaim": {"claimName": shared.claim, "readOnly": true}}));
    }

    let mut container = json!({
        "name": CONTAINER,
        "image": settings.worker_image,
        "command": ["loraforge-trainer", "run", "--job-id", launch.job_id.to_string(), "--api", launch.api_url],
        "env": env,
        "resources": {"limits": limits, "requests": limits},
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(secret) = &settings.storage_secret {
        container["envFrom"] = json!([{"secretRef": {"name": secret}}]);
    }

    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "enableServiceLinks": false,
        "automountServiceAccountToken": settings.worker_service_account.is_some(),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    });
    if let Some(sa) = &settings.worker_service_account {
        pod_spec["serviceAccountName"] = sa.clone().into();
    }
    if let Some(secret) = &settings.image_pull_secret {
        pod_spec["imagePullSecrets"] = json!([{"name": secret}]);
    }
    if let Some(gpu_type) = &resources.gpu_type {
        pod_spec["nodeSelector"] = json!({ settings.gpu_label.clone(): gpu_type });
    }
    if !resources.tolerations.is_empty() {
        pod_spec["tolerations"] = serde_json::to_value(
            resources
                .tolerations
                .iter()
                .map(|t| {
                    json!({
                        "key": t.key,
                        "operator": t.operator,
                        "value": t.value,
                        "effect": t.effect,
                        "tolerationSeconds": t.toleration_seconds,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .expect("tolerations serialize");
    }
    if let Some(p) = &resources.priority_class {
        pod_spec["priorityClassName"] = p.clone().into();
    }

    let mut spec = json!({
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
        "template": {
            "metadata": {"labels": labels(launch), "annotations": annotations(launch)},
            "spec": pod_spec,
        },
    });
    if queue.is_some() {
        // Kueue admits the Job by unsuspending it.
        spec["suspend"] = true.into();
    }
    if let Some(secs) = launch.spec.training.max_duration_secs() {
        spec["activeDeadlineSeconds"] = secs.into();
    }
    let manifest = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(worker),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": annotations(launch),
        },
        "spec": spec,
    });
    let mut manifest = manifest;
    strip_nulls(&mut manifest);
    serde_json::from_value(manifest).expect("a Job manifest matches the Job schema")
}

/// Optional fields left `null` (a toleration without a value) are dropped, as the API
/// server would.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[cfg(test)]
#[path = "tests/manifests.rs"]
mod tests;
