//! A training pass's backward, run layer by layer, with the MLP's by hand.
//!
//! Autograd keeps four `(tokens, intermediate)` tensors a layer for `down(silu(gate) * up)`:
//! gate and up (one merged product), `silu(gate)` for the product's gradient, and the product
//! itself for the down projection's LoRA `A` gradient. They are a Llama layer's largest
//! activations. Here each decoder layer is its own graph, which stops at the MLP's input: the
//! norms and attention with their adapters stay autograd's, and the MLP (gate/up, SwiGLU, down,
//! and their LoRA branches) runs outside it, keeping its input, gate and up, and the branches'
//! rank-sized products. The backward recomputes `silu(gate)` and the product (two elementwise
//! kernels), works out the MLP's gradients by hand (the same products autograd would run) and
//! hands the gradient of the MLP's input to the layer's graph. Half of the MLP's activations are
//! not kept: by their sizes 7.6 GiB on TinyLlama at batch 8 x seq 2048 in bf16 (docs/trainer.md,
//! "Memory").
//!
//! The hand-written part applies where gate and up are one merged product and every adapter of
//! the MLP is a plain low-rank branch in this pass ([`LinearAdapter::low_rank`]) or absent; any
//! other keeps the whole layer autograd's ([`LayerGraph::Whole`]). Either way the next layer
//! starts from a leaf, so a layer's graph ends at its own output.

use super::{plain_branches, rms_norm, DecoderLayer, Linear, LowRank, MergedBranches};
use crate::model::cuda_kernels;
use tch::{Kind, Tensor};

/// What a layer's training forward kept for its backward.
pub(super) enum LayerGraph {
    /// The whole layer under autograd; `out` is its output.
    Whole { input: Tensor, out: Tensor },
    /// Up to the MLP's input under autograd, the MLP by hand.
    HandMlp(HandMlp),
}

pub(super) struct HandMlp {
    input: Tensor,
    /// The residual stream after attention `(batch, seq, hidden)`, a root of the layer's graph.
    attended: Tensor,
    /// Its norm, the MLP's input `(tokens, hidden)`, the graph's other root.
    mlp_in: Tensor,
    /// Gate and up side by side `(tokens, 2 * intermediate)`.
    gate_up: Tensor,
    /// Their branches' products.
    gate_up_branches: Option<MergedBranches>,
    /// The down projection's branch input times `A^T`, scaled, `(tokens, r)`.
    down_h: Option<Tensor>,
}

/// The down projection's plain branch, or `None` without an adapter; `Err` for an adapter that
/// is not a plain low-rank branch in this pass.
fn plain_branch(down: &Linear, train: bool) -> Result<Option<LowRank<'_>>, ()> {
    plain_branches(&[down], train)
        .map(|mut one| one.remove(0))
        .ok_or(())
}

/// Gate and up, the halves of their merged product.
fn halves(gate_up: &Tensor) -> (Tensor, Tensor) {
    let half = gate_up.size()[1] / 2;
    (gate_up.narrow(1, 0, half), gate_up.narrow(1, half, half))
}

impl DecoderLayer {
    /// The layer's output for `input` (a leaf: requiring grad where the layer before wants its
    /// gradient), detached, and what [`DecoderLayer::backward`] needs. The output is computed
    /// as [`DecoderLayer::forward`] computes it, op for op.
    pub(super) fn forward_for_backward(
        &self,
        input: Tensor,
        rope: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        eps: f64,
        train: bool,
    ) -> (Tensor, LayerGraph) {
        let mlp = &self.mlp;
        let gate_up_parts = [&mlp.gate_proj, &mlp.up_proj];
        let by_hand = mlp.gate_up.as_ref().filter(|_| {
            plain_branches(&gate_up_parts, train).is_some()
                && plain_branch(&mlp.down_proj, train).is_ok()
        });
        let Some(merged) = by_hand else {
            let out = self.forward(&input, rope, mask, None, eps, train);
            return (out.detach(), LayerGraph::Whole { input, out });
        };
        let normed = rms_norm(&input, &self.input_layernorm, eps);
        let attended = &input
            + self
                .self_attn
                .forward(&normed, rope.0, rope.1, mask, None, train);
        let mlp_in = rms_norm(&attended, &self.post_attention_layernorm, eps);
        let mlp_in = mlp_in.reshape([-1, mlp_in.size()[2]]);
        let down = &mlp.down_proj;
        let (out, gate_up, gate_up_branches, down_h) = tch::no_grad(|| {
            let (gate_up, branches) = merged
                .product(&gate_up_parts, &mlp_in, train)
                .expect("every branch of the group is plain");
            let gated = swiglu(&gate_up);
            // The residual joins the down product as its accumulator (one pass over the
            // output fewer than adding it after), then the branch as `add_to` does.
            let residual = attended.reshape([-1, down.out_features()]);
            let mut y = residual.addmm(&gated, &down.weight.tr());
            if let Some(bias) = &down.bias {
                y += bias;
            }
            let mut down_h = None;
            if let Ok(Some(b)) = plain_branch(down, train) {
                let h = gated.linear::<Tensor>(&b.a.to_kind(gated.kind()), None) * b.scaling;
                y = y.addmm_(&h, &b.b.to_kind(gated.kind()).tr());
                down_h = Some(h);
            }
            let out = y.view(attended.size().as_slice());
            (out, gate_up, branches, down_h)
        });
        let graph = LayerGraph::HandMlp(HandMlp {
            input,
            attended,
            mlp_in,
            gate_up,
            gate_up_branches,
            down_h,
        });
        (out, graph)
    }

    /// Accumulates the gradients of the layer's adapters for `grad`, the gradient of its
    /// output, and returns the gradient of its input (undefined where the input wanted none).
    pub(super) fn backward(&self, graph: LayerGraph, grad: &Tensor, train: bool) -> Tensor {
        let (input, surrogate) = match graph {
            LayerGraph::Whole { input, out } => (input, Some(dot(&out, grad))),
            LayerGraph::HandMlp(kept) => {
                let surrogate = self.mlp_surrogate(&kept, grad, train);
                (kept.input, surrogate)
            }
        };
        if let Some(surrogate) = surrogate.filter(Tensor::requires_grad) {
            surrogate.backward();
        }
        input.grad()
    }

    /// A scalar whose backward gives the layer's graph and the MLP's factors their gradients:
    /// the dot products of the graph's roots with their gradients, the MLP input's worked out
    /// here, and of each factor with its gradient. `None` where nothing wants a gradient.
    fn mlp_surrogate(&self, kept: &HandMlp, grad: &Tensor, train: bool) -> Option<Tensor> {
        let mlp = &self.mlp;
        let merged = mlp
            .gate_up
            .as_ref()
            .expect("an MLP by hand has gate/up merged");
        let g = grad.reshape([-1, grad.size()[2]]);
        let (d_mlp_in, factor_grads) = tch::no_grad(|| {
            let mut factor_grads: Vec<(Tensor, Tensor)> = Vec::new();
            // The down projection, y = gated W^T (+ h B^T, h = scaling * gated A^T):
            // d(gated) = g W (+ scaling * (g B) A), dB = g^T h, dA = scaling * (g B)^T gated.
            let mut d_gated = g.mm(&mlp.down_proj.weight);
            let mut down_a = None;
            if let (Ok(Some(b)), Some(h)) = (plain_branch(&mlp.down_proj, train), &kept.down_h) {
                let kind = g.kind();
                let dh = g.mm(&b.b.to_kind(kind)) * b.scaling;
                factor_grads.push((b.b.shallow_clone(), h.tr().mm(&g).tr()));
                d_gated = d_gated.addmm_(&dh, &b.a.to_kind(kind));
                down_a = Some((b.a.shallow_clone(), dh));
            }
            // SwiGLU's gradient, and the product again where the down branch's A needs it.
            let (d_gate_up, gated) = swiglu_backward(&kept.gate_up, &d_gated, down_a.is_some());
            if let (Some((a, dh)), Some(gated)) = (down_a, gated) {
                factor_grads.push((a, dh.tr().mm(&gated)));
            }
            // Gate and up, y = x W^T (+ h b^T, h = x a^T): d x = d_y W (+ (d_y b) a),
            // d b = d_y^T h, d a = (d_y b)^T x; each part's A and B are blocks of a and b.
            let mut d_x = d_gate_up.mm(&merged.weight);
            if let Some(MergedBranches { h, a, b }) = &kept.gate_up_branches {
                let dh = d_gate_up.mm(b);
                let d_a = dh.tr().mm(&kept.mlp_in);
                let d_b = h.tr().mm(&d_gate_up).tr();
                d_x = d_x.addmm_(&dh, a);
                let parts = plain_branches(&[&mlp.gate_proj, &mlp.up_proj], train)
                    .expect("an MLP by hand has plain branches");
                let (mut row, mut col) = (0, 0);
                for (part, branch) in [&mlp.gate_proj, &mlp.up_proj].iter().zip(parts) {
                    let out = part.out_features();
                    if let Some(branch) = branch {
                        let r = branch.a.size()[0];
                        let d_block = d_b.narrow(0, row, out).narrow(1, col, r);
                        factor_grads.push((branch.a.shallow_clone(), d_a.narrow(0, col, r)));
                        factor_grads.push((
                            branch.b.shallow_clone(),
                            d_block.to_kind(branch.b.kind()) * branch.scaling,
                        ));
                        col += r;
                    }
                    row += out;
                }
            }
            (d_x, factor_grads)
        });
        let mut terms: Vec<Tensor> = [(&kept.attended, &g), (&kept.mlp_in, &d_mlp_in)]
            .into_iter()
            .filter(|(root, _)| root.requires_grad())
            .map(|(root, grad)| dot(root, grad).to_kind(Kind::Float))
            .collect();
        terms.extend(
            factor_grads
                .iter()
                .filter(|(factor, _)| factor.requires_grad())
                .map(|(factor, d)| (factor * d.to_kind(factor.kind())).sum(Kind::Float)),
        );
        (!terms.is_empty()).then(|| Tensor::stack(&terms, 0).sum(Kind::Float))
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
/// silu'(gate) * up * d_gated, d up = silu(gate) * d_gated) and, with `want_gated`, the
/// forward's output recomputed; one kernel on CUDA in bf16, else libtorch's.
fn swiglu_backward(
    gate_up: &Tensor,
    d_gated: &Tensor,
    want_gated: bool,
) -> (Tensor, Option<Tensor>) {
    if let Some(fused) = cuda_kernels::swiglu_backward(gate_up, d_gated, want_gated) {
        return fused;
    }
    let (gate, up) = halves(gate_up);
    let activated = gate.silu();
    let gated = want_gated.then(|| &activated * &up);
    let d_gate_up = gate_up.empty_like();
    let (d_gate, d_up) = halves(&d_gate_up);
    let _ = gate.silu_backward_grad_input(&d_gate, &(d_gated * &up));
    let _ = d_gated.mul_out(&d_up, &activated);
    (d_gate_up, gated)
}

/// `x · g` over all elements: a scalar whose gradient with respect to `x` is `g`.
fn dot(x: &Tensor, g: &Tensor) -> Tensor {
    x.flatten(0, -1).dot(&g.flatten(0, -1))
}
