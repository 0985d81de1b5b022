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
//! attention's backward, the one piece left to autograd, on its own small graph), the residual
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
    apply_rotary, attend, branch_then_frozen, plain_branches, rms_norm, rms_norm_with_rstd,
    weight_gradient, Backward, DecoderLayer, DeltaGradientSink, Linear, LowRank, Merged,
    MergedBranches,
};
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
    /// q's, k's and v's branches, and their merged product's.
    qkv: Vec<Option<LowRank>>,
    qkv_product: Option<MergedBranches>,
    /// RoPE's tables `(seq, head_dim)` and the heads.
    rope: (Tensor, Tensor),
    heads: Heads,
    attention: AttentionGraph,
    /// The o projection's branch, and its input times `A^T`, scaled.
    o: Option<(LowRank, Tensor)>,
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
    /// Gate's and up's branches, and their merged product's.
    gate_up_branches: Vec<Option<LowRank>>,
    gate_up_product: Option<MergedBranches>,
    /// The down projection's branch, and its input times `A^T`, scaled, `(tokens, r)`.
    down: Option<(LowRank, Tensor)>,
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
        let (gate_up, gate_up_product) = merged.product_of(&parts, &branches.merged, mlp_in);
        let gated = swiglu(&gate_up);
        let down = branches.last;
        let (y, down_h) = plain_forward(&mlp.down_proj, down.as_ref(), &gated, residual);
        let kept = MlpKept {
            gate_up,
            gate_up_branches: branches.merged,
            gate_up_product,
            down: down.zip(down_h),
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
            let (qkv, product) = merged.product_of(&qkv_parts, &attention_branches.merged, &normed);
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
        let (layer_out, o_h, attended, rstd2, mlp) = tch::no_grad(|| {
            let (attended, o_h) = plain_forward(&attn.o_proj, o.as_ref(), &flat, &x);
            let (mlp_in, rstd2) =
                rms_norm_with_rstd(&attended, &self.post_attention_layernorm, eps);
            let (y, mlp) = self.mlp_forward(&mlp_in, &attended, mlp_branches);
            (y, o_h, attended, rstd2, mlp)
        });
        timeline::mark("fwd: o, norm, mlp");
        let kept = HandLayer {
            input: x,
            wants_input_grad,
            shape: shape.clone(),
            rstd1,
            qkv: attention_branches.merged,
            qkv_product,
            rope: (cos.shallow_clone(), sin.shallow_clone()),
            heads,
            attention: AttentionGraph { q, k, v, out, flat },
            o: o.zip(o_h),
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
            LayerGraph::Whole { input, out } => (input, Some(dot(&out, grad))),
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
        let mut grads = Vec::new();
        let mlp_in = ProductInput::Plain(&kept.mlp_in);
        let d_mlp_in = tch::no_grad(|| self.mlp_backward(&kept.mlp, mlp_in, &g, &mut grads));
        let mut terms: Vec<Tensor> = [(&kept.attended, &g), (&kept.mlp_in, &d_mlp_in)]
            .into_iter()
            .filter(|(root, _)| root.requires_grad())
            .map(|(root, grad)| dot(root, grad).to_kind(Kind::Float))
            .collect();
        terms.extend(accumulate(grads));
        (!terms.is_empty()).then(|| Tensor::stack(&terms, 0).sum(Kind::Float))
    }

    /// The MLP's backward for `g`, the gradient of its output `(tokens, hidden)`, and `mlp_in`,
    /// its input: the input's gradient, the factors' gradients pushed onto `grads`.
    fn mlp_backward(
        &self,
        kept: &MlpKept,
        mlp_in: ProductInput,
        g: &Tensor,
        grads: &mut Vec<(Tensor, Tensor)>,
    ) -> Tensor {
        let mlp = &self.mlp;
        let down = &mlp.down_proj;
        // The down projection's input is SwiGLU's output, not kept: its `A` gradient comes
        // out of SwiGLU's backward.
        let (d_gated, down_a) = plain_backward(down, kept.down.as_ref(), g, grads);
        if let Some(sink) = down_a.as_ref().and_then(|a| a.delta_gradient) {
            sink(weight_gradient(g, &swiglu(&kept.gate_up)));
        }
        let dh = down_a.as_ref().map(|a| &a.dh);
        let (d_gate_up, a_grad) = swiglu_backward(&kept.gate_up, &d_gated, dh);
        if let (Some(down_a), Some(a_grad)) = (down_a, a_grad) {
            grads.push((down_a.a, a_grad));
        }
        let merged = mlp
            .gate_up
            .as_ref()
            .expect("an MLP by hand has gate/up merged");
        let parts = [&mlp.gate_proj, &mlp.up_proj];
        let branches = (&kept.gate_up_branches[..], kept.gate_up_product.as_ref());
        merged_backward(merged, &parts, branches, &d_gate_up, mlp_in, grads, true)
            .expect("asked for")
    }

    /// The layer by hand's backward ([`LayerGraph::Hand`]).
    fn backward_by_hand(&self, kept: HandLayer, grad: &Tensor) -> Tensor {
        let attn = &self.self_attn;
        let (h, kvh, hd) = kept.heads;
        let tokens = kept.input.size()[0];
        let mut grads = Vec::new();
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
            let (d_flat, o_a) = plain_backward(o, kept.o.as_ref(), &d_attended, &mut grads);
            if let Some(o_a) = o_a {
                let flat = &kept.attention.flat;
                if let Some(sink) = o_a.delta_gradient {
                    sink(weight_gradient(&d_attended, flat));
                }
                grads.push((o_a.a, o_a.dh.tr().mm(flat)));
            }
            (d_attended, d_flat)
        });
        timeline::mark("bwd: mlp, norm, o");
        let AttentionGraph { q, k, v, out, flat } = kept.attention;
        drop(flat);
        dot(&out.transpose(1, 2), &d_flat).backward();
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
            let branches = (&kept.qkv[..], kept.qkv_product.as_ref());
            let wants = kept.wants_input_grad;
            let d_normed =
                merged_backward(merged, &parts, branches, &d_qkv, normed, &mut grads, wants);
            d_normed.map(|d| {
                let (w1, rstd1) = (&self.input_layernorm, &kept.rstd1);
                rms_norm_backward(&d, &kept.input, rstd1, w1, Some(&d_attended))
                    .view(kept.shape.as_slice())
            })
        });
        timeline::mark("bwd: rope, qkv, norm");
        if let Some(surrogate) = accumulate(grads) {
            surrogate.backward();
        }
        d_input.unwrap_or_else(Tensor::new)
    }
}

/// `y = x W^T (+ bias) + residual`, plus the projection's plain branch as its `add_to` adds it,
/// for `x (tokens, in)`, and the branch's `h = scaling x A^T`, which its `B` gradient needs.
/// The branch goes into the product before the residual does, as autograd's path adds them:
/// in bf16 a fresh adapter's share of the output is far below the residual stream's last
/// bit, and added after the residual it would be rounded away every time (no dither from the
/// product's own rounding), so early updates would not reach the loss (bench/gpu.md, third
/// round, "What was wrong").
fn plain_forward(
    linear: &Linear,
    branch: Option<&LowRank>,
    x: &Tensor,
    residual: &Tensor,
) -> (Tensor, Option<Tensor>) {
    let (bias, weight) = (linear.bias.as_ref(), &linear.weight);
    let (mut y, kept) = match branch {
        Some(b) => {
            let h = x.linear::<Tensor>(&b.a.to_kind(x.kind()), None) * b.scaling;
            let branch = h.mm(&b.b.to_kind(x.kind()).tr());
            (branch_then_frozen(branch, x, weight, bias), Some(h))
        }
        _ => (x.linear(weight, bias), None),
    };
    y += residual;
    (y, kept)
}

/// What [`plain_backward`] leaves to its caller, which has the projection's input `x`: to push
/// `dA = dhᵀ x` for the branch's `a`, and to hand `d_yᵀ x` to its sink, if any.
struct BranchInputGrads<'a> {
    a: Tensor,
    /// `scaling d_y B`, `(tokens, r)`.
    dh: Tensor,
    delta_gradient: Option<&'a DeltaGradientSink>,
}

/// [`plain_forward`]'s backward for `d_y`, given its branch and `h`: `d x = d_y W (+ (scaling
/// d_y B) A)`, `dB = d_y^T h` pushed onto `grads`, and what needs `x` ([`BranchInputGrads`]).
fn plain_backward<'a>(
    linear: &Linear,
    branch: Option<&'a (LowRank, Tensor)>,
    d_y: &Tensor,
    grads: &mut Vec<(Tensor, Tensor)>,
) -> (Tensor, Option<BranchInputGrads<'a>>) {
    let Some((b, h)) = branch else {
        return (d_y.mm(&linear.weight), None);
    };
    let kind = d_y.kind();
    let dh = d_y.mm(&b.b.to_kind(kind)) * b.scaling;
    grads.push((b.b.shallow_clone(), h.tr().mm(d_y).tr()));
    let d_x = frozen_input_grad(dh.mm(&b.a.to_kind(kind)), d_y, &linear.weight);
    let rest = BranchInputGrads {
        a: b.a.shallow_clone(),
        dh,
        delta_gradient: b.delta_gradient.as_ref(),
    };
    (d_x, Some(rest))
}

/// `branch + d_y W`: the frozen weight's input gradient accumulated onto the branch's share
/// `branch (tokens, in)` in place, as [`branch_then_frozen`] does forward.
fn frozen_input_grad(branch: Tensor, d_y: &Tensor, weight: &Tensor) -> Tensor {
    let mut d_x = branch;
    d_x.addmm_(d_y, weight)
}

/// A merged product's backward ([`Merged::product_of`], its parts' branches and what it
/// returned) for `d_y (tokens, sum of out_i)` and its input `x`: `d x = d_y W (+ (d_y b) a)`
/// where `want_dx`, and every part's factor gradients
/// pushed onto `grads` (`d b = d_y^T h`, `d a = (d_y b)^T x`, each part's `A` and `B` blocks of
/// `a` and `b`); a part's `d_yᵀ x` to its sink where it has one.
fn merged_backward(
    merged: &Merged,
    parts: &[&Linear],
    (factors, product): (&[Option<LowRank>], Option<&MergedBranches>),
    d_y: &Tensor,
    x: ProductInput,
    grads: &mut Vec<(Tensor, Tensor)>,
    want_dx: bool,
) -> Option<Tensor> {
    let Some(MergedBranches { h, a, b }) = product else {
        return want_dx.then(|| d_y.mm(&merged.weight));
    };
    let dh = d_y.mm(b);
    let d_a = x.left_product(&dh);
    let d_b = h.tr().mm(d_y).tr();
    let d_x = want_dx.then(|| frozen_input_grad(dh.mm(a), d_y, &merged.weight));
    let (mut row, mut col) = (0, 0);
    for (part, branch) in parts.iter().zip(factors) {
        let out = part.out_features();
        if let Some(branch) = branch {
            if let Some(sink) = &branch.delta_gradient {
                sink(x.weight_gradient(&d_y.narrow(1, row, out)));
            }
            let r = branch.a.size()[0];
            let d_block = d_b.narrow(0, row, out).narrow(1, col, r);
            grads.push((branch.a.shallow_clone(), d_a.narrow(0, col, r)));
            // Scaled in the gradient's dtype, added to the factor's own by `accumulate`.
            grads.push((branch.b.shallow_clone(), d_block * branch.scaling));
            col += r;
        }
        row += out;
    }
    d_x
}

/// Adds each factor's gradient into its `.grad` where it has one (after the first step, the
/// optimizer's flat buffer), without autograd; for a factor that has none yet, or that is
/// derived from the adapter's parameters ([`LowRank::derived`]: not a leaf), a term whose
/// backward creates or reaches it (its dot product with the gradient), returned for the
/// caller to run.
fn accumulate(grads: Vec<(Tensor, Tensor)>) -> Option<Tensor> {
    let mut terms = Vec::new();
    for (factor, d) in grads {
        if !factor.requires_grad() {
            continue;
        }
        let existing = match factor.is_leaf() {
            true => factor.grad(),
            false => Tensor::new(),
        };
        if existing.defined() {
            // One kernel: the add reads `d` in its own dtype (bf16 on CUDA) into fp32.
            tch::no_grad(|| {
                let mut existing = existing;
                existing += d;
            });
        } else {
            terms.push(tch::with_grad(|| {
                (&factor * d.to_kind(factor.kind())).sum(Kind::Float)
            }));
        }
    }
    (!terms.is_empty()).then(|| Tensor::stack(&terms, 0).sum(Kind::Float))
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
    /// `dh^T input` for `dh (tokens, r)`: `(r, in)`, in the input's dtype.
    fn left_product(&self, dh: &Tensor) -> Tensor {
        self.transposed_product(dh, |g, x| g.tr().mm(x))
    }

    /// `d_yᵀ input` for `d_y (tokens, out)`: `(out, in)`, in f32 ([`weight_gradient`]).
    fn weight_gradient(&self, d_y: &Tensor) -> Tensor {
        self.transposed_product(d_y, weight_gradient)
    }

    /// `product(g, input)` (a `gᵀ input`): for a normed input, the norm's row scales go onto
    /// `g` (in the input's dtype) and its weight onto the `(rows, in)` result.
    fn transposed_product(
        &self,
        g: &Tensor,
        product: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> Tensor {
        match self {
            ProductInput::Plain(x) => product(g, x),
            ProductInput::Normed { x, rstd, weight } => {
                let scaled = (g.to_kind(rstd.kind()) * rstd.reshape([-1, 1])).to_kind(x.kind());
                product(&scaled, x) * *weight
            }
        }
    }
}

/// `x · g` over all elements: a scalar whose gradient with respect to `x` is `g`.
fn dot(x: &Tensor, g: &Tensor) -> Tensor {
    x.flatten(0, -1).dot(&g.flatten(0, -1))
}
