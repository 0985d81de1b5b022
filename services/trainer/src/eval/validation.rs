//! The validation loss: mean cross-entropy per target token, without dropout. The training
//! loop reports it every `eval_every` steps and at the end; the safety evaluation's perplexity
//! is its exponential.

use crate::data::{Batch, ExampleSet, IGNORE_INDEX};
use crate::model::LlamaModel;
use anyhow::Result;
use tch::{Device, Kind, Reduction, Tensor};

/// Cross-entropy summed over a batch's target tokens (fp32 logits).
pub fn summed_loss(model: &LlamaModel, batch: &Batch, vocab_size: i64, train: bool) -> Tensor {
    let logits = model.forward(&batch.input_ids, train).to_kind(Kind::Float);
    logits.view([-1, vocab_size]).cross_entropy_loss::<Tensor>(
        &batch.labels.view([-1]),
        None,
        Reduction::Sum,
        IGNORE_INDEX,
        0.0,
    )
}

/// Mean loss per target token over the validation examples (no dropout), and how many
/// target tokens that is. The safety evaluation's perplexity is this loss, exponentiated.
pub fn validation_loss(
    model: &LlamaModel,
    examples: &ExampleSet,
    seq_len: usize,
    batch_size: usize,
    pad_id: i64,
    vocab_size: i64,
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
        loss_sum +=
            tch::no_grad(|| summed_loss(model, &batch, vocab_size, false)).double_value(&[]);
        targets += batch.targets;
    }
    Ok((loss_sum / targets.max(1) as f64, targets))
}
