//! One job from REST to a published, verified, PEFT-loadable adapter with lineage.

mod common;

use common::{python, sha256_file, Fixture, TestApp};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::process::Command;

#[tokio::test]
async fn a_job_trains_publishes_and_records_lineage() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;

    // Submit twice with one Idempotency-Key: one job.
    let body = fixture.job("demo");
    let first = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "k-1")
        .json(&body)
        .send()
        .await?;
    assert_eq!(first.status(), 201);
    let job: Value = first.json().await?;
    let id = job["id"].as_str().unwrap().to_string();
    let again = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "k-1")
        .json(&body)
        .send()
        .await?;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await?["id"], job["id"]);

    let done = app.wait_for_job(&id).await?;
    assert_eq!(done["status"], "succeeded", "job: {done}");
    assert_eq!(done["adapter_version"]["version"], 1);
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());
    assert_eq!(app.count("jobs").await, 1);

    // The lifecycle, in order, from the event log; one progress event per step.
    let events = app.all_events(&id).await?;
    let statuses: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "status")
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "queued",
            "scheduled",
            "running",
            "evaluating",
            "publishing",
            "succeeded"
        ]
    );
    // The safety gate ran (on by default) and its report is an event.
    assert_eq!(events.iter().filter(|e| e["kind"] == "safety").count(), 1);
    let progress: Vec<&Value> = events.iter().filter(|e| e["kind"] == "progress").collect();
    assert_eq!(progress.len(), 30);
    assert_eq!(
        progress
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    assert!(progress
        .iter()
        .all(|e| e["tokens_per_second"].as_f64().unwrap() > 0.0
            && e["lr"].as_f64().unwrap() > 0.0
            && e["grad_norm"]
                .as_f64()
                .is_some_and(|n| n > 0.0 && n.is_finite())));

    // The same events as a server-sent event stream, which ends because the job is final;
    // Last-Event-ID resumes after a given event.
    let sse = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events/stream")))
        .send()
        .await?;
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let text = sse.text().await?;
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids.len(), events.len());
    let resumed = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events/stream")))
        .header("Last-Event-ID", ids[ids.len() - 3])
        .send()
        .await?;
    assert_eq!(
        resumed
            .text()
            .await?
            .lines()
            .filter(|l| l.starts_with("id: "))
            .count(),
        2
    );

    // The version: ready, every file in the store matching the registry's digest.
    let (code, version) = app.get_json("/v1/adapters/demo/versions/1").await?;
    assert_eq!(code, 200, "{version}");
    assert_eq!(version["status"], "ready");
    assert_eq!(version["method"]["type"], "lora");
    assert_eq!(version["hyperparameters"]["max_steps"], 30);
    let version_dir = app
        .store_dir
        .as_ref()
        .unwrap()
        .join("adapters/default/demo/v1");
    assert_eq!(
        version["uri"].as_str().unwrap(),
        format!("file://{}", version_dir.display())
    );
    let mut names: Vec<&str> = version["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "manifest.json"
        ]
    );
    for f in version["files"].as_array().unwrap() {
        let path = version_dir.join(f["name"].as_str().unwrap());
        assert_eq!(
            sha256_file(&path),
            f["sha256"].as_str().unwrap(),
            "{}",
            path.display()
        );
        assert_eq!(std::fs::metadata(&path)?.len(), f["size"].as_u64().unwrap());
    }

    // The loss fell clearly: the dataset is learnable.
    let metrics = &version["metrics"];
    let (initial, last) = (
        metrics["initial_loss"].as_f64().unwrap(),
        metrics["final_loss"].as_f64().unwrap(),
    );
    assert!(last < 0.8 * initial, "loss went from {initial} to {last}");
    let first_step_loss = progress[0]["loss"].as_f64().unwrap();
    assert!((first_step_loss - initial).abs() < 1e-9);

    // Lineage: both inputs by URI and content digest.
    let (code, lineage) = app.get_json("/v1/adapters/demo/versions/1/lineage").await?;
    assert_eq!(code, 200);
    assert_eq!(lineage["job_id"].as_str().unwrap(), id);
    assert_eq!(
        lineage["dataset"]["uri"].as_str().unwrap(),
        fixture.train_uri()
    );
    assert_eq!(
        lineage["dataset"]["sha256"].as_str().unwrap(),
        sha256_file(&fixture.train_file())
    );
    assert_eq!(
        lineage["base_model"]["uri"].as_str().unwrap(),
        fixture.model_uri()
    );
    assert_eq!(
        lineage["base_model"]["sha256"].as_str().unwrap(),
        model_tree_digest(&fixture.model_dir())
    );
    assert!(lineage["parent"].is_null());

    // The manifest says the same.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(version_dir.join("manifest.json"))?)?;
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["dataset"]["sha256"], lineage["dataset"]["sha256"]);

    // Python PEFT loads it onto the same base with no missing or unexpected keys.
    peft_loads(&fixture.model_dir(), &version_dir)?;

    // Prometheus metrics see the finished job and the ready version.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("loraforge_jobs{status=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("loraforge_adapter_versions{status=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("loraforge_queue_depth 0"), "{metrics}");

    // The next job of the same adapter gets version 2.
    let mut second = fixture.job("demo");
    second["training"]["max_steps"] = 2.into();
    let (code, job2) = app.submit(&second).await?;
    assert_eq!(code, 201);
    let done2 = app.wait_for_job(job2["id"].as_str().unwrap()).await?;
    assert_eq!(done2["status"], "succeeded", "{done2}");
    assert_eq!(done2["adapter_version"]["version"], 2);

    app.stop().await
}

/// sha256 over `sha256sum`-style lines of every file in the model directory.
fn model_tree_digest(dir: &std::path::Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let lines: String = names
        .iter()
        .map(|n| format!("{}  {n}\n", sha256_file(&dir.join(n))))
        .collect();
    hex::encode(Sha256::digest(lines.as_bytes()))
}

fn peft_loads(model: &std::path::Path, adapter: &std::path::Path) -> anyhow::Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/peft_load.py");
    let out = Command::new(python())
        .arg(script)
        .arg(model)
        .arg(adapter)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "peft_load.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))?;
    assert_eq!(report["unexpected_keys"], serde_json::json!([]));
    assert_eq!(report["missing_lora_keys"], serde_json::json!([]));
    assert!(
        report["lora_tensors"].as_u64().unwrap() == 2 * 2 * 2,
        "{report}"
    );
    assert!(
        report["max_logit_change"].as_f64().unwrap() > 1e-4,
        "the adapter changes nothing: {report}"
    );
    Ok(())
}
