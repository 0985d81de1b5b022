//! A Llama-family decoder (Llama, Mistral, Qwen2) in libtorch, following Hugging Face's
//! `LlamaForCausalLM` op for op so that logits match it. Base weights are frozen; every
//! linear layer has a slot for a trainable adapter branch.

use crate::config::ModelConfig;
use crate::error::user_error;
use crate::weights::load_model_weights;
use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The dtype of the frozen base: bf16 where the hardware makes it fast, fp32 on the CPU.
pub fn base_kind(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// The device and base dtype in words, for logs and manifests: `cpu fp32`, `cuda:0 bf16`.
pub fn device_label(device: Device) -> String {
    let dtype = if base_kind(device) == Kind::BFloat16 { "bf16" } else { "fp32" };
    match device {
        Device::Cuda(index) => format!("cuda:{index} {dtype}"),
        other => format!("{} {dtype}", format!("{other:?}").to_lowercase()),
    }
}

/// A trainable branch added to the output of a frozen linear layer (LoRA and its relatives).
pub trait LinearAdapter {
    /// The branch's contribution for input `x`, in `x`'s dtype.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;
}

/// `y = x W^T + b`, plus the adapter branch if one is attached.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias, adapter: None }
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn attach(&mut self, adapter: Box<dyn LinearAdapter>) {
        self.adapter = Some(adapter);
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.adapter {
            Some(adapter) => y + adapter.forward(x, train),
            None => y,
        }
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

pub struct LlamaModel {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// Base weights by their Hugging Face names, handed out once each with their shape checked.
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = self.0.remove(name).ok_or_else(|| user_error(format!("model weights have no tensor {name}")))?;
        if tensor.size() != shape {
            return Err(user_error(format!(
                "model weight {name} has shape {:?}, but config.json implies {shape:?}",
                tensor.size()
            )));
        }
        Ok(tensor)
    }

    fn linear(&mut self, prefix: &str, out: i64, inp: i64, bias: bool) -> Result<Linear> {
        let weight = self.take(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias { Some(self.take(&format!("{prefix}.bias"), &[out])?) } else { None };
        Ok(Linear::new(weight, bias))
    }
}

impl LlamaModel {
    /// Loads the base weights of a Hugging Face model directory onto `device`, frozen.
    pub fn load(model_dir: &Path, config: ModelConfig, device: Device) -> Result<LlamaModel> {
        let weights = load_model_weights(model_dir, device, base_kind(device))?;
        Self::from_weights(config, weights)
    }

    fn from_weights(config: ModelConfig, weights: HashMap<String, Tensor>) -> Result<LlamaModel> {
        let mut weights = Weights(weights);
        let c = &config;
        let (hidden, q_out, kv_out) =
            (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let embed_tokens = weights.take("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: weights.take(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                self_attn: Attention {
                    q_proj: weights.linear(&format!("{p}.self_attn.q_proj"), q_out, hidden, c.qkv_bias)?,
                    k_proj: weights.linear(&format!("{p}.self_attn.k_proj"), kv_out, hidden, c.qkv_bias)?,
                    v_proj: weights.linear(&format!("{p}.self_attn.v_proj"), kv_out, hidden, c.qkv_bias)?,
                    o_proj: weights.linear(&format!("{p}.self_attn.o_proj"), hidden, q_out, c.o_bias)?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                post_attention_layernorm: weights.take(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                mlp: Mlp {
                    gate_proj: weights.linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, hidden, false)?,
                    up_proj: weights.linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, hidden, false)?,
                    down_proj: weights.linear(&format!("{p}.mlp.down_proj"), hidden, c.intermediate_size, false)?,
                },
            });
        }
        let norm = weights.take("model.norm.weight", &[hidden])?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            weights.take("lm_head.weight", &[c.vocab_size, hidden])?
        };
        Ok(LlamaModel { config, embed_tokens, layers, norm, lm_head })
    }

    /// The linear layers whose short name (`q_proj`, `down_proj`, …) is in `modules`, each
    /// with its Hugging Face module path (`model.layers.0.self_attn.q_proj`), layer by layer.
    pub fn linears_mut<'a, S: AsRef<str>>(
        &'a mut self,
        modules: &'a [S],
    ) -> impl Iterator<Item = (String, &'a mut Linear)> + 'a {
        self.layers.iter_mut().enumerate().flat_map(move |(i, layer)| {
            layer
                .named_linears_mut()
                .into_iter()
                .filter(|(_, name, _)| modules.iter().any(|m| m.as_ref() == *name))
                .map(move |(block, name, linear)| (format!("model.layers.{i}.{block}.{name}"), linear))
        })
    }

    /// Logits `(batch, seq, vocab)` in the base dtype for token ids `(batch, seq)`.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let seq_len = input_ids.size()[1];
        let mut hidden = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let (cos, sin) = self.rotary_tables(seq_len, hidden.kind(), hidden.device());
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &cos, &sin, self.config.rms_norm_eps, train);
        }
        let hidden = rms_norm(&hidden, &self.norm, self.config.rms_norm_eps);
        hidden.linear::<Tensor>(&self.lm_head, None)
    }

    /// cos/sin tables `(seq, head_dim)` computed in fp32, then cast, as Hugging Face does.
    fn rotary_tables(&self, seq_len: i64, kind: Kind, device: Device) -> (Tensor, Tensor) {
        let dim = self.config.head_dim;
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
        let inv_freq = Tensor::pow_scalar(self.config.rope_theta, &exponents).reciprocal();
        let positions = Tensor::arange(seq_len, (Kind::Float, device));
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        (angles.cos().to_kind(kind), angles.sin().to_kind(kind))
    }
}

impl DecoderLayer {
    fn named_linears_mut(&mut self) -> [(&'static str, &'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn", "q_proj", &mut a.q_proj),
            ("self_attn", "k_proj", &mut a.k_proj),
            ("self_attn", "v_proj", &mut a.v_proj),
            ("self_attn", "o_proj", &mut a.o_proj),
            ("mlp", "gate_proj", &mut m.gate_proj),
            ("mlp", "up_proj", &mut m.up_proj),
            ("mlp", "down_proj", &mut m.down_proj),
        ]
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, eps: f64, train: bool) -> Tensor {
        let attended = self.self_attn.forward(&rms_norm(x, &self.input_layernorm, eps), cos, sin, train);
        let x = x + attended;
        let mlp_in = rms_norm(&x, &self.post_attention_layernorm, eps);
        let mlp = &self.mlp;
        let gated = mlp.gate_proj.forward(&mlp_in, train).silu() * mlp.up_proj.forward(&mlp_in, train);
        x + mlp.down_proj.forward(&gated, train)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let (batch, seq) = (size[0], size[1]);
        let heads = |proj: &Linear, n: i64| proj.forward(x, train).view([batch, seq, n, self.head_dim]).transpose(1, 2);
        let q = apply_rotary(&heads(&self.q_proj, self.heads), cos, sin);
        let k = apply_rotary(&heads(&self.k_proj, self.kv_heads), cos, sin);
        let v = heads(&self.v_proj, self.kv_heads);
        let grouped = self.kv_heads != self.heads;
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, grouped);
        let out = out.transpose(1, 2).reshape([batch, seq, self.heads * self.head_dim]);
        self.o_proj.forward(&out, train)
    }
}

/// Hugging Face's RMSNorm: normalise in fp32, cast back, then scale.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let variance = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    weight * (xf * (variance + eps).rsqrt()).to_kind(x.kind())
}

/// RoPE in the `rotate_half` convention (the halves of the head dimension are the pairs).
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
    x * cos + rotated * sin
}
