//! How far an adapter moves the model on ordinary text: KL(base || adapted) of the next-token
//! distributions at every position of the benign prompts, and perplexity. A safety fine-tune
//! that also wrecks the model's everyday behaviour shows here, as does a "benign" adapter that
//! changes far more than its data suggests.

use crate::model::LlamaModel;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// Next-token log-probabilities of prompts under one model, and their negative log-likelihood.
pub struct PromptScores {
    /// Per prompt, `(len, vocab)` fp32 log-probabilities on the CPU (kept for the KL against
    /// the other model; the benign set is small, so this stays in the tens of megabytes).
    log_probs: Vec<Tensor>,
    nll_sum: f64,
    /// Tokens predicted (every token after a prompt's first).
    predicted: u64,
}

impl PromptScores {
    /// The per-prompt log-probabilities, the NLL sum and the count of predicted tokens (what a
    /// stored base side keeps).
    pub fn parts(&self) -> (&[Tensor], f64, u64) {
        (&self.log_probs, self.nll_sum, self.predicted)
    }

    pub fn from_parts(log_probs: Vec<Tensor>, nll_sum: f64, predicted: u64) -> PromptScores {
        PromptScores {
            log_probs,
            nll_sum,
            predicted,
        }
    }

    /// Perplexity of the prompts' own tokens.
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.predicted.max(1) as f64).exp()
    }
}

/// Scores `prompts` (token ids), `batch_size` at a time, right-padded: causal attention never
/// lets a real token see the padding after it, so padding changes nothing.
pub fn score_prompts(
    model: &LlamaModel,
    prompts: &[Vec<i64>],
    pad_id: i64,
    batch_size: usize,
    device: Device,
) -> Result<PromptScores> {
    let mut scores = PromptScores {
        log_probs: Vec::with_capacity(prompts.len()),
        nll_sum: 0.0,
        predicted: 0,
    };
    for chunk in prompts.chunks(batch_size.max(1)) {
        let width = chunk.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![pad_id; chunk.len() * width];
        for (row, prompt) in chunk.iter().enumerate() {
            ids[row * width..row * width + prompt.len()].copy_from_slice(prompt);
        }
        let input = Tensor::from_slice(&ids)
            .view([chunk.len() as i64, width as i64])
            .to_device(device);
        let log_probs = tch::no_grad(|| {
            model
                .forward(&input, false)
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float)
        })
        .to_device(Device::Cpu);
        for (row, prompt) in chunk.iter().enumerate() {
            let len = prompt.len() as i64;
            let own = log_probs.get(row as i64).narrow(0, 0, len);
            if len > 1 {
                let next = Tensor::from_slice(&prompt[1..]).unsqueeze(1);
                let picked = own.narrow(0, 0, len - 1).gather(1, &next, false);
                scores.nll_sum -= picked.sum(Kind::Double).double_value(&[]);
                scores.predicted += (len - 1) as u64;
            }
            scores.log_probs.push(own);
        }
    }
    Ok(scores)
}

/// Mean over all positions of KL(base || adapted) = Σ p_base (log p_base − log p_adapted).
pub fn mean_kl(base: &PromptScores, adapted: &PromptScores) -> f64 {
    let (mut sum, mut positions) = (0.0, 0i64);
    for (b, a) in base.log_probs.iter().zip(&adapted.log_probs) {
        let kl = (b.exp() * (b - a)).sum_dim_intlist([-1i64].as_slice(), false, Kind::Double);
        sum += kl.sum(Kind::Double).double_value(&[]);
        positions += kl.size()[0];
    }
    // Rounding can leave a hair below zero for identical models.
    (sum / positions.max(1) as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(logits: &[[f32; 3]]) -> PromptScores {
        let t = Tensor::from_slice(logits.as_flattened()).view([logits.len() as i64, 3]);
        PromptScores {
            log_probs: vec![t.log_softmax(-1, Kind::Float)],
            nll_sum: 0.0,
            predicted: 0,
        }
    }

    #[test]
    fn kl_is_zero_for_the_same_model_and_matches_the_formula() {
        let base = scores(&[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]);
        assert!(mean_kl(&base, &scores(&[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])) < 1e-9);
        let adapted = scores(&[
            [1.0, 2.0, 3.0],
            [(0.5f32).ln(), (0.25f32).ln(), (0.25f32).ln()],
        ]);
        // Position 2: uniform vs (1/2, 1/4, 1/4): (1/3)(ln(2/3) + 2 ln(4/3)).
        let expected = ((2.0f64 / 3.0).ln() + 2.0 * (4.0f64 / 3.0).ln()) / 3.0 / 2.0;
        assert!((mean_kl(&base, &adapted) - expected).abs() < 1e-6);
    }
}
