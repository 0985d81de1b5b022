//! GGUF to the Hugging Face layout the trainer loads: `config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`.
//!
//! Weights are written as f32: every GGUF encoding (F16, BF16, the block quantizations)
//! dequantizes to f32 exactly, so the converted model computes what llama.cpp and
//! transformers compute from the same file, and the trainer casts to bf16 on GPUs itself.
//! Writing bf16 instead would halve the files but round most dequantized values again.

use crate::gguf::{GgufFile, MetaValue, TensorInfo};
use crate::tokenizer::{self, SpecialTokens};
use crate::ModelsError;
use safetensors::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// What an import produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    /// `general.architecture` (`llama`, `qwen2`).
    pub architecture: String,
    /// `general.name`, where the file has one.
    pub model_name: Option<String>,
    pub parameters: u64,
    /// How many tensors the file stored in each encoding, e.g. `{"Q4_1": 210, "F32": 61}`.
    pub encodings: BTreeMap<String, usize>,
    pub vocab_size: usize,
    pub files: Vec<String>,
}

/// The decoder families we convert, and how their GGUF differs from the HF checkpoint.
#[derive(Clone, Copy, PartialEq)]
enum Family {
    /// llama.cpp's converter permuted the rows of q/k for its RoPE layout (interleaved pairs);
    /// HF rotates halves, so the permutation is undone.
    Llama,
    /// Stored in HF's row order (llama.cpp runs it with NeoX-style RoPE); q/k/v have biases.
    Qwen2,
}

/// Hyper-parameters from the `<arch>.*` metadata keys.
struct Shape {
    hidden: i64,
    intermediate: i64,
    layers: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    context: i64,
    rms_eps: f64,
    rope_theta: f64,
}

/// Converts `gguf_path` into a Hugging Face model directory `out` (created if missing; the
/// four files are overwritten). The result is deterministic: the same file gives the same bytes.
pub fn import_gguf(gguf_path: &Path, out: &Path) -> Result<ImportSummary, ModelsError> {
    let gguf = GgufFile::open(gguf_path)?;
    let arch = gguf
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .unwrap_or("")
        .to_string();
    let family = match arch.as_str() {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(ModelsError::Unsupported(format!(
                "architecture {other:?}; supported: llama (Llama, Mistral, SmolLM, ...), qwen2"
            )))
        }
    };
    let shape = read_shape(&gguf, &arch)?;
    let tokenizer = tokenizer::build(&gguf)?;
    let tensors = plan_tensors(&gguf, family, &shape)?;
    let embeddings = gguf
        .tensor("token_embd.weight")
        .ok_or_else(|| missing("token_embd.weight"))?;
    let vocab_size = embeddings.dims.get(1).copied().unwrap_or(0) as usize;
    if vocab_size != tokenizer.vocab_size {
        return Err(ModelsError::Format(format!(
            "token_embd has {vocab_size} rows but the vocabulary {} tokens",
            tokenizer.vocab_size
        )));
    }
    let tied = gguf.tensor("output.weight").is_none();

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelsError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let special_ids = special_ids(&tokenizer.tokenizer, &tokenizer.special);
    let config = config_json(family, &shape, vocab_size, tied, &special_ids);
    write_json(&out.join(CONFIG_FILE), &config)?;

    let weights_path = out.join(WEIGHTS_FILE);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors
        .iter()
        .map(|(name, plan)| (name.as_str(), LazyTensor { gguf: &gguf, plan }));
    safetensors::serialize_to_file(views, Some(metadata), &weights_path).map_err(|e| {
        ModelsError::Write {
            path: weights_path.clone(),
            reason: e.to_string(),
        }
    })?;

    let tokenizer_path = out.join(TOKENIZER_FILE);
    tokenizer
        .tokenizer
        .save(&tokenizer_path, true)
        .map_err(|e| ModelsError::Write {
            path: tokenizer_path.clone(),
            reason: e.to_string(),
        })?;
    let chat_template = gguf
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str);
    write_json(
        &out.join(TOKENIZER_CONFIG_FILE),
        &tokenizer_config_json(&tokenizer.special, chat_template, &shape),
    )?;

    let mut encodings = BTreeMap::new();
    for t in &gguf.tensors {
        *encodings.entry(t.kind.name().to_string()).or_insert(0) += 1;
    }
    Ok(ImportSummary {
        architecture: arch,
        model_name: gguf
            .get("general.name")
            .and_then(MetaValue::as_str)
            .map(str::to_string),
        parameters: gguf.tensors.iter().map(|t| t.elements() as u64).sum(),
        encodings,
        vocab_size,
        files: [
            CONFIG_FILE,
            WEIGHTS_FILE,
            TOKENIZER_FILE,
            TOKENIZER_CONFIG_FILE,
        ]
        .map(str::to_string)
        .to_vec(),
    })
}

fn missing(name: &str) -> ModelsError {
    ModelsError::Format(format!("the file has no tensor {name}"))
}

fn read_shape(gguf: &GgufFile, arch: &str) -> Result<Shape, ModelsError> {
    let key = |name: &str| format!("{arch}.{name}");
    let int = |name: &str| -> Result<Option<i64>, ModelsError> {
        match gguf.get(&key(name)) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(ModelsError::Format(format!(
                    "{} is {v:?}, not a positive integer",
                    key(name)
                ))),
            },
        }
    };
    let required = |name: &str| {
        int(name)?.ok_or_else(|| ModelsError::Format(format!("no {} in the metadata", key(name))))
    };
    let float = |name: &str| gguf.get(&key(name)).and_then(MetaValue::as_f64);

    let hidden = required("embedding_length")?;
    let heads = required("attention.head_count")?;
    let head_dim = match int("attention.key_length")? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(ModelsError::Format(format!(
                "embedding_length {hidden} is not a multiple of {heads} heads"
            )))
        }
    };
    if let Some(rotary) = int("rope.dimension_count")? {
        if rotary != head_dim {
            return Err(ModelsError::Unsupported(format!(
                "partial rotary embeddings ({rotary} of {head_dim} dimensions per head)"
            )));
        }
    }
    if let Some(scaling) = gguf
        .get(&key("rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        if scaling != "none" {
            return Err(ModelsError::Unsupported(format!(
                "RoPE scaling {scaling:?}"
            )));
        }
    }
    if gguf.tensor("rope_freqs.weight").is_some() {
        return Err(ModelsError::Unsupported(
            "RoPE frequency factors (rope_freqs, Llama 3.1 scaling)".into(),
        ));
    }
    Ok(Shape {
        hidden,
        intermediate: required("feed_forward_length")?,
        layers: required("block_count")?,
        heads,
        kv_heads: int("attention.head_count_kv")?.unwrap_or(heads),
        head_dim,
        context: required("context_length")?,
        rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
    })
}

/// How one HF tensor is made from a GGUF tensor.
struct TensorPlan<'a> {
    source: &'a TensorInfo,
    /// Undo llama.cpp's q/k row permutation with this many heads.
    unpermute_heads: Option<usize>,
    shape: Vec<usize>,
}

/// Every GGUF tensor's HF name and conversion, sorted by name. A tensor we do not know is an
/// error rather than silently dropped: it would mean an architecture variant we do not model.
fn plan_tensors<'a>(
    gguf: &'a GgufFile,
    family: Family,
    shape: &Shape,
) -> Result<BTreeMap<String, TensorPlan<'a>>, ModelsError> {
    let mut plans = BTreeMap::new();
    for tensor in &gguf.tensors {
        let (name, role) = hf_name(&tensor.name).ok_or_else(|| {
            ModelsError::Unsupported(format!(
                "tensor {} (not part of a Llama-family decoder)",
                tensor.name
            ))
        })?;
        if tensor.dims.len() > 2 {
            return Err(ModelsError::Unsupported(format!(
                "tensor {} has {} dimensions",
                tensor.name,
                tensor.dims.len()
            )));
        }
        let heads = match (family, role) {
            (Family::Llama, Role::Query) => Some(shape.heads),
            (Family::Llama, Role::Key) => Some(shape.kv_heads),
            _ => None,
        };
        let unpermute_heads = match heads {
            Some(h) => {
                let rows = tensor.shape()[0] as i64;
                if rows != h * shape.head_dim {
                    return Err(ModelsError::Format(format!(
                        "tensor {} has {rows} rows, expected {h} heads of {}",
                        tensor.name, shape.head_dim
                    )));
                }
                Some(h as usize)
            }
            None => None,
        };
        let plan = TensorPlan {
            source: tensor,
            unpermute_heads,
            shape: tensor.shape(),
        };
        if plans.insert(name.clone(), plan).is_some() {
            return Err(ModelsError::Format(format!("two tensors map to {name}")));
        }
    }
    for i in 0..shape.layers {
        for part in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ] {
            let name = format!("model.layers.{i}.{part}.weight");
            if !plans.contains_key(&name) {
                return Err(ModelsError::Format(format!(
                    "the file has no tensor for {name}"
                )));
            }
        }
    }
    if family == Family::Qwen2 && !plans.contains_key("model.layers.0.self_attn.q_proj.bias") {
        return Err(ModelsError::Format(
            "a qwen2 model without q/k/v biases".into(),
        ));
    }
    Ok(plans)
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Query,
    Key,
    Other,
}

/// llama.cpp's tensor names (`gguf-py/gguf/tensor_mapping.py`) to Hugging Face's.
fn hf_name(gguf_name: &str) -> Option<(String, Role)> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), Role::Other));
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (hf, role) = match part {
        "attn_norm" => ("input_layernorm", Role::Other),
        "ffn_norm" => ("post_attention_layernorm", Role::Other),
        "attn_q" => ("self_attn.q_proj", Role::Query),
        "attn_k" => ("self_attn.k_proj", Role::Key),
        "attn_v" => ("self_attn.v_proj", Role::Other),
        "attn_output" => ("self_attn.o_proj", Role::Other),
        "ffn_gate" => ("mlp.gate_proj", Role::Other),
        "ffn_up" => ("mlp.up_proj", Role::Other),
        "ffn_down" => ("mlp.down_proj", Role::Other),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), role))
}

/// A tensor dequantized only when the writer asks for its bytes, so converting needs memory
/// for one tensor at a time rather than the whole f32 model.
struct LazyTensor<'a> {
    gguf: &'a GgufFile,
    plan: &'a TensorPlan<'a>,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.gguf.dequantize(self.plan.source);
        let values = match self.plan.unpermute_heads {
            Some(heads) => unpermute_rows(&values, self.plan.shape[0], heads),
            None => values,
        };
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.plan.source.elements() * 4
    }
}

/// Inverts llama.cpp's `permute` (convert_hf_to_gguf.py): within each head it stored row
/// `2 i + s` for HF row `s * head_dim / 2 + i` (s = 0, 1), interleaving the two rotary halves.
fn unpermute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let to = h * head_dim + s * half + i;
                let from = h * head_dim + 2 * i + s;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Special token ids for config.json, from the tokens the tokenizer config names.
fn special_ids(
    tokenizer: &tokenizers::Tokenizer,
    special: &SpecialTokens,
) -> BTreeMap<&'static str, u32> {
    [
        ("bos_token_id", &special.bos),
        ("eos_token_id", &special.eos),
        ("pad_token_id", &special.pad),
    ]
    .into_iter()
    .filter_map(|(key, token)| {
        token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .map(|id| (key, id))
    })
    .collect()
}

fn config_json(
    family: Family,
    s: &Shape,
    vocab_size: usize,
    tied: bool,
    ids: &BTreeMap<&str, u32>,
) -> Value {
    let (architecture, model_type) = match family {
        Family::Llama => ("LlamaForCausalLM", "llama"),
        Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.context,
        "rms_norm_eps": s.rms_eps,
        "rope_theta": s.rope_theta,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    });
    if family == Family::Llama {
        config["attention_bias"] = json!(false);
        config["mlp_bias"] = json!(false);
    } else {
        config["use_sliding_window"] = json!(false);
    }
    for (key, id) in ids {
        config[*key] = json!(id);
    }
    config
}

fn tokenizer_config_json(
    special: &SpecialTokens,
    chat_template: Option<&str>,
    shape: &Shape,
) -> Value {
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": special.add_bos,
        "add_eos_token": special.add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": shape.context,
    });
    for (key, token) in [
        ("bos_token", &special.bos),
        ("eos_token", &special.eos),
        ("pad_token", &special.pad),
        ("unk_token", &special.unk),
    ] {
        if let Some(token) = token {
            config[key] = json!(token);
        }
    }
    if let Some(template) = chat_template {
        config["chat_template"] = json!(template);
    }
    config
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelsError> {
    let write_error = |reason: String| ModelsError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| write_error(e.to_string()))?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permutation, as convert_hf_to_gguf.py writes it with numpy.
    fn permute(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
        let cols = values.len() / rows;
        let half = rows / heads / 2;
        let mut out = vec![0f32; values.len()];
        // reshape(heads, 2, half, cols).swapaxes(1, 2): row (h, s, i) moves to (h, i, s).
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..half {
                    let from = (h * 2 + s) * half + i;
                    let to = (h * half + i) * 2 + s;
                    out[to * cols..(to + 1) * cols]
                        .copy_from_slice(&values[from * cols..(from + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let stored = permute(&values, rows, heads);
        assert_ne!(stored, values);
        assert_eq!(unpermute_rows(&stored, rows, heads), values);
        // Head 0 of the file interleaves the halves: rows 0, 4, 1, 5, ... of HF's.
        assert_eq!(stored[cols], values[4 * cols]);
    }

    #[test]
    fn names_map_to_hugging_face() {
        let (name, role) = hf_name("blk.12.attn_k.bias").unwrap();
        assert_eq!(name, "model.layers.12.self_attn.k_proj.bias");
        assert!(role == Role::Key);
        assert_eq!(
            hf_name("output_norm.weight").unwrap().0,
            "model.norm.weight"
        );
        assert!(hf_name("blk.0.attn_qkv.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
