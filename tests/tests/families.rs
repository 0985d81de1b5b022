//! The adapter families PEFT has besides LoRA, published in PEFT's own format: MiSS (with
//! Bone's block-affine `bat` and the `mini` variant) and SHiRA. For each, against PEFT 0.21.2
//! on the fixture, fp32 on the CPU:
//! - training: PEFT (`get_peft_model` with the same knobs) starts from loraforge's initial
//!   variables and takes the same optimizer steps (torch's AdamW) on the same batches; the
//!   variables agree. For SHiRA, PEFT's own random mask for the seed is loraforge's.
//! - the published adapter: `PeftModel.from_pretrained` loads it, and its logits are
//!   loraforge's (`loraforge-trainer logits --adapter`).
//! - merge: `loraforge-trainer merge` gives the model PEFT's `merge_and_unload` gives.
//!
//! And through the API: the jobs publish (the registry reads each family's layout), and a
//! merged version registered as a base model keeps its lineage.

mod common;

use common::{control_plane_bin, python, run_ok, run_ok_async, trainer_bin, Fixture, TestApp};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const TOKENS: &str = "1,5,9,14,20,33,41,57,80,2";

fn last_json_line(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON line")
}

fn matrix(value: &Value) -> Vec<Vec<f64>> {
    serde_json::from_value(value.clone()).expect("a logits matrix")
}

fn trainer_logits(model: &Path, adapter: Option<&Path>) -> Vec<Vec<f64>> {
    let mut command = Command::new(trainer_bin());
    command
        .args(["logits", "--device", "cpu", "--tokens", TOKENS, "--model"])
        .arg(model);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    matrix(&last_json_line(&run_ok(&mut command))["logits"])
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(
        (a.len(), a[0].len()),
        (b.len(), b[0].len()),
        "shapes differ"
    );
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| {
            if (x - y).is_nan() {
                f64::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f64::max)
}

fn merge(model: &Path, adapter: &Path, out: &Path) -> Value {
    let stdout = run_ok(
        Command::new(trainer_bin())
            .arg("merge")
            .arg("--model")
            .arg(model)
            .arg("--adapter")
            .arg(adapter)
            .arg("--out")
            .arg(out),
    );
    serde_json::from_str(&stdout).unwrap()
}

/// Trains `method` with a trace, runs PEFT on the trace, and checks training, the published
/// adapter and the merge against PEFT.
///
/// Tolerances. Variables: 2e-5 of the largest entry (same libtorch kernels, fp32; only the
/// order of a few reductions differs, and which vector kernels run depends on the CPU: SHiRA
/// measured 1.01e-5 on an AVX-512 machine, within 1e-5 on others). Six steps, because Adam's first
/// step from a zero block moves every entry by the learning rate whatever the gradient's size;
/// the later steps depend on the gradients' values. Logits: 1e-4 (fp32 logits of order 1-10).
fn check(method: Value, peft_type: &str, modules: usize) {
    let fixture = Fixture::create().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (adapter, trace) = (work.path().join("adapter"), work.path().join("trace"));
    let spec = json!({
        "adapter_name": "families",
        "base_model": fixture.model_uri(),
        "dataset": {"train": fixture.train_uri()},
        "method": method,
        "training": {"max_steps": 6, "learning_rate": 0.01, "batch_size": 4, "seq_len": 64, "seed": 3,
                     "max_grad_norm": null, "checkpoint_every": null, "weight_decay": 0.0}
    });
    let spec_path = work.path().join("job.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    run_ok(
        Command::new(trainer_bin())
            .args(["train", "--device", "cpu", "--spec"])
            .arg(&spec_path)
            .arg("--out")
            .arg(&adapter)
            .env("LORAFORGE_TRACE_DIR", &trace),
    );
    let name = format!("{method}");
    let config: Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], peft_type, "{name}: {config}");

    let merged_peft = work.path().join("merged-by-peft");
    let peft = last_json_line(&run_ok(
        Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/family_parity.py"))
            .arg(fixture.model_dir())
            .arg(&trace)
            .arg(&spec_path)
            .arg(&adapter)
            .arg(&merged_peft)
            .arg(TOKENS),
    ));
    if peft_type == "SHIRA" {
        assert_eq!(
            peft["positions_match"], true,
            "{name}: PEFT drew other positions"
        );
    }
    let (diff, largest) = (
        peft["max_abs_diff"].as_f64().unwrap(),
        peft["max_abs_param"].as_f64().unwrap(),
    );
    println!("{name}: trained variables differ from PEFT's by {diff:e} (largest {largest:e})");
    assert!(largest > 1e-3, "{name}: nothing trained");
    assert!(
        diff <= 2e-5 * largest,
        "{name}: variables differ by {diff} (largest {largest})"
    );

    let base = trainer_logits(&fixture.model_dir(), None);
    let ours = trainer_logits(&fixture.model_dir(), Some(&adapter));
    let theirs = matrix(&peft["logits"]);
    let moved = max_abs_diff(&ours, &base);
    let published = max_abs_diff(&ours, &theirs);
    println!(
        "{name}: logits differ from PEFT's by {published:e}; the adapter moves them by {moved:e}"
    );
    assert!(
        moved > 1e-2,
        "{name}: the adapter barely changes the logits ({moved})"
    );
    assert!(
        published < 1e-4,
        "{name}: PEFT's logits differ by {published}"
    );

    let merged = work.path().join("merged");
    let summary = merge(&fixture.model_dir(), &adapter, &merged);
    assert_eq!(summary["merged_modules"], modules, "{name}: {summary}");
    let from_merged = trainer_logits(&merged, None);
    let merge_diff = max_abs_diff(&from_merged, &matrix(&peft["merged_logits"]));
    println!("{name}: merged model's logits differ from PEFT's merge_and_unload by {merge_diff:e}");
    assert!(
        merge_diff < 1e-4,
        "{name}: merged logits differ from PEFT's by {merge_diff}"
    );
    assert!(
        max_abs_diff(&from_merged, &ours) < 1e-4,
        "{name}: merged != base + adapter"
    );
}

#[test]
fn miss_matches_peft() {
    // r = 6 does not divide the 64 inputs: the last slice is padded, as PEFT pads it.
    check(
        json!({"type": "miss", "r": 6, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        "MISS",
        2 * 3,
    );
}

#[test]
fn miss_bat_matches_peft() {
    check(
        json!({"type": "miss", "r": 8, "init": "bat", "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        "MISS",
        2 * 3,
    );
}

#[test]
fn miss_mini_matches_peft() {
    check(
        json!({"type": "miss", "r": 8, "init": "mini", "mini_r": 16, "target_modules": ["q_proj", "o_proj"]}),
        "MISS",
        2 * 2,
    );
}

#[test]
fn shira_matches_peft() {
    check(
        json!({"type": "shira", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        "SHIRA",
        2 * 3,
    );
}

/// Each family's job through the control plane publishes (the registry checks its tensors
/// against its `adapter_config.json`), serves its files, and merges into a base model that
/// keeps the version it came from.
#[tokio::test]
async fn family_jobs_publish_and_merge_with_their_lineage() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let out = tempfile::tempdir()?;
    for (adapter, method, peft_type) in [
        (
            "miss-job",
            json!({"type": "miss", "r": 8, "init": "bat"}),
            "MISS",
        ),
        ("shira-job", json!({"type": "shira", "r": 2}), "SHIRA"),
        (
            "randlora-job",
            json!({"type": "randlora", "r": 16, "alpha": 320, "projection_prng_key": 3}),
            "RANDLORA",
        ),
    ] {
        let mut job = fixture.job(adapter);
        job["method"] = method;
        job["training"]["max_steps"] = json!(8);
        job["training"]["learning_rate"] = json!(0.005);
        let done = app.run_job(&job).await?;
        let version = done["adapter_version"]["version"].as_i64().unwrap();
        let (code, config) = app
            .get_json(&format!(
                "/v1/adapters/{adapter}/versions/{version}/files/adapter_config.json"
            ))
            .await?;
        assert_eq!(
            (code, config["peft_type"].as_str()),
            (200, Some(peft_type)),
            "{config}"
        );

        let stored = app
            .store_dir
            .as_ref()
            .unwrap()
            .join(format!("adapters/default/{adapter}/v{version}"));
        let merged = out.path().join(adapter);
        let summary = merge(&fixture.model_dir(), &stored, &merged);
        assert_eq!(
            summary["record"]["source"],
            json!({"adapter": adapter, "version": version})
        );
        let adapted = trainer_logits(&fixture.model_dir(), Some(&stored));
        let diff = max_abs_diff(&adapted, &trainer_logits(&merged, None));
        assert!(
            diff < 1e-4,
            "{adapter}: merged differs from base + adapter by {diff}"
        );

        let mut register = Command::new(control_plane_bin());
        let merged_name = format!("{adapter}-merged");
        register.args(["models", "register"]).arg(&merged).args([
            "--name",
            &merged_name,
            "--api",
            &app.base_url,
            "-o",
            "json",
        ]);
        let row: Value = serde_json::from_str(&run_ok_async(register).await)?;
        assert_eq!(
            (
                row["source_adapter"].as_str(),
                row["source_version"].as_i64()
            ),
            (Some(adapter), Some(version)),
            "{row}"
        );
    }
    app.stop().await
}
