//! `loraforge-trainer generate` on a real instruction-tuned model: SmolLM2-135M-Instruct,
//! imported from its GGUF, answers a question greedily; batching and sampling are reproducible.

mod common;

use common::{control_plane_bin, run_ok, smollm2_gguf, trainer_bin};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const QUESTION: &str = "What is the capital of France?";

fn generate(model: &Path, args: &[&str]) -> Vec<Value> {
    let stdout = run_ok(
        Command::new(trainer_bin())
            .args([
                "generate",
                "--device",
                "cpu",
                "--max-new-tokens",
                "12",
                "--model",
            ])
            .arg(model)
            .args(args),
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn smollm2_answers_greedily_and_batches_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("smollm2");
    run_ok(
        Command::new(control_plane_bin())
            .args(["models", "import"])
            .arg(smollm2_gguf())
            .arg("--out")
            .arg(&model),
    );

    let alone = generate(&model, &["--chat", QUESTION]);
    assert_eq!(alone.len(), 1);
    let answer = &alone[0];
    assert!(
        answer["text"].as_str().unwrap().contains("Paris"),
        "{answer}"
    );
    // It ends its turn: <|im_end|> (id 2) is the last token and not part of the text.
    assert_eq!(answer["finish_reason"], "stop", "{answer}");
    assert_eq!(
        answer["token_ids"].as_array().unwrap().last(),
        Some(&Value::from(2))
    );
    assert!(answer["prompt"]
        .as_str()
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));

    // Batched with a longer chat and a raw prompt (left padding, per-row stops), the answer
    // is the same tokens; rows come back in order.
    let batch = generate(
        &model,
        &[
            "--chat",
            "Name three primary colors, please, in one short sentence.",
            "--chat",
            QUESTION,
            "--prompt",
            "The capital of Italy is",
        ],
    );
    let indices: Vec<i64> = batch
        .iter()
        .map(|row| row["index"].as_i64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    assert_eq!(batch[1]["token_ids"], answer["token_ids"]);
    assert_eq!(batch[2]["prompt"], "The capital of Italy is");
    assert!(batch[2]["prompt_tokens"].as_u64().unwrap() < 10);

    // Sampling is seeded: the same seed draws the same text.
    let sampled = [
        "--chat",
        QUESTION,
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "11",
    ];
    assert_eq!(
        generate(&model, &sampled)[0]["token_ids"],
        generate(&model, &sampled)[0]["token_ids"]
    );
}
