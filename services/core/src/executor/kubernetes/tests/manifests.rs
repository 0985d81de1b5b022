use super::*;
use crate::executor::kubernetes::test_support::{launch, settings, TOKEN};
use serde_json::json;

fn job_json(launch: &WorkerLaunch, settings: &KubernetesSettings) -> serde_json::Value {
    serde_json::to_value(job(launch, "ml", settings)).unwrap()
}

#[test]
fn the_job_carries_labels_limits_and_placement_but_never_the_token() {
    let launch = launch(json!({
        "resources": {
            "gpus": 2, "gpu_type": "NVIDIA-H100-80GB-HBM3", "cpu": "16", "memory": "128Gi",
            "ephemeral_storage": "200Gi", "priority_class": "training",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        },
        "training": {"max_duration": "2h"}
    }));
    let j = job_json(&launch, &settings());
    let text = j.to_string();
    assert!(
        !text.contains(TOKEN),
        "the token must not be in the Job: {text}"
    );

    assert_eq!(
        j["metadata"]["name"],
        "lf-6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f-2"
    );
    assert_eq!(j["metadata"]["namespace"], "ml");
    let labels = &j["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "loraforge");
    assert_eq!(
        labels["loraforge.dev/job-id"],
        "6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f"
    );
    assert_eq!(labels["loraforge.dev/attempt"], "2");
    assert_eq!(labels["loraforge.dev/project"], "ml-team");
    assert_eq!(j["spec"]["template"]["metadata"]["labels"], *labels);
    assert_eq!(j["spec"]["backoffLimit"], 0);
    assert_eq!(j["spec"]["activeDeadlineSeconds"], 7200);
    assert!(j["spec"].get("suspend").is_none());

    let pod = &j["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(
        pod["nodeSelector"]["nvidia.com/gpu.product"],
        "NVIDIA-H100-80GB-HBM3"
    );
    assert_eq!(pod["priorityClassName"], "training");
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example.com/loraforge-worker:1.0");
    assert_eq!(
        c["command"],
        json!([
            "loraforge-trainer",
            "run",
            "--job-id",
            "6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f",
            "--api",
            "http://loraforge.ml.svc:8080"
        ])
    );
    let limits = &c["resources"]["limits"];
    assert_eq!(limits["nvidia.com/gpu"], "2");
    assert_eq!(limits["cpu"], "16");
    assert_eq!(limits["memory"], "128Gi");
    assert_eq!(limits["ephemeral-storage"], "200Gi");
    assert_eq!(c["resources"]["requests"], *limits);
    let token_env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "LORAFORGE_WORKER_TOKEN")
        .unwrap();
    assert_eq!(
        token_env["valueFrom"]["secretKeyRef"],
        json!({"name": "lf-6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f-2-token", "key": "token"})
    );
    assert_eq!(
        c["envFrom"],
        json!([{"secretRef": {"name": "loraforge-store"}}])
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts.contains(&json!({"name": "scratch", "mountPath": "/scratch"})));
    assert!(
        mounts.contains(&json!({"name": "shared", "mountPath": "/mnt/datasets", "readOnly": true}))
    );
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(volumes.contains(&json!({"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}})));
    assert!(volumes.contains(
        &json!({"name": "shared", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": true}})
    ));
}

#[test]
fn defaults_give_one_gpu_and_no_placement() {
    let mut s = settings();
    s.storage_secret = None;
    s.shared_volume = None;
    let j = job_json(&launch(json!({})), &s);
    let pod = &j["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"], json!({"nvidia.com/gpu": "1"}));
    assert!(c.get("envFrom").is_none());
    assert!(pod.get("nodeSelector").is_none());
    assert!(pod.get("tolerations").is_none());
    assert!(j["spec"].get("activeDeadlineSeconds").is_none());
    assert_eq!(pod["volumes"], json!([{"name": "scratch", "emptyDir": {}}]));
}

#[test]
fn a_cpu_only_worker_asks_for_no_gpu() {
    let j = job_json(&launch(json!({"resources": {"gpus": 0}})), &settings());
    let c = &j["spec"]["template"]["spec"]["containers"][0];
    assert!(c["resources"]["limits"].get("nvidia.com/gpu").is_none());
}

#[test]
fn kueue_jobs_start_suspended_with_their_queue() {
    let mut s = settings();
    s.queue = Some("team-a".into());
    let j = job_json(&launch(json!({})), &s);
    assert_eq!(j["spec"]["suspend"], true);
    assert_eq!(
        j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
    // A job's own queue wins over the default.
    let j = job_json(&launch(json!({"resources": {"queue": "urgent"}})), &s);
    assert_eq!(
        j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "urgent"
    );
}

#[test]
fn the_secret_holds_the_token_under_the_attempts_labels() {
    let l = launch(json!({}));
    let s = serde_json::to_value(secret(&l, "ml")).unwrap();
    assert_eq!(
        s["metadata"]["name"],
        "lf-6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f-2-token"
    );
    assert_eq!(s["stringData"]["token"], TOKEN);
    assert_eq!(s["metadata"]["labels"]["loraforge.dev/attempt"], "2");
    assert_eq!(
        worker_of(secret(&l, "ml").metadata.labels.as_ref()),
        Some(WorkerRef {
            job_id: l.job_id,
            attempt: 2
        })
    );
}
