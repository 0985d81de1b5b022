// Shared by the executor's unit tests: a launch and settings as a real deployment has them.
use crate::executor::WorkerLaunch;
use crate::settings::{KubernetesSettings, SharedVolume};
use loraforge_spec::ResolvedJobSpec;
use uuid::Uuid;

pub const TOKEN: &str = "0123456789abcdef-the-worker-token-never-in-a-spec";

pub fn launch(extra: serde_json::Value) -> WorkerLaunch {
    let mut spec = serde_json::json!({
        "adapter_name": "support-bot",
        "base_model": "s3://models/llama-3-8b",
        "dataset": {"train": "s3://data/train.jsonl"},
        "method": {"type": "lora", "r": 16},
        "training": {"max_steps": 100, "learning_rate": 0.0002},
    });
    json_merge(&mut spec, extra);
    WorkerLaunch {
        job_id: Uuid::parse_str("6f1c7d3e-2a4b-4c5d-8e9f-0a1b2c3d4e5f").unwrap(),
        attempt: 2,
        project: "ml-team".into(),
        spec: serde_json::from_value::<ResolvedJobSpec>(spec).unwrap(),
        api_url: "http://loraforge.ml.svc:8080".into(),
        token: TOKEN.into(),
    }
}

pub fn settings() -> KubernetesSettings {
    KubernetesSettings {
        namespace: Some("ml".into()),
        worker_image: "registry.example.com/loraforge-worker:1.0".into(),
        queue: None,
        gpu_label: "nvidia.com/gpu.product".into(),
        storage_secret: Some("loraforge-store".into()),
        shared_volume: Some(SharedVolume {
            claim: "datasets".into(),
            mount_path: "/mnt/datasets".into(),
        }),
        max_workers: 4,
        worker_service_account: None,
        image_pull_secret: None,
    }
}

fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}
