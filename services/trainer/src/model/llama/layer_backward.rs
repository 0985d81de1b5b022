//! A training pass's backward, run layer by layer, by hand where the adapters allow.
//!
//! Each decoder layer is its own piece of the backward pass: [`TrainingPass::backward`] hands a
//! layer its output's gradient and gets back its input's, last layer first. Where every adapter
//! of the layer is a low-rank branch in this pass ([`LinearAdapter::low_rank`]: LoRA without
//! dropout, and the adaptive methods whose factors derive from their parameters) or absent,
//! and q/k/v and gate/up are merged products, the whole layer runs by hand
//! ([`LayerGraph::Hand`]; on CUDA only when asked for, see [`by_hand`]): the base weights are
//! frozen, so the backward is the activations' gradients and the factors' (the same products
//! autograd would run), and it
//! keeps only what those need: the layer's input and the norms' per-row scales (the `A`
//! gradients of the products after a norm take its input with the scales moved onto the
//! rank-sized side, [`ProductInput::Normed`], so the normalised rows are never recomputed),
//! the roped q and k and v with attention's output (for
//! attention's backward, the one piece left to autograd, on its own small graph, its output's
//! gradient handed in by [`backward_with_grad`]), the residual
//! after attention, gate and up, and the branches' rank-sized products. `silu(gate) * up`, RoPE
//! and RMSNorm's backward are one fused kernel each on CUDA in bf16 (model/cuda_kernels.rs);
//! elsewhere libtorch's operations compute the same. By their sizes that keeps about 11.5
//! `(tokens, hidden)` tensors a layer on Llama-3-8B where autograd's graph kept 13.5, and
//! autograd's own bookkeeping (and the dot products that fed it our gradients) is gone.
//! Each block's branches are taken once per pass ([`BlockBranches`]) and kept for the
//! backward, so factors derived from parameters are derived once; a branch that wants its
//! whole update's gradient `∂L/∂ΔW` gets it here, from the projection's input and output
//! gradient ([`super::DeltaGradientSink`]).
//!
//! Where the attention's adapters are not plain but the MLP's are, only the MLP runs by hand
//! ([`LayerGraph::HandMlp`]: the layer's graph stops at the MLP's input, and the MLP's input
//! gradient is handed to it through a dot product, tch having no custom autograd functions);
//! anything else keeps the whole layer autograd's ([`LayerGraph::Whole`]). Either way the next
//! layer starts from a leaf, so a layer's graph ends at its own output. Tested in f64 against
//! autograd through the whole model (`the_layer_by_layer_backward_matches_autograd`).
//!
//! [`TrainingPass::backward`]: super::TrainingPass::backward
//! [`LinearAdapter::low_rank`]: super::LinearAdapter::low_rank

use super::{
    add_rms_norm_with_rstd, apply_rotary, attend, group_product, plain_branches, rms_norm,
    rms_norm_with_rstd, weight_gradient, Backward, DecoderLayer, Linear, LowRank, MergedBranches,
};
use crate::model::backward_with_grad::backward_with_grad;
use crate::model::cuda_kernels::{self, Heads};
use crate::model::timeline;
use tch::{Kind, Tensor};

/// What a layer's training forward kept for its backward.
pub(super) enum LayerGraph {
    /// The whole layer under autograd; `out` is its output.
    Whole { input: Tensor, out: Tensor },
    /// Up to the MLP's input under autograd, the MLP by hand.
    HandMlp(HandMlp),
    /// The whole layer by hand, attention's core on a graph of its own.
    Hand(Box<HandLayer>),
}

/// What the layer by hand keeps for its backward.
pub(super) struct HandLayer {
    /// The layer's input `(tokens, hidden)`, detached; whether the layer before wants its
    /// gradient.
    input: Tensor,
    wants_input_grad: bool,
    /// The output's shape `(batch, seq, hidden)`.
    shape: Vec<i64>,
    /// The input norm's per-row `1 / rms` ([`ProductInput::Normed`]).
    rstd1: Tensor,
    /// q's, k's and v's branches and their merged product's.
    qkv: GroupKept,
    /// RoPE's tables `(seq, head_dim)` and the heads.
    rope: (Tensor, Tensor),
    heads: Heads,
    attention: AttentionGraph,
    /// The o projection's branch and its product's.
    o: GroupKept,
    /// The residual stream after attention `(tokens, hidden)`, and its norm's `1 / rms`.
    attended: Tensor,
    rstd2: Tensor,
    mlp: MlpKept,
}

/// Attention's core, `sdpa(q, k, v)`, as a graph of its own: leaves q, k (roped) and v
/// `(batch, heads, seq, head_dim)`, and its output.
struct AttentionGraph {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    /// The output as the o projection's input `(tokens, heads * head_dim)`, detached.
    flat: Tensor,
}

/// What the MLP by hand keeps (either way it runs by hand).
struct MlpKept {
    /// Gate and up side by side `(tokens, 2 * intermediate)`.
    gate_up: Tensor,
    /// Gate's and up's branches and their merged product's.
    gate_up_branches: GroupKept,
    /// The down projection's branch and its product's.
    down: GroupKept,
}

/// A group of projections' branches (q/k/v, gate/up, or o or down alone) as its backward needs
/// them: each part's (`None` for a part without an adapter) and the group's product of them
/// ([`group_product`]: its `h`, and the factors packed for the products).
struct GroupKept {
    branches: Vec<Option<LowRank>>,
    product: Option<MergedBranches>,
}

/// The low-rank branches of a block's projections in one pass: the merged group's (q/k/v or
/// gate/up; `None` for a part without an adapter) and the one after it (o or down). Taken
/// once per pass ([`LinearAdapter::low_rank`]), so a method whose factors derive from its
/// parameters derives them once, and the backward uses them and their small graphs.
///
/// [`LinearAdapter::low_rank`]: super::LinearAdapter::low_rank
struct BlockBranches {
    merged: Vec<Option<LowRank>>,
    last: Option<LowRank>,
}

impl BlockBranches {
    /// `None` where some adapter among them is not a plain low-rank branch in this pass.
    fn of(merged: &[&Linear], last: &Linear, train: bool) -> Option<BlockBranches> {
        Some(BlockBranches {
            merged: plain_branches(merged, train, Backward::ByHand)?,
            last: plain_branch(last, train).ok()?,
        })
    }
}

pub(super) struct HandMlp {
    input: Tensor,
    /// The residual stream after attention `(batch, seq, hidden)`, a root of the layer's graph.
    attended: Tensor,
    /// Its norm, the MLP's input `(tokens, hidden)`, the graph's other root.
    mlp_in: Tensor,
    mlp: MlpKept,
}

/// A projection's plain branch, or `None` without an adapter; `Err` for an adapter that is not
/// a plain low-rank branch in this pass.
fn plain_branch(linear: &Linear, train: bool) -> Result<Option<LowRank>, ()> {
    plain_branches(&[linear], train, Backward::ByHand)
        .map(|mut one| one.remove(0))
        .ok_or(())
}

/// Gate and up, the halves of their merged product.
fn halves(gate_up: &Tensor) -> (Tensor, Tensor) {
    let half = gate_up.size()[1] / 2;
    (gate_up.narrow(1, 0, half), gate_up.narrow(1, half, half))
}

/// What runs by hand, from `LORAFORGE_LAYER_BY_HAND`: `on` (the default), the whole layer
/// where its adapters allow; `mlp`, the MLP alone, attention under autograd; `off`, neither
/// (autograd's whole layer, the reference). On the CPU (fp32) the whole layer matches autograd
/// and PEFT (tests, bench/README.md). On an H100 it is the fastest path, and its 200-step loss
/// curves in bf16 land within PEFT's own run-to-run spread: +0.11%, +0.55% and -0.28% from
/// PEFT's final loss in three runs, the MLP alone +0.72% beside them, where one earlier run
/// had ended 5.6% below and was not reproduced (bench/gpu.md, "Eighth round").
#[derive(Clone, Copy, PartialEq, Eq)]
enum ByHand {
    Whole,
    Mlp,
    Off,
}

fn by_hand() -> ByHand {
    match std::env::var("LORAFORGE_LAYER_BY_HAND").as_deref() {
        Ok("on" | "1") => ByHand::Whole,
        Ok("mlp") => ByHand::Mlp,
        Ok("off" | "0") => ByHand::Off,
        _ => ByHand::Whole,
    }
}

impl DecoderLayer {
    /// The layer's output for `input` (a leaf: requiring grad where the layer before wants its
    /// gradient), detached, and what [`DecoderLayer::backward`] needs. The output is what
    /// [`DecoderLayer::forward`] computes (by hand, up to the order of roundings in bf16).
    pub(super) fn forward_for_backward(
        &self,
        input: Tensor,
        rope: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        eps: f64,
        train: bool,
    ) -> (Tensor, LayerGraph) {
        let mlp = &self.mlp;
        let attn = &self.self_attn;
        let by_hand = by_hand();
        let mlp_branches = (by_hand != ByHand::Off && mlp.gate_up.is_some())
            .then(|| BlockBranches::of(&[&mlp.gate_proj, &mlp.up_proj], &mlp.down_proj, train))
            .flatten();
        let Some(mlp_branches) = mlp_branches else {
            let out = self.forward(&input, rope, mask, None, eps, train);
            return (out.detach(), LayerGraph::Whole { input, out });
        };
        let qkv_parts = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
        let attention_branches = (by_hand == ByHand::Whole && attn.qkv.is_some())
            .then(|| BlockBranches::of(&qkv_parts, &attn.o_proj, train))
            .flatten();
        if let Some(attention_branches) = attention_branches {
            let branches = [attention_branches, mlp_branches];
            return self.forward_by_hand(input, rope, mask, eps, branches);
        }
        let normed = rms_norm(&input, &self.input_layernorm, eps);
        let attended = &input + attn.forward(&normed, rope.0, rope.1, mask, None, train);
        let mlp_in = rms_norm(&attended, &self.post_attention_layernorm, eps);
        let mlp_in = mlp_in.reshape([-1, mlp_in.size()[2]]);
        let (out, mlp) = tch::no_grad(|| {
            let residual = attended.reshape([-1, mlp_in.size()[1]]);
            self.mlp_forward(&mlp_in, &residual, mlp_branches)
        });
        let out = out.view(attended.size().as_slice());
        let graph = LayerGraph::HandMlp(HandMlp {
            input,
            attended,
            mlp_in,
            mlp,
        });
        (out, graph)
    }

    /// The MLP's output plus `residual`, for `mlp_in (tokens, hidden)`, outside autograd, and
    /// what its backward needs.
    fn mlp_forward(
        &self,
        mlp_in: &Tensor,
        residual: &Tensor,
        branches: BlockBranches,
    ) -> (Tensor, MlpKept) {
        let mlp = &self.mlp;
        let merged = mlp
            .gate_up
            .as_ref()
            .expect("an MLP by hand has gate/up merged");
        let parts = [&mlp.gate_proj, &mlp.up_proj];
        let product = merged.product_of(&parts, &branches.merged, mlp_in, Backward::ByHand);
        let (gate_up, product) = product;
        let gated = swiglu(&gate_up);
        let (y, down) = single_forward(&mlp.down_proj, branches.last, &gated, Some(residual));
        let kept = MlpKept {
            gate_up,
            gate_up_branches: GroupKept {
                branches: branches.merged,
                product,
            },
            down,
        };
        (y, kept)
    }

    /// The layer by hand ([`LayerGraph::Hand`]).
    fn forward_by_hand(
        &self,
        input: Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        eps: f64,
        [attention_branches, mlp_branches]: [BlockBranches; 2],
    ) -> (Tensor, LayerGraph) {
        let attn = &self.self_attn;
        let shape = input.size();
        let (batch, seq, hidden) = (shape[0], shape[1], shape[2]);
        let heads = (attn.heads, attn.kv_heads, attn.head_dim);
        let (h, kvh, hd) = heads;
        let wants_input_grad = input.requires_grad();
        let x = input.detach().reshape([-1, hidden]);
        let (qkv, qkv_product, rstd1) = tch::no_grad(|| {
            let (normed, rstd1) = rms_norm_with_rstd(&x, &self.input_layernorm, eps);
            let qkv_parts = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
            let merged = attn
                .qkv
                .as_ref()
                .expect("attention by hand has q/k/v merged");
            let branches = &attention_branches.merged;
            let (qkv, product) = merged.product_of(&qkv_parts, branches, &normed, Backward::ByHand);
            (qkv, product, rstd1)
        });
        timeline::mark("fwd: norm, qkv");
        // Attention's core on a graph of its own: q, k (roped) and v as leaves, q and k laid
        // out `(batch, seq, heads, head_dim)` in memory as the RoPE kernel writes them, v
        // `(batch, heads, seq, head_dim)`: the layouts autograd's path hands attention
        // (`Attention::forward`), which the GPU loss curve against PEFT validated.
        let (q, k, v) = tch::no_grad(|| {
            let (q, k) = rope(&qkv, cos, sin, heads);
            let to_heads = |t: Tensor, n: i64| t.view([batch, seq, n, hd]).transpose(1, 2);
            let v = to_heads(qkv.narrow(1, (h + kvh) * hd, kvh * hd), kvh).contiguous();
            (to_heads(q, h), to_heads(k, kvh), v)
        });
        drop(qkv);
        let (q, k, v) = (
            q.set_requires_grad(true),
            k.set_requires_grad(true),
            v.set_requires_grad(true),
        );
        let out = tch::with_grad(|| attend(&q, &k, &v, mask));
        timeline::mark("fwd: rope, attention");
        let flat = out.detach().transpose(1, 2).reshape([-1, h * hd]);
        let o = attention_branches.last;
        let (layer_out, o, attended, rstd2, mlp) = tch::no_grad(|| {
            let (o_out, o) = single_forward(&attn.o_proj, o, &flat, None);
            let w2 = &self.post_attention_layernorm;
            let (attended, mlp_in, rstd2) = add_rms_norm_with_rstd(&o_out, &x, w2, eps);
            let (y, mlp) = self.mlp_forward(&mlp_in, &attended, mlp_branches);
            (y, o, attended, rstd2, mlp)
        });
        timeline::mark("fwd: o, norm, mlp");
        let kept = HandLayer {
            input: x,
            wants_input_grad,
            shape: shape.clone(),
            rstd1,
            qkv: GroupKept {
                branches: attention_branches.merged,
                product: qkv_product,
            },
            rope: (cos.shallow_clone(), sin.shallow_clone()),
            heads,
            attention: AttentionGraph { q, k, v, out, flat },
            o,
            attended,
            rstd2,
            mlp,
        };
        (
            layer_out.view(shape.as_slice()),
            LayerGraph::Hand(Box::new(kept)),
        )
    }

    /// Accumulates the gradients of the layer's adapters for `grad`, the gradient of its
    /// output, and returns the gradient of its input (undefined where the input wanted none).
    pub(super) fn backward(&self, graph: LayerGraph, grad: &Tensor) -> Tensor {
        let (input, surrogate) = match graph {
            LayerGraph::Whole { input, out } => {
                if out.requires_grad() {
                    backward_with_grad(&out, grad);
                }
                return input.grad();
            }
            LayerGraph::HandMlp(kept) => {
                let surrogate = self.mlp_surrogate(&kept, grad);
                (kept.input, surrogate)
            }
            LayerGraph::Hand(kept) => return self.backward_by_hand(*kept, grad),
        };
        if let Some(surrogate) = surrogate.filter(Tensor::requires_grad) {
            surrogate.backward();
        }
        input.grad()
    }

    /// A scalar whose backward gives the layer's graph its gradients: the dot products of the
    /// graph's roots with their gradients, the MLP input's worked out here (the MLP's factors
    /// get theirs directly). `None` where nothing wants a gradient.
    fn mlp_surrogate(&self, kept: &HandMlp, grad: &Tensor) -> Option<Tensor> {
        let g = grad.reshape([-1, grad.size()[2]]);
        let mut grads = FactorGrads::default();
        let mlp_in = ProductInput::Plain(&kept.mlp_in);
        let d_mlp_in = tch::no_grad(|| self.mlp_backward(&kept.mlp, mlp_in, &g, &mut grads));
        let mut terms: Vec<Tensor> = [(&kept.attended, &g), (&kept.mlp_in, &d_mlp_in)]
            .into_iter()
            .filter(|(root, _)| root.requires_grad())
            .map(|(root, grad)| dot(root, grad).to_kind(Kind::Float))
            .collect();
        terms.extend(grads.surrogate());
        (!terms.is_empty()).then(|| Tensor::stack(&terms, 0).sum(Kind::Float))
    }

    /// The MLP's backward for `g`, the gradient of its output `(tokens, hidden)`, and `mlp_in`,
    /// its input: the input's gradient; the factors' gradients go to `grads`.
    fn mlp_backward(
        &self,
        kept: &MlpKept,
        mlp_in: ProductInput,
        g: &Tensor,
        grads: &mut FactorGrads,
    ) -> Tensor {
        let mlp = &self.mlp;
        let down = &mlp.down_proj;
        // The down projection's input is SwiGLU's output, not kept: its `A` gradient comes
        // out of SwiGLU's backward.
        let (d_gated, dh) = group_backward(&down.weight, &[down], &kept.down, g, None, grads, true);
        let d_gated = d_gated.expect("asked for");
        let down_branch = kept.down.branches[0].as_ref();
        if let Some(sink) = down_branch.and_then(|b| b.delta_gradient.as_ref()) {
            sink(weight_gradient(g, &swiglu(&kept.gate_up)));
        }
        let (d_gate_up, a_grad) = swiglu_backward(&kept.gate_up, &d_gated, dh.as_ref());
        if let (Some(branch), Some(a_grad)) = (down_branch, a_grad) {
            grads.add(&branch.a, &a_grad, None);
        }
        let merged = mlp
            .gate_up
            .as_ref()
            .expect("an MLP by hand has gate/up merged");
        let parts = [&mlp.gate_proj, &mlp.up_proj];
        let kept = &kept.gate_up_branches;
        let x = Some(mlp_in);
        group_backward(&merged.weight, &parts, kept, &d_gate_up, x, grads, true)
            .0
            .expect("asked for")
    }

    /// The layer by hand's backward ([`LayerGraph::Hand`]).
    fn backward_by_hand(&self, kept: HandLayer, grad: &Tensor) -> Tensor {
        let attn = &self.self_attn;
        let (h, kvh, hd) = kept.heads;
        let tokens = kept.input.size()[0];
        let mut grads = FactorGrads::default();
        let g = grad.reshape([-1, *kept.shape.last().expect("a hidden size")]);
        let (d_attended, d_flat) = tch::no_grad(|| {
            let (w2, rstd2) = (&self.post_attention_layernorm, &kept.rstd2);
            let mlp_in = ProductInput::Normed {
                x: &kept.attended,
                rstd: rstd2,
                weight: w2,
            };
            let d_mlp_in = self.mlp_backward(&kept.mlp, mlp_in, &g, &mut grads);
            let d_attended = rms_norm_backward(&d_mlp_in, &kept.attended, rstd2, w2, Some(&g));
            let o = &attn.o_proj;
            let flat = ProductInput::Plain(&kept.attention.flat);
            let (d_flat, _) = group_backward(
                &o.weight,
                &[o],
                &kept.o,
                &d_attended,
                Some(flat),
                &mut grads,
                true,
            );
            (d_attended, d_flat.expect("asked for"))
        });
        timeline::mark("bwd: mlp, norm, o");
        let AttentionGraph { q, k, v, out, flat } = kept.attention;
        drop(flat);
        // The gradient of `out (batch, heads, seq, head_dim)`: a view of `d_flat (tokens,
        // heads * head_dim)`, in the layout cuDNN's attention gives `out` on CUDA.
        let d_out = d_flat
            .view([out.size()[0], out.size()[2], h, hd])
            .transpose(1, 2);
        backward_with_grad(&out, &d_out);
        drop(out);
        timeline::mark("bwd: attention");
        let d_input = tch::no_grad(|| {
            let to_tokens =
                |t: Tensor, n: i64| t.transpose(1, 2).contiguous().view([tokens, n, hd]);
            let (dq, dk, dv) = (to_tokens(q.grad(), h), to_tokens(k.grad(), kvh), v.grad());
            drop((q, k));
            let width = (h + 2 * kvh) * hd;
            let d_qkv = Tensor::empty([tokens, width], (dq.kind(), dq.device()));
            rope_backward(&dq, &dk, &kept.rope, &d_qkv, kept.heads);
            let d_v = dv.transpose(1, 2).reshape([tokens, kvh * hd]);
            d_qkv.narrow(1, (h + kvh) * hd, kvh * hd).copy_(&d_v);
            let normed = ProductInput::Normed {
                x: &kept.input,
                rstd: &kept.rstd1,
                weight: &self.input_layernorm,
            };
            let merged = attn
                .qkv
                .as_ref()
                .expect("attention by hand has q/k/v merged");
            let parts = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
            let (qkv, wants) = (&kept.qkv, kept.wants_input_grad);
            let (d_normed, _) = group_backward(
                &merged.weight,
                &parts,
                qkv,
                &d_qkv,
                Some(normed),
                &mut grads,
                wants,
            );
            d_normed.map(|d_normed| {
                let (w1, rstd1) = (&self.input_layernorm, &kept.rstd1);
                rms_norm_backward(&d_normed, &kept.input, rstd1, w1, Some(&d_attended))
                    .view(kept.shape.as_slice())
            })
        });
        timeline::mark("bwd: rope, qkv, norm");
        if let Some(surrogate) = grads.surrogate() {
            surrogate.backward();
        }
        d_input.unwrap_or_else(Tensor::new)
    }
}

/// `y = x W^T (+ bias) (+ residual)` for a single projection and its plain branch (`None`
/// without an adapter), as a group of one ([`group_product`]), for `x (tokens, in)`, and what
/// its backward needs (o's residual is added by the norm after it, in one kernel with it:
/// [`add_rms_norm_with_rstd`]). The branch goes into the product before the residual does, as
/// autograd's path adds them: in bf16 a fresh adapter's share of the output is far below the
/// residual stream's last bit, and added after the residual it would be rounded away every
/// time (no dither from the product's own rounding), so early updates would not reach the
/// loss (bench/gpu.md, third round, "What was wrong").
fn single_forward(
    linear: &Linear,
    branch: Option<LowRank>,
    x: &Tensor,
    residual: Option<&Tensor>,
) -> (Tensor, GroupKept) {
    let branches = vec![branch];
    let frozen = (&linear.weight, linear.bias.as_ref());
    let (mut y, product) = group_product(frozen, &[linear], &branches, x, Backward::ByHand);
    if let Some(residual) = residual {
        y += residual;
    }
    (y, GroupKept { branches, product })
}

/// A group's backward ([`group_product`] for the frozen `weight` of `parts`, and what it kept)
/// for `d_y (tokens, sum of out_i)`: the input's gradient `d x = d_y W (+ dh a)` where
/// `want_dx`, and `dh = d_y b`, each part's `scaling d_y_i B_i` side by side `(tokens, total
/// r)`. Each part's `B` gradient, `scaling d_y_iᵀ h_i`, goes to `grads`; given the group's
/// input `x`, so do the `A` gradients, `dh_iᵀ x`, and a part's `d_y_iᵀ x` to its sink where it
/// has one (without it, the caller has those to do).
fn group_backward(
    weight: &Tensor,
    parts: &[&Linear],
    kept: &GroupKept,
    d_y: &Tensor,
    x: Option<ProductInput>,
    grads: &mut FactorGrads,
    want_dx: bool,
) -> (Option<Tensor>, Option<Tensor>) {
    let Some(MergedBranches { h, a, b }) = &kept.product else {
        return (want_dx.then(|| d_y.mm(weight)), None);
    };
    let dh = d_y.mm(b);
    let d_x = want_dx.then(|| frozen_input_grad(dh.mm(a), d_y, weight));
    // `h` scaled for the `B` gradients: in one kernel where the parts share their scaling
    // (LoRA's `alpha / r` unless ranks differ), else part by part.
    let scalings: Vec<f64> = kept.branches.iter().flatten().map(|b| b.scaling).collect();
    let shared = scalings.windows(2).all(|w| w[0] == w[1]);
    let h_scaled = shared.then(|| h * scalings[0]);
    let mut a_factors = Vec::new();
    let (mut row, mut col) = (0, 0);
    for (part, branch) in parts.iter().zip(&kept.branches) {
        let out = part.out_features();
        if let Some(branch) = branch {
            let r = branch.a.size()[0];
            let d_part = d_y.narrow(1, row, out);
            if let (Some(sink), Some(x)) = (&branch.delta_gradient, &x) {
                sink(x.weight_gradient(&d_part));
            }
            let h_part = match &h_scaled {
                Some(h) => h.narrow(1, col, r),
                None => h.narrow(1, col, r) * branch.scaling,
            };
            grads.add_product(&branch.b, &d_part.tr(), &h_part);
            a_factors.push((&branch.a, col, r));
            col += r;
        }
        row += out;
    }
    if let Some(x) = x {
        x.add_a_gradients(&dh, &a_factors, grads);
    }
    (d_x, Some(dh))
}

/// `branch + d_y W`: the frozen weight's input gradient accumulated onto the branch's share
/// `branch (tokens, in)` in place, as [`super::branch_then_frozen`] does forward.
fn frozen_input_grad(branch: Tensor, d_y: &Tensor, weight: &Tensor) -> Tensor {
    let mut d_x = branch;
    d_x.addmm_(d_y, weight)
}

/// Where the layer by hand's factor gradients go, each as it comes: into the factor's `.grad`
/// where it has one (after the first step, its slot of the optimizer's flat fp32 buffer), a
/// product accumulated there by the product itself (on CUDA from bf16 operands into fp32,
/// `addmm` with an output dtype) where a product and then an add took two kernels; for a
/// factor that has none yet, or that is derived from the adapter's parameters
/// ([`LowRank::derived`]: not a leaf), a term whose backward creates or reaches it (its dot
/// product with the gradient), summed by [`FactorGrads::surrogate`] for the caller to run.
#[derive(Default)]
struct FactorGrads {
    terms: Vec<Tensor>,
}

/// Where one factor's gradient goes ([`FactorGrads`]).
enum GradSlot {
    /// The factor wants none.
    Unwanted,
    /// Its `.grad`, added to in place.
    Grad(Tensor),
    /// A term for autograd.
    Term,
}

impl FactorGrads {
    fn slot(factor: &Tensor) -> GradSlot {
        if !factor.requires_grad() {
            return GradSlot::Unwanted;
        }
        let grad = match factor.is_leaf() {
            true => factor.grad(),
            false => Tensor::new(),
        };
        match grad.defined() {
            true => GradSlot::Grad(grad),
            false => GradSlot::Term,
        }
    }

    /// Adds `m1 m2` to `factor`'s gradient.
    fn add_product(&mut self, factor: &Tensor, m1: &Tensor, m2: &Tensor) {
        match Self::slot(factor) {
            GradSlot::Unwanted => {}
            GradSlot::Grad(grad) => tch::no_grad(|| accumulate_product(grad, m1, m2)),
            GradSlot::Term => self.term(factor, &m1.mm(m2)),
        }
    }

    /// Adds `d`, times `columns` (a factor per column) where given, to `factor`'s gradient:
    /// one kernel, reading `d` in its own dtype.
    fn add(&mut self, factor: &Tensor, d: &Tensor, columns: Option<&Tensor>) {
        match Self::slot(factor) {
            GradSlot::Unwanted => {}
            GradSlot::Grad(mut grad) => tch::no_grad(|| match columns {
                Some(w) => {
                    if grad.f_addcmul_(d, w).is_err() {
                        grad += d.to_kind(grad.kind()) * w.to_kind(grad.kind());
                    }
                }
                None => grad += d,
            }),
            GradSlot::Term => match columns {
                Some(w) => self.term(factor, &(d * w)),
                None => self.term(factor, d),
            },
        }
    }

    fn term(&mut self, factor: &Tensor, d: &Tensor) {
        let term = tch::with_grad(|| (factor * d.to_kind(factor.kind())).sum(Kind::Float));
        self.terms.push(term);
    }

    /// The sum of the terms, whose backward gives the rest their gradients; `None` if none.
    fn surrogate(self) -> Option<Tensor> {
        (!self.terms.is_empty()).then(|| Tensor::stack(&self.terms, 0).sum(Kind::Float))
    }
}

/// `grad += m1 m2` in place, in `grad`'s dtype: where the operands are of another (bf16 into an
/// fp32 gradient), the product's own output on CUDA (`addmm` with an output dtype: the products
/// of bf16 numbers are exact in fp32, as in [`weight_gradient`]), else a product and an add.
fn accumulate_product(mut grad: Tensor, m1: &Tensor, m2: &Tensor) {
    if m1.kind() == grad.kind() {
        let _ = grad.addmm_(m1, m2);
        return;
    }
    let into_grad =
        grad.device().is_cuda() && grad.f_addmm_dtype_out(&grad, m1, m2, grad.kind()).is_ok();
    if !into_grad {
        grad += m1.mm(m2);
    }
}

/// RoPE of the q and k heads of `qkv (tokens, width)`: `(tokens, heads, head_dim)` and
/// `(tokens, kv_heads, head_dim)`. One kernel on CUDA in bf16, else [`apply_rotary`].
fn rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: Heads) -> (Tensor, Tensor) {
    if let Some(fused) = cuda_kernels::rope(qkv, cos, sin, heads) {
        return fused;
    }
    let (h, kvh, hd) = heads;
    let tokens = qkv.size()[0];
    let seq = cos.size()[0];
    let roped = |offset: i64, n: i64| {
        let x = qkv
            .narrow(1, offset, n * hd)
            .view([tokens / seq, seq, n, hd])
            .transpose(1, 2);
        apply_rotary(&x, cos, sin)
            .transpose(1, 2)
            .contiguous()
            .view([tokens, n, hd])
    };
    (roped(0, h), roped(h * hd, kvh))
}

/// [`rope`]'s backward for `dq (tokens, heads, head_dim)` and `dk`, written into the q and k
/// columns of `d_qkv`: `dx = dy cos + rotate_half^T(dy sin)`, `rotate_half^T(z) = (z2, -z1)`.
fn rope_backward(
    dq: &Tensor,
    dk: &Tensor,
    (cos, sin): &(Tensor, Tensor),
    d_qkv: &Tensor,
    heads: Heads,
) {
    if cuda_kernels::rope_backward(dq, dk, cos, sin, d_qkv, heads) {
        return;
    }
    let (h, _, hd) = heads;
    let (tokens, seq) = (d_qkv.size()[0], cos.size()[0]);
    let half = hd / 2;
    for (d, offset) in [(dq, 0), (dk, h * hd)] {
        let n = d.size()[1];
        let dy = d.view([tokens / seq, seq, n, hd]).transpose(1, 2);
        let ds = &dy * sin;
        let swapped = Tensor::cat(&[ds.narrow(-1, half, half), -ds.narrow(-1, 0, half)], -1);
        let dx = dy * cos + swapped;
        d_qkv
            .narrow(1, offset, n * hd)
            .view([tokens / seq, seq, n, hd])
            .copy_(&dx.transpose(1, 2));
    }
}

/// RMSNorm's input gradient for `dy`, its input `x (tokens, hidden)`, per-row `rstd` and
/// weight `w`, plus `residual` where given: `dx = rstd (dy w - x^ mean(dy w x^))`, `x^ = x
/// rstd`, in `rstd`'s precision. One kernel on CUDA in bf16.
fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    residual: Option<&Tensor>,
) -> Tensor {
    if let Some(dx) = cuda_kernels::rms_norm_backward(dy, x, rstd, w, residual) {
        return dx;
    }
    let acc = rstd.kind();
    let normed = x.to_kind(acc) * rstd;
    let dyw = dy.to_kind(acc) * w.to_kind(acc);
    let mean = (&dyw * &normed).mean_dim(-1, true, acc);
    let dx = ((dyw - normed * mean) * rstd).to_kind(x.kind());
    match residual {
        Some(r) => dx + r,
        None => dx,
    }
}

/// `silu(gate) * up` for `gate_up (tokens, 2 * intermediate)`: our kernel on CUDA in bf16
/// ([`cuda_kernels::swiglu`]), else libtorch's two.
fn swiglu(gate_up: &Tensor) -> Tensor {
    cuda_kernels::swiglu(gate_up).unwrap_or_else(|| {
        let (gate, up) = halves(gate_up);
        gate.silu() * up
    })
}

/// SwiGLU's gradient for `d_gated`, the gradient of its output: `d_gate_up` (d gate =
/// silu'(gate) * up * d_gated, d up = silu(gate) * d_gated) and, for `down_dh` (the down
/// projection's `scaling d_y B`, whose input is SwiGLU's output), that projection's `A`
/// gradient `down_dh^T silu(gate) * up`. On CUDA in bf16 one kernel computes both without
/// writing SwiGLU's output again ([`cuda_kernels::swiglu_backward_with_a_grad`]), or one
/// kernel and a product; elsewhere libtorch's operations.
fn swiglu_backward(
    gate_up: &Tensor,
    d_gated: &Tensor,
    down_dh: Option<&Tensor>,
) -> (Tensor, Option<Tensor>) {
    if let Some(dh) = down_dh {
        if let Some((d_gate_up, a_grad)) =
            cuda_kernels::swiglu_backward_with_a_grad(gate_up, d_gated, dh)
        {
            return (d_gate_up, Some(a_grad));
        }
    }
    let a_grad = |gated: Tensor| down_dh.map(|dh| dh.tr().mm(&gated));
    if let Some((d_gate_up, gated)) =
        cuda_kernels::swiglu_backward(gate_up, d_gated, down_dh.is_some())
    {
        return (d_gate_up, gated.and_then(a_grad));
    }
    let (gate, up) = halves(gate_up);
    let activated = gate.silu();
    let d_gate_up = gate_up.empty_like();
    let (d_gate, d_up) = halves(&d_gate_up);
    let _ = gate.silu_backward_grad_input(&d_gate, &(d_gated * &up));
    let _ = d_gated.mul_out(&d_up, &activated);
    let a_grad = down_dh.is_some().then(|| &activated * &up).and_then(a_grad);
    (d_gate_up, a_grad)
}

/// A product's input as its backward needs it (for the factors' `dA = dh^T x`): the tensor
/// itself, or an RMSNorm's output given by the norm's input, per-row `1 / rms` and weight, so
/// that the normalised rows (a `(tokens, hidden)` tensor) are not recomputed for it: `dh^T (x
/// rstd w) = ((dh rstd)^T x) w`, the row scale on the rank-sized side, the weight on the
/// `(r, in)` result.
enum ProductInput<'a> {
    Plain(&'a Tensor),
    Normed {
        x: &'a Tensor,
        rstd: &'a Tensor,
        weight: &'a Tensor,
    },
}

impl ProductInput<'_> {
    /// `d_yᵀ input` for `d_y (tokens, out)`: `(out, in)`, in f32 ([`weight_gradient`]).
    fn weight_gradient(&self, d_y: &Tensor) -> Tensor {
        match self.transposed_product(d_y, weight_gradient) {
            (product, Some(weight)) => product * weight,
            (product, None) => product,
        }
    }

    /// Adds each factor's `A` gradient `dh_iᵀ input` to `grads`, for `factors` given with their
    /// columns `col..col + r` of `dh (tokens, total r)`: straight into its gradient for a plain
    /// input of one factor, else one product for all of them, then each its block (times the
    /// norm's weight for a normed input).
    fn add_a_gradients(
        &self,
        dh: &Tensor,
        factors: &[(&Tensor, i64, i64)],
        grads: &mut FactorGrads,
    ) {
        if let (ProductInput::Plain(x), [(a, col, r)]) = (self, factors) {
            grads.add_product(a, &dh.narrow(1, *col, *r).tr(), x);
            return;
        }
        let (d_a, weight) = self.transposed_product(dh, |g, x| g.tr().mm(x));
        for (a, col, r) in factors {
            grads.add(a, &d_a.narrow(0, *col, *r), weight);
        }
    }

    /// `product(g, input)` (a `gᵀ input`), and for a normed input the norm's weight, which the
    /// caller puts on the `(rows, in)` result's columns; the norm's row scales go onto `g` (in
    /// the input's dtype).
    fn transposed_product(
        &self,
        g: &Tensor,
        product: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> (Tensor, Option<&Tensor>) {
        match self {
            ProductInput::Plain(x) => (product(g, x), None),
            ProductInput::Normed { x, rstd, weight } => {
                // One kernel for the product in fp32 (the bf16 `g` read as it is), one cast.
                let scaled = (g * rstd.reshape([-1, 1])).to_kind(x.kind());
                (product(&scaled, x), Some(*weight))
            }
        }
    }
}

/// `x · g` over all elements: a scalar whose gradient with respect to `x` is `g`.
fn dot(x: &Tensor, g: &Tensor) -> Tensor {
    x.flatten(0, -1).dot(&g.flatten(0, -1))
}
