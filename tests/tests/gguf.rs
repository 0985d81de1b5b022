//! `loraforge models import`: GGUF files become Hugging Face model directories that compute
//! what transformers computes from the same file, with the tokenizer it builds from it.
//!
//! Tolerance for logits: both sides run fp32 on the CPU from bit-identical weights (checked
//! below tensor by tensor), through the same sequence of operations, and here they agree
//! exactly. The tolerance leaves room only for summation order inside matmul/attention kernels
//! (another CPU, another thread count): ~1e-6 relative per op, which over SmolLM2's 30 layers
//! stays under 1e-4 on logits of magnitude ~20. A wrong permutation, scale or tokenizer moves
//! them by whole units.

mod common;

use common::{control_plane_bin, python, run_ok, run_ok_async, smollm2_gguf, trainer_bin, TestApp};
use loraforge_models::gguf::GgufFile;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const LOGIT_TOLERANCE: f64 = 1e-4;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A tiny random model of `arch` in GGUF, every encoding represented (tests/python/gguf_tiny.py).
fn tiny(arch: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(python())
            .arg(script("gguf_tiny.py"))
            .arg(dir.path())
            .arg(arch),
    );
    let gguf = dir.path().join(format!("tiny-{arch}.gguf"));
    (dir, gguf)
}

fn import(gguf: &Path, out: &Path) -> Value {
    let stdout = run_ok(
        Command::new(control_plane_bin())
            .args(["models", "import"])
            .arg(gguf)
            .arg("--out")
            .arg(out),
    );
    serde_json::from_str(&stdout).unwrap()
}

fn our_logits(model: &Path, tokens: &[u32]) -> Vec<Vec<f64>> {
    let list: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let stdout = run_ok(
        Command::new(trainer_bin())
            .args(["logits", "--device", "cpu", "--model"])
            .arg(model)
            .arg("--tokens")
            .arg(list.join(",")),
    );
    let json: Value = serde_json::from_str(&stdout).unwrap();
    serde_json::from_value(json["logits"].clone()).unwrap()
}

/// transformers on the GGUF itself: logits for `tokens`, and its tokenizer's encodings of `texts`.
fn reference(gguf: &Path, tokens: &[u32], texts: &[&str]) -> Value {
    let list: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let stdout = run_ok(
        Command::new(python())
            .arg(script("gguf_reference.py"))
            .arg(gguf)
            .arg(list.join(","))
            .args(texts),
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

fn max_abs_diff(ours: &[Vec<f64>], theirs: &Value) -> f64 {
    let theirs: Vec<Vec<f64>> = serde_json::from_value(theirs.clone()).unwrap();
    assert_eq!((ours.len(), ours[0].len()), (theirs.len(), theirs[0].len()));
    ours.iter()
        .flatten()
        .zip(theirs.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// Our tokenizer.json (through the tokenizers crate, as the trainer uses it) encodes every
/// text as transformers' tokenizer built from the GGUF does, with and without special tokens.
fn assert_same_encodings(model: &Path, texts: &[&str], reference: &Value) {
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    for (key, special) in [("encodings", false), ("encodings_with_special", true)] {
        for (text, expected) in texts.iter().zip(reference[key].as_array().unwrap()) {
            let ours: Vec<u64> = tokenizer
                .encode(*text, special)
                .unwrap()
                .get_ids()
                .iter()
                .map(|&i| i.into())
                .collect();
            let expected: Vec<u64> = serde_json::from_value(expected.clone()).unwrap();
            assert_eq!(ours, expected, "{text:?} (special tokens: {special})");
        }
    }
}

#[test]
fn every_encoding_dequantizes_bit_for_bit_like_gguf_py() {
    let (dir, gguf) = tiny("llama");
    let file = GgufFile::open(&gguf).unwrap();
    let expected_bytes = std::fs::read(dir.path().join("expected.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&expected_bytes).unwrap();
    let mut encodings = BTreeSet::new();
    for tensor in &file.tensors {
        let view = expected.tensor(&tensor.name).unwrap();
        assert_eq!(view.shape(), tensor.shape().as_slice(), "{}", tensor.name);
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got = file.dequantize(tensor);
        let differing = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differing,
            0,
            "{} ({}): {differing} values differ",
            tensor.name,
            tensor.kind.name()
        );
        encodings.insert(tensor.kind.name());
    }
    let all = [
        "BF16", "F16", "F32", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
        "Q6_K", "Q8_0",
    ];
    assert_eq!(encodings, all.into_iter().collect());
}

/// Llama (q/k rows un-permuted, BOS added, Llama 3's split) and Qwen2 (biases, no
/// permutation, single-digit split), all encodings mixed in one model.
#[test]
fn tiny_models_compute_what_transformers_computes_from_the_gguf() {
    let tokens = [1, 50, 100, 150, 200, 260, 270, 274, 2];
    let texts = [
        "the cat sat on 12 mats <think>",
        "<|im_start|>user\n  hi 123!<|im_end|>\n",
        "naïve café\t\ttabs",
    ];
    for arch in ["llama", "qwen2"] {
        let (dir, gguf) = tiny(arch);
        let out = dir.path().join("hf");
        let summary = import(&gguf, &out);
        assert_eq!(summary["model"]["architecture"], arch);
        let reference = reference(&gguf, &tokens, &texts);
        let diff = max_abs_diff(&our_logits(&out, &tokens), &reference["logits"]);
        eprintln!("{arch}: max |logit difference| {diff:e}");
        assert!(
            diff < LOGIT_TOLERANCE,
            "{arch}: max abs logit difference {diff}"
        );
        assert_same_encodings(&out, &texts, &reference);
    }
}

#[test]
fn smollm2_imports_deterministically_and_matches_transformers() {
    let gguf = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let (out, again) = (dir.path().join("smollm2"), dir.path().join("again"));
    let started = std::time::Instant::now();
    let summary = import(&gguf, &out);
    eprintln!("import took {:?}", started.elapsed());
    assert_eq!(summary["model"]["parameters"], 134_515_008);
    assert_eq!(
        summary["model"]["encodings"],
        serde_json::json!({"F32": 61, "Q4_1": 210, "Q8_0": 1})
    );
    import(&gguf, &again);
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            common::sha256_file(&out.join(name)),
            common::sha256_file(&again.join(name)),
            "{name} differs"
        );
    }

    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(
        (
            config["num_key_value_heads"].as_i64(),
            config["eos_token_id"].as_i64()
        ),
        (Some(3), Some(2))
    );
    let tokenizer_config: Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tokenizer_config["eos_token"], "<|im_end|>");
    assert!(tokenizer_config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    // The chat prompt of "What is the capital of France?" as transformers renders it.
    let tokens = [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2,
    ];
    let texts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "In 2024, 3.14 apples cost $12.50 -- naïve café, 東京 🙂",
        "fn main() {\n    println!(\"hi\");\n}\n\n\n  trailing  ",
    ];
    let reference = reference(&gguf, &tokens, &texts);
    let diff = max_abs_diff(&our_logits(&out, &tokens), &reference["logits"]);
    eprintln!("SmolLM2: max |logit difference| {diff:e}");
    assert!(diff < LOGIT_TOLERANCE, "max abs logit difference {diff}");
    assert_same_encodings(&out, &texts, &reference);
}

#[tokio::test]
async fn import_registers_the_model_as_a_base_model() -> anyhow::Result<()> {
    let (dir, gguf) = tiny("llama");
    let app = TestApp::spawn().await?;
    let out = dir.path().join("hf");
    let mut import = Command::new(control_plane_bin());
    import
        .args(["models", "import"])
        .arg(&gguf)
        .arg("--out")
        .arg(&out)
        .args(["--api", &app.base_url]);
    let stdout = run_ok_async(import).await;
    let report: Value = serde_json::from_str(&stdout)?;
    // The name comes from the file: tiny-llama.gguf.
    assert_eq!(report["registered"]["name"], "tiny-llama");
    let (code, row) = app.get_json("/v1/base-models/tiny-llama").await?;
    assert_eq!(code, 200, "{row}");
    assert_eq!(
        row["uri"],
        format!("file://{}", out.canonicalize()?.display())
    );
    assert_eq!(row["format"], "hf-safetensors");

    // A job can train on it by name.
    let train = dir.path().join("train.jsonl");
    std::fs::write(
        &train,
        "{\"text\": \"the cat sat on the mat\"}\n{\"text\": \"the cat sat on 12 mats\"}\n",
    )?;
    let job = serde_json::json!({
        "adapter_name": "on-gguf",
        "base_model": "tiny-llama",
        "dataset": {"train": format!("file://{}", train.display())},
        "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 2, "learning_rate": 0.001, "batch_size": 2, "seq_len": 16, "seed": 0}
    });
    let done = app.run_job(&job).await?;
    assert_eq!(done["adapter_version"]["version"], 1);
    app.stop().await
}

#[test]
fn broken_and_unsupported_files_are_refused_with_the_reason() {
    let (dir, gguf) = tiny("llama");
    let bytes = std::fs::read(&gguf).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let not_gguf = dir.path().join("not.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 a zip file").unwrap();
    for (file, reason) in [
        (truncated, "outside the file"),
        (not_gguf, "not a GGUF file"),
    ] {
        let out = Command::new(control_plane_bin())
            .args(["models", "import"])
            .arg(&file)
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(reason),
            "{}: {stderr}",
            file.display()
        );
    }
}
