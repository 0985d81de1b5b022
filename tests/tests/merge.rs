//! `loraforge-trainer merge`: base + adapter folded into one model computes what the base
//! with the adapter attached computes, and the merged model keeps its lineage when registered.
//!
//! Tolerance 1e-4 on fp32 CPU logits: merging only reorders the arithmetic
//! (`x (W + s B A)^T` instead of `x W^T + s (x A^T) B^T`), a rounding difference of ~1e-6
//! relative on the fixture's logits of magnitude ~1-10.

mod common;

use common::{control_plane_bin, python, run_ok, run_ok_async, trainer_bin, Fixture, TestApp};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const TOKENS: &str = "1,5,9,14,20,33,41,57,80,2";
const ALL_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn logits_of(stdout: &str) -> Vec<Vec<f64>> {
    let json: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    serde_json::from_value(json["logits"].clone()).unwrap()
}

fn trainer_logits(model: &Path, adapter: Option<&Path>) -> Vec<Vec<f64>> {
    let mut command = Command::new(trainer_bin());
    command
        .args(["logits", "--device", "cpu", "--tokens", TOKENS, "--model"])
        .arg(model);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    logits_of(&run_ok(&mut command))
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!((a.len(), a[0].len()), (b.len(), b[0].len()));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn merge(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Value {
    let stdout = run_ok(
        Command::new(trainer_bin())
            .arg("merge")
            .arg("--model")
            .arg(model)
            .arg("--adapter")
            .arg(adapter)
            .arg("--out")
            .arg(out)
            .args(extra),
    );
    serde_json::from_str(&stdout).unwrap()
}

/// A trained rsLoRA adapter on every linear layer, published through the control plane as
/// version 1; merged, it computes what base + adapter computes, and registering the merged
/// model records that version as its source.
#[tokio::test]
async fn merged_model_equals_base_plus_adapter_and_keeps_its_lineage() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let mut job = fixture.job("demo");
    job["method"]["use_rslora"] = json!(true);
    job["method"]["target_modules"] = json!(ALL_MODULES);
    job["training"]["max_steps"] = json!(10);
    app.run_job(&job).await?;
    let adapter = app
        .store_dir
        .as_ref()
        .unwrap()
        .join("adapters/default/demo/v1");

    let out = tempfile::tempdir()?;
    let merged = out.path().join("merged");
    let summary = merge(&fixture.model_dir(), &adapter, &merged, &[]);
    assert_eq!(summary["merged_modules"], 2 * 7, "{summary}");
    // The version comes from the adapter's manifest.json.
    assert_eq!(
        summary["record"]["source"],
        json!({"adapter": "demo", "version": 1})
    );
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "loraforge_merge.json",
    ] {
        assert!(merged.join(name).is_file(), "{name} missing");
    }

    let base = trainer_logits(&fixture.model_dir(), None);
    let adapted = trainer_logits(&fixture.model_dir(), Some(&adapter));
    let from_merged = trainer_logits(&merged, None);
    let moved = max_abs_diff(&base, &adapted);
    assert!(
        moved > 1e-2,
        "the adapter barely changes the logits ({moved}); the comparison would prove nothing"
    );
    let diff = max_abs_diff(&adapted, &from_merged);
    eprintln!("merged vs base + adapter: max |logit difference| {diff:e} (the adapter moves them by {moved:e})");
    assert!(
        diff < 1e-4,
        "merged model differs from base + adapter by {diff}"
    );

    let mut register = Command::new(control_plane_bin());
    register.args(["models", "register"]).arg(&merged).args([
        "--name",
        "demo-merged",
        "--api",
        &app.base_url,
        "-o",
        "json",
    ]);
    let stdout = run_ok_async(register).await;
    let row: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        (
            row["source_adapter"].as_str(),
            row["source_version"].as_i64()
        ),
        (Some("demo"), Some(1)),
        "{row}"
    );
    let (code, fetched) = app.get_json("/v1/base-models/demo-merged").await?;
    assert_eq!(
        (code, &fetched["source_version"]),
        (200, &json!(1)),
        "{fetched}"
    );
    app.stop().await
}

/// Per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) scale each module as PEFT
/// does: the merged model equals PEFT's base + adapter.
#[test]
fn alpha_and_rank_patterns_merge_as_peft_applies_them() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let work = tempfile::tempdir()?;
    let mut job = fixture.job("patterns");
    job["method"]["target_modules"] = json!(["q_proj", "v_proj", "down_proj"]);
    job["training"]["max_steps"] = json!(8);
    let spec = work.path().join("spec.json");
    std::fs::write(&spec, serde_json::to_vec(&job)?)?;
    let adapter = work.path().join("adapter");
    run_ok(
        Command::new(trainer_bin())
            .args(["train", "--device", "cpu", "--spec"])
            .arg(&spec)
            .arg("--out")
            .arg(&adapter),
    );

    let config_path = adapter.join("adapter_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["alpha_pattern"] = json!({"v_proj": 4.0, "model.layers.1.self_attn.q_proj": 64.0});
    config["rank_pattern"] = json!({"down_proj": 8});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;

    let merged = work.path().join("merged");
    let summary = merge(
        &fixture.model_dir(),
        &adapter,
        &merged,
        &["--source-adapter", "patterns", "--source-version", "3"],
    );
    assert_eq!(
        summary["record"]["source"],
        json!({"adapter": "patterns", "version": 3})
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/peft_logits.py");
    let peft = logits_of(&run_ok(
        Command::new(python())
            .arg(&script)
            .arg(fixture.model_dir())
            .arg(TOKENS)
            .arg(&adapter),
    ));
    let plain = logits_of(&run_ok(
        Command::new(python())
            .arg(&script)
            .arg(fixture.model_dir())
            .arg(TOKENS),
    ));
    let from_merged = trainer_logits(&merged, None);
    let moved = max_abs_diff(&plain, &peft);
    let diff = max_abs_diff(&peft, &from_merged);
    eprintln!("merged vs PEFT base + adapter: max |logit difference| {diff:e} (the adapter moves them by {moved:e})");
    assert!(
        moved > 1e-2,
        "the adapter barely changes the logits ({moved})"
    );
    assert!(
        diff < 1e-4,
        "merged model differs from PEFT's base + adapter by {diff}"
    );

    // A rank_pattern that contradicts the tensors is refused rather than merged wrongly.
    config["rank_pattern"] = json!({"down_proj": 4});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let out = Command::new(trainer_bin())
        .args(["merge", "--model"])
        .arg(fixture.model_dir())
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(work.path().join("refused"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("rank_pattern"),
        "{stderr}"
    );
    Ok(())
}
