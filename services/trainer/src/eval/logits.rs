//! `loraforge-trainer logits`: a model's logits for given tokens, with a PEFT adapter where
//! one is given, in fp32 whatever the base dtype. The parity tests compare them with
//! transformers' and PEFT's.

use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::model::{LlamaModel, ModelConfig};
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Logits `[tokens][vocab]` of the model in `model_dir` (with the adapter in `adapter`) for
/// one sequence of token ids.
pub fn logits(
    model_dir: &Path,
    adapter: Option<&Path>,
    tokens: &[i64],
    device: Device,
) -> Result<Vec<Vec<f32>>> {
    let config = ModelConfig::load(model_dir)?;
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= config.vocab_size) {
        return Err(user_error(format!(
            "token {bad} is outside the vocabulary (size {})",
            config.vocab_size
        )));
    }
    let mut model = LlamaModel::load(model_dir, config, device)?;
    if let Some(dir) = adapter {
        crate::families::attach_frozen(&mut model, &PeftAdapter::load(dir)?, device)?;
    }
    let input = Tensor::from_slice(tokens).unsqueeze(0).to_device(device);
    let logits = tch::no_grad(|| model.forward(&input, false));
    let logits = logits
        .squeeze_dim(0)
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    Ok(Vec::<Vec<f32>>::try_from(&logits)?)
}
