//! A Llama-family decoder (Llama, Mistral, Qwen2) in libtorch, following Hugging Face's
//! `LlamaForCausalLM` op for op so that logits match it (tests/tests/parity.rs), with RoPE
//! scaling and sliding-window attention as transformers computes them. Base weights are
//! frozen; every linear layer has a slot for a trainable adapter branch.

use crate::error::user_error;
use crate::model::architecture::{ModelConfig, RopeScaling};
use crate::model::cuda_kernels;
use crate::model::device::base_kind;
use crate::model::weights::load_model_weights;
use anyhow::Result;
use layer_backward::LayerGraph;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

mod layer_backward;

/// A trainable branch added to the output of a frozen linear layer (LoRA and its relatives).
pub trait LinearAdapter {
    /// The branch's contribution for input `x`, in `x`'s dtype.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;

    /// `y + forward(x)` for `x (tokens, in)` and the frozen layer's output `y (tokens, out)`,
    /// which the adapter may take over: a branch that ends in a matrix product can accumulate
    /// into `y` in place (`addmm_`) instead of materialising its output and then adding it.
    /// A branch that is low-rank in this pass ([`LinearAdapter::low_rank`]) does so by default.
    fn add_to(&self, y: Tensor, x: &Tensor, train: bool) -> Tensor {
        match self.low_rank(train) {
            Some(branch) if y.kind() == x.kind() && branch.delta_gradient.is_none() => {
                branch.add_to(y, x)
            }
            _ => y + self.forward(x, train),
        }
    }

    /// A branch that is exactly `scaling * x A^T B^T` in this pass gives its factors, so that
    /// the branches of layers sharing an input can run as one product ([`Merged`]) and the
    /// layer's backward can run by hand (layer_backward.rs): plain LoRA without dropout, and
    /// the adaptive methods whose branch is a product of small factors (AdaLoRA's `A ⊙ E`, a
    /// gate, a nested or triangular core), which give factors derived from their parameters
    /// ([`LowRank::derived`]). Any other keeps its own forward.
    ///
    /// A branch that also needs the gradient of its whole update, `∂L/∂ΔW`, says so with a
    /// [`DeltaGradientSink`]: a backward by hand then hands it over, and under autograd the
    /// branch runs its own forward (which takes it itself), not the merged product.
    fn low_rank(&self, _train: bool) -> Option<LowRank> {
        None
    }
}

/// The factors of a low-rank branch: `A (r, in)`, `B (out, r)`. Either the adapter's own
/// parameters (autograd's leaves, whose `.grad` a backward by hand adds into) or tensors
/// derived from them under autograd, whose gradients reach the parameters through a small
/// backward of their own.
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    /// Where the backward by hand hands `∂L/∂ΔW`, if the branch wants it.
    pub delta_gradient: Option<DeltaGradientSink>,
}

/// Receives a branch's `∂L/∂ΔW = Σ_tokens ∂L/∂y_tᵀ x_t`, `(out, in)` in f32, once per
/// backward by hand of a pass (so once per micro-batch). IncreLoRA's importance needs every
/// element of it (methods/increlora.rs), which no low-rank product gives; the layer by hand
/// has each projection's input and output gradient at hand, so it takes one dense product.
pub type DeltaGradientSink = Box<dyn Fn(Tensor)>;

/// `gᵀ x` in f32 (f64 for f64 inputs) for `g (tokens, out)` and `x (tokens, in)`: a
/// weight-shaped gradient. Where both are bf16 (or f16) on a GPU, every product `g_ti x_tj` is
/// exact in f32, so the half-precision tensor-core product with f32 output and accumulation
/// (`mm` with `out_dtype`) gives what the f32 product does up to the order of the f32 sums, as
/// between any two f32 kernels, at a fraction of its cost.
pub fn weight_gradient(g: &Tensor, x: &Tensor) -> Tensor {
    let half = matches!(x.kind(), Kind::BFloat16 | Kind::Half);
    if half && g.kind() == x.kind() && x.device().is_cuda() {
        if let Ok(product) = g.tr().f_mm_dtype(x, Kind::Float) {
            return product;
        }
    }
    let kind = match (g.kind(), x.kind()) {
        (Kind::Double, Kind::Double) => Kind::Double,
        _ => Kind::Float,
    };
    g.to_kind(kind).tr().mm(&x.to_kind(kind))
}

impl LowRank {
    /// Factors computed from the adapter's parameters by `derive`, on an autograd graph even
    /// where the caller runs without one (a backward by hand does), so that their gradients
    /// can reach the parameters; in evaluation (`train` false) under the caller's mode.
    pub fn derived(
        train: bool,
        scaling: f64,
        derive: impl FnOnce() -> (Tensor, Tensor),
    ) -> LowRank {
        let (a, b) = if train {
            tch::with_grad(derive)
        } else {
            derive()
        };
        LowRank {
            a,
            b,
            scaling,
            delta_gradient: None,
        }
    }

    /// The branch, wanting its `∂L/∂ΔW` handed to `sink` ([`DeltaGradientSink`]).
    pub fn with_delta_gradient(self, sink: impl Fn(Tensor) + 'static) -> LowRank {
        LowRank {
            delta_gradient: Some(Box::new(sink)),
            ..self
        }
    }

    /// `y + scaling x A^T B^T` for `x (tokens, in)`, accumulated into `y (tokens, out)`: the
    /// scaling on the rank-sized product, the factors cast to `x`'s dtype (fp32 factors over a
    /// bf16 base: their gradients come back in fp32).
    pub fn add_to(&self, mut y: Tensor, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.linear::<Tensor>(&self.a.to_kind(kind), None) * self.scaling;
        y.addmm_(&h, &self.b.to_kind(kind).tr())
    }
}

/// `y = x W^T + b`, plus the adapter branch if one is attached.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight,
            bias,
            adapter: None,
        }
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

    /// Removes the adapter branch, if any, and hands it back (calibration runs the base model
    /// with probes in its place, then puts it back).
    pub fn take_adapter(&mut self) -> Option<Box<dyn LinearAdapter>> {
        self.adapter.take()
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let Some(adapter) = &self.adapter else {
            return x.linear(&self.weight, self.bias.as_ref());
        };
        // Flattened to (tokens, features), the shape `linear` multiplies in anyway (a view of
        // the contiguous activations), so that the adapter can accumulate into the output.
        let mut shape = x.size();
        if let Some(features) = shape.last_mut() {
            *features = self.out_features();
        }
        let x = x.reshape([-1, self.in_features()]);
        let y = x.linear(&self.weight, self.bias.as_ref());
        adapter.add_to(y, &x, train).view(shape.as_slice())
    }
}

/// Frozen projections that read the same input (q, k, v; gate, up) as one matrix product:
/// their weights are concatenated at load, and each projection's own weight is a view into
/// the concatenation (no memory is added). Where every adapter of the group is a plain
/// low-rank branch ([`LinearAdapter::low_rank`]), the branches run as one product too: the
/// `A`s concatenated, `x [A_1; A_2; ...]^T`, and the `B`s (scaled) as a block-diagonal
/// matrix accumulated in place into the base output. Anything else runs projection by
/// projection, as before.
struct Merged {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Merged {
    /// Concatenates the weights of `parts` and makes each part's weight (and bias) a view into
    /// them; `None` where only some of them have a bias.
    fn new(parts: &mut [&mut Linear]) -> Option<Merged> {
        let biases = parts.iter().filter(|l| l.bias.is_some()).count();
        if biases != 0 && biases != parts.len() {
            return None;
        }
        let weight = Tensor::cat(&parts.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0);
        let bias = (biases > 0).then(|| {
            Tensor::cat(
                &parts
                    .iter()
                    .filter_map(|l| l.bias.as_ref())
                    .collect::<Vec<_>>(),
                0,
            )
        });
        let mut offset = 0;
        for part in parts.iter_mut() {
            let out = part.out_features();
            part.weight = weight.narrow(0, offset, out);
            part.bias = bias.as_ref().map(|b| b.narrow(0, offset, out));
            offset += out;
        }
        Some(Merged { weight, bias })
    }

    /// Every part's output for `x (.., in)`, `(.., out_i)` each.
    fn forward(&self, parts: &[&Linear], x: &Tensor, train: bool) -> Vec<Tensor> {
        let shape = x.size();
        let x2 = x.reshape([-1, shape[shape.len() - 1]]);
        let Some((y, _)) = self.product(parts, &x2, train) else {
            return parts.iter().map(|l| l.forward(x, train)).collect();
        };
        let sizes: Vec<i64> = parts.iter().map(|l| l.out_features()).collect();
        y.split_with_sizes(sizes.as_slice(), 1)
            .into_iter()
            .map(|part| {
                let mut out = shape.clone();
                let last = out.len() - 1;
                out[last] = part.size()[1];
                part.view(out.as_slice())
            })
            .collect()
    }

    /// The parts' outputs side by side, `(tokens, sum of out_i)`, for `x2 (tokens, in)`, and
    /// the branches' share of it, under autograd; `None` where some part's adapter is not a
    /// plain low-rank branch in this pass ([`plain_branches`]).
    fn product(
        &self,
        parts: &[&Linear],
        x2: &Tensor,
        train: bool,
    ) -> Option<(Tensor, Option<MergedBranches>)> {
        let branches = plain_branches(parts, train, Backward::Autograd)?;
        Some(self.product_of(parts, &branches, x2, Backward::Autograd))
    }

    /// [`Merged::product`] with the parts' plain branches given (`None` for a part without an
    /// adapter), and who runs its backward.
    fn product_of(
        &self,
        parts: &[&Linear],
        branches: &[Option<LowRank>],
        x2: &Tensor,
        backward: Backward,
    ) -> (Tensor, Option<MergedBranches>) {
        group_product(
            (&self.weight, self.bias.as_ref()),
            parts,
            branches,
            x2,
            backward,
        )
    }
}

/// The output of a group of projections that read `x2 (tokens, in)` (merged q/k/v or gate/up,
/// or a single projection), `(tokens, sum of out_i)` for their weights side by side (and
/// bias), with their plain branches (`None` for a part without an adapter) run as one
/// product, and those branches' share ([`MergedBranches`]).
fn group_product(
    (weight, bias): (&Tensor, Option<&Tensor>),
    parts: &[&Linear],
    branches: &[Option<LowRank>],
    x2: &Tensor,
    backward: Backward,
) -> (Tensor, Option<MergedBranches>) {
    if !branches.iter().any(Option::is_some) {
        return (x2.linear(weight, bias), None);
    }
    let (a, b) = pack_branches(parts, branches, x2.kind(), backward);
    let h = x2.linear::<Tensor>(&a, None);
    let y = branch_then_frozen(h.mm(&b.tr()), x2, weight, bias);
    (y, Some(MergedBranches { h, a, b }))
}

/// The factors of a group's branches for its products, in `kind`: `a` the parts' `A`s stacked
/// `(total r, in)`, `b` their `scaling B`s block-diagonal `(sum of out_i, total r)`. Under
/// autograd libtorch's operations, which it records so that gradients reach the factors; for a
/// backward by hand (which hands the factors their gradients itself) one kernel on CUDA
/// ([`cuda_kernels::pack_lora`]), where casts, a concatenation and block copies took about a
/// dozen kernels a group.
fn pack_branches(
    parts: &[&Linear],
    branches: &[Option<LowRank>],
    kind: Kind,
    backward: Backward,
) -> (Tensor, Tensor) {
    let rows: i64 = parts.iter().map(|p| p.out_features()).sum();
    let mut row = 0;
    let mut packed = Vec::new();
    for (part, branch) in parts.iter().zip(branches) {
        if let Some(branch) = branch {
            packed.push(cuda_kernels::LoraPart {
                a: &branch.a,
                b: &branch.b,
                scaling: branch.scaling,
                row,
            });
        }
        row += part.out_features();
    }
    let fused = (backward == Backward::ByHand && kind == Kind::BFloat16)
        .then(|| cuda_kernels::pack_lora(&packed, rows))
        .flatten();
    if let Some(fused) = fused {
        return fused;
    }
    let device = packed[0].a.device();
    let total: i64 = packed.iter().map(|p| p.a.size()[0]).sum();
    let a = Tensor::cat(&packed.iter().map(|p| p.a).collect::<Vec<_>>(), 0).to_kind(kind);
    // The block-diagonal `b`, each part's `scaling B` copied into its block of one zeroed
    // buffer (two kernels a part; autograd records the copies, so gradients reach `B` where it
    // runs). The copy casts: one rounding to the input's dtype.
    let b = Tensor::zeros([rows, total], (kind, device));
    let mut col = 0;
    for p in &packed {
        let (out, r) = (p.b.size()[0], p.a.size()[0]);
        let block = b.narrow(0, p.row, out).narrow(1, col, r);
        block.shallow_clone().copy_(&(p.b * p.scaling));
        col += r;
    }
    (a, b)
}

/// The branches of a merged product: `y += h b^T` with `h = x2 a^T`; `a` the parts' `A`s
/// stacked `(total r, in)`, `b` their scaled `B`s block-diagonal `(sum of out_i, total r)`,
/// both in the input's dtype.
struct MergedBranches {
    h: Tensor,
    a: Tensor,
    b: Tensor,
}

/// `branch + x W^T (+ bias)` for the branch's share of a product, `branch (tokens, out)`: the
/// frozen product accumulated onto the branch's in place (`addmm_`, beta 1), where adding the
/// branch to the frozen product took a third pass over the output; the large product is
/// compute-bound, so reading its accumulator should cost it little (`bench/gemm_floor.py`
/// times both orders). In bf16 the sum is rounded once, with the branch's share inside it.
fn branch_then_frozen(
    branch: Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Tensor {
    let mut y = branch;
    if let Some(bias) = bias {
        y += bias;
    }
    y.addmm_(x, &weight.tr())
}

/// Who runs the backward of a product: autograd, or the layer by hand (layer_backward.rs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backward {
    Autograd,
    ByHand,
}

/// Each part's branch if every adapter among `parts` is a plain low-rank branch in this pass
/// (`None` for a part without one), else `None`. Under autograd a branch that wants its
/// `∂L/∂ΔW` ([`DeltaGradientSink`]) is not plain: only a backward by hand hands it over.
fn plain_branches(
    parts: &[&Linear],
    train: bool,
    backward: Backward,
) -> Option<Vec<Option<LowRank>>> {
    parts
        .iter()
        .map(|l| match &l.adapter {
            None => Some(None),
            Some(adapter) => adapter
                .low_rank(train)
                .filter(|b| backward == Backward::ByHand || b.delta_gradient.is_none())
                .map(Some),
        })
        .collect()
}

struct Attention {
    qkv: Option<Merged>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

struct Mlp {
    gate_up: Option<Merged>,
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
        let tensor = self
            .0
            .remove(name)
            .ok_or_else(|| user_error(format!("model weights have no tensor {name}")))?;
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
        let bias = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    /// Tensors nobody took mean config.json describes another model (more layers, biases it
    /// does not declare), which would otherwise train silently on the wrong architecture.
    /// Only what transformers itself ignores may remain: old checkpoints' RoPE buffers and
    /// a stored copy of a tied output head.
    fn check_all_taken(self, tied_head: bool) -> Result<()> {
        let mut extra: Vec<String> = self
            .0
            .into_keys()
            .filter(|name| {
                !(name.ends_with("rotary_emb.inv_freq") || tied_head && name == "lm_head.weight")
            })
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort();
        let shown = extra.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        let more = if extra.len() > 5 {
            format!(" and {} more", extra.len() - 5)
        } else {
            String::new()
        };
        Err(user_error(format!(
            "model weights have tensors that config.json does not describe: {shown}{more}"
        )))
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
        let (hidden, q_out, kv_out) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let embed_tokens = weights.take("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: weights.take(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                self_attn: Attention {
                    qkv: None,
                    q_proj: weights.linear(
                        &format!("{p}.self_attn.q_proj"),
                        q_out,
                        hidden,
                        c.qkv_bias,
                    )?,
                    k_proj: weights.linear(
                        &format!("{p}.self_attn.k_proj"),
                        kv_out,
                        hidden,
                        c.qkv_bias,
                    )?,
                    v_proj: weights.linear(
                        &format!("{p}.self_attn.v_proj"),
                        kv_out,
                        hidden,
                        c.qkv_bias,
                    )?,
                    o_proj: weights.linear(
                        &format!("{p}.self_attn.o_proj"),
                        hidden,
                        q_out,
                        c.o_bias,
                    )?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                post_attention_layernorm: weights
                    .take(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                mlp: Mlp {
                    gate_up: None,
                    gate_proj: weights.linear(
                        &format!("{p}.mlp.gate_proj"),
                        c.intermediate_size,
                        hidden,
                        false,
                    )?,
                    up_proj: weights.linear(
                        &format!("{p}.mlp.up_proj"),
                        c.intermediate_size,
                        hidden,
                        false,
                    )?,
                    down_proj: weights.linear(
                        &format!("{p}.mlp.down_proj"),
                        hidden,
                        c.intermediate_size,
                        false,
                    )?,
                },
            });
        }
        let norm = weights.take("model.norm.weight", &[hidden])?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            weights.take("lm_head.weight", &[c.vocab_size, hidden])?
        };
        weights.check_all_taken(c.tie_word_embeddings)?;
        for layer in &mut layers {
            layer.merge_projections();
        }
        Ok(LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The linear layers whose short name (`q_proj`, `down_proj`, …) is in `modules`, each
    /// with its Hugging Face module path (`model.layers.0.self_attn.q_proj`), layer by layer.
    pub fn linears_mut<'a, S: AsRef<str>>(
        &'a mut self,
        modules: &'a [S],
    ) -> impl Iterator<Item = (String, &'a mut Linear)> + 'a {
        self.layers
            .iter_mut()
            .enumerate()
            .flat_map(move |(i, layer)| {
                layer
                    .named_linears_mut()
                    .into_iter()
                    .filter(|(_, name, _)| modules.iter().any(|m| m.as_ref() == *name))
                    .map(move |(block, name, linear)| {
                        (format!("model.layers.{i}.{block}.{name}"), linear)
                    })
            })
    }

    /// [`LlamaModel::linears_mut`] for an adapter: a target list that matches no layer is the
    /// user's error (a typo would otherwise train nothing under the method's name).
    pub fn target_linears<'a, S: AsRef<str> + std::fmt::Debug>(
        &'a mut self,
        modules: &'a [S],
    ) -> anyhow::Result<Vec<(String, &'a mut Linear)>> {
        let linears: Vec<_> = self.linears_mut(modules).collect();
        if linears.is_empty() {
            return Err(user_error(format!(
                "the model has none of the target modules {modules:?}"
            )));
        }
        Ok(linears)
    }

    /// Logits `(batch, seq, vocab)` in the base dtype for token ids `(batch, seq)`: the whole
    /// sequence at once, as training and scoring see it.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        self.forward_with_cache(input_ids, train, None, Logits::All)
    }

    /// Logits for `input_ids (batch, new)` that follow the cached tokens, whose keys and values
    /// are appended to the cache: `(batch, new, vocab)`, or `(batch, 1, vocab)` of the last
    /// position with [`Logits::Last`]. `positions (batch, new)` are the RoPE positions (rows may
    /// be left-padded, so they differ from cache indices); `key_valid (batch, cache.len() + new)`
    /// is false at padding, which no token attends to.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_valid: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let step = CacheStep::new(cache, input_ids, positions, key_valid)?;
        Ok(self.forward_with_cache(input_ids, false, Some(step), logits))
    }

    /// The residual stream after every decoder layer at the last of the new positions,
    /// `(layers, batch, hidden)`, for tokens that follow the cached ones as in
    /// [`LlamaModel::forward_cached`] (left-padded rows all end there: a prompt's last token).
    /// The vocabulary projection is skipped.
    pub fn last_residuals_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_valid: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let last = input_ids.size()[1] - 1;
        let step = CacheStep::new(cache, input_ids, positions, key_valid)?;
        let mut taken = Vec::with_capacity(self.layers.len());
        // The last layer's output is taken like the others'; what comes back is the same.
        let _ = self.run_layers(input_ids, false, Some(step), &mut |hidden: &Tensor| {
            taken.push(hidden.select(1, last));
        });
        Ok(Tensor::stack(&taken, 0))
    }

    /// The forward pass: the decoder layers, then the final norm and the vocabulary projection
    /// at the positions `logits` asks for.
    fn forward_with_cache(
        &self,
        input_ids: &Tensor,
        train: bool,
        cache: Option<CacheStep>,
        logits: Logits,
    ) -> Tensor {
        let new = input_ids.size()[1];
        let hidden = self.run_layers(input_ids, train, cache, &mut |_| {});
        let hidden = match logits {
            Logits::All => hidden,
            Logits::Last => hidden.narrow(1, new - 1, 1),
        };
        let hidden = rms_norm(&hidden, &self.norm, self.config.rms_norm_eps);
        hidden.linear::<Tensor>(&self.lm_head, None)
    }

    /// The embedding and the decoder layers, `after_layer` shown the residual stream
    /// `(batch, new, hidden)` after each. Without a cache, the tokens are a whole sequence from
    /// position 0, and attention is causal (cut to the window on sliding layers); with one,
    /// they continue the cached tokens, and an explicit mask says what each may attend to.
    fn run_layers(
        &self,
        input_ids: &Tensor,
        train: bool,
        cache: Option<CacheStep>,
        after_layer: &mut dyn FnMut(&Tensor),
    ) -> Tensor {
        let new = input_ids.size()[1];
        let mut hidden = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let (kind, device) = (hidden.kind(), hidden.device());
        let c = &self.config;
        let (rope, full_mask, window_mask, mut cache) = match cache {
            None => {
                // Every sliding layer shares one window; within it, attention is plain causal.
                let window = c
                    .sliding_window
                    .filter(|&w| new > w)
                    .map(|w| sliding_window_mask(new, w, device));
                (rotary_tables(c, new, kind, device), None, window, None)
            }
            Some(step) => {
                let (valid, offset) = (step.key_valid, step.cache.len);
                let full = cached_attention_mask(valid, offset, new, None);
                let window = c
                    .sliding_window
                    .map(|w| cached_attention_mask(valid, offset, new, Some(w)));
                (
                    rotary_at(c, step.positions, kind),
                    Some(full),
                    window,
                    Some(step.cache),
                )
            }
        };
        let (cos, sin) = &rope;
        for (i, layer) in self.layers.iter().enumerate() {
            let mask = match c.window_of(i) {
                Some(_) => window_mask.as_ref().or(full_mask.as_ref()),
                None => full_mask.as_ref(),
            };
            let layer_cache = cache.as_deref_mut().map(|cache| LayerCache {
                keys: &mut cache.keys[i],
                values: &mut cache.values[i],
                offset: cache.len,
            });
            hidden = layer.forward(
                &hidden,
                (cos, sin),
                mask,
                layer_cache,
                c.rms_norm_eps,
                train,
            );
            after_layer(&hidden);
        }
        if let Some(cache) = cache {
            cache.len += new;
        }
        hidden
    }

    /// The final hidden states `(batch, seq, hidden)` of a whole sequence, after the last norm,
    /// as one autograd graph: what [`LlamaModel::training_pass`] computes, for scoring without
    /// the layer-by-layer backward.
    pub fn final_hidden(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let hidden = self.run_layers(input_ids, train, None, &mut |_| {});
        rms_norm(&hidden, &self.norm, self.config.rms_norm_eps)
    }

    /// The frozen output projection `(vocab, hidden)`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The final hidden states `(batch, seq, hidden)` of a whole sequence, after the last
    /// norm: what the output projection turns into logits, for a loss that does that itself
    /// ([`crate::model::lm_loss`]). Each layer is its own graph (layer_backward.rs), which
    /// [`TrainingPass::backward`] runs last layer first. With [`Checkpointing::Layers`], the
    /// layers run without keeping their activations, and the backward recomputes them; with
    /// [`Checkpointing::Offload`] too, the inputs they are recomputed from waiting in pinned
    /// host memory.
    pub fn training_pass(
        &self,
        input_ids: &Tensor,
        train: bool,
        checkpointing: Checkpointing,
    ) -> TrainingPass<'_> {
        let new = input_ids.size()[1];
        let embedded = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let (kind, device) = (embedded.kind(), embedded.device());
        let c = &self.config;
        let window_mask = c
            .sliding_window
            .filter(|&w| new > w)
            .map(|w| sliding_window_mask(new, w, device));
        let rope = rotary_tables(c, new, kind, device);
        let seeds = layer_seeds(self.layers.len(), train);
        let run_layer = |i: usize, x: Tensor| {
            if let Some(seeds) = &seeds {
                tch::manual_seed(seeds[i]);
            }
            let mask = c.window_of(i).and(window_mask.as_ref());
            let rope = (&rope.0, &rope.1);
            self.layers[i].forward_for_backward(x, rope, mask, c.rms_norm_eps, train)
        };
        super::timeline::mark("embedding");
        let (last, kept) = match checkpointing {
            Checkpointing::None => {
                let mut graphs = Vec::with_capacity(self.layers.len());
                let mut hidden = embedded;
                for i in 0..self.layers.len() {
                    // The first layer's input is the frozen embedding: no gradient to pass on.
                    let input = hidden.set_requires_grad(i > 0);
                    let (out, graph) = run_layer(i, input);
                    super::timeline::mark("layer forward");
                    graphs.push(graph);
                    hidden = out;
                }
                (hidden, Kept::Graphs(graphs))
            }
            Checkpointing::Layers | Checkpointing::Offload => {
                let offload = checkpointing == Checkpointing::Offload;
                let mut inputs = Vec::with_capacity(self.layers.len());
                let mut hidden = embedded;
                tch::no_grad(|| {
                    for i in 0..self.layers.len() {
                        let out = run_layer(i, hidden.shallow_clone()).0;
                        super::timeline::mark("layer forward");
                        let input = std::mem::replace(&mut hidden, out);
                        inputs.push(if offload { to_host(&input) } else { input });
                    }
                });
                (hidden, Kept::Inputs(inputs))
            }
        };
        let last = last.set_requires_grad(true);
        let hidden = rms_norm(&last, &self.norm, c.rms_norm_eps);
        TrainingPass {
            model: self,
            hidden,
            layers: LayersBackward {
                last,
                kept,
                rope,
                window_mask,
                seeds,
                train,
            },
        }
    }
}

/// Whether a training step keeps every layer's activations for the backward pass
/// (`training.gradient_checkpointing`).
pub use loraforge_spec::GradientCheckpointing as Checkpointing;

/// One training forward pass: its final hidden states, and what the layers' backward needs.
pub struct TrainingPass<'m> {
    model: &'m LlamaModel,
    /// `(batch, seq, hidden)`, after the final norm.
    pub hidden: Tensor,
    layers: LayersBackward,
}

/// What the decoder layers' backward starts from.
struct LayersBackward {
    /// The last layer's output, a leaf whose gradient the loss's backward fills.
    last: Tensor,
    kept: Kept,
    rope: (Tensor, Tensor),
    window_mask: Option<Tensor>,
    seeds: Option<Vec<i64>>,
    train: bool,
}

/// Per layer, in order: its graph, or, checkpointed, its input (on the device, or, offloaded,
/// in pinned host memory), from which the layer is recomputed.
enum Kept {
    Graphs(Vec<LayerGraph>),
    Inputs(Vec<Tensor>),
}

impl TrainingPass<'_> {
    /// To be called after the loss's `backward()`: runs the layers' backward, last layer first,
    /// each one's gradient accumulated into its adapters and handed to the layer before
    /// ([`DecoderLayer::backward`]). A checkpointed layer is first recomputed from its saved
    /// input (with the dropout masks of the first pass, from the same seeds); an offloaded
    /// input comes back to the device as its layer's turn comes.
    pub fn backward(self) {
        let mut r = self.layers;
        let c = &self.model.config;
        let mut grad = r.last.grad();
        if !grad.defined() {
            return;
        }
        let device = r.last.device();
        super::timeline::mark("loss backward");
        for (i, layer) in self.model.layers.iter().enumerate().rev() {
            // Popped, each layer's graph or input is freed once its layer is done.
            let graph = match &mut r.kept {
                Kept::Graphs(graphs) => graphs.pop().expect("one graph a layer"),
                Kept::Inputs(inputs) => {
                    let input = inputs.pop().expect("one input a layer");
                    // Brought back just before its layer, not one layer ahead: tch has no
                    // second CUDA stream, and on the one stream a copy issued earlier would
                    // still run in order, before the kernels queued after it, so prefetching
                    // would only hold one more input on the device. The copy does not make
                    // the host wait (pinned memory).
                    let input = to_device(&input, device);
                    if let Some(seeds) = &r.seeds {
                        tch::manual_seed(seeds[i]);
                    }
                    let x = input.detach().set_requires_grad(i > 0);
                    let mask = c.window_of(i).and(r.window_mask.as_ref());
                    let rope = (&r.rope.0, &r.rope.1);
                    layer
                        .forward_for_backward(x, rope, mask, c.rms_norm_eps, r.train)
                        .1
                }
            };
            grad = layer.backward(graph, &grad);
            super::timeline::mark("layer backward");
        }
    }
}

/// A copy of `x` in pinned host memory, made on the current stream without waiting for it
/// (libtorch pins the destination of a non-blocking copy from CUDA); on the CPU, `x` itself.
/// The host never reads the copy, only [`to_device`] does, later on the same stream, so no
/// synchronisation is needed; `x`'s device memory may be freed at once (the caching allocator
/// reuses it only for work queued after the copy).
fn to_host(x: &Tensor) -> Tensor {
    x.to_device_(Device::Cpu, x.kind(), true, false)
}

/// `x` on `device`, copied without waiting if it is elsewhere (from pinned memory, a DMA
/// that does not block the host), or `x` itself if it is there already.
fn to_device(x: &Tensor, device: Device) -> Tensor {
    x.to_device_(device, x.kind(), true, false)
}

/// One seed per layer for the dropout of a training pass, drawn from libtorch's generator (so
/// seeded by the step), and set before each layer: a checkpointed layer recomputed in the
/// backward pass then draws the same masks as it did forward. `None` without training.
fn layer_seeds(layers: usize, train: bool) -> Option<Vec<i64>> {
    train.then(|| {
        Vec::<i64>::try_from(Tensor::randint(
            i64::MAX,
            [layers as i64],
            (Kind::Int64, Device::Cpu),
        ))
        .unwrap_or_default()
    })
}

/// Which positions a forward pass computes logits for. A prompt's prefill needs only its last
/// position's: the vocabulary projection of the others is most of a small model's prefill
/// work (SmolLM2-135M: 28M of its 135M weights) and a `(batch, len, vocab)` f32 tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// RoPE inverse frequencies `(head_dim / 2)` in fp32, op for op as transformers computes them
/// (`compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters`), so that the rotations agree to the last bit.
fn inverse_frequencies(config: &ModelConfig, device: Device) -> Tensor {
    let dim = config.head_dim;
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device))
        .to_kind(Kind::Float)
        / dim as f64;
    let inv_freq = Tensor::pow_scalar(config.rope_theta, &exponents).reciprocal();
    match config.rope_scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_context = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            // Python's `scalar / tensor` is `tensor.reciprocal() * scalar`; the same here.
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = (&inv_freq / factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
            let smooth = (wavelen.reciprocal() * old_context - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed: Tensor = (1.0 - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.lt(high_freq_wavelen).logical_not()
                * wavelen.gt(low_freq_wavelen).logical_not();
            smoothed.where_self(&medium, &scaled)
        }
    }
}

/// cos/sin tables `(seq, head_dim)` computed in fp32, then cast, as Hugging Face does.
fn rotary_tables(
    config: &ModelConfig,
    seq_len: i64,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let inv_freq = inverse_frequencies(config, device);
    let positions = Tensor::arange(seq_len, (Kind::Float, device));
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let angles = Tensor::cat(&[&freqs, &freqs], -1);
    (angles.cos().to_kind(kind), angles.sin().to_kind(kind))
}

/// cos/sin `(batch, 1, new, head_dim)` for explicit positions `(batch, new)`, computed as
/// [`rotary_tables`] does.
fn rotary_at(config: &ModelConfig, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let inv_freq = inverse_frequencies(config, positions.device());
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let angles = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    (angles.cos().to_kind(kind), angles.sin().to_kind(kind))
}

/// `(seq, seq)`, true where query i may attend key j: `i - window < j <= i`, as transformers'
/// `sliding_window_overlay` on a causal mask.
fn sliding_window_mask(seq_len: i64, window: i64, device: Device) -> Tensor {
    let positions = Tensor::arange(seq_len, (Kind::Int64, device));
    let (query, key) = (positions.unsqueeze(1), positions.unsqueeze(0));
    let distance = &query - &key;
    distance.ge(0).logical_and(&distance.lt(window))
}

/// `(batch, 1, new, offset + new)`, true where new token q may attend cache index k: causal,
/// valid (not padding) and, with a window, fewer than `window` positions back (padding sits
/// only on the left, so index distance is position distance). Every token may attend itself,
/// so a padding query's row is never empty: an empty row makes NaN, which would reach real
/// rows through the padding's keys and values.
fn cached_attention_mask(key_valid: &Tensor, offset: i64, new: i64, window: Option<i64>) -> Tensor {
    let device = key_valid.device();
    let total = offset + new;
    let query = Tensor::arange_start(offset, total, (Kind::Int64, device)).unsqueeze(1);
    let key = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let distance = &query - &key;
    let mut allowed = distance.ge(0);
    if let Some(w) = window {
        allowed = allowed.logical_and(&distance.lt(w));
    }
    let allowed = allowed.unsqueeze(0).logical_and(&key_valid.unsqueeze(1));
    allowed
        .logical_or(&distance.eq(0).unsqueeze(0))
        .unsqueeze(1)
}

impl DecoderLayer {
    /// The projections that share an input, merged into one product each ([`Merged`]).
    fn merge_projections(&mut self) {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        a.qkv = Merged::new(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj]);
        m.gate_up = Merged::new(&mut [&mut m.gate_proj, &mut m.up_proj]);
    }

    /// Back to one product per projection (the weights stay views): what the merged products
    /// are compared with in tests.
    #[cfg(test)]
    fn split_projections(&mut self) {
        self.self_attn.qkv = None;
        self.mlp.gate_up = None;
    }

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

    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cache: Option<LayerCache>,
        eps: f64,
        train: bool,
    ) -> Tensor {
        let attended = self.self_attn.forward(
            &rms_norm(x, &self.input_layernorm, eps),
            cos,
            sin,
            mask,
            cache,
            train,
        );
        let x = x + attended;
        let mlp_in = rms_norm(&x, &self.post_attention_layernorm, eps);
        let (gate, up) = self.mlp.gate_and_up(&mlp_in, train);
        x + self.mlp.down_proj.forward(&(gate.silu() * up), train)
    }
}

impl Mlp {
    /// The gate and up projections of `x (.., hidden)`, `(.., intermediate)` each.
    fn gate_and_up(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        match &self.gate_up {
            Some(merged) => {
                let parts = merged.forward(&[&self.gate_proj, &self.up_proj], x, train);
                (parts[0].shallow_clone(), parts[1].shallow_clone())
            }
            None => (
                self.gate_proj.forward(x, train),
                self.up_proj.forward(x, train),
            ),
        }
    }
}

impl Attention {
    /// Self-attention over `x` and, with a cache, the cached keys and values, which `x`'s are
    /// appended to. `mask` (true = attend) is required with a cache; without one, `None` is
    /// plain causal attention.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<LayerCache>,
        train: bool,
    ) -> Tensor {
        let size = x.size();
        let (batch, seq) = (size[0], size[1]);
        let projected = match &self.qkv {
            Some(merged) => merged.forward(&[&self.q_proj, &self.k_proj, &self.v_proj], x, train),
            None => [&self.q_proj, &self.k_proj, &self.v_proj]
                .iter()
                .map(|proj| proj.forward(x, train))
                .collect(),
        };
        let heads = |y: &Tensor, n: i64| y.view([batch, seq, n, self.head_dim]).transpose(1, 2);
        let q = apply_rotary(&heads(&projected[0], self.heads), cos, sin);
        let k = apply_rotary(&heads(&projected[1], self.kv_heads), cos, sin);
        let v = heads(&projected[2], self.kv_heads);
        let (k, v) = match cache {
            // v alone, not a view into the q, k, v product: attention keeps v for its backward,
            // and a view would keep the whole product (on Llama-3-8B 6x v's size) alive.
            None => (k, v.contiguous()),
            Some(LayerCache {
                keys,
                values,
                offset,
            }) => {
                keys.narrow(2, offset, seq).copy_(&k);
                values.narrow(2, offset, seq).copy_(&v);
                (
                    keys.narrow(2, 0, offset + seq),
                    values.narrow(2, 0, offset + seq),
                )
            }
        };
        let out = attend(&q, &k, &v, mask);
        let out = out
            .transpose(1, 2)
            .reshape([batch, seq, self.heads * self.head_dim]);
        self.o_proj.forward(&out, train)
    }
}

/// Attention's core for `q (batch, heads, seq, head_dim)`, `k` and `v` (`kv_heads` each, shared
/// by groups of query heads where fewer): causal without `mask`, else where `mask` says.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let grouped = k.size()[1] != q.size()[1];
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, mask.is_none(), None, grouped)
}

/// RMSNorm. On CUDA, aten's fused kernel (`_fused_rms_norm`): one kernel each way, and autograd
/// keeps only the input and the per-row scale, where the composite below keeps an fp32 copy
/// of the input and the normalised rows (about 4 bytes an element more, two norms a layer). It
/// scales by the weight before rounding to the input's dtype, so in bf16 it differs from
/// Hugging Face's by that one rounding. Elsewhere the composite, which is Hugging Face's
/// (normalise in fp32, cast back, then scale) op for op, so CPU logits match theirs exactly.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    rms_norm_with_rstd(x, weight, eps).0
}

/// [`rms_norm`] and its per-row `1 / rms` (fp32, or f64 for f64), which its backward needs
/// (layer_backward.rs).
fn rms_norm_with_rstd(x: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Tensor) {
    if x.device().is_cuda() {
        fused_rms_norm_with_rstd(x, weight, eps)
    } else {
        composite_rms_norm_with_rstd(x, weight, eps)
    }
}

/// `x + y` (the residual stream after a sublayer) and [`rms_norm_with_rstd`] of the sum: one
/// kernel on CUDA in bf16 ([`cuda_kernels::add_rms_norm`]), else the add and the norm.
fn add_rms_norm_with_rstd(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    if let Some(fused) = cuda_kernels::add_rms_norm(x, y, weight, eps) {
        return fused;
    }
    let sum = x + y;
    let (normed, rstd) = rms_norm_with_rstd(&sum, weight, eps);
    (sum, normed, rstd)
}

fn fused_rms_norm_with_rstd(x: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let last = *x
        .size()
        .last()
        .expect("RMSNorm of a tensor with dimensions");
    x.internal_fused_rms_norm([last], Some(weight), eps)
}

/// Hugging Face's RMSNorm (in fp32; in f64 for f64, which the gradient tests use) and its
/// per-row `1 / rms`.
fn composite_rms_norm_with_rstd(x: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let acc = match x.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    let xf = x.to_kind(acc);
    let variance = xf.pow_tensor_scalar(2).mean_dim(-1, true, acc);
    let rstd = (variance + eps).rsqrt();
    (weight * (xf * &rstd).to_kind(x.kind()), rstd)
}

/// RoPE in the `rotate_half` convention (the halves of the head dimension are the pairs).
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
    x * cos + rotated * sin
}

// ---------------------------------------------------------------------------------------------
// The key/value cache of incremental decoding (generate.rs): each forward pass sees only the new
// tokens and attends over the cached keys and values of the earlier ones.

/// Keys and values `(batch, kv_heads, capacity, head_dim)` of every layer, filled up to `len`.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
}

/// One forward pass's part in incremental decoding: the cache it extends, the new tokens' RoPE
/// positions `(batch, new)`, and which keys are real `(batch, cache.len + new)`.
struct CacheStep<'c> {
    cache: &'c mut KvCache,
    positions: &'c Tensor,
    key_valid: &'c Tensor,
}

impl<'c> CacheStep<'c> {
    /// A step of `input_ids (batch, new)`, refused when the cache has no room for it.
    fn new(
        cache: &'c mut KvCache,
        input_ids: &Tensor,
        positions: &'c Tensor,
        key_valid: &'c Tensor,
    ) -> Result<CacheStep<'c>> {
        let new = input_ids.size()[1];
        if cache.len + new > cache.capacity {
            return Err(anyhow::anyhow!(
                "the KV cache holds {} positions; {} were asked for",
                cache.capacity,
                cache.len + new
            ));
        }
        Ok(CacheStep {
            cache,
            positions,
            key_valid,
        })
    }
}

/// One layer's slice of the cache, filled up to `offset`.
struct LayerCache<'c> {
    keys: &'c mut Tensor,
    values: &'c mut Tensor,
    offset: i64,
}

impl LlamaModel {
    /// An empty cache for `batch` rows of up to `capacity` positions, in the base dtype.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let c = &self.config;
        let options = (self.embed_tokens.kind(), self.embed_tokens.device());
        let empty = || {
            Tensor::zeros(
                [batch, c.num_key_value_heads, capacity, c.head_dim],
                options,
            )
        };
        let layers = self.layers.len();
        KvCache {
            keys: (0..layers).map(|_| empty()).collect(),
            values: (0..layers).map(|_| empty()).collect(),
            len: 0,
            capacity,
        }
    }
}

impl KvCache {
    /// The cache of one row, copied to `batch` rows: a prefix every prompt of a batch shares is
    /// computed once and continued by each.
    pub fn repeated(&self, batch: i64) -> KvCache {
        let repeat = |tensors: &[Tensor]| {
            tensors
                .iter()
                .map(|t| t.expand([batch, -1, -1, -1], false).contiguous())
                .collect()
        };
        KvCache {
            keys: repeat(&self.keys),
            values: repeat(&self.values),
            len: self.len,
            capacity: self.capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: serde_json::Value) -> ModelConfig {
        let mut v = json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40});
        for (key, value) in extra.as_object().cloned().unwrap_or_default() {
            v[key] = value;
        }
        ModelConfig::from_json(&v).unwrap()
    }

    /// Every tensor a Hugging Face checkpoint of `c` holds, with its shape.
    fn checkpoint(c: &ModelConfig) -> HashMap<String, Tensor> {
        let (h, i, q, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut shapes = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        )];
        shapes.push(("model.norm.weight".into(), vec![h]));
        shapes.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                shapes.push((format!("{p}.{name}"), shape));
            }
        }
        shapes
            .into_iter()
            .map(|(name, shape)| {
                (
                    name,
                    Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)),
                )
            })
            .collect()
    }

    /// [`checkpoint`] seeded, with weights of a trained model's scale (products that keep
    /// their input's size, norms near 1), so that bf16 rounds them as it would a real model's.
    fn scaled_checkpoint(c: &ModelConfig) -> HashMap<String, Tensor> {
        tch::manual_seed(4);
        checkpoint(c)
            .into_iter()
            .map(|(name, w)| {
                let w = match w.dim() {
                    2 => &w / (w.size()[1] as f64).sqrt(),
                    _ => w * 0.1 + 1.0,
                };
                (name, w)
            })
            .collect()
    }

    fn load_error(c: &ModelConfig, weights: HashMap<String, Tensor>) -> String {
        let err = LlamaModel::from_weights(c.clone(), weights)
            .err()
            .expect("loading should fail");
        assert!(
            matches!(
                crate::error::classify(&err),
                Some(crate::error::Failure::User(_))
            ),
            "{err:#}"
        );
        err.to_string()
    }

    #[test]
    fn weights_that_do_not_fit_the_config_are_user_errors() {
        let c = config(json!({}));
        assert!(LlamaModel::from_weights(c.clone(), checkpoint(&c)).is_ok());

        let mut wrong_shape = checkpoint(&c);
        wrong_shape.insert(
            "model.layers.1.self_attn.k_proj.weight".into(),
            Tensor::zeros([32, 32], (Kind::Float, Device::Cpu)),
        );
        let message = load_error(&c, wrong_shape);
        assert!(
            message.contains("model.layers.1.self_attn.k_proj.weight has shape [32, 32]"),
            "{message}"
        );
        assert!(message.contains("implies [16, 32]"), "{message}");

        let mut missing = checkpoint(&c);
        missing.remove("lm_head.weight");
        assert!(load_error(&c, missing).contains("no tensor lm_head.weight"));

        // A checkpoint with a third layer, or with q biases the config does not declare.
        let mut more = checkpoint(&config(json!({"num_hidden_layers": 3})));
        more.insert(
            "model.layers.0.self_attn.q_proj.bias".into(),
            Tensor::zeros([32], (Kind::Float, Device::Cpu)),
        );
        let message = load_error(&c, more);
        assert!(
            message.contains(
                "does not describe: model.layers.0.self_attn.q_proj.bias, model.layers.2."
            ),
            "{message}"
        );
        assert!(message.contains("and 5 more"), "{message}");

        // What transformers ignores too: a stored copy of a tied head, old RoPE buffers.
        let tied = config(json!({"tie_word_embeddings": true}));
        let mut extras = checkpoint(&tied);
        extras.insert(
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        );
        assert!(LlamaModel::from_weights(tied, extras).is_ok());
    }

    /// The residual stream after the last layer, normed and projected, is what the forward
    /// pass makes the last position's logits of; the cache fills as a forward pass fills it.
    #[test]
    fn the_residual_stream_is_what_the_forward_pass_projects() {
        let c = config(json!({}));
        let model = LlamaModel::from_weights(c.clone(), checkpoint(&c)).unwrap();
        let ids = Tensor::from_slice(&[3i64, 7, 1, 9, 4, 3, 7, 1, 0, 2]).view([2, 5]);
        let positions = Tensor::arange(5, (Kind::Int64, Device::Cpu)).repeat([2, 1]);
        let valid = Tensor::ones([2, 5], (Kind::Bool, Device::Cpu));
        let mut cache = model.new_cache(2, 6);
        let residuals = model
            .last_residuals_cached(&ids, &positions, &valid, &mut cache)
            .unwrap();
        assert_eq!(residuals.size(), [2, 2, 32]);
        assert_eq!(cache.len, 5);
        let logits = model.forward(&ids, false).select(1, 4);
        let projected = rms_norm(&residuals.get(1), &model.norm, c.rms_norm_eps)
            .linear::<Tensor>(&model.lm_head, None);
        let diff = (projected - &logits).abs().max().double_value(&[]);
        let scale = logits.abs().max().double_value(&[]);
        assert!(diff < 1e-5 * scale, "{diff} of {scale}");
        let mut full = model.new_cache(2, 4);
        assert!(model
            .last_residuals_cached(&ids, &positions, &valid, &mut full)
            .is_err());
    }

    #[test]
    fn llama3_scaling_keeps_fast_stretches_slow_and_blends_between() {
        let rope = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let plain = config(json!({"head_dim": 16, "rope_theta": 500000.0}));
        let scaled = config(json!({"head_dim": 16, "rope_parameters": rope}));
        let plain = Vec::<f32>::try_from(inverse_frequencies(&plain, Device::Cpu)).unwrap();
        let scaled = Vec::<f32>::try_from(inverse_frequencies(&scaled, Device::Cpu)).unwrap();
        // Wavelengths 2π/f: 6.3 (under 64/4: kept), 32.4 (between 16 and 64: blended), then over 64: / 8.
        assert_eq!(scaled[0], plain[0]);
        assert!(
            plain[1] / 8.0 < scaled[1] && scaled[1] < plain[1],
            "{} vs {}",
            scaled[1],
            plain[1]
        );
        for (s, p) in scaled[2..].iter().zip(&plain[2..]) {
            assert_eq!(*s, p / 8.0);
        }
        let linear = config(
            json!({"head_dim": 16, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}),
        );
        let linear = Vec::<f32>::try_from(inverse_frequencies(&linear, Device::Cpu)).unwrap();
        assert!(linear.iter().zip(&plain).all(|(l, p)| *l == p / 4.0));
    }

    /// q, k, v and gate, up as one product each (weights and LoRA factors concatenated) give
    /// the logits and the factors' gradients of one product per projection, also where only
    /// some projections of a group are adapted and where dropout keeps a branch apart.
    /// The fused RMSNorm computes RMSNorm, with its gradients: to 1e-12 in f64 on the CPU against
    /// the formula (the composite works in fp32 by design); on CUDA (when there is one) in bf16,
    /// to bf16's precision, against the composite in fp32.
    #[test]
    fn fused_rms_norm_matches_the_composite_and_its_gradients() {
        let grads = |norm: fn(&Tensor, &Tensor, f64) -> Tensor, x: &Tensor, w: &Tensor| {
            let x = x.detach().set_requires_grad(true);
            let w = w.detach().set_requires_grad(true);
            let y = norm(&x, &w, 1e-5);
            // A weighted sum, so each output element's gradient differs.
            let probe = Tensor::arange(y.numel() as i64, (Kind::Float, y.device()))
                .sin()
                .to_kind(y.kind())
                .view(y.size().as_slice());
            (&y * probe).sum(Kind::Float).backward();
            (y.detach(), x.grad(), w.grad())
        };
        tch::manual_seed(0);
        let x = Tensor::randn([3, 5, 64], (Kind::Double, Device::Cpu));
        let w = Tensor::randn([64], (Kind::Double, Device::Cpu));
        let formula = |x: &Tensor, w: &Tensor, eps: f64| {
            w * (x * (x.pow_tensor_scalar(2).mean_dim(-1, true, x.kind()) + eps).rsqrt())
        };
        let fused = grads(|x, w, eps| fused_rms_norm_with_rstd(x, w, eps).0, &x, &w);
        let reference = grads(formula, &x, &w);
        for (f, c) in [
            (&fused.0, &reference.0),
            (&fused.1, &reference.1),
            (&fused.2, &reference.2),
        ] {
            let gap = (f - c).abs().max().double_value(&[]);
            assert!(gap < 1e-12, "f64 gap {gap}");
        }
        if tch::Cuda::is_available() {
            let cuda = Device::Cuda(0);
            let reference = grads(
                |x, w, eps| composite_rms_norm_with_rstd(x, w, eps).0,
                &x.to_kind(Kind::Float).to_device(cuda),
                &w.to_kind(Kind::Float).to_device(cuda),
            );
            let fused = grads(
                |x, w, eps| fused_rms_norm_with_rstd(x, w, eps).0,
                &x.to_kind(Kind::BFloat16).to_device(cuda),
                &w.to_kind(Kind::BFloat16).to_device(cuda),
            );
            for (f, c) in [
                (&fused.0, &reference.0),
                (&fused.1, &reference.1),
                (&fused.2, &reference.2),
            ] {
                let f = f.to_kind(Kind::Float);
                let gap = (&f - c).abs().max().double_value(&[]);
                let scale = c.abs().max().double_value(&[]);
                assert!(gap < 2e-2 * scale, "bf16 gap {gap} on a scale of {scale}");
            }
        }
    }

    #[test]
    fn merged_projections_match_separate_ones() {
        use crate::methods::lora::LoraBranch;
        let c = config(json!({}));
        let mut model = LlamaModel::from_weights(c.clone(), checkpoint(&c)).unwrap();
        assert!(model
            .layers
            .iter()
            .all(|l| l.self_attn.qkv.is_some() && l.mlp.gate_up.is_some()));
        let targets = ["q_proj", "v_proj", "up_proj", "down_proj", "o_proj"];
        let mut factors = Vec::new();
        for (i, (_, linear)) in model.linears_mut(&targets).enumerate() {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let opts = (Kind::Float, Device::Cpu);
            let a = (Tensor::randn([4, inp], opts) * 0.3).set_requires_grad(true);
            let b = (Tensor::randn([out, 4], opts) * 0.3).set_requires_grad(true);
            // One branch with dropout: its group runs projection by projection in training.
            let dropout = if i == 3 { 0.2 } else { 0.0 };
            linear.attach(Box::new(LoraBranch::new(
                a.shallow_clone(),
                b.shallow_clone(),
                2.0,
                dropout,
            )));
            factors.push(a);
            factors.push(b);
        }
        let ids = Tensor::randint(40, [2, 7], (Kind::Int64, Device::Cpu));
        let run = |model: &LlamaModel| {
            tch::manual_seed(1);
            let logits = model.forward(&ids, true);
            logits.square().sum(Kind::Float).backward();
            let grads: Vec<Tensor> = factors.iter().map(|f| f.grad().copy()).collect();
            for f in &factors {
                let _ = f.grad().zero_();
            }
            (logits.detach(), grads)
        };
        let (merged_logits, merged_grads) = run(&model);
        for layer in &mut model.layers {
            layer.split_projections();
        }
        let (logits, grads) = run(&model);
        let diff = |a: &Tensor, b: &Tensor| {
            ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).double_value(&[])
        };
        assert!(
            diff(&merged_logits, &logits) < 1e-6,
            "{}",
            diff(&merged_logits, &logits)
        );
        // fp32 gradients summed in another order (one product for several, and libtorch's
        // CPU threads split a reduction as they come): 1.2e-5 seen, so 1e-4.
        for (m, s) in merged_grads.iter().zip(&grads) {
            assert!(diff(m, s) < 1e-4, "{}", diff(m, s));
        }
    }

    /// `scaling * x A^T B^T` in the input's dtype (so f64 stays f64, where LoRA's branch works
    /// in fp32); `opaque` hides that it is plain, as any other method's branch does. With a
    /// `gate (r)`, `A`'s rows are scaled by it (as the gated and adaptive methods' are): the
    /// factors given are then derived from the parameters.
    struct Plain {
        a: Tensor,
        b: Tensor,
        opaque: bool,
        gate: Option<Tensor>,
    }

    impl LinearAdapter for Plain {
        fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
            let a = match &self.gate {
                Some(gate) => &self.a * gate.view([-1, 1]),
                None => self.a.shallow_clone(),
            };
            x.linear::<Tensor>(&a, None).linear::<Tensor>(&self.b, None) * 0.5
        }

        fn low_rank(&self, train: bool) -> Option<LowRank> {
            if self.opaque {
                return None;
            }
            Some(match &self.gate {
                None => LowRank {
                    a: self.a.shallow_clone(),
                    b: self.b.shallow_clone(),
                    scaling: 0.5,
                    delta_gradient: None,
                },
                Some(gate) => LowRank::derived(train, 0.5, || {
                    (&self.a * gate.view([-1, 1]), self.b.shallow_clone())
                }),
            })
        }
    }

    /// [`checkpoint`]'s model in f64, for gradient tests to 1e-10.
    fn double_model(c: &ModelConfig) -> LlamaModel {
        let weights = checkpoint(c)
            .into_iter()
            .map(|(name, w)| (name, w.to_kind(Kind::Double)))
            .collect();
        LlamaModel::from_weights(c.clone(), weights).unwrap()
    }

    /// Random f64 factors `A (3, inp)` and `B (out, 3)` that want gradients.
    fn rank_3_factors(inp: i64, out: i64) -> (Tensor, Tensor) {
        let opts = (Kind::Double, Device::Cpu);
        let a = (Tensor::randn([3, inp], opts) * 0.3).set_requires_grad(true);
        let b = (Tensor::randn([out, 3], opts) * 0.3).set_requires_grad(true);
        (a, b)
    }

    /// The layer-by-layer backward (layer_backward.rs), with and without checkpointing, gives
    /// the adapters the gradients autograd gives them through the whole model, in f64 to 1e-10:
    /// every projection adapted, some of them, the MLP without adapters (each the layer by
    /// hand); an opaque branch on o or on k (the MLP by hand, attention autograd's); on down or
    /// on gate (the layer stays autograd's whole).
    #[test]
    fn the_layer_by_layer_backward_matches_autograd() {
        let c = config(json!({"num_hidden_layers": 3}));
        let all = loraforge_spec::model::LLAMA_TARGET_MODULES;
        // (targets, the opaque one, gated: factors derived from the parameters)
        let cases: [(&[&str], Option<&str>, bool); 10] = [
            (all, None, false),
            (&["q_proj", "up_proj", "down_proj"], None, false),
            (&["k_proj", "gate_proj"], None, false),
            (&["q_proj", "v_proj", "o_proj"], None, false),
            (all, Some("down_proj"), false),
            (all, Some("gate_proj"), false),
            (all, Some("o_proj"), false),
            (all, Some("k_proj"), false),
            (all, None, true),
            (all, Some("o_proj"), true),
        ];
        for (targets, opaque, gated) in cases {
            let mut model = double_model(&c);
            tch::manual_seed(3);
            let mut factors = Vec::new();
            for (name, linear) in model.linears_mut(targets) {
                let (inp, out) = (linear.in_features(), linear.out_features());
                let opts = (Kind::Double, Device::Cpu);
                let (a, b) = rank_3_factors(inp, out);
                let gate = gated.then(|| (Tensor::randn([3], opts) + 1.0).set_requires_grad(true));
                linear.attach(Box::new(Plain {
                    a: a.shallow_clone(),
                    b: b.shallow_clone(),
                    opaque: opaque.is_some_and(|o| name.ends_with(o)),
                    gate: gate.as_ref().map(Tensor::shallow_clone),
                }));
                factors.extend([a, b].into_iter().chain(gate));
            }
            let ids = Tensor::randint(40, [2, 9], (Kind::Int64, Device::Cpu));
            let probe = Tensor::arange(2 * 9 * 40, (Kind::Double, Device::Cpu))
                .sin()
                .view([2, 9, 40]);
            let take_grads = || -> Vec<Tensor> {
                factors
                    .iter()
                    .map(|f| {
                        let g = f.grad().copy();
                        let _ = f.grad().zero_();
                        g
                    })
                    .collect()
            };
            let layer_by_layer = |checkpointing| {
                let pass = model.training_pass(&ids, true, checkpointing);
                let logits = pass.hidden.linear::<Tensor>(model.lm_head(), None);
                (logits * &probe).sum(Kind::Double).backward();
                pass.backward();
                take_grads()
            };
            // First while the factors have no gradient yet (the layer by hand then hands its
            // gradients to autograd to create them), then with gradients to add into.
            let first = layer_by_layer(Checkpointing::None);
            (model.forward(&ids, true) * &probe)
                .sum(Kind::Double)
                .backward();
            let reference = take_grads();
            let runs = [
                ("first", first),
                ("none", layer_by_layer(Checkpointing::None)),
                ("layers", layer_by_layer(Checkpointing::Layers)),
            ];
            for (checkpointing, grads) in runs {
                for (got, want) in grads.iter().zip(&reference) {
                    let gap = (got - want).abs().max().double_value(&[]);
                    let scale = want.abs().max().double_value(&[]);
                    assert!(
                        scale > 0.0 && gap < 1e-10 * scale,
                        "{targets:?} opaque {opaque:?} gated {gated} {checkpointing}: gap {gap} on {scale}"
                    );
                }
            }
        }
    }

    /// On the GPU, in bf16 with the fused kernels, each training path gives the adapters the
    /// gradients autograd gives them through the whole model in fp32 as closely as autograd in
    /// bf16 does: what the f64 test above cannot see (aten's fused norm and its per-row scales,
    /// cuDNN's attention and its layouts, the kernels in place). Every run starts from the same
    /// weights (seeded, scaled as a trained model's are, so bf16 rounds them as it would a real
    /// model's) at a width where the kernels loop over rows wider than a block. Each factor's
    /// gap to fp32 (relative, in norm) may be at most twice bf16 autograd's plus 0.2%, bf16's
    /// own step. Every path is checked (`LORAFORGE_LAYER_BY_HAND`): the whole layer
    /// by hand, the MLP by hand, and autograd layer by layer; the paths by hand twice, first
    /// creating the factors' gradients, then adding to them (the products into fp32 there).
    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn the_layer_by_hand_matches_autograd_on_cuda() {
        let c = config(
            json!({"num_hidden_layers": 2, "hidden_size": 1024, "intermediate_size": 2816,
                              "num_attention_heads": 16, "num_key_value_heads": 4}),
        );
        let device = Device::Cuda(0);
        let base = scaled_checkpoint(&c);
        // `None`: autograd through the whole model; else the training pass with the given
        // `LORAFORGE_LAYER_BY_HAND`, run `passes` times, the last pass's share returned.
        let grads = |kind: Kind, by_hand: Option<&str>, passes: usize| -> Vec<Tensor> {
            let weights = base
                .iter()
                .map(|(name, w)| (name.clone(), w.to_device(device).to_kind(kind)))
                .collect();
            let mut model = LlamaModel::from_weights(c.clone(), weights).unwrap();
            tch::manual_seed(5);
            let mut factors = Vec::new();
            for (_, linear) in model.linears_mut(loraforge_spec::model::LLAMA_TARGET_MODULES) {
                let (inp, out) = (linear.in_features(), linear.out_features());
                let opts = (Kind::Float, device);
                let a =
                    (Tensor::randn([4, inp], opts) / (inp as f64).sqrt()).set_requires_grad(true);
                let b = (Tensor::randn([out, 4], opts) * 0.1).set_requires_grad(true);
                linear.attach(Box::new(Plain {
                    a: a.shallow_clone(),
                    b: b.shallow_clone(),
                    opaque: false,
                    gate: None,
                }));
                factors.push(a);
                factors.push(b);
            }
            tch::manual_seed(6);
            let ids = Tensor::randint(40, [2, 128], (Kind::Int64, device));
            let probe = Tensor::randn([2, 128, 40], (Kind::Float, device));
            let mut before: Vec<Tensor> = Vec::new();
            for _ in 0..passes {
                let copy = |g: Tensor| if g.defined() { g.copy() } else { g };
                before = factors.iter().map(|f| copy(f.grad())).collect();
                match by_hand {
                    Some(mode) => {
                        std::env::set_var("LORAFORGE_LAYER_BY_HAND", mode);
                        let pass = model.training_pass(&ids, true, Checkpointing::None);
                        let logits = pass.hidden.linear::<Tensor>(model.lm_head(), None);
                        (logits.to_kind(Kind::Float) * &probe)
                            .sum(Kind::Float)
                            .backward();
                        pass.backward();
                        std::env::remove_var("LORAFORGE_LAYER_BY_HAND");
                    }
                    None => (model.forward(&ids, true).to_kind(Kind::Float) * &probe)
                        .sum(Kind::Float)
                        .backward(),
                }
            }
            let share = |(f, before): (&Tensor, &Tensor)| match before.defined() {
                true => f.grad() - before,
                false => f.grad().copy(),
            };
            factors.iter().zip(&before).map(share).collect()
        };
        let want = grads(Kind::Float, None, 1);
        let autograd = grads(Kind::BFloat16, None, 1);
        let paths = [
            ("layer by hand", grads(Kind::BFloat16, Some("on"), 1)),
            ("layer by hand, added", grads(Kind::BFloat16, Some("on"), 2)),
            ("mlp by hand", grads(Kind::BFloat16, Some("mlp"), 1)),
            ("mlp by hand, added", grads(Kind::BFloat16, Some("mlp"), 2)),
            ("autograd by layers", grads(Kind::BFloat16, Some("off"), 1)),
        ];
        let mut failures = Vec::new();
        for (i, want) in want.iter().enumerate() {
            let norm = want.norm().double_value(&[]);
            let gap = |t: &Tensor| (t - want).norm().double_value(&[]) / norm;
            let bound = 2.0 * gap(&autograd[i]) + 2e-3;
            let mut line = format!("factor {i:2}: bf16 autograd {:.2e}", gap(&autograd[i]));
            for (name, got) in &paths {
                let g = gap(&got[i]);
                line += &format!(", {name} {g:.2e}");
                if !(norm > 0.0 && g <= bound) {
                    failures.push(format!("factor {i} {name}: {g:.2e} > {bound:.2e}"));
                }
            }
            eprintln!("{line} (of the fp32 gradient's norm)");
        }
        assert!(failures.is_empty(), "{failures:?}");
    }

    /// In bf16 a fresh adapter's share of a layer's output is below the last bit of the
    /// residual stream it joins (the stream grows through the layers; B is as small as AdamW's
    /// first steps leave it). Every path must add the o and down branches to their own products
    /// before the residual, as autograd's does: then the product's rounding dithers the share
    /// into the sum, where added after the residual it is rounded away every time, and early
    /// training steps do not reach the loss (the GPU loss curve against PEFT trailed by 0.11 at
    /// step 4 that way, bench/gpu.md). The share is the bf16 effect of the branches on the
    /// layer's output (with them minus without) projected on the fp32 effect: about 1 under
    /// autograd, 0 where it is lost.
    #[test]
    fn a_fresh_adapters_share_survives_the_residual_in_bf16_on_every_path() {
        let c = config(
            json!({"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
                              "num_attention_heads": 4, "num_key_value_heads": 2}),
        );
        let base = scaled_checkpoint(&c);
        // A residual stream 30 times the size of what a layer adds to it.
        let input = Tensor::randn([2, 32, 256], (Kind::Float, Device::Cpu)) * 30.0;
        let output = |kind: Kind, b_scale: f64, mode: Option<&str>| -> Tensor {
            let weights = base
                .iter()
                .map(|(name, w)| (name.clone(), w.to_kind(kind)))
                .collect();
            let mut model = LlamaModel::from_weights(c.clone(), weights).unwrap();
            tch::manual_seed(5);
            for (_, linear) in model.linears_mut(&["o_proj", "down_proj"]) {
                let (inp, out) = (linear.in_features(), linear.out_features());
                let opts = (Kind::Float, Device::Cpu);
                let a = Tensor::randn([4, inp], opts) / (inp as f64).sqrt();
                let b = Tensor::randn([out, 4], opts).sign() * b_scale;
                linear.attach(Box::new(Plain {
                    a: a.set_requires_grad(true),
                    b: b.set_requires_grad(true),
                    opaque: false,
                    gate: None,
                }));
            }
            let (cos, sin) = rotary_tables(&c, 32, kind, Device::Cpu);
            let x = input.to_kind(kind);
            let layer = &model.layers[0];
            let out = match mode {
                None => layer.forward(&x, (&cos, &sin), None, None, 1e-5, true),
                Some(mode) => {
                    std::env::set_var("LORAFORGE_LAYER_BY_HAND", mode);
                    let out = layer
                        .forward_for_backward(x, (&cos, &sin), None, 1e-5, true)
                        .0;
                    std::env::remove_var("LORAFORGE_LAYER_BY_HAND");
                    out
                }
            };
            out.detach().to_kind(Kind::Float)
        };
        let effect = |kind, mode| output(kind, 5e-3, mode) - output(kind, 0.0, mode);
        let want = effect(Kind::Float, None);
        let share = |got: Tensor| {
            let dot = |a: &Tensor| (a * &want).sum(Kind::Double).double_value(&[]);
            dot(&got) / dot(&want)
        };
        let autograd = share(effect(Kind::BFloat16, None));
        assert!(
            (autograd - 1.0).abs() < 0.2,
            "bf16 autograd's share {autograd:.3}"
        );
        for mode in ["on", "mlp", "off"] {
            let got = share(effect(Kind::BFloat16, Some(mode)));
            eprintln!("LORAFORGE_LAYER_BY_HAND={mode}: share {got:.3} (autograd {autograd:.3})");
            assert!(
                (got - 1.0).abs() < 0.2,
                "LORAFORGE_LAYER_BY_HAND={mode}: share {got:.3}"
            );
        }
    }

    /// A low-rank branch that wants its `∂L/∂ΔW`: what a backward by hand hands its sink is
    /// summed into `by_hand`; under autograd its own forward adds `x Zᵀ` for a zero leaf `Z`,
    /// whose gradient is `∂L/∂ΔW`. `opaque` hides the low-rank form.
    struct Watched {
        a: Tensor,
        b: Tensor,
        zero: Tensor,
        by_hand: std::rc::Rc<std::cell::RefCell<Option<Tensor>>>,
        opaque: bool,
    }

    impl LinearAdapter for Watched {
        fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
            x.linear::<Tensor>(&self.a, None)
                .linear::<Tensor>(&self.b, None)
                * 0.5
                + x.linear::<Tensor>(&self.zero, None)
        }

        fn low_rank(&self, _train: bool) -> Option<LowRank> {
            if self.opaque {
                return None;
            }
            let sum = std::rc::Rc::clone(&self.by_hand);
            let branch = LowRank {
                a: self.a.shallow_clone(),
                b: self.b.shallow_clone(),
                scaling: 0.5,
                delta_gradient: None,
            };
            Some(branch.with_delta_gradient(move |grad| {
                let mut sum = sum.borrow_mut();
                *sum = Some(match sum.take() {
                    Some(s) => s + grad,
                    None => grad,
                });
            }))
        }
    }

    /// A branch that wants `∂L/∂ΔW` ([`DeltaGradientSink`]) gets from the layer by hand what
    /// autograd gives a zero `ΔW` leaf through the whole model, in f64 to 1e-10, whichever
    /// path its layer takes (the layer by hand; the MLP by hand, attention autograd's, where
    /// o is opaque; autograd's whole layer where gate is), with and without checkpointing;
    /// and its factors' gradients are autograd's too.
    #[test]
    fn the_layer_by_hand_hands_branches_their_delta_gradient() {
        let c = config(json!({"num_hidden_layers": 2}));
        let all = loraforge_spec::model::LLAMA_TARGET_MODULES;
        for opaque in [None, Some("o_proj"), Some("gate_proj")] {
            let mut model = double_model(&c);
            tch::manual_seed(5);
            let mut watched = Vec::new();
            for (name, linear) in model.linears_mut(all) {
                let (inp, out) = (linear.in_features(), linear.out_features());
                let opts = (Kind::Double, Device::Cpu);
                let (a, b) = rank_3_factors(inp, out);
                let zero = Tensor::zeros([out, inp], opts).set_requires_grad(true);
                let by_hand = std::rc::Rc::new(std::cell::RefCell::new(None));
                linear.attach(Box::new(Watched {
                    a: a.shallow_clone(),
                    b: b.shallow_clone(),
                    zero: zero.shallow_clone(),
                    by_hand: std::rc::Rc::clone(&by_hand),
                    opaque: opaque.is_some_and(|o| name.ends_with(o)),
                }));
                watched.push((name, [a, b, zero], by_hand));
            }
            let ids = Tensor::randint(40, [2, 7], (Kind::Int64, Device::Cpu));
            let probe = Tensor::arange(2 * 7 * 40, (Kind::Double, Device::Cpu))
                .cos()
                .view([2, 7, 40]);
            // Per module: ∂L/∂ΔW (from the sink, or the zero leaf), whether the sink gave it,
            // and the factors' gradients; all of them reset.
            let take = || -> Vec<(Tensor, bool, Vec<Tensor>)> {
                watched
                    .iter()
                    .map(|(_, [a, b, zero], by_hand)| {
                        let grad_of = |t: &Tensor| {
                            let g = t.grad();
                            g.defined().then(|| {
                                let taken = g.copy();
                                let _ = t.grad().zero_();
                                taken
                            })
                        };
                        let sunk = by_hand.borrow_mut().take();
                        let from_sink = sunk.is_some();
                        let delta = match (sunk, grad_of(zero)) {
                            (Some(s), Some(leaf)) => s + leaf,
                            (s, leaf) => s.or(leaf).expect("a gradient of ΔW"),
                        };
                        let factors = [a, b].into_iter().filter_map(grad_of).collect();
                        (delta, from_sink, factors)
                    })
                    .collect()
            };
            (model.forward(&ids, true) * &probe)
                .sum(Kind::Double)
                .backward();
            let reference = take();
            for checkpointing in [Checkpointing::None, Checkpointing::Layers] {
                let pass = model.training_pass(&ids, true, checkpointing);
                let logits = pass.hidden.linear::<Tensor>(model.lm_head(), None);
                (logits * &probe).sum(Kind::Double).backward();
                pass.backward();
                let got = take();
                for (((name, ..), (got, sunk, factors)), (want, _, want_factors)) in
                    watched.iter().zip(&got).zip(&reference)
                {
                    let case = format!("{name} opaque {opaque:?} {checkpointing:?}");
                    let gap = (got - want).abs().max().double_value(&[]);
                    let scale = want.abs().max().double_value(&[]);
                    assert!(
                        scale > 0.0 && gap < 1e-10 * scale,
                        "{case}: {gap} on {scale}"
                    );
                    for (got, want) in factors.iter().zip(want_factors) {
                        let gap = (got - want).abs().max().double_value(&[]);
                        assert!(gap < 1e-10 * want.abs().max().double_value(&[]), "{case}");
                    }
                    // The layer by hand's projections are the sink's; the others autograd's.
                    let attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
                        .iter()
                        .any(|p| name.ends_with(p));
                    let by_hand = match opaque {
                        None => true,
                        Some("o_proj") => !attention,
                        _ => false,
                    };
                    assert_eq!(*sunk, by_hand, "{case}");
                }
            }
        }
    }

    /// Which layers run by hand: all of it where every branch is plain, the MLP alone where an
    /// attention branch is not, none of it where an MLP branch is not.
    #[test]
    fn the_plain_branches_decide_what_runs_by_hand() {
        let c = config(json!({"num_hidden_layers": 1}));
        let all = loraforge_spec::model::LLAMA_TARGET_MODULES;
        for (opaque, expected) in [
            (None, "hand"),
            (Some("o_proj"), "mlp"),
            (Some("up_proj"), "whole"),
        ] {
            let mut model = LlamaModel::from_weights(c.clone(), checkpoint(&c)).unwrap();
            for (name, linear) in model.linears_mut(all) {
                let (inp, out) = (linear.in_features(), linear.out_features());
                linear.attach(Box::new(Plain {
                    a: Tensor::randn([2, inp], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                    b: Tensor::zeros([out, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                    opaque: opaque.is_some_and(|o| name.ends_with(o)),
                    gate: None,
                }));
            }
            let x = Tensor::randn([1, 4, 32], (Kind::Float, Device::Cpu));
            let rope = rotary_tables(&c, 4, Kind::Float, Device::Cpu);
            let graph = model.layers[0]
                .forward_for_backward(x, (&rope.0, &rope.1), None, 1e-5, true)
                .1;
            let kind = match graph {
                LayerGraph::Hand(_) => "hand",
                LayerGraph::HandMlp(_) => "mlp",
                LayerGraph::Whole { .. } => "whole",
            };
            assert_eq!(kind, expected, "opaque {opaque:?}");
        }
    }

    #[test]
    fn sliding_window_mask_sees_the_window_up_to_itself() {
        let mask =
            Vec::<Vec<i64>>::try_from(sliding_window_mask(4, 2, Device::Cpu).to_kind(Kind::Int64))
                .unwrap();
        assert_eq!(
            mask,
            [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
        );
    }

    /// On the CPU an offloaded input is the input itself (so `offload` is `layers` there, and
    /// the training tests' `offload` run checks the rest of the path); on CUDA, where this
    /// runs too, an exact copy in pinned host memory that comes back unchanged.
    #[test]
    fn an_offloaded_input_is_a_pinned_host_copy_or_on_the_cpu_the_input() {
        let x = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let kept = to_host(&x);
        assert_eq!(kept.data_ptr(), x.data_ptr());
        assert_eq!(to_device(&kept, Device::Cpu).data_ptr(), x.data_ptr());
        if tch::Cuda::is_available() {
            let cuda = Device::Cuda(0);
            let x = x.to_device(cuda).to_kind(Kind::BFloat16);
            let kept = to_host(&x);
            assert_eq!((kept.device(), kept.kind()), (Device::Cpu, Kind::BFloat16));
            assert!(kept.is_pinned(cuda));
            let back = to_device(&kept, cuda);
            assert_eq!(back.device(), cuda);
            assert!(back.equal(&x));
        }
    }
}
