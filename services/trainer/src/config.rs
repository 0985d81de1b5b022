//! The architecture of a Llama-family model, read from its Hugging Face `config.json`.

use crate::error::user_error;
use anyhow::Result;
use loraforge_spec::model::ModelConfigSummary;
use serde_json::Value;
use std::path::Path;

/// Everything the decoder needs to know about its shape, checked for consistency.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: i64,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2 always, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias too (Llama with `attention_bias`; Qwen2 never).
    pub o_bias: bool,
    pub max_position_embeddings: i64,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    /// Attention window, where the model restricts it; we only train sequences that fit in it.
    pub sliding_window: Option<i64>,
}

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<ModelConfig> {
        let path = model_dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| user_error(format!("cannot read {}: {e}", path.display())))?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| user_error(format!("{} is not valid JSON: {e}", path.display())))?;
        Self::from_json(&json).map_err(|message| user_error(format!("{}: {message}", path.display())))
    }

    /// Parses a config; the error says which key is missing or wrong.
    pub fn from_json(json: &Value) -> Result<ModelConfig, String> {
        let summary: ModelConfigSummary =
            serde_json::from_value(json.clone()).map_err(|e| format!("unexpected layout: {e}"))?;
        summary.check_supported()?;
        let model_type = summary.model_type.unwrap_or_default();

        let hidden_size = positive(json, "hidden_size")?;
        let num_attention_heads = positive(json, "num_attention_heads")?;
        let num_key_value_heads = optional_positive(json, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = match optional_positive(json, "head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}) and head_dim is not given"
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("head_dim ({head_dim}) must be even for rotary embeddings"));
        }
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(format!("hidden_act {act:?} is not supported; only \"silu\" (SwiGLU)"));
            }
        }
        if flag(json, "mlp_bias")? {
            return Err("mlp_bias = true is not supported".into());
        }
        let attention_bias = flag(json, "attention_bias")?;
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            "llama" => (attention_bias, attention_bias),
            _ => (false, false),
        };
        let sliding_window = match model_type.as_str() {
            "mistral" => optional_positive(json, "sliding_window")?,
            "qwen2" if flag(json, "use_sliding_window")? => optional_positive(json, "sliding_window")?,
            _ => None,
        };
        Ok(ModelConfig {
            hidden_size,
            intermediate_size: positive(json, "intermediate_size")?,
            num_hidden_layers: positive(json, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: optional_number(json, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta(json)?,
            vocab_size: positive(json, "vocab_size")?,
            tie_word_embeddings: flag(json, "tie_word_embeddings")?,
            qkv_bias,
            o_bias,
            max_position_embeddings: optional_positive(json, "max_position_embeddings")?.unwrap_or(i64::MAX),
            bos_token_id: token_id(json, "bos_token_id")?,
            eos_token_id: token_id(json, "eos_token_id")?,
            pad_token_id: token_id(json, "pad_token_id")?,
            sliding_window,
            model_type,
        })
    }

    /// The longest sequence this model attends over exactly as it was trained.
    pub fn max_trainable_len(&self) -> i64 {
        self.sliding_window.map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }
}

fn positive(json: &Value, key: &str) -> Result<i64, String> {
    optional_positive(json, key)?.ok_or_else(|| format!("missing {key:?}"))
}

fn optional_positive(json: &Value, key: &str) -> Result<Option<i64>, String> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("{key:?} must be a positive integer, got {v}")),
        },
    }
}

fn optional_number(json: &Value, key: &str) -> Result<Option<f64>, String> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(format!("{key:?} must be a positive number, got {v}")),
        },
    }
}

fn flag(json: &Value, key: &str) -> Result<bool, String> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("{key:?} must be true or false, got {v}")),
    }
}

/// A special token id; Llama 3 lists several end-of-sequence ids, and the first is the one we append.
fn token_id(json: &Value, key: &str) -> Result<Option<i64>, String> {
    let value = match json.get(key) {
        Some(Value::Array(ids)) => ids.first(),
        other => other,
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n)),
            _ => Err(format!("{key:?} must be a token id, got {v}")),
        },
    }
}

/// RoPE base frequency: `rope_theta` (transformers 4) or `rope_parameters.rope_theta`
/// (transformers 5). Only the unscaled ("default") rotary embedding is implemented.
fn rope_theta(json: &Value) -> Result<f64, String> {
    let params = json.get("rope_parameters").filter(|p| !p.is_null());
    let scaling = json.get("rope_scaling").filter(|p| !p.is_null());
    for (key, block) in [("rope_parameters", params), ("rope_scaling", scaling)] {
        if let Some(block) = block {
            let kind = block.get("rope_type").or_else(|| block.get("type")).and_then(Value::as_str);
            if let Some(kind) = kind.filter(|k| *k != "default") {
                return Err(format!("{key}: rope_type {kind:?} is not supported; only \"default\""));
            }
        }
    }
    let nested = match params {
        Some(p) => optional_number(p, "rope_theta").map_err(|e| format!("rope_parameters: {e}"))?,
        None => None,
    };
    Ok(nested.or(optional_number(json, "rope_theta")?).unwrap_or(10_000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
               "eos_token_id": [2, 7], "bos_token_id": 1})
    }

    #[test]
    fn defaults_follow_hugging_face() {
        let c = ModelConfig::from_json(&llama()).unwrap();
        assert_eq!((c.head_dim, c.rope_theta, c.eos_token_id, c.tie_word_embeddings), (16, 10_000.0, Some(2), false));
        let mut v = llama();
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        v["model_type"] = json!("qwen2");
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!((c.rope_theta, c.qkv_bias, c.o_bias), (500000.0, true, false));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            ("model_type", json!("gpt2"), "not supported"),
            ("hidden_size", Value::Null, "missing \"hidden_size\""),
            ("num_key_value_heads", json!(3), "multiple of num_key_value_heads"),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "yarn"),
            ("hidden_act", json!("gelu"), "gelu"),
        ];
        for (key, value, expected) in cases {
            let mut v = llama();
            v[key] = value;
            let err = ModelConfig::from_json(&v).unwrap_err();
            assert!(err.contains(expected), "{key}: {err}");
        }
    }
}
