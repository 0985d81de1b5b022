//! `loraforge-trainer fixture`: a tiny random-weight Llama in the Hugging Face layout, with a
//! real byte-level BPE tokenizer trained on a generated corpus, and that corpus as a dataset
//! full of regularities a LoRA can learn in a few dozen steps. Deterministic per seed.

use anyhow::{anyhow, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

const HIDDEN: i64 = 64;
const INTERMEDIATE: i64 = 128;
const LAYERS: i64 = 2;
const HEADS: i64 = 4;
const KV_HEADS: i64 = 2;
const HEAD_DIM: i64 = HIDDEN / HEADS;
const MAX_POSITIONS: i64 = 2048;
const VOCAB_TARGET: usize = 384;
const TRAIN_LINES: usize = 400;
const VALIDATION_LINES: usize = 50;
const SPECIAL_TOKENS: [&str; 3] = ["<s>", "</s>", "<pad>"];
/// Std of the random projections, Hugging Face's `initializer_range`.
const INIT_STD: f64 = 0.02;
/// Embeddings and value projections start small, so that a LoRA on the attention path can
/// outweigh the base's residual stream within a few dozen steps at lr 1e-3, as a test needs;
/// with everything at `INIT_STD`, q/v LoRA moves the loss by only a few percent in 30 steps.
const EMBED_STD: f64 = 0.002;
const VALUE_STD: f64 = 0.002;
/// A wide output head (~1.5/sqrt(hidden)) lets the logits move at all; at `INIT_STD` they
/// stay within about ±1 of uniform whatever the adapter does.
const HEAD_STD: f64 = 0.18;

/// Writes `out/model` (config, weights, tokenizer) and `out/data/{train,validation}.jsonl`.
pub fn write_fixture(out: &Path, seed: u64) -> Result<()> {
    let model_dir = out.join("model");
    let data_dir = out.join("data");
    std::fs::create_dir_all(&model_dir)?;
    std::fs::create_dir_all(&data_dir)?;

    let mut rng = StdRng::seed_from_u64(seed);
    let train: Vec<String> = (0..TRAIN_LINES).map(|_| sentence(&mut rng)).collect();
    let validation: Vec<String> = (0..VALIDATION_LINES).map(|_| sentence(&mut rng)).collect();
    write_jsonl(&data_dir.join("train.jsonl"), &train)?;
    write_jsonl(&data_dir.join("validation.jsonl"), &validation)?;

    let tokenizer = train_tokenizer(&train)?;
    tokenizer
        .save(model_dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("saving tokenizer.json: {e}"))?;
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| anyhow!("tokenizer lost {token}"))
    };
    let (bos, eos, pad) = (
        id(SPECIAL_TOKENS[0])?,
        id(SPECIAL_TOKENS[1])?,
        id(SPECIAL_TOKENS[2])?,
    );
    let vocab_size = tokenizer.get_vocab_size(true) as i64;

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": INIT_STD,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    });
    std::fs::write(
        model_dir.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "model_max_length": MAX_POSITIONS,
    });
    std::fs::write(
        model_dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tokenizer_config)?,
    )?;

    tch::manual_seed(seed as i64);
    Tensor::write_safetensors(
        &random_weights(vocab_size),
        model_dir.join("model.safetensors"),
    )?;
    Ok(())
}

/// A GPT-2 style byte-level BPE: every byte is in the vocabulary, so any text encodes.
fn train_tokenizer(corpus: &[String]) -> Result<Tokenizer> {
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_post_processor(Some(ByteLevel::default().trim_offsets(false).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(VOCAB_TARGET)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    Ok(tokenizer.into())
}

/// Weights drawn from the global libtorch generator (seeded by the caller), HF names.
fn random_weights(vocab_size: i64) -> Vec<(String, Tensor)> {
    let normal = |shape: &[i64], std: f64| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std;
    let ones = |n: i64| Tensor::ones([n], (Kind::Float, Device::Cpu));
    let (q_out, kv_out) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut weights = vec![(
        "model.embed_tokens.weight".to_string(),
        normal(&[vocab_size, HIDDEN], EMBED_STD),
    )];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        weights.extend([
            (format!("{p}.input_layernorm.weight"), ones(HIDDEN)),
            (
                format!("{p}.self_attn.q_proj.weight"),
                normal(&[q_out, HIDDEN], INIT_STD),
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                normal(&[kv_out, HIDDEN], INIT_STD),
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                normal(&[kv_out, HIDDEN], VALUE_STD),
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                normal(&[HIDDEN, q_out], INIT_STD),
            ),
            (format!("{p}.post_attention_layernorm.weight"), ones(HIDDEN)),
            (
                format!("{p}.mlp.gate_proj.weight"),
                normal(&[INTERMEDIATE, HIDDEN], INIT_STD),
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                normal(&[INTERMEDIATE, HIDDEN], INIT_STD),
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                normal(&[HIDDEN, INTERMEDIATE], INIT_STD),
            ),
        ]);
    }
    weights.push(("model.norm.weight".to_string(), ones(HIDDEN)));
    weights.push((
        "lm_head.weight".to_string(),
        normal(&[vocab_size, HIDDEN], HEAD_STD),
    ));
    weights
}

const NAMES: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank"];
const ANIMALS: &[&str] = &["cat", "dog", "bird", "fox", "horse"];
const OBJECTS: &[&str] = &["mat", "box", "chair", "table", "rug"];
const COLORS: &[&str] = &["red", "blue", "green", "yellow"];
const FRUITS: &[&str] = &["apple", "pear", "plum", "lemon"];
const NUMBERS: &[&str] = &[
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// One line of the corpus: a few templates with small vocabularies, and counting sequences,
/// so the next token is often predictable from the last few.
fn sentence(rng: &mut StdRng) -> String {
    let pick = |rng: &mut StdRng, words: &[&'static str]| *words.choose(rng).unwrap_or(&"");
    match rng.random_range(0..4) {
        0 => format!(
            "the {} {} sat on the {}.",
            pick(rng, COLORS),
            pick(rng, ANIMALS),
            pick(rng, OBJECTS)
        ),
        1 => {
            let n = rng.random_range(0..NUMBERS.len() - 1);
            let (who, other, fruit) = (pick(rng, NAMES), pick(rng, NAMES), pick(rng, FRUITS));
            format!(
                "{who} has {} {fruit}s and {other} has {} {fruit}s.",
                NUMBERS[n],
                NUMBERS[n + 1]
            )
        }
        2 => {
            let start = rng.random_range(0..NUMBERS.len() / 2);
            let len = rng.random_range(3..=NUMBERS.len() - start);
            format!("count: {}.", NUMBERS[start..start + len].join(" "))
        }
        _ => {
            let len = rng.random_range(4..=12);
            let start = rng.random_range(0..=26 - len);
            let letters: Vec<String> = (start..start + len)
                .map(|i| ((b'a' + i as u8) as char).to_string())
                .collect();
            format!("letters: {}", letters.join(" "))
        }
    }
}

fn write_jsonl(path: &Path, texts: &[String]) -> Result<()> {
    let lines: String = texts
        .iter()
        .map(|t| format!("{}\n", json!({ "text": t })))
        .collect();
    std::fs::write(path, lines)?;
    Ok(())
}
