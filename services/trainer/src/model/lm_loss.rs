//! The language-model loss without the logits: the output projection and the cross-entropy
//! fused, a chunk of tokens at a time, so the full `(tokens, vocab)` logits never exist. On
//! Llama-3's 128k vocabulary they are the largest tensor of a step (batch 2 x seq 2048: 1 GiB
//! in bf16 plus 2 GiB in fp32, kept for the backward pass); here one chunk of at most
//! [`CHUNK_ELEMENTS`] logits lives at a time.
//!
//! libtorch has no custom autograd functions through `tch`, so the gradient is written by
//! hand and handed to autograd through a surrogate: while the loss is computed, each chunk
//! also computes `d loss / d hidden = (softmax(logits) - onehot(label)) W` (rows without a
//! label contribute nothing), and the returned loss is `value + (h . G - stop_grad(h . G))`:
//! its value is the loss, and its gradient with respect to `h` is `G` times whatever scales
//! the loss afterwards (the mean over target tokens, gradient accumulation). The output
//! projection is frozen, so it needs no gradient. Only the labelled rows are projected at all:
//! prompt tokens of a chat dataset cost nothing here.

use crate::data::IGNORE_INDEX;
use crate::model::cuda_kernels;
use tch::{Kind, Tensor};

/// Logits computed at a time: at most 64 Mi elements (256 MiB in fp32), e.g. 2,048 tokens of a
/// 32k vocabulary or 512 of Llama-3's 128k, each chunk still a large matrix product.
pub const CHUNK_ELEMENTS: i64 = 1 << 26;

/// Chunks are a multiple of this many tokens where they can be: the matrix products tile their
/// rows by 128 (or 256), so 523 rows would run as 640 (on Llama-3-8B's shape, about a fifth of
/// the output projection's time wasted).
const CHUNK_ALIGN: i64 = 256;

/// Cross-entropy summed over the labelled tokens of `hidden (tokens, dim)` projected by
/// `weight (vocab, dim)` with `labels (tokens)` ([`IGNORE_INDEX`] where there is none), in
/// chunks of `chunk_rows` tokens. The logits are computed in `hidden`'s dtype and the
/// softmax in fp32 (fp64 for fp64 inputs), as `logits.to_kind(Float).cross_entropy` would.
/// Differentiable with respect to `hidden` when it requires a gradient.
pub fn summed_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_rows: i64,
) -> Tensor {
    let acc = match hidden.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    let device = hidden.device();
    let labelled = labels.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
    let rows = labelled.size()[0];
    let hidden = hidden.index_select(0, &labelled);
    let labels = labels.index_select(0, &labelled);
    let with_grad = hidden.requires_grad();
    let detached = hidden.detach();
    let mut total = Tensor::zeros([], (acc, device));
    // The gradient with respect to the labelled rows, in the accumulation dtype: scaled by
    // the loss's later factor (1 / targets) before it is rounded to the base dtype.
    let grad = with_grad.then(|| Tensor::empty([rows, detached.size()[1]], (acc, device)));
    tch::no_grad(|| {
        let mut start = 0;
        while start < rows {
            let n = chunk_rows.max(1).min(rows - start);
            let h = detached.narrow(0, start, n);
            let targets = labels.narrow(0, start, n);
            let logits = h.linear::<Tensor>(weight, None);
            // On CUDA in bf16, two kernels of our own (model/cuda_kernels.rs) compute what the
            // fp32 path below does, the gradient written over the logits.
            if let Some(row_loss) = cuda_kernels::cross_entropy(&logits, &targets, grad.is_some()) {
                total += row_loss.sum(acc);
                if let Some(grad) = &grad {
                    grad.narrow(0, start, n).copy_(&logits.mm(weight));
                }
                start += n;
                continue;
            }
            let (logits, targets) = (logits.to_kind(acc), targets.unsqueeze(1));
            let lse = logits.logsumexp([-1], true);
            let picked = logits.gather(1, &targets, false);
            total += (&lse - picked).sum(acc);
            if let Some(grad) = &grad {
                // softmax - onehot, computed in the logits' own memory.
                let mut d = logits;
                let _ = d.g_sub_(&lse).exp_();
                let minus_one = Tensor::full([n, 1], -1.0, (acc, device));
                let _ = d.scatter_add_(1, &targets, &minus_one);
                // Rounded to the base dtype before the product, as autograd does through
                // `to_kind`; the product then runs in the base dtype (bf16 on CUDA).
                let g = d.to_kind(h.kind()).mm(weight);
                grad.narrow(0, start, n).copy_(&g);
            }
            start += n;
        }
    });
    match grad {
        None => total,
        Some(grad) => {
            let surrogate = hidden.to_kind(acc).flatten(0, -1).dot(&grad.flatten(0, -1));
            total + (&surrogate - surrogate.detach())
        }
    }
}

/// The chunk for [`summed_cross_entropy`] over a vocabulary of `vocab` tokens.
pub fn chunk_rows(vocab: i64) -> i64 {
    let rows = CHUNK_ELEMENTS / vocab.max(1);
    match rows >= CHUNK_ALIGN {
        true => rows / CHUNK_ALIGN * CHUNK_ALIGN,
        false => rows.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Reduction};

    /// Hidden states, an output projection and labels (some ignored) in fp64.
    fn case() -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(7);
        let opts = (Kind::Double, Device::Cpu);
        let hidden = Tensor::randn([23, 8], opts);
        let weight = Tensor::randn([11, 8], opts);
        let labels = Tensor::randint(11, [23], (Kind::Int64, Device::Cpu));
        let _ = labels.narrow(0, 0, 4).fill_(IGNORE_INDEX);
        let _ = labels.narrow(0, 15, 2).fill_(IGNORE_INDEX);
        (hidden, weight, labels)
    }

    /// What the loss was before it was fused: full logits, libtorch's cross-entropy.
    fn reference(hidden: &Tensor, weight: &Tensor, labels: &Tensor) -> Tensor {
        hidden
            .linear::<Tensor>(weight, None)
            .cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, IGNORE_INDEX, 0.0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn the_chunked_loss_is_the_cross_entropy_of_the_full_logits() {
        let (hidden, weight, labels) = case();
        let expected = reference(&hidden, &weight, &labels);
        for chunk in [1, 3, 5, 100] {
            let loss = summed_cross_entropy(&hidden, &weight, &labels, chunk);
            assert!(max_diff(&loss, &expected) < 1e-10, "chunk {chunk}");
        }
        // No labelled token: nothing to learn from, a loss of zero.
        let none = Tensor::full([23], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        let loss = summed_cross_entropy(&hidden, &weight, &none, 4);
        assert_eq!(loss.double_value(&[]), 0.0);
    }

    #[test]
    fn the_hand_written_gradient_is_autograds() {
        let (hidden, weight, labels) = case();
        // Scaled afterwards, as the training step divides by its target tokens.
        let grad_of = |f: &dyn Fn(&Tensor) -> Tensor| {
            let h = hidden.detach().set_requires_grad(true);
            (f(&h) / 17.0).backward();
            h.grad()
        };
        let expected = grad_of(&|h| reference(h, &weight, &labels));
        for chunk in [1, 4, 100] {
            let got = grad_of(&|h| summed_cross_entropy(h, &weight, &labels, chunk));
            assert!(
                max_diff(&got, &expected) < 1e-10,
                "chunk {chunk}: {}",
                max_diff(&got, &expected)
            );
        }
        // The ignored rows get no gradient.
        assert_eq!(
            expected
                .narrow(0, 0, 4)
                .abs()
                .sum(Kind::Double)
                .double_value(&[]),
            0.0
        );
    }

    #[test]
    fn chunks_hold_a_bounded_number_of_logits() {
        assert_eq!(chunk_rows(32_000), 2048);
        assert_eq!(chunk_rows(128_256), 512);
        assert_eq!(chunk_rows(1 << 19), 128);
        assert_eq!(chunk_rows(1 << 30), 1);
        for vocab in [8_192, 32_000, 49_152, 128_256, 151_936] {
            assert!(chunk_rows(vocab) * vocab <= CHUNK_ELEMENTS);
        }
    }
}
