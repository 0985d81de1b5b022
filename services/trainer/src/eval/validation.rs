//! The validation loss: mean cross-entropy per target token, without dropout. The training
//! loop reports it every `eval_every` steps and at the end; the safety evaluation's perplexity
//! is its exponential.

use crate::data::{Batch, ExampleSet};
use crate::model::lm_loss::{chunk_rows, summed_cross_entropy};
use crate::model::LlamaModel;
use anyhow::Result;
use tch::{Device, Tensor};

/// Cross-entropy summed over a batch's target tokens (fp32 softmax), the logits computed a
/// chunk at a time ([`crate::model::lm_loss`]). `hidden (batch, seq, dim)` are the final hidden
/// states of a [`LlamaModel::training_pass`] or [`LlamaModel::final_hidden`].
pub fn summed_loss_of(model: &LlamaModel, hidden: &Tensor, labels: &Tensor) -> Tensor {
    let head = model.lm_head();
    let dim = head.size()[1];
    summed_cross_entropy(
        &hidden.reshape([-1, dim]),
        head,
        &labels.reshape([-1]),
        chunk_rows(head.size()[0]),
    )
}

/// [`summed_loss_of`] a batch.
pub fn summed_loss(model: &LlamaModel, batch: &Batch, train: bool) -> Tensor {
    let hidden = model.final_hidden(&batch.input_ids, train);
    summed_loss_of(model, &hidden, &batch.labels)
}

/// Mean loss per target token over the validation examples (no dropout), and how many
/// target tokens that is. The safety evaluation's perplexity is this loss, exponentiated.
pub fn validation_loss(
    model: &LlamaModel,
    examples: &ExampleSet,
    seq_len: usize,
    batch_size: usize,
    pad_id: i64,
    device: Device,
) -> Result<(f64, u64)> {
    let (mut loss_sum, mut targets) = (0.0, 0u64);
    let positions: Vec<usize> = (0..examples.len()).collect();
    for chunk in positions.chunks(batch_size) {
        let rows = chunk
            .iter()
            .map(|&p| examples.row(p, seq_len))
            .collect::<Result<Vec<_>>>()?;
        let batch = Batch::from_rows(&rows, pad_id, device);
        loss_sum += tch::no_grad(|| summed_loss(model, &batch, false)).double_value(&[]);
        targets += batch.targets;
    }
    Ok((loss_sum / targets.max(1) as f64, targets))
}
