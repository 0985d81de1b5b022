//! The architecture of a Llama-family model, read from its Hugging Face `config.json` as
//! transformers reads it: both the 4.x layout (`rope_theta`, `rope_scaling`) and the 5.x one
//! (`rope_parameters`), with transformers' per-architecture defaults for absent keys.

use crate::error::user_error;
use anyhow::Result;
use loraforge_spec::model::ModelConfigSummary;
use serde_json::{Map, Value};
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
    pub rope_scaling: RopeScaling,
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
    /// Attention window of the layers that restrict it (Mistral: all; Qwen2: those that
    /// `layer_types` or `max_window_layers` name); a query sees itself and the window-1 before it.
    pub sliding_window: Option<i64>,
    /// Per layer, whether `sliding_window` applies to it.
    pub sliding_layers: Vec<bool>,
}

/// How RoPE's inverse frequencies are rescaled for long contexts (`rope_type`), computed
/// exactly as transformers' `ROPE_INIT_FUNCTIONS` do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `default`: the frequencies `theta^(-2i/d)` as they are.
    None,
    /// `linear`: every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1+): wavelengths longer than `original_max_position_embeddings /
    /// low_freq_factor` are stretched by `factor`, shorter than `... / high_freq_factor` kept,
    /// and those in between interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
}

/// transformers' defaults for keys a config may leave out, where they differ by architecture.
struct ArchitectureDefaults {
    max_position_embeddings: i64,
    num_key_value_heads: Option<i64>,
    sliding_window: Option<i64>,
}

fn defaults(model_type: &str) -> ArchitectureDefaults {
    match model_type {
        "mistral" => ArchitectureDefaults {
            max_position_embeddings: 4096 * 32,
            num_key_value_heads: Some(8),
            sliding_window: Some(4096),
        },
        "qwen2" => ArchitectureDefaults {
            max_position_embeddings: 32768,
            num_key_value_heads: Some(32),
            sliding_window: Some(4096),
        },
        _ => ArchitectureDefaults {
            max_position_embeddings: 2048,
            num_key_value_heads: None,
            sliding_window: None,
        },
    }
}

/// Qwen2's default `max_window_layers`: layers from this index on slide when windows are on.
const QWEN2_MAX_WINDOW_LAYERS: i64 = 28;

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<ModelConfig> {
        let path = model_dir.join("config.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| user_error(format!("cannot read {}: {e}", path.display())))?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| user_error(format!("{} is not valid JSON: {e}", path.display())))?;
        Self::from_json(&json)
            .map_err(|message| user_error(format!("{}: {message}", path.display())))
    }

    /// Parses a config; the error says which key is missing or wrong.
    pub fn from_json(json: &Value) -> Result<ModelConfig, String> {
        let summary: ModelConfigSummary =
            serde_json::from_value(json.clone()).map_err(|e| format!("unexpected layout: {e}"))?;
        summary.check_supported()?;
        if !summary.architectures.is_empty()
            && !summary
                .architectures
                .iter()
                .any(|a| a.ends_with("ForCausalLM"))
        {
            return Err(format!(
                "architectures {:?} has no causal language model (…ForCausalLM); only those can be trained",
                summary.architectures
            ));
        }
        let model_type = summary.model_type.unwrap_or_default();
        let defaults = defaults(&model_type);

        let hidden_size = positive(json, "hidden_size")?;
        let num_hidden_layers = positive(json, "num_hidden_layers")?;
        let num_attention_heads = positive(json, "num_attention_heads")?;
        let num_key_value_heads = optional_positive(json, "num_key_value_heads")?
            .or(defaults.num_key_value_heads)
            .unwrap_or(num_attention_heads);
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
            return Err(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            ));
        }
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str) {
            // transformers maps both names to the same SiLU.
            if act != "silu" && act != "swish" {
                return Err(format!(
                    "hidden_act {act:?} is not supported; only \"silu\" (SwiGLU)"
                ));
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
        let max_position_embeddings = optional_positive(json, "max_position_embeddings")?
            .unwrap_or(defaults.max_position_embeddings);
        let (sliding_window, sliding_layers) =
            sliding_window(json, &model_type, num_hidden_layers, &defaults)?;
        let (rope_theta, rope_scaling) = rope(json, max_position_embeddings)?;
        Ok(ModelConfig {
            hidden_size,
            intermediate_size: positive(json, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: optional_number(json, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            vocab_size: positive(json, "vocab_size")?,
            tie_word_embeddings: flag(json, "tie_word_embeddings")?,
            qkv_bias,
            o_bias,
            max_position_embeddings,
            bos_token_id: token_id(json, "bos_token_id")?,
            eos_token_id: token_id(json, "eos_token_id")?,
            pad_token_id: token_id(json, "pad_token_id")?,
            sliding_window,
            sliding_layers,
            model_type,
        })
    }

    /// The longest sequence this model was built to attend over; RoPE positions beyond it
    /// were never trained. Sliding windows do not limit it: the decoder masks them.
    pub fn max_trainable_len(&self) -> i64 {
        self.max_position_embeddings
    }

    /// The attention window of layer `layer`, if it has one.
    pub fn window_of(&self, layer: usize) -> Option<i64> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }
}

/// The sliding window and the layers it applies to. Mistral slides every layer when
/// `sliding_window` is set (4096 if the key is absent, none if it is null); Qwen2 only with
/// `use_sliding_window`, on the layers `layer_types` marks, by default those from
/// `max_window_layers` on.
fn sliding_window(
    json: &Value,
    model_type: &str,
    layers: i64,
    defaults: &ArchitectureDefaults,
) -> Result<(Option<i64>, Vec<bool>), String> {
    let window = match json.get("sliding_window") {
        None => defaults.sliding_window,
        Some(_) => optional_positive(json, "sliding_window")?,
    };
    let none = (None, vec![false; layers as usize]);
    match model_type {
        "mistral" => Ok(match window {
            Some(w) => (Some(w), vec![true; layers as usize]),
            None => none,
        }),
        "qwen2" if flag(json, "use_sliding_window")? => {
            let Some(w) = window else { return Ok(none) };
            let sliding = match json.get("layer_types").filter(|v| !v.is_null()) {
                Some(types) => {
                    let types = types.as_array().filter(|t| t.len() == layers as usize).ok_or_else(|| {
                        format!("\"layer_types\" must list one type per layer ({layers}), got {types}")
                    })?;
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("sliding_attention") => Ok(true),
                            Some("full_attention") => Ok(false),
                            _ => {
                                Err(format!("\"layer_types\": {t} is not \"full_attention\" or \"sliding_attention\""))
                            }
                        })
                        .collect::<Result<Vec<bool>, String>>()?
                }
                None => {
                    let first = optional_positive(json, "max_window_layers")?
                        .unwrap_or(QWEN2_MAX_WINDOW_LAYERS);
                    (0..layers).map(|i| i >= first).collect()
                }
            };
            Ok((Some(w), sliding))
        }
        _ => Ok(none),
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

fn number(json: &Value, key: &str) -> Result<f64, String> {
    optional_number(json, key)?.ok_or_else(|| format!("missing {key:?}"))
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

/// RoPE's base frequency and scaling, resolved as transformers 5 does: a non-empty
/// `rope_scaling` (4.x) wins over `rope_parameters` (5.x); `rope_theta` comes from that
/// block, else the top level, else 10000; the type from `rope_type`, else `type`.
fn rope(json: &Value, max_position_embeddings: i64) -> Result<(f64, RopeScaling), String> {
    let empty = Map::new();
    let block_of = |key: &str| -> Result<Option<&Map<String, Value>>, String> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(format!("{key:?} must be an object, got {v}")),
        }
    };
    let (key, block) = match (block_of("rope_scaling")?, block_of("rope_parameters")?) {
        (Some(scaling), _) => ("rope_scaling", scaling),
        (None, Some(parameters)) => ("rope_parameters", parameters),
        (None, None) => ("rope_parameters", &empty),
    };
    let block_value = Value::Object(block.clone());
    let in_block = |e: String| format!("{key}: {e}");
    let theta = optional_number(&block_value, "rope_theta")
        .map_err(in_block)?
        .or(optional_number(json, "rope_theta")?)
        .unwrap_or(10_000.0);
    if let Some(partial) =
        optional_number(&block_value, "partial_rotary_factor").map_err(in_block)?
    {
        if partial != 1.0 {
            return Err(format!(
                "{key}: partial_rotary_factor {partial} is not supported"
            ));
        }
    }
    let kind = block
        .get("rope_type")
        .or_else(|| block.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: number(&block_value, "factor").map_err(in_block)? },
        "llama3" => {
            let factor = number(&block_value, "factor").map_err(in_block)?;
            let low_freq_factor = number(&block_value, "low_freq_factor").map_err(in_block)?;
            let high_freq_factor = number(&block_value, "high_freq_factor").map_err(in_block)?;
            if high_freq_factor <= low_freq_factor {
                return Err(format!(
                    "{key}: high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"
                ));
            }
            // A top-level value wins, as in transformers (Phi-3 style configs keep it there).
            let original_max_position_embeddings = optional_positive(json, "original_max_position_embeddings")?
                .or(optional_positive(&block_value, "original_max_position_embeddings").map_err(in_block)?)
                .unwrap_or(max_position_embeddings);
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }
        }
        other => {
            return Err(format!(
                "{key}: rope_type {other:?} is not supported; supported: \"default\", \"linear\", \"llama3\""
            ))
        }
    };
    Ok((theta, scaling))
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
        assert_eq!(
            (
                c.head_dim,
                c.rope_theta,
                c.eos_token_id,
                c.tie_word_embeddings
            ),
            (16, 10_000.0, Some(2), false)
        );
        assert_eq!(
            (c.rope_scaling, c.max_position_embeddings, c.sliding_window),
            (RopeScaling::None, 2048, None)
        );
        let mut v = llama();
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        v["model_type"] = json!("qwen2");
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(
            (c.rope_theta, c.qkv_bias, c.o_bias),
            (500000.0, true, false)
        );
        assert_eq!((c.max_position_embeddings, c.sliding_window), (32768, None));
    }

    /// Llama 3.1 as transformers 4 wrote it and as transformers 5 writes it: one model.
    #[test]
    fn llama3_rope_reads_from_both_layouts() {
        let expected = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let mut v4 = llama();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = llama();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192});
        for v in [v4, v5] {
            let c = ModelConfig::from_json(&v).unwrap();
            assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, expected));
        }
        // The pre-4.45 key `type`, and original_max_position_embeddings falling back to max_position_embeddings.
        let mut old = llama();
        old["rope_scaling"] =
            json!({"type": "llama3", "factor": 2, "low_freq_factor": 1, "high_freq_factor": 2});
        old["max_position_embeddings"] = json!(4096);
        let c = ModelConfig::from_json(&old).unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 2.0,
                low_freq_factor: 1.0,
                high_freq_factor: 2.0,
                original_max_position_embeddings: 4096
            }
        );
        let mut linear = llama();
        linear["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        assert_eq!(
            ModelConfig::from_json(&linear).unwrap().rope_scaling,
            RopeScaling::Linear { factor: 4.0 }
        );
    }

    #[test]
    fn sliding_windows_follow_each_architecture() {
        let mut mistral = llama();
        mistral["model_type"] = json!("mistral");
        mistral
            .as_object_mut()
            .unwrap()
            .remove("num_key_value_heads");
        mistral["num_attention_heads"] = json!(8);
        mistral["head_dim"] = json!(16);
        let c = ModelConfig::from_json(&mistral).unwrap();
        assert_eq!(
            (c.num_key_value_heads, c.sliding_window, c.window_of(1)),
            (8, Some(4096), Some(4096))
        );
        mistral["sliding_window"] = Value::Null;
        assert_eq!(ModelConfig::from_json(&mistral).unwrap().window_of(0), None);

        let mut qwen = llama();
        qwen["model_type"] = json!("qwen2");
        qwen["sliding_window"] = json!(32);
        assert_eq!(
            ModelConfig::from_json(&qwen).unwrap().sliding_window,
            None,
            "off without use_sliding_window"
        );
        qwen["use_sliding_window"] = json!(true);
        qwen["max_window_layers"] = json!(1);
        let c = ModelConfig::from_json(&qwen).unwrap();
        assert_eq!((c.window_of(0), c.window_of(1)), (None, Some(32)));
        qwen["layer_types"] = json!(["sliding_attention", "full_attention"]);
        let c = ModelConfig::from_json(&qwen).unwrap();
        assert_eq!((c.window_of(0), c.window_of(1)), (Some(32), None));
        assert_eq!(
            c.max_trainable_len(),
            32768,
            "windows are masked, not refused"
        );
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            ("model_type", json!("gpt2"), "not supported"),
            (
                "architectures",
                json!(["LlamaForSequenceClassification"]),
                "ForCausalLM",
            ),
            ("hidden_size", Value::Null, "missing \"hidden_size\""),
            (
                "num_key_value_heads",
                json!(3),
                "multiple of num_key_value_heads",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
                "missing \"low_freq_factor\"",
            ),
            (
                "rope_parameters",
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
                "must exceed low_freq_factor",
            ),
            (
                "rope_parameters",
                json!({"rope_type": "default", "partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
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
